"""One view of a TorchScript file's zip: what `zipfile` inspects is what `torch.jit.load` loads.

The program inspector (`serving.torchscript`) reads a TorchScript file with Python's `zipfile`;
`torch.jit.load` reads it with PyTorch's own reader (miniz). The two find the central
directory differently: `zipfile` takes it to end right before the end record and shifts every
offset by what precedes it ("prepended data"), and takes a ZIP64 end record from just before
its locator; miniz takes the offsets as written and follows the locator. A crafted file thus
holds two archives: the inspector passes a harmless program while torch loads another.

Rather than model each reader, a TorchScript file must be in the one form `torch.jit.save`
writes, where every reader agrees: the end record is the last 22 bytes (no comment), any
ZIP64 end record sits where its locator points and repeats the 32-bit values, the central
directory ends exactly where the end records begin, its entries are printable-ASCII names,
unique whatever their case (miniz looks names up case-insensitively), with no comments, disks
or unknown flags, and the members tile the file from offset 0
in directory order (local header, data, data descriptor) up to the directory, each local
header repeating its central entry. Pure byte-level checks (only the standard library), so
both the supply side and the worker import it.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

from secure_handler.errors import UnsafeModelError

__all__ = ["check_single_view"]

_FIX = (
    "save the model again with torch.jit.save (or `secure_handler.serving.loading."
    "save_torchscript`) and archive that file unchanged"
)
_LOC = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
_CEN = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_EOCD = struct.Struct("<4sHHHHIIH")  # 22 bytes
_Z64_LOC = struct.Struct("<4sIQI")  # 20 bytes
_Z64_END = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
_MARK16, _MARK32 = 0xFFFF, 0xFFFFFFFF
_ZIP64_TAG = 0x0001
#: miniz pads local headers with this extra field so tensor data is aligned ("FB").
_PADDING_TAG = 0x4246
#: Deflate level bits, data descriptor, UTF-8 names. Encryption and the rest are refused.
_ALLOWED_FLAGS = 0x0002 | 0x0004 | 0x0008 | 0x0800
_DESCRIPTOR = 0x0008
_DESCRIPTOR_SIG = b"PK\x07\x08"


class _Refused(Exception):
    """Internal: the first way the file departs from the one form."""


@dataclass(frozen=True)
class _Entry:
    name: bytes
    flags: int
    method: int
    crc: int
    csize: int
    size: int
    offset: int


def check_single_view(path: str | os.PathLike[str], max_members: int = 100_000) -> None:
    """Refuse a TorchScript file that `zipfile` and `torch.jit.load` could read differently.

    Raises:
        UnsafeModelError: naming the first construct outside the form torch.jit.save writes.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            entries = _check(fh, max_members)
        _same_as_zipfile(name, entries)
    except _Refused as why:
        raise UnsafeModelError(
            f"{name}: not in the one zip form torch.jit.save writes ({why}); zipfile (which "
            f"inspects it) and torch.jit.load could read different files. Fix: {_FIX}"
        ) from None
    except OSError as exc:
        raise UnsafeModelError(f"{name}: cannot be read: {exc}") from exc


def _check(fh: BinaryIO, max_members: int) -> list[_Entry]:
    cd_offset, cd_size, total = _end_records(fh)
    records_end = cd_offset + cd_size
    if total > max_members:
        raise _Refused(f"{total} members, limit {max_members}")
    entries, pos, names = [], cd_offset, dict[bytes, bytes]()
    for _ in range(total):
        entry, pos = _central(fh, pos)
        # miniz looks names up without regard to ASCII case: `code/__torch__/MODS.py` can be
        # loaded for `mods.py`. Names must be unique the way it compares them.
        folded = entry.name.lower()
        if folded in names:
            raise _Refused(
                f"duplicate name {entry.name!r} (as {names[folded]!r}; PyTorch's reader "
                "ignores case): readers differ on which one wins"
            )
        names[folded] = entry.name
        entries.append(entry)
    if pos != records_end:
        raise _Refused("the directory's records do not fill its recorded size")
    walk = 0
    for entry in entries:
        if entry.offset != walk:
            raise _Refused(
                f"{entry.name!r} is recorded at {entry.offset}, the previous member ends at "
                f"{walk}: members out of order, or bytes between them"
            )
        walk = _local(fh, entry)
    if walk != cd_offset:
        raise _Refused(f"{cd_offset - walk} bytes between the last member and the directory")
    return entries


