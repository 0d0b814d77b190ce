"""Zip container checks for MARs (and the TorchScript zip inside), then a bounded extraction.

TorchServe's frontend unpacks a MAR with Java's `ZipInputStream`, which reads the LOCAL file
headers front to back, while Python's `zipfile` (and most tools) read the CENTRAL directory.
A crafted zip can show each reader different members. So besides names, links, duplicates,
encryption and bomb limits, the local headers must tile the file exactly as the central
directory says: same names, same sizes, no gaps, no hidden entries.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from secure_handler.errors import ConfigurationError
from secure_handler.supply.findings import Finding, finding

__all__ = [
    "InflationError",
    "ZipLimits",
    "check_entries",
    "check_local_headers",
    "copy_file_nofollow",
    "extract_checked",
]

_LOCAL_SIG = b"PK\x03\x04"
_LOCAL_FMT = "<4sHHHHHIIIHH"
_LOCAL_SIZE = struct.calcsize(_LOCAL_FMT)
_DESCRIPTOR_SIG = b"PK\x07\x08"
_ZIP64_MARK = 0xFFFFFFFF
_ALLOWED_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_COPY_CHUNK = 1 << 20


class InflationError(ConfigurationError, ValueError):
    """A member inflated past its declared size, or past the total budget."""


@dataclass(frozen=True)
class ZipLimits:
    """Bounds on a zip before anything is extracted (CWE-409).

    The ratio limit applies only to members of at least `ratio_min_bytes`, since tiny files
    compress well without being bombs.
    """

    max_members: int = 4096
    max_total_bytes: int = 16 << 30
    max_ratio: float = 200.0
    ratio_min_bytes: int = 1 << 20


def _name_problem(name: str) -> tuple[str, str] | None:
    if not name or "\x00" in name:
        return "SH302", "empty name or NUL byte"
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return "SH302", "absolute path, drive letter or backslash; it would extract outside"
    parts = name.rstrip("/").split("/")
    if any(part in ("..", ".", "") for part in parts):
        return "SH303", "'..', '.' or empty component (zip-slip: it would extract elsewhere)"
    return None


def _type_problem(info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if info.create_system != 3 or kind == 0:  # only Unix-made entries carry a file type
        return None
    if stat.S_ISLNK(mode):
        return "a symlink; extracting or following it can reach outside the model directory"
    if kind not in (stat.S_IFREG, stat.S_IFDIR):
        return f"a special file (mode {oct(kind)}), not a regular file"
    return None


def check_entries(infos: list[zipfile.ZipInfo], limits: ZipLimits, where: str) -> list[Finding]:
    """Names, file types, duplicates, encryption, methods and size limits of every member.

    `where` prefixes member locations, e.g. `model.mar` gives `model.mar!handler.py`.
    """
    findings: list[Finding] = []
    if len(infos) > limits.max_members:
        findings.append(
            finding("SH307", where, f"{len(infos)} members, limit {limits.max_members}")
        )
    total = sum(info.file_size for info in infos)
    if total > limits.max_total_bytes:
        findings.append(
            finding("SH308", where, f"{total} bytes uncompressed, limit {limits.max_total_bytes}")
        )
    seen: set[str] = set()
    for info in infos:
        findings.extend(_check_one(info, limits, f"{where}!{info.filename}", seen))
    return findings


def _check_one(
    info: zipfile.ZipInfo, limits: ZipLimits, location: str, seen: set[str]
) -> Iterable[Finding]:
    name = info.filename
    if problem := _name_problem(name):
        yield finding(problem[0], location, problem[1])
    if why := _type_problem(info):
        yield finding("SH304", location, why)
    key = name.rstrip("/")
    if key in seen:
        yield finding("SH305", location, "duplicate name; readers disagree on which one wins")
    seen.add(key)
    if info.flag_bits & 0x1:
        yield finding("SH306", location, "encrypted; its content cannot be inspected")
    if info.compress_type not in _ALLOWED_METHODS:
        yield finding("SH311", location, f"compression method {info.compress_type}")
    if info.file_size >= limits.ratio_min_bytes:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_ratio:
            yield finding(
                "SH309", location, f"compression ratio {ratio:.0f}:1, limit {limits.max_ratio:.0f}"
            )


def check_local_headers(path: Path, zf: zipfile.ZipFile, where: str) -> list[Finding]:
    """Show that the local headers tile the file exactly as the central directory says.

    Java's ZipInputStream (TorchServe's extractor) walks local headers from offset 0, so any
    gap, extra entry, or name/size difference is content that Python-side checks would miss.
    """
    infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    expected = 0
    start_dir = getattr(zf, "start_dir", None)
    with path.open("rb") as fh:
        for info in infos:
            problem = _local_problem(fh, info, expected)
            if problem:
                return [finding("SH310", f"{where}!{info.filename}", problem)]
            expected = _entry_end(fh, info)
    if start_dir is not None and start_dir != expected:
        return [
            finding(
                "SH310",
                where,
                f"{start_dir - expected} unlisted bytes before the central "
                "directory; a streaming reader would see entries that zipfile does not",
            )
        ]
    return []


def _local_problem(fh: BinaryIO, info: zipfile.ZipInfo, expected: int) -> str | None:
    if info.header_offset != expected:
        return (
            f"local header at offset {info.header_offset}, expected {expected}: "
            "hidden bytes or entries between members"
        )
    fh.seek(info.header_offset)
    raw = fh.read(_LOCAL_SIZE)
    if len(raw) != _LOCAL_SIZE or raw[:4] != _LOCAL_SIG:
        return "no local file header where the central directory points"
    (_, _, flags, method, _, _, crc, csize, usize, name_len, _) = struct.unpack(_LOCAL_FMT, raw)
    local_name = fh.read(name_len)
    if local_name.decode("utf-8" if flags & 0x800 else "cp437", "replace") != info.filename:
        return f"local header names {local_name!r}, central directory names {info.filename!r}"
    if method != info.compress_type:
        return "local header compression method differs from the central directory"
    sizes_deferred = flags & 0x08 or _ZIP64_MARK in (csize, usize)
    if not sizes_deferred and (csize, usize, crc) != (info.compress_size, info.file_size, info.CRC):
        return "local header sizes/CRC differ from the central directory"
    return None


def _entry_end(fh: BinaryIO, info: zipfile.ZipInfo) -> int:
    fh.seek(info.header_offset + 26)
    name_len, extra_len = struct.unpack("<HH", fh.read(4))
    end: int = info.header_offset + _LOCAL_SIZE + name_len + extra_len + info.compress_size
    if info.flag_bits & 0x08:  # a data descriptor follows the data, with or without signature
        fh.seek(end)
        zip64 = info.file_size >= _ZIP64_MARK or info.compress_size >= _ZIP64_MARK
        body = 20 if zip64 else 12
        end += body + (4 if fh.read(4) == _DESCRIPTOR_SIG else 0)
    return end


def extract_checked(
    zf: zipfile.ZipFile, dest: Path, limits: ZipLimits, skip: Iterable[str] = ()
) -> list[str]:
    """Extract every regular member under `dest`; names must already have passed
    `check_entries`. Stops a member that inflates past its declared size. Returns the files.
    """
    root = dest.resolve()
    skipped = set(skip)
    written: list[str] = []
    budget = limits.max_total_bytes
    for info in zf.infolist():
        if info.is_dir() or info.filename in skipped:
            continue
        target = (root / PurePosixPath(info.filename)).resolve()
        if root not in target.parents:  # belt and braces after _name_problem
            raise ValueError(f"{info.filename!r} would extract outside {root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        budget -= _copy_bounded(zf, info, target, min(info.file_size, budget))
        written.append(info.filename)
    return written


def _copy_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limit: int) -> int:
    copied = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with zf.open(info) as src, os.fdopen(os.open(target, flags, 0o600), "wb") as dst:
        while chunk := src.read(_COPY_CHUNK):
            copied += len(chunk)
            if copied > limit:
                raise InflationError(f"{info.filename!r} inflates past its declared size")
            dst.write(chunk)
    return copied


def copy_file_nofollow(src: Path, dst: Path) -> None:
    """Copy a regular file, refusing symlinks at the source (used when staging inputs)."""
    if src.is_symlink() or not src.is_file():
        raise ValueError(f"{src} is not a regular file (symlinks are refused)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst, follow_symlinks=False)
