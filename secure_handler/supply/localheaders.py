"""One view of a MAR: the local headers, read as TorchServe's extractor reads them.

TorchServe unpacks a MAR with `ZipUtils.unzip`, a loop over Java's `ZipInputStream`: LOCAL
headers from offset 0, sizes from each local header (or its ZIP64 extra, or a data descriptor
after the data), stopping at the first bytes that are not a local header. `verify` reads the
CENTRAL directory, as `zipfile` does. A crafted zip shows the two readers different files (a
shorter ZIP64 size or a deflate stream that ends early hides an entry inside a member; a local
header carries another name or method; an entry sits between members or before the first).

Rather than model every way a streaming reader can be fooled, a MAR must be in the canonical
form `zipfile` (so torch-model-archiver and `secure-handler archive`) writes, and both views
must agree member by member. SH312 (not canonical): data descriptors, flag bits other than the
deflate level and UTF-8, names outside printable ASCII, extra fields (ZIP64 only on members
over 1 GiB), comments, STORED members whose sizes differ, bytes after the records. SH310 (views
differ): the walk of local headers must meet each central entry at its offset with the same
name bytes, flags, method, CRC and sizes, and end where the central directory starts.
`zipsafe.extract_checked` then reads each member where both views put it and requires a
deflate stream to end exactly at its compressed size: what `verify` inspects is byte for byte
what the Java extractor writes.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from secure_handler.supply.findings import Finding, finding

__all__ = ["FIX", "LocalHeader", "ZipViewError", "check_local_headers", "read_local_header"]

#: The fix every refusal here prints.
FIX = "re-create the archive with `secure-handler archive` (or torch-model-archiver)"

_LOC_SIG = b"PK\x03\x04"
_LOC_FMT = "<4sHHHHHIIIHH"
_LOC_SIZE = struct.calcsize(_LOC_FMT)  # 30
_CEN_SIG = b"PK\x01\x02"
_CEN_FMT = "<4sHHHHHHIIIHHHHHII"
_CEN_SIZE = struct.calcsize(_CEN_FMT)  # 46
_EOCD_SIG = b"PK\x05\x06"
_EOCD_FMT = "<4sHHHHIIH"
_EOCD_SIZE = struct.calcsize(_EOCD_FMT)  # 22
_Z64_LOC_SIG = b"PK\x06\x07"
_Z64_LOC_FMT = "<4sIQI"
_Z64_LOC_SIZE = struct.calcsize(_Z64_LOC_FMT)  # 20
_Z64_END_SIG = b"PK\x06\x06"
_Z64_END_FMT = "<4sQHHIIQQQQ"
_Z64_END_SIZE = struct.calcsize(_Z64_END_FMT)  # 56
_MAGIC32 = 0xFFFFFFFF
_ZIP64_TAG = 0x0001
#: zipfile writes ZIP64 fields only for sizes near 2 GiB; anything under 1 GiB is "small".
_ZIP64_MIN_SIZE = 1 << 30
#: Bits 1-2 only grade the deflate level; bit 11 says the name is UTF-8 (ASCII here anyway).
#: Bit 0 (encryption) is SH306's to report; every other bit is refused.
_ALLOWED_FLAGS = 0x0002 | 0x0004 | 0x0800 | 0x0001
_DATA_DESCRIPTOR = 0x0008


class ZipViewError(ValueError):
    """A member's data is not what both views say (a deflate stream ends early or late)."""


@dataclass(frozen=True)
class LocalHeader:
    """One local header with the sizes `ZipInputStream` would use."""

    offset: int
    flags: int
    method: int
    crc: int
    csize: int
    size: int
    name: bytes
    extra: bytes
    zip64: bool

    @property
    def data_offset(self) -> int:
        return self.offset + _LOC_SIZE + len(self.name) + len(self.extra)

    @property
    def end(self) -> int:
        """Where a streaming reader looks for the next header (no data descriptors here)."""
        # ZipInputStream reads `size` bytes of a STORED member and `csize` of a DEFLATED one.
        span = self.size if self.method == zipfile.ZIP_STORED else self.csize
        return self.data_offset + span