def _end_records(fh: BinaryIO) -> tuple[int, int, int]:
    """(directory offset, directory size, members) from the end records, which must frame
    the directory exactly."""
    size = fh.seek(0, 2)
    eocd_at = size - _EOCD.size
    if eocd_at < 0:
        raise _Refused("too short for a zip")
    sig, disk, cd_disk, on_disk, total, cd_size, cd_offset, comment = _EOCD.unpack(
        _read(fh, eocd_at, _EOCD.size)
    )
    if sig != b"PK\x05\x06" or comment:
        raise _Refused("the end record is not the last 22 bytes (a comment or trailing bytes)")
    records_end = eocd_at
    if eocd_at >= _Z64_LOC.size and _read(fh, eocd_at - _Z64_LOC.size, 4) == b"PK\x06\x07":
        records_end, wide = _zip64_end(fh, eocd_at)
        narrow = (disk, cd_disk, on_disk, total, cd_size, cd_offset)
        marks = (_MARK16, _MARK16, _MARK16, _MARK16, _MARK32, _MARK32)
        if any(n not in (w, m) for n, w, m in zip(narrow, wide, marks, strict=True)):
            raise _Refused("the end record and the ZIP64 end record disagree")
        disk, cd_disk, on_disk, total, cd_size, cd_offset = wide
    if (disk, cd_disk) != (0, 0) or on_disk != total:
        raise _Refused("disk numbers (a split archive)")
    if cd_offset + cd_size != records_end:
        raise _Refused(
            f"the directory is recorded at {cd_offset} (+{cd_size}) but the end records begin "
            f"at {records_end}: bytes before the archive or after the directory"
        )
    return cd_offset, cd_size, total


def _zip64_end(fh: BinaryIO, eocd_at: int) -> tuple[int, tuple[int, ...]]:
    """The ZIP64 end record: where `zipfile` looks (just before its locator) must be where
    the locator points (where miniz looks)."""
    record_at = eocd_at - _Z64_LOC.size - _Z64_END.size
    _, disk, offset, disks = _Z64_LOC.unpack(_read(fh, eocd_at - _Z64_LOC.size, _Z64_LOC.size))
    if record_at < 0 or (disk, offset, disks) != (0, record_at, 1):
        raise _Refused("the ZIP64 locator does not point just before itself")
    fields = _Z64_END.unpack(_read(fh, record_at, _Z64_END.size))
    if fields[0] != b"PK\x06\x06" or fields[1] != _Z64_END.size - 12:
        raise _Refused("a ZIP64 end record of another size (extensible data)")
    return record_at, fields[4:]


def _central(fh: BinaryIO, pos: int) -> tuple[_Entry, int]:
    raw = _read(fh, pos, _CEN.size)
    (sig, _, _, flags, method, _, _, crc, csize, size, name_len, extra_len, comment_len,
     disk, _, _, offset) = _CEN.unpack(raw)  # fmt: skip
    if sig != b"PK\x01\x02":
        raise _Refused(f"no directory record at {pos}")
    name = _read(fh, pos + _CEN.size, name_len)
    extra = _read(fh, pos + _CEN.size + name_len, extra_len)
    if comment_len or disk:
        raise _Refused(f"{name!r} has a comment or a disk number")
    _check_name(name)
    if flags & ~_ALLOWED_FLAGS:
        raise _Refused(f"{name!r} has flags {flags:#06x} (encryption or unknown)")
    if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _Refused(f"{name!r} uses compression method {method}")
    size, csize, offset = _widen(extra, [size, csize, offset], name)
    if method == zipfile.ZIP_STORED and csize != size:
        raise _Refused(f"{name!r} is STORED with two different sizes")
    entry = _Entry(name, flags, method, crc, csize, size, offset)
    return entry, pos + _CEN.size + name_len + extra_len


