"""Find pickles by their content, and report what they import with a maintained scanner.

Names lie: a `.bin`, `.pt`, `.txt` or `.json` can hold a pickle, and unpickling one runs the
callables it names (`os.system` through `__reduce__`). Detection here reads bytes and never
unpickles: protocol 2+ headers, zip containers of `.pkl` members (`torch.save`), NumPy object
arrays, and protocol 0/1 streams recognised by disassembling them with `pickletools.genops`
(a disassembler; it executes nothing).

The report of imported globals comes from picklescan (the `scan` extra) rather than a scanner
of our own: it is maintained against new bypasses. picklescan is a denylist with a history of
bypasses, so it is defence in depth, never the gate: pickles are refused unless the operator
opts in, and dangerous globals are refused even then.
"""

from __future__ import annotations

import io
import logging
import os
import pickletools
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PickleGlobal", "PickleReport", "report_pickle", "sniff_pickle"]

logger = logging.getLogger(__name__)

_SNIFF_BYTES = 1 << 20
_IMPORTING_OPS = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ"})
_NUMPY_MAGIC = b"\x93NUMPY"
_MAX_ZIP_MEMBERS_SNIFFED = 10_000
_INSTALL_HINT = "install picklescan (pip install 'secure-handler[scan]') to list its globals"


@dataclass(frozen=True)
class PickleGlobal:
    """A global a pickle imports, with picklescan's verdict (innocuous/suspicious/dangerous)."""

    module: str
    name: str
    safety: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name} ({self.safety})"


@dataclass(frozen=True)
class PickleReport:
    """What a pickle-bearing file imports. `error` is set when it could not be scanned."""

    kind: str
    globals: tuple[PickleGlobal, ...] = ()
    error: str | None = None

    @property
    def dangerous(self) -> tuple[PickleGlobal, ...]:
        """Globals picklescan rates dangerous (os.system, builtins.eval, ...)."""
        return tuple(g for g in self.globals if g.safety == "dangerous")

    @property
    def safe_to_allow(self) -> bool:
        """True only when the scan ran and found nothing dangerous."""
        return self.error is None and not self.dangerous

    def describe(self) -> str:
        """One line: the kind, then the globals or why there are none."""
        if self.error:
            return f"{self.kind}; {self.error}"
        listed = ", ".join(str(g) for g in sorted(self.globals, key=str)) or "no globals"
        return f"{self.kind}; imports {listed}"


def _protocol_header(head: bytes) -> int | None:
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return head[1]
    return None


def _is_text_pickle(head: bytes) -> bool:
    """A protocol 0/1 pickle: disassembles to STOP and imports or calls something."""
    ops: set[str] = set()
    try:
        for opcode, _arg, _pos in pickletools.genops(io.BytesIO(head)):
            ops.add(opcode.name)
            if opcode.name == "STOP":
                return bool(ops & _IMPORTING_OPS)
    except Exception:  # any disassembly error means "not a pickle"
        return False
    return False


def _zip_pickle_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()[:_MAX_ZIP_MEMBERS_SNIFFED]
            found = []
            for info in infos:
                if info.is_dir() or info.flag_bits & 0x1:
                    continue
                if info.filename.endswith((".pkl", ".pickle")):
                    found.append(info.filename)
                    continue
                with zf.open(info) as fh:
                    if _protocol_header(fh.read(2)) is not None:
                        found.append(info.filename)
            return found
    except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError, ValueError,
            EOFError, zlib.error):  # fmt: skip
        return []


def _numpy_object_array(head: bytes) -> bool:
    # The .npy header is a Python dict literal; object arrays declare descr '|O'.
    header = head[:4096]
    return header.startswith(_NUMPY_MAGIC) and b"'|O'" in header


def sniff_pickle(path: str | os.PathLike[str]) -> str | None:
    """What kind of pickle-bearing content the file is, or None. Reads bytes only.

    Returns e.g. `"pickle (protocol 4)"`, `"zip of pickles (torch.save checkpoint) ..."`,
    `"NumPy object array (pickled)"`, `"pickle (protocol 0/1)"`.
    """
    file = Path(path)
    with file.open("rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    protocol = _protocol_header(head)
    if protocol is not None:
        return f"pickle (protocol {protocol})"
    if head.startswith(b"PK\x03\x04"):
        members = _zip_pickle_members(file)
        if members:
            shown = ", ".join(members[:3]) + (", ..." if len(members) > 3 else "")
            return f"zip of pickles (torch.save checkpoint?): {shown}"
        return None
    if _numpy_object_array(head):
        return "NumPy object array (pickled)"
    if _is_text_pickle(head):
        return "pickle (protocol 0/1)"
    return None


def report_pickle(path: str | os.PathLike[str], kind: str) -> PickleReport:
    """List the globals a pickle-bearing file imports, using picklescan. Never unpickles."""
    try:
        from picklescan import scanner  # optional: the `scan` extra
    except ImportError:
        return PickleReport(kind, error=f"not scanned: {_INSTALL_HINT}")
    file = Path(path)
    ext = file.suffix.lower()
    # picklescan picks its parser by extension; a zip named .bin must still parse as a zip.
    if kind.startswith("zip"):
        ext = ".pt"
    try:
        with file.open("rb") as fh:
            result = scanner.scan_bytes(fh, os.fspath(file), ext)
    except Exception as exc:  # a scanner crash must refuse, not pass
        logger.warning("picklescan failed on %s: %s", file, exc)
        return PickleReport(kind, error=f"picklescan failed: {exc}")
    found = tuple(
        PickleGlobal(g.module, g.name, g.safety.value)
        for g in sorted(result.globals, key=lambda g: (g.module, g.name))
    )
    error = "picklescan could not fully parse it" if result.scan_err else None
    return PickleReport(kind, found, error)
