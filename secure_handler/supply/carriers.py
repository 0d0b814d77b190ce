"""Members Python could import code from, found by their bytes as well as their names.

The worker runs with the model directory on `sys.path`, and Python imports code from more than
`.py` files: compiled modules (`.pyc`, extension modules), zip files through `zipimport` (which
reads the END of a file, so a text file with a zip appended is importable), `.pth` files and
package metadata whose entry points plugins load. A name proves nothing, so the content is
searched too: a zip end-of-central-directory record anywhere, native-code and bytecode
headers, and archive magic at the start (or `ustar` at byte 257).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

__all__ = ["code_carrier"]

_COMPILED_SUFFIXES = (".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll")
_ARCHIVE_SUFFIXES = (
    ".zip", ".whl", ".egg", ".pyz", ".pyzw", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z",
    ".zst", ".rar",
)  # fmt: skip
#: zip and zip64 end-of-central-directory signatures: what zipimport looks for.
_EOCD = re.compile(rb"PK\x05\x06|PK\x06\x06")
_CHUNK = 1 << 20
_NATIVE_MAGIC = (
    (b"\x7fELF", "an ELF shared object or executable"),
    (b"\xfe\xed\xfa\xce", "a Mach-O binary"),
    (b"\xfe\xed\xfa\xcf", "a Mach-O binary"),
    (b"\xce\xfa\xed\xfe", "a Mach-O binary"),
    (b"\xcf\xfa\xed\xfe", "a Mach-O binary"),
    (b"\xca\xfe\xba\xbe", "a universal Mach-O binary"),
)
_ARCHIVE_MAGIC = (
    (b"PK\x03\x04", "zip"),
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"Rar!\x1a\x07", "rar"),
)
_BZIP2 = re.compile(rb"BZh[1-9]")


def code_carrier(path: Path, name: str) -> tuple[str, str, str] | None:
    """(rule, member, why) when `name` could carry importable code; None when it cannot."""
    why = _by_name(name)
    if why is not None:
        return (why[0], name, why[1])
    with path.open("rb") as fh:
        head = fh.read(4096)
    why = _by_head(head)
    if why is not None:
        return (why[0], name, why[1])
    offset = _eocd_offset(path)
    if offset is not None:
        return (
            "SH410",
            name,
            f"carries a zip end-of-central-directory record at byte {offset}: zipimport can "
            "import code from it whatever its name and first bytes",
        )
    return None


def _by_name(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    parts = PurePosixPath(lower).parts
    if lower.endswith(_COMPILED_SUFFIXES) or ".so." in parts[-1]:
        return ("SH408", "compiled code cannot be reviewed or scanned; ship source")
    if lower.endswith(_ARCHIVE_SUFFIXES):
        return ("SH410", "an archive by its name: zipimport or an unpacking step could load it")
    if lower.endswith((".pth", ".egg-link")):
        return ("SH412", "a path configuration file: `site` adds its paths and runs its "
                "`import` lines")  # fmt: skip
    if any(p.endswith((".dist-info", ".egg-info")) for p in parts[:-1]):
        return ("SH412", "package metadata: entry points found on the import path are loaded "
                "as plugins (e.g. torch device backends)")  # fmt: skip
    return None


def _by_head(head: bytes) -> tuple[str, str] | None:
    for magic, label in _NATIVE_MAGIC:
        if head.startswith(magic):
            return ("SH408", f"{label}: native code cannot be reviewed")
    if _is_pe(head):
        return ("SH408", "a Windows PE binary: native code cannot be reviewed")
    if len(head) >= 16 and head[2:4] == b"\r\n" and _pyc_magic(head[:2]):
        return ("SH408", "Python bytecode (a .pyc header): it runs without source")
    for magic, label in _ARCHIVE_MAGIC:
        if head.startswith(magic):
            return ("SH410", f"a nested {label} archive; its content is not inspected")
    if _BZIP2.match(head) or head[257:262] == b"ustar":
        kind = "tar" if head[257:262] == b"ustar" else "bzip2"
        return ("SH410", f"a nested {kind} archive; its content is not inspected")
    return None


def _is_pe(head: bytes) -> bool:
    if not head.startswith(b"MZ") or len(head) < 64:
        return False
    offset = int.from_bytes(head[0x3C:0x40], "little")
    return head[offset : offset + 4] == b"PE\x00\x00"


def _pyc_magic(first: bytes) -> bool:
    # CPython 3.x magic numbers are 3000-3999 (2.7: 62211); as text these are control bytes.
    number = int.from_bytes(first, "little")
    return 3000 <= number < 4000 or number == 62211


def _eocd_offset(path: Path) -> int | None:
    """Where the first zip end-of-central-directory signature starts, searching every byte."""
    with path.open("rb") as fh:
        carry, base = b"", 0
        while chunk := fh.read(_CHUNK):
            window = carry + chunk
            if match := _EOCD.search(window):
                return base - len(carry) + match.start()
            carry = window[-3:]  # a signature split across two reads
            base += len(chunk)
    return None
