"""Zip container checks for MARs (and the TorchScript zip inside), then a bounded extraction.

Names, file types, duplicates, encryption, methods and bomb limits here. TorchServe's frontend
unpacks a MAR with Java's `ZipInputStream` (LOCAL headers, front to back) while `zipfile` reads
the CENTRAL directory; `localheaders.check_local_headers` (re-exported here) makes both views
one, and `extract_checked` reads each member's bytes where both views put them, so what is
inspected is what TorchServe writes.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from secure_handler.errors import ConfigurationError
from secure_handler.supply.findings import Finding, finding
from secure_handler.supply.localheaders import (
    ZipViewError,
    check_local_headers,
    read_local_header,
)

__all__ = [
    "InflationError",
    "ZipLimits",
    "ZipViewError",
    "check_entries",
    "check_local_headers",
    "copy_file_nofollow",
    "extract_checked",
]

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


def extract_checked(
    zf: zipfile.ZipFile, dest: Path, limits: ZipLimits, skip: Iterable[str] = ()
) -> list[str]:
    """Extract every regular member under `dest`; names must already have passed
    `check_entries` and the archive `check_local_headers`. Returns the files.

    Each member's data is read from the file where both views put it (not through zipfile's
    reader), so the bytes written are the bytes TorchServe's extractor writes. Raises
    InflationError past the declared size or budget, ZipViewError when a deflate stream does
    not end exactly at its compressed size or the size or CRC differ.
    """
    if zf.filename is None:
        raise ValueError("extract_checked needs a zip opened from a path")
    root = dest.resolve()
    skipped = set(skip)
    written: list[str] = []
    budget = limits.max_total_bytes
    with open(zf.filename, "rb") as src:
        for info in zf.infolist():
            if info.is_dir() or info.filename in skipped:
                continue
            target = (root / PurePosixPath(info.filename)).resolve()
            if root not in target.parents:  # belt and braces after _name_problem
                raise ValueError(f"{info.filename!r} would extract outside {root}")
            target.parent.mkdir(parents=True, exist_ok=True)
            budget -= _copy_bounded(src, info, target, min(info.file_size, budget))
            written.append(info.filename)
    return written


def _copy_bounded(src: BinaryIO, info: zipfile.ZipInfo, target: Path, limit: int) -> int:
    local = read_local_header(src, info.header_offset)
    if local is None:  # check_local_headers showed it is there; the file changed since
        raise ZipViewError(f"{info.filename!r}: no local header at {info.header_offset}")
    src.seek(local.data_offset)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(target, flags, 0o600), "wb") as dst:
        if info.compress_type == zipfile.ZIP_STORED:
            copied, crc = _copy_stored(src, dst, info.compress_size)
        else:
            copied, crc = _inflate(src, dst, info, limit)
    if copied > limit:
        raise InflationError(f"{info.filename!r} inflates past its declared size")
    if copied != info.file_size or crc != info.CRC:
        raise ZipViewError(
            f"{info.filename!r}: {copied} bytes with CRC {crc:#010x}, the headers say "
            f"{info.file_size} bytes with CRC {info.CRC:#010x}; re-create the archive"
        )
    return copied


def _copy_stored(src: BinaryIO, dst: BinaryIO, length: int) -> tuple[int, int]:
    copied = crc = 0
    while copied < length:
        chunk = src.read(min(_COPY_CHUNK, length - copied))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        dst.write(chunk)
        copied += len(chunk)
    return copied, crc


def _inflate(src: BinaryIO, dst: BinaryIO, info: zipfile.ZipInfo, limit: int) -> tuple[int, int]:
    """Inflate exactly `compress_size` bytes, as Java's extractor will: the deflate stream
    must end exactly there (Java ends a member where the stream ends) and stay within
    `limit` bytes of output.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    left, copied, crc = info.compress_size, 0, 0
    while left and not inflater.eof:
        pending = src.read(min(_COPY_CHUNK, left))
        if not pending:
            break
        left -= len(pending)
        while pending and not inflater.eof:
            out = inflater.decompress(pending, _COPY_CHUNK)
            pending = inflater.unconsumed_tail
            copied += len(out)
            if copied > limit:
                raise InflationError(f"{info.filename!r} inflates past its declared size")
            crc = zlib.crc32(out, crc)
            dst.write(out)
    if not inflater.eof or left or inflater.unused_data:
        unread = left + len(inflater.unused_data)
        where = f"{unread} bytes before" if inflater.eof else "after"
        raise ZipViewError(
            f"{info.filename!r}: its deflate stream ends {where} its compressed size, so "
            "TorchServe's streaming reader would read other bytes than zipfile; re-create "
            "the archive with `secure-handler archive`"
        )
    return copied, crc


def copy_file_nofollow(src: Path, dst: Path) -> None:
    """Copy a regular file, refusing symlinks at the source (used when staging inputs)."""
    if src.is_symlink() or not src.is_file():
        raise ValueError(f"{src} is not a regular file (symlinks are refused)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst, follow_symlinks=False)