def _widen(extra: bytes, values: list[int], name: bytes) -> list[int]:
    """Replace the 32-bit markers by the central ZIP64 field, which must hold exactly them."""
    marked = [i for i, v in enumerate(values) if v == _MARK32]
    records = _records(extra, name)
    wanted = [(_ZIP64_TAG, 8 * len(marked))] if marked else []
    if [(tag, len(body)) for tag, body in records] != wanted:
        raise _Refused(f"{name!r}: central extra fields other than the ZIP64 sizes it needs")
    if marked:
        wide = struct.unpack(f"<{len(marked)}Q", records[0][1])
        for index, value in zip(marked, wide, strict=True):
            values[index] = value
    return values


def _local(fh: BinaryIO, entry: _Entry) -> int:
    """Check the local header at `entry.offset`; return where the next member must start."""
    sig, _, flags, method, _, _, crc, csize, size, name_len, extra_len = _LOC.unpack(
        _read(fh, entry.offset, _LOC.size)
    )
    name = _read(fh, entry.offset + _LOC.size, name_len)
    extra = _read(fh, entry.offset + _LOC.size + name_len, extra_len)
    if sig != b"PK\x03\x04" or name != entry.name:
        raise _Refused(f"{entry.name!r}: its local header is missing or names {name!r}")
    if (flags, method) != (entry.flags, entry.method):
        raise _Refused(f"{entry.name!r}: local and central flags or method differ")
    wide = {tag: body for tag, body in _records(extra, name) if tag == _ZIP64_TAG}
    if any(tag not in (_ZIP64_TAG, _PADDING_TAG) for tag, _ in _records(extra, name)):
        raise _Refused(f"{entry.name!r}: local extra fields other than ZIP64 and padding")
    if _MARK32 in (csize, size) and len(wide.get(_ZIP64_TAG, b"")) >= 16:
        size, csize = struct.unpack("<QQ", wide[_ZIP64_TAG][:16])
    declared = (crc, csize, size)
    real = (entry.crc, entry.csize, entry.size)
    data_end: int = entry.offset + _LOC.size + name_len + extra_len + entry.csize
    if not flags & _DESCRIPTOR:
        if declared != real:
            raise _Refused(f"{entry.name!r}: local and central CRC or sizes differ")
        return data_end
    if declared not in (real, (0, 0, 0), (0, _MARK32, _MARK32)):
        raise _Refused(f"{entry.name!r}: local and central CRC or sizes differ")
    for layout in ("<4sIII", "<4sIQQ"):
        raw = _read(fh, data_end, struct.calcsize(layout), exact=False)
        if len(raw) == struct.calcsize(layout) and struct.unpack(layout, raw) == (
            _DESCRIPTOR_SIG, *real,
        ):  # fmt: skip
            return data_end + len(raw)
    raise _Refused(f"{entry.name!r}: its data descriptor is missing or differs")


def _records(extra: bytes, name: bytes) -> list[tuple[int, bytes]]:
    records, pos = [], 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise _Refused(f"{name!r}: extra fields that do not parse")
        tag, length = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + length > len(extra):
            raise _Refused(f"{name!r}: extra fields that do not parse")
        records.append((tag, extra[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return records


def _check_name(name: bytes) -> None:
    # Python decodes names without the UTF-8 flag as cp437, PyTorch compares raw bytes.
    if not name or any(b < 0x20 or b > 0x7E for b in name) or b"\\" in name:
        raise _Refused(f"name {name!r} is not printable ASCII with forward slashes")


def _same_as_zipfile(path: str, entries: list[_Entry]) -> None:
    """The inspector's own reader must list exactly the members checked here."""
    try:
        with zipfile.ZipFile(path) as zf:
            seen = [(i.orig_filename.encode("ascii"), i.flag_bits, i.compress_type, i.CRC,
                     i.compress_size, i.file_size, i.header_offset) for i in zf.infolist()]
    except (zipfile.BadZipFile, ValueError, UnicodeEncodeError) as exc:
        raise _Refused(f"zipfile cannot read it: {exc}") from None
    mine = [(e.name, e.flags, e.method, e.crc, e.csize, e.size, e.offset) for e in entries]
    if seen != mine:
        raise _Refused("zipfile reads another directory than the one recorded")


def _read(fh: BinaryIO, offset: int, length: int, exact: bool = True) -> bytes:
    fh.seek(offset)
    data = fh.read(length)
    if exact and len(data) != length:
        raise _Refused(f"truncated at offset {offset}")
    return data
