"""Zip archives written byte by byte, and TorchServe's own extractor to unpack them.

`RawZip` writes honest local headers, data and central records unless a test tells one field
to lie, so each hostile archive differs from a canonical one in exactly the construct under
test. `TorchServeExtractor` compiles a ten-line Java class against the installed
`model-server.jar` and calls `org.pytorch.serve.archive.utils.ZipUtils.unzip`, the method
TorchServe's `ModelArchive` unpacks every MAR with.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ts

STORED, DEFLATED = 0, 8
MAGIC32 = 0xFFFFFFFF


def deflate(data: bytes) -> bytes:
    """A raw deflate stream, as zip members carry it."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def local_header(name: bytes, method: int, flags: int, crc32: int, csize: int, size: int,
                 extra: bytes = b"") -> bytes:
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, flags, method, 0, 0x21,
                       crc32, csize, size, len(name), len(extra)) + name + extra


def local_entry(name: str, data: bytes, method: int = DEFLATED) -> bytes:
    """A complete, honest local entry (header + data), as a hidden payload."""
    payload = deflate(data) if method == DEFLATED else data
    return local_header(name.encode(), method, 0, crc(data), len(payload), len(data)) + payload


def zip64_extra(*values: int) -> bytes:
    return struct.pack("<HH", 1, 8 * len(values)) + b"".join(struct.pack("<Q", v)
                                                             for v in values)


@dataclass
class _Central:
    name: bytes
    method: int
    flags: int
    crc: int
    csize: int
    size: int
    offset: int
    extra: bytes = b""
    comment: bytes = b""

    def pack(self) -> bytes:
        return struct.pack(
            "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0x0314, 20, self.flags, self.method, 0,
            0x21, self.crc, self.csize, self.size, len(self.name), len(self.extra),
            len(self.comment), 0, 0, 0o100644 << 16, self.offset,
        ) + self.name + self.extra + self.comment


@dataclass
class RawZip:
    """An archive built member by member; `add(..., local=..., central=...)` makes fields lie."""

    body: bytearray = field(default_factory=bytearray)
    central: list[_Central] = field(default_factory=list)

    def add(self, name: str, data: bytes, method: int = DEFLATED, region: bytes | None = None,
            local: Mapping[str, Any] | None = None,
            central: Mapping[str, Any] | None = None) -> None:
        """One member. `region` replaces the bytes after the local header (the central
        sizes and CRC then describe it, unless overridden)."""
        payload = deflate(data) if method == DEFLATED else data
        fields: dict[str, Any] = {"name": name.encode(), "method": method, "flags": 0,
                                  "crc": crc(data), "csize": len(payload), "size": len(data)}
        if region is not None:
            payload = region
            fields["csize"] = len(region)
        cen = _Central(offset=len(self.body), **{**fields, **dict(central or {})})
        loc = {**fields, "extra": b"", **dict(local or {})}
        self.body += local_header(loc["name"], loc["method"], loc["flags"], loc["crc"],
                                  loc["csize"], loc["size"], loc["extra"])
        self.body += payload
        self.central.append(cen)

    def raw(self, blob: bytes) -> None:
        """Bytes between members that no central record lists."""
        self.body += blob

    def finish(self, order: Sequence[int] | None = None, comment: bytes = b"") -> bytes:
        records = [self.central[i] for i in (order or range(len(self.central)))]
        directory = b"".join(r.pack() for r in records)
        end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(records), len(records),
                          len(directory), len(self.body), len(comment))
        return bytes(self.body) + directory + end + comment


def rebuild(members: Mapping[str, bytes]) -> RawZip:
    """An honest RawZip with these members, in this order."""
    out = RawZip()
    for name, data in members.items():
        out.add(name, data)
    return out


class TorchServeExtractor:
    """TorchServe's `ZipUtils.unzip(InputStream, File)` from the installed jar, in one JVM."""

    SOURCE = """
import java.io.File;
import java.io.FileInputStream;
import java.io.InputStream;
import org.pytorch.serve.archive.utils.ZipUtils;

public final class ExtractWithTorchServe {
    public static void main(String[] args) throws Exception {
        for (int i = 0; i + 1 < args.length; i += 2) {
            try (InputStream in = new FileInputStream(args[i])) {
                ZipUtils.unzip(in, new File(args[i + 1]));
                System.out.println("OK");
            } catch (Exception e) {
                System.out.println("ERR " + e.getClass().getName() + ": "
                                   + String.valueOf(e.getMessage()).replace('\\n', ' '));
            }
        }
    }
}
"""

    def __init__(self, workdir: Path) -> None:
        self.jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
        self.classes = workdir
        source = workdir / "ExtractWithTorchServe.java"
        source.write_text(self.SOURCE)
        subprocess.run([_tool("javac"), "-cp", str(self.jar), "-d", str(workdir), str(source)],
                       check=True, capture_output=True, timeout=300)

    def extract(self, jobs: Sequence[tuple[Path, Path]]) -> list[str]:
        """Unpack each (archive, destination); one "OK" or "ERR <exception>" line per job."""
        args = [str(p) for job in jobs for p in job]
        done = subprocess.run(
            [_tool("java"), "-cp", f"{self.jar}:{self.classes}", "ExtractWithTorchServe",
             *args], check=True, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        return done.stdout.splitlines()


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not on PATH; a JDK 17 is required for this test")
    return found


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under `root`, by POSIX relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}