def read_local_header(fh: BinaryIO, offset: int) -> LocalHeader | None:
    """The local header at `offset` as Java reads it; None where Java would stop."""
    fh.seek(offset)
    raw = fh.read(_LOC_SIZE)
    if len(raw) != _LOC_SIZE or raw[:4] != _LOC_SIG:
        return None
    _, _, flags, method, _, _, crc, csize, size, name_len, extra_len = struct.unpack(
        _LOC_FMT, raw
    )
    name, extra = fh.read(name_len), fh.read(extra_len)
    if len(name) != name_len or len(extra) != extra_len:
        return None
    zip64 = False
    if _MAGIC32 in (csize, size):
        # java.util.zip.ZipEntry.setExtra0: a LOC ZIP64 record of >= 16 bytes gives both sizes.
        for tag, body in _extra_records(extra) or []:
            if tag == _ZIP64_TAG and len(body) >= 16:
                size, csize = struct.unpack("<QQ", body[:16])
                zip64 = True
    return LocalHeader(offset, flags, method, crc, csize, size, name, extra, zip64)


def _extra_records(extra: bytes) -> list[tuple[int, bytes]] | None:
    """(tag, body) records that tile `extra` exactly; None when they do not."""
    records, pos = [], 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            return None
        tag, length = struct.unpack("<HH", extra[pos : pos + 4])
        if pos + 4 + length > len(extra):
            return None
        records.append((tag, extra[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return records


@dataclass(frozen=True)
class _Central:
    flags: int
    method: int
    crc: int
    csize: int
    size: int
    name: bytes
    extra: bytes
    comment_len: int
    disk: int
    local_offset: int
    record_len: int


def _read_central(fh: BinaryIO, pos: int) -> _Central | None:
    fh.seek(pos)
    raw = fh.read(_CEN_SIZE)
    if len(raw) != _CEN_SIZE or raw[:4] != _CEN_SIG:
        return None
    (_, _, _, flags, method, _, _, crc, csize, size, name_len, extra_len, comment_len, disk,
     _, _, local_offset) = struct.unpack(_CEN_FMT, raw)  # fmt: skip
    name, extra = fh.read(name_len), fh.read(extra_len)
    record_len = _CEN_SIZE + name_len + extra_len + comment_len
    return _Central(flags, method, crc, csize, size, name, extra, comment_len, disk,
                    local_offset, record_len)


class _Refusal(Exception):
    def __init__(self, rule: str, member: str | None, message: str) -> None:
        super().__init__(message)
        self.rule, self.member, self.message = rule, member, message


def check_local_headers(path: Path, zf: zipfile.ZipFile, where: str) -> list[Finding]:
    """Refuse a MAR unless its local headers, walked as TorchServe's Java extractor walks
    them, agree with the central directory member by member, in canonical form.

    Returns at most one finding: the first place the views part (later ones would follow
    from it).
    """
    infos = zf.infolist()
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            directory_end = _check_members(fh, infos, zf)
            _check_framing(fh, size, zf, directory_end, len(infos))
    except _Refusal as refusal:
        location = f"{where}!{refusal.member}" if refusal.member else where
        return [finding(refusal.rule, location, f"{refusal.message}; {FIX}")]
    return []


def _check_members(fh: BinaryIO, infos: list[zipfile.ZipInfo], zf: zipfile.ZipFile) -> int:
    """Walk both views side by side; returns where the central directory ends."""
    start_dir: int = getattr(zf, "start_dir", 0)
    central_pos = start_dir
    walk = 0  # where ZipInputStream reads its next header
    for info in infos:
        central = _read_central(fh, central_pos)
        if central is None:
            raise _Refusal("SH310", info.filename, "central directory record unreadable")
        central_pos += central.record_len
        _check_central_record(central, info)
        local = read_local_header(fh, walk)
        if local is None:
            raise _Refusal(
                "SH310", info.filename,
                f"a streaming reader (TorchServe's) stops at offset {walk}, before this "
                "member: it would not extract it, or anything after it",
            )  # fmt: skip
        if local.offset != info.header_offset:
            raise _Refusal(
                "SH310", info.filename,
                f"a streaming reader finds the entry {_show(local.name)} at offset {walk}, "
                f"the central directory puts this member at {info.header_offset}: hidden "
                "entries, or bytes before or between members",
            )  # fmt: skip
        _check_local(local, central, info.filename)
        walk = local.end
    hidden = read_local_header(fh, walk)
    if hidden is not None:
        raise _Refusal(
            "SH310", hidden.name.decode("ascii", "backslashreplace"),
            f"a streaming reader finds this entry at offset {walk}; the central directory "
            "does not list it",
        )  # fmt: skip
    if walk != start_dir:
        raise _Refusal(
            "SH312", None,
            f"{start_dir - walk} bytes between the last member and the central directory",
        )  # fmt: skip
    return central_pos


def _check_central_record(central: _Central, info: zipfile.ZipInfo) -> None:
    member = info.filename
    if central.comment_len or central.disk:
        raise _Refusal("SH312", member, "a member comment or a disk number")
    _check_name(central.name, member)
    _check_flags(central.flags, member)
    zip64_fields = [v for v in (central.size, central.csize, central.local_offset)
                    if v == _MAGIC32]
    _check_extra(central.extra, member, allow_zip64=bool(zip64_fields),
                 zip64_len=8 * len(zip64_fields))
    if central.local_offset not in (info.header_offset, _MAGIC32):
        raise _Refusal(
            "SH310", member,
            f"the central directory puts it at offset {central.local_offset}, zipfile reads it "
            f"at {info.header_offset}: bytes precede the archive, which a streaming reader "
            "(starting at offset 0) reads as entries or stops at",
        )  # fmt: skip
    python_view = (info.filename, info.flag_bits, info.compress_type, info.CRC,
                   info.compress_size, info.file_size)
    if (central.name.decode("ascii"), central.flags, central.method, central.crc,
            *_central_sizes(central)) != python_view:
        raise _Refusal("SH310", member, "zipfile reads this central record differently")


def _check_local(local: LocalHeader, central: _Central, member: str) -> None:
    _check_name(local.name, member)
    _check_flags(local.flags, member)
    needs_zip64 = max(central.size, central.csize) >= _ZIP64_MIN_SIZE or _MAGIC32 in (
        central.size, central.csize,
    )  # fmt: skip
    if local.zip64 and not needs_zip64:
        raise _Refusal(
            "SH312", member,
            f"the local header gives its sizes in a ZIP64 field ({local.size} bytes, "
            f"{local.csize} compressed) though the member is small: a streaming reader "
            "takes those sizes, the central directory others",
        )  # fmt: skip
    _check_extra(local.extra, member, allow_zip64=local.zip64, zip64_len=16)
    if local.name != central.name:
        raise _Refusal(
            "SH310", member,
            f"its local header names {_show(local.name)}: TorchServe would write that file "
            "instead",
        )  # fmt: skip
    if local.flags != central.flags or local.method != central.method:
        raise _Refusal(
            "SH310", member,
            f"local header says flags {local.flags:#06x} method {local.method}, the central "
            f"directory flags {central.flags:#06x} method {central.method}: TorchServe would "
            "decode other bytes",
        )  # fmt: skip
    central_sizes = _central_sizes(central)
    if (local.crc, local.csize, local.size) != (central.crc, *central_sizes):
        raise _Refusal(
            "SH310", member,
            f"local header CRC/sizes {local.crc:#010x}/{local.csize}/{local.size} differ from "
            f"the central directory's {central.crc:#010x}/{central_sizes[0]}/"
            f"{central_sizes[1]}",
        )  # fmt: skip
    if _MAGIC32 in (central.size, central.csize) and max(central_sizes) < _ZIP64_MIN_SIZE:
        raise _Refusal("SH312", member, "ZIP64 sizes in the central directory of a small member")
    if local.method == zipfile.ZIP_STORED and local.csize != local.size:
        raise _Refusal("SH312", member, "a STORED member whose two sizes differ")
    if member.endswith("/") and (local.method, local.size) != (zipfile.ZIP_STORED, 0):
        raise _Refusal("SH312", member, "a directory entry with data")


def _central_sizes(central: _Central) -> tuple[int, int]:
    """(compressed, uncompressed) from the central record and its ZIP64 field."""
    csize, size = central.csize, central.size
    values = []
    for tag, body in _extra_records(central.extra) or []:
        if tag == _ZIP64_TAG:
            values = [v[0] for v in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
    if size == _MAGIC32 and values:
        size = values.pop(0)
    if csize == _MAGIC32 and values:
        csize = values.pop(0)
    return csize, size


def _check_name(name: bytes, member: str) -> None:
    # Java decodes names without the UTF-8 flag as UTF-8, zipfile as cp437, and the JVM writes
    # them in its own locale's charset: only printable ASCII reads the same everywhere.
    if not name or any(b < 0x20 or b > 0x7E for b in name):
        raise _Refusal(
            "SH312", member,
            f"name {_show(name)} is not printable ASCII: Java and Python decode it differently",
        )  # fmt: skip


def _check_flags(flags: int, member: str) -> None:
    if flags & _DATA_DESCRIPTOR:
        raise _Refusal(
            "SH312", member,
            "a data descriptor (flag bit 3): a streaming reader takes the sizes from after "
            "the data and ends the member where the deflate stream ends, whatever the "
            "central directory says",
        )  # fmt: skip
    if flags & ~_ALLOWED_FLAGS:
        raise _Refusal("SH312", member, f"general-purpose flags {flags:#06x}")


def _check_extra(extra: bytes, member: str, allow_zip64: bool, zip64_len: int) -> None:
    if not extra:
        if allow_zip64:
            raise _Refusal("SH312", member, "ZIP64 size markers without a ZIP64 field")
        return
    records = _extra_records(extra)
    ok = (
        records is not None
        and len(records) == 1
        and allow_zip64
        and records[0][0] == _ZIP64_TAG
        and len(records[0][1]) == zip64_len
    )
    if not ok:
        raise _Refusal(
            "SH312", member,
            f"extra fields {extra[:16].hex()}...: zipfile writes none but a needed ZIP64 "
            "field, and readers differ on the rest",
        )  # fmt: skip


def _check_framing(
    fh: BinaryIO, size: int, zf: zipfile.ZipFile, pos: int, count: int
) -> None:
    """The central directory (ending at `pos`) ends where the end records begin, and they
    end the file."""
    start_dir: int = getattr(zf, "start_dir", 0)
    eocd_at = size - _EOCD_SIZE
    eocd = struct.unpack(_EOCD_FMT, _read_at(fh, eocd_at, _EOCD_SIZE))
    _, disk, cd_disk, on_disk, total, cd_size, cd_offset, comment_len = eocd
    if eocd[0] != _EOCD_SIG or comment_len:
        raise _Refusal(
            "SH312", None,
            "the end record is not the last 22 bytes (a comment or trailing data): readers "
            "that search for it can find another central directory",
        )  # fmt: skip
    end_of_records = eocd_at
    if eocd_at >= _Z64_LOC_SIZE and _read_at(fh, eocd_at - _Z64_LOC_SIZE, 4) == _Z64_LOC_SIG:
        end_of_records = _check_zip64_end(fh, eocd_at, pos)
    elif (disk, cd_disk, on_disk, total) != (0, 0, count, count) or (
        cd_offset, cd_size,
    ) != (start_dir, pos - start_dir):  # fmt: skip
        raise _Refusal(
            "SH312", None,
            "the end record's offsets or counts do not match the central directory "
            "(prepended data, or a split archive)",
        )  # fmt: skip
    if pos != end_of_records:
        raise _Refusal(
            "SH312", None,
            f"{end_of_records - pos} bytes between the central directory and the end record",
        )  # fmt: skip


def _check_zip64_end(fh: BinaryIO, eocd_at: int, cd_end: int) -> int:
    record_at = eocd_at - _Z64_LOC_SIZE - _Z64_END_SIZE
    fh.seek(eocd_at - _Z64_LOC_SIZE)
    _, disk, offset, disks = struct.unpack(_Z64_LOC_FMT, fh.read(_Z64_LOC_SIZE))
    fh.seek(max(record_at, 0))
    raw = fh.read(_Z64_END_SIZE)
    if record_at < 0 or (disk, offset, disks) != (0, record_at, 1) or raw[:4] != _Z64_END_SIG:
        raise _Refusal("SH312", None, "a ZIP64 end locator that does not point at its record")
    fields = struct.unpack(_Z64_END_FMT, raw)
    record_size, cd_size, cd_offset = fields[1], fields[8], fields[9]
    if record_size != _Z64_END_SIZE - 12 or max(cd_size, cd_offset) < _ZIP64_MIN_SIZE:
        raise _Refusal("SH312", None, "a ZIP64 end record on an archive that needs none")
    if cd_offset + cd_size != cd_end or cd_end != record_at:
        raise _Refusal("SH312", None, "the ZIP64 end record does not frame the directory")
    return record_at


def _read_at(fh: BinaryIO, offset: int, length: int) -> bytes:
    fh.seek(offset)
    return fh.read(length)


def _show(name: bytes) -> str:
    return repr(name.decode("ascii", "backslashreplace"))
