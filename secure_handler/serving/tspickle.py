"""Judge the pickles inside a TorchScript file (`data.pkl`, `constants.pkl`, ...) unexecuted.

Two passes, both before `torch.jit.load` sees the file:

1. `walk_pickle` reads the opcodes with `pickletools.genops` (executes nothing): opcodes from a
   fixed set, globals only the rebuilders and list builders `torch.jit.save` writes, the storage
   types in `STORAGE_ITEMSIZE`, classes the program's code defines and the allowed
   `torch.classes`.
2. `check_storages` then replays a pickle that passed with Python's `pickle.Unpickler`, every
   global replaced by an inert stand-in (no torch, nothing imported), to check each storage
   reference against the file. TorchScript's unpickler sizes a storage by the element count the
   pickle CLAIMS (`('storage', type, key, location, numel)`) but fills it from the record
   `<archive>/<key>`: a count larger than the record gave a tensor over the heap beyond it
   (reads leaked addresses, in-place operators wrote past it; CWE-125/787). So the record must
   exist and hold exactly `numel * itemsize` bytes, the location must be a CPU/CUDA device, and
   every tensor view (offset, sizes, strides) must lie inside its storage. A type tag
   (`restore_type_tag(value, "Dict[str, Tensor]")`, parsed by TorchScript at load) may name only
   TorchScript's type names, the program's own classes and the allowed `torch.classes`.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any, Protocol

from secure_handler.serving import tscode
from secure_handler.serving.opsallow import ALLOWED_CUSTOM_CLASSES

__all__ = ["PICKLE_GLOBALS", "STORAGE_ITEMSIZE", "check_storages", "walk_pickle"]

PICKLE_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "GLOBAL", "BINPERSID", "REDUCE",
    "BUILD", "NEWOBJ", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "LIST",
    "EMPTY_LIST", "APPEND", "APPENDS", "DICT", "EMPTY_DICT", "SETITEM", "SETITEMS", "GET",
    "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "INT", "BININT",
    "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "NONE", "NEWTRUE",
    "NEWFALSE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES",
    "BINBYTES8", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE",
})  # fmt: skip
PICKLE_GLOBALS = frozenset({
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_qtensor",
    "torch.jit._pickle.build_intlist", "torch.jit._pickle.build_doublelist",
    "torch.jit._pickle.build_boollist", "torch.jit._pickle.build_tensorlist",
    "torch.jit._pickle.build_tensor_from_id", "torch.jit._pickle.restore_type_tag",
    "collections.OrderedDict", "builtins.complex", "torch.device",
    "torch.per_tensor_affine", "torch.per_channel_affine", "torch.per_tensor_symmetric",
    "torch.per_channel_symmetric", "torch.per_channel_affine_float_qparams",
})  # fmt: skip
#: `torch.<Name>Storage` globals `torch.jit.save` writes, with the bytes of one element.
STORAGE_ITEMSIZE: Mapping[str, int] = {
    "Float": 4, "Double": 8, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
    "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "ComplexHalf": 4,
    "UInt16": 2, "UInt32": 4, "UInt64": 8, "Float8_e4m3fn": 1, "Float8_e5m2": 1,
    "Float8_e4m3fnuz": 1, "Float8_e5m2fnuz": 1, "QInt8": 1, "QUInt8": 1, "QInt32": 4,
    "QUInt4x2": 1, "QUInt2x4": 1,
}  # fmt: skip
_LOCATION = re.compile(r"cpu|cuda(:[0-9]{1,3})?")
_TYPE_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*|[\[\], ]")


class _Budget(Protocol):
    """What the walk needs from the inspection: an opcode count and its limit."""

    opcodes: int

    @property
    def max_pickle_opcodes(self) -> int: ...


def _issue(name: str, what: str, why: str) -> tscode.CodeIssue:
    return tscode.CodeIssue(name, None, None, what, why)


def walk_pickle(
    name: str, stream: IO[bytes], program: tscode.Program, budget: _Budget
) -> Iterator[tscode.CodeIssue]:
    """Opcodes and globals of one pickle; every opcode counts against `budget.opcodes`, and
    past the budget the last finding is "pickle size"."""
    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            budget.opcodes += 1
            if budget.opcodes > budget.max_pickle_opcodes:
                yield _issue(name, "pickle size",
                             f"all pickles over {budget.max_pickle_opcodes} opcodes")
                return  # the caller stops reading on this finding
            if opcode.name not in PICKLE_OPCODES:
                yield _issue(name, f"pickle opcode {opcode.name}", "not one torch.jit.save "
                             "writes; refused as not understood")
            elif opcode.name == "GLOBAL":
                problem = _global_problem(str(arg).replace(" ", "."), program)
                if problem:
                    yield _issue(name, f"pickle global {arg}", problem)
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        yield _issue(name, "pickle", f"cannot be disassembled: {exc}")


def _global_problem(qualified: str, program: tscode.Program) -> str | None:
    if qualified in PICKLE_GLOBALS:
        return None
    if qualified.startswith("torch.") and qualified.endswith("Storage"):
        if qualified[len("torch."):-len("Storage")] in STORAGE_ITEMSIZE:
            return None
        return "a storage type torch.jit.save does not write"
    if qualified.startswith("__torch__.torch.classes."):
        custom = qualified[len("__torch__.torch.classes."):]
        if custom in ALLOWED_CUSTOM_CLASSES:
            return None
        return "custom class outside the allowed ones: it needs a native library"
    if qualified.startswith("__torch__.") and qualified in program.classes:
        return None
    if qualified.startswith("__torch__."):
        return "a class the program's code does not define"
    return "not a global torch.jit.save writes (only tensors, storages and list builders)"


class _Refused(Exception):
    """A storage or tensor view the replay refuses; the message says why."""


class _Inert:
    """Stands for every object the pickle builds: accepts any state, does nothing."""

    def __init__(self, *args: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        self.state = state


class _Storage:
    def __init__(self, numel: int, itemsize: int) -> None:
        self.numel = numel
        self.itemsize = itemsize


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _Refused(f"{what} {value!r} is not a non-negative integer")
    return value


def _rebuild(storage: object, offset: object, size: object, stride: object,
             *_rest: object) -> _Inert:
    """`_rebuild_tensor_v2`/`_rebuild_qtensor`: the view must lie inside its storage."""
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor is not built on a storage reference")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise _Refused("tensor sizes and strides are not tuples of one length")
    sizes = [_int(s, "tensor size") for s in size]
    strides = [_int(s, "tensor stride") for s in stride]
    start = _int(offset, "storage offset")
    if 0 not in sizes:
        end = start + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True)) + 1
        if end > storage.numel:
            raise _Refused(f"a tensor view reaches element {end - 1} of a storage of "
                           f"{storage.numel}")
    return _Inert()


class _Replay(pickle.Unpickler):
    """Unpickles with inert stand-ins only; `persistent_load` checks each storage."""

    def __init__(self, data: bytes, folder: str, records: Mapping[str, int],
                 program: tscode.Program) -> None:
        super().__init__(io.BytesIO(data))
        self.folder = folder
        self.records = records
        self.program = program

    def restore_type_tag(self, value: object, tag: object) -> object:
        names = _TYPE_TOKEN.findall(tag) if isinstance(tag, str) else None
        if names is None or "".join(names) != tag:
            raise _Refused(f"type tag {str(tag)[:60]!r} is not a type expression")
        for word in names:
            known = (not word.strip("[], ") or word in tscode.TYPE_NAMES
                     or word in self.program.classes
                     or word.removeprefix("__torch__.torch.classes.") in ALLOWED_CUSTOM_CLASSES)
            if not known:
                raise _Refused(f"type tag {tag[:60]!r} names {word[:60]!r}: not a TorchScript "
                               "type or a class of the program")
        return value

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_qtensor"):
            return _rebuild
        if module == "torch" and name.endswith("Storage"):
            return STORAGE_ITEMSIZE[name[: -len("Storage")]]
        if qualified == "collections.OrderedDict":
            return dict
        if qualified == "torch.jit._pickle.restore_type_tag":
            return self.restore_type_tag
        passthrough: Callable[..., object] = lambda *args: args[0] if args else None  # noqa: E731
        return passthrough if module.startswith("torch.jit") else _Inert

    def persistent_load(self, pid: object) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"persistent id {str(pid)[:60]} is not a storage reference")
        _tag, itemsize, key, location, numel = pid
        if not isinstance(itemsize, int) or not isinstance(key, str):
            raise _Refused("storage reference without a storage type and key")
        if not (isinstance(location, str) and _LOCATION.fullmatch(location)):
            raise _Refused(f"storage location {str(location)[:40]!r} is not cpu or cuda[:N]")
        count = _int(numel, "storage element count")
        record = f"{self.folder}/{key}"
        stored = self.records.get(record)
        if count and stored != count * itemsize:
            raise _Refused(f"storage {key!r} claims {count} elements ({count * itemsize} "
                           f"bytes) but its record {record} holds {stored} bytes")
        return _Storage(count, itemsize)


def check_storages(
    name: str, data: bytes, records: Mapping[str, int], program: tscode.Program
) -> list[tscode.CodeIssue]:
    """Replay one pickle that `walk_pickle` passed; `records` maps member paths under the
    top folder to their sizes. Tensors of `data.pkl` live in `data/`, of `x.pkl` in `x/`."""
    folder = name[: -len(".pkl")]
    try:
        _Replay(data, folder, records, program).load()
    except _Refused as exc:
        return [_issue(name, "pickle tensor", str(exc))]
    except (pickle.UnpicklingError, TypeError, ValueError, IndexError, KeyError, EOFError,
            AttributeError, RecursionError, MemoryError) as exc:  # fmt: skip
        return [_issue(name, "pickle", f"cannot be replayed: {type(exc).__name__}: {exc}")]
    return []
