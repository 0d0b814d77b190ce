"""The allowlist of operators a TorchScript model may call: side-effect-free ones only.

A TorchScript program reaches native code only through operators (`torch.add(...)` is
`aten::add`, `ops.quantized.linear_dynamic(...)` is `quantized::linear_dynamic`). This module
says which operators are allowed; `secure_handler.serving.torchscript` refuses a model that
names any other, and the handler scan uses the same list for `torch.*` names.

How the list is built
---------------------
`generate()` walks every operator schema registered in the running torch
(`torch._C._jit_get_all_schemas()`) and keeps an overload only when

1. its namespace is `aten`, `prim` or `quantized` (`ALLOWED_NAMESPACES`). Every other namespace
   is outside: custom ops come from native libraries loaded at run time
   (`torch.ops.load_library`), and torch's own extra namespaces are distributed collectives
   (`c10d`, `symm_mem`: network), profiler hooks, debug loaders (`debugprims::load_tensor`
   reads a file) or compiler internals;
2. its name is in no excluded family (`_EXCLUDED_NAMES`, `_excluded_by_name`): file I/O
   (`from_file`, `save`), process output (`prim::Print`, `aten::_print`), process-wide state
   (`manual_seed`, `seed`, plan caches, stats), calls into Python (`prim::PythonOp`), network
   (`prim::rpc_*`), memory safety (`_unsafe_index*` skips bounds checks; sparse tensors built
   from given indices and nested views of a buffer at given offsets are not checked; `prim::id`
   discloses an address), test-only operators and JIT-internal graph nodes that never appear
   in saved code;
3. no argument or result has an excluded type (`_EXCLUDED_TYPES`): `Storage` (rebinds raw
   memory), `RRef` (remote references: network), `Capsule`, or a custom class other than
   `ALLOWED_CUSTOM_CLASSES` (those need a native library's registration); nor a `bool unsafe`
   switch (`_index_put_impl_`, `segment_reduce` skip index checks with it);
4. an operator that takes explicit `size` and `stride` lists is allowed only when torch checks
   the result against its storage or allocates one to fit (`_CHECKED_STRIDED`): `as_strided`
   raises past the storage, but `_reshape_alias` views any extent of a small buffer (a model
   returned 4096 floats of the worker's heap, addresses included, from a 4-element input).

In-place operators (`add_`, `(a!)` aliasing) are allowed: they change tensors the program
already holds, nothing outside it. `aten::warn` is allowed (nn.TransformerEncoder calls it): it
goes through Python's `warnings`, not a file the model names.

The result is checked in as `opsallow.txt` next to this module, one overload a line
(`aten::add.Tensor`; an empty overload name is written `.default`), excluded ones prefixed `!`
with their reason. Importing this module reads that file and never imports torch. An operator
a newer torch adds is therefore outside until the file is regenerated and the diff reviewed:
tests/unit/test_torchscript_inspect.py regenerates it and fails when it differs.

How to extend it
----------------
To allow an operator, make sure it does nothing outside the tensors it is given, remove what
excludes it here (a family entry, or its namespace from `ALLOWED_NAMESPACES`), then run
`python -m secure_handler.serving.opsallow --write` and commit the file with the change.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "ALLOWED_CUSTOM_CLASSES",
    "ALLOWED_NAMESPACES",
    "ALLOWED_OPS",
    "DATA_FILE",
    "EXCLUDED_OPS",
    "generate",
    "is_allowed_op",
    "refusal_reason",
]

#: Operator namespaces whose operators can be allowed at all.
ALLOWED_NAMESPACES = ("aten", "prim", "quantized")

#: Custom classes (`torch.classes.NS.NAME`) built into libtorch that quantised models hold.
ALLOWED_CUSTOM_CLASSES = frozenset({
    "quantized.LinearPackedParamsBase",
    "quantized.Conv2dPackedParamsBase",
    "quantized.Conv3dPackedParamsBase",
    "quantized.EmbeddingPackedParamsBase",
    "rnn.CellParamsBase",
})  # fmt: skip

#: The checked-in result of `generate()`.
DATA_FILE = Path(__file__).with_name("opsallow.txt")

_FILE_IO = "file I/O: reads, maps or writes a host file the model names"
_OUTPUT = "process output: writes to the worker's stdout, which TorchServe parses"
_STATE = "process state: changes settings shared by everything in the worker"
_PYTHON = "runs Python code outside the TorchScript program"
_NETWORK = "network: remote calls and references (torch.distributed.rpc)"
_MEMORY = "memory safety: skips bounds or invariant checks, or discloses an address"
_INTERNAL = "JIT-internal graph node: never part of saved code"
_TEST = "test-only operator"

_EXCLUDED_NAMES: dict[str, str] = {
    "aten::from_file": _FILE_IO,
    "aten::save": _FILE_IO,
    "prim::Print": _OUTPUT,
    "aten::_print": _OUTPUT,
    "prim::AddStatValue": "telemetry: reports a value to a process-wide stats backend",
    "aten::manual_seed": _STATE,
    "aten::seed": _STATE,
    "aten::_cufft_set_plan_cache_max_size": _STATE,
    "aten::_cufft_clear_plan_cache": _STATE,
    "prim::PythonOp": _PYTHON,
    "prim::IgnoredPythonOp": _PYTHON,
    "prim::rpc_async": _NETWORK,
    "prim::rpc_sync": _NETWORK,
    "prim::rpc_remote": _NETWORK,
    "prim::id": _MEMORY,
    **{
        f"prim::{name}": _INTERNAL
        for name in (
            "BailOut", "BailoutTemplate", "DifferentiableGraph", "FallbackGraph", "FusedConcat",
            "FusionGroup", "Guard", "RequiresGradCheck", "StaticRuntimeCopyOuts",
            "StaticSubgraph", "TensorExprDynamicGroup", "TensorExprDynamicGuard",
            "TensorExprGroup", "TypeCheck", "oneDNNFusionGroup", "oneDNNFusionGuard",
            "profile", "profile_ivalue", "TimePoint",
        )
    },
}  # fmt: skip

#: `unsafe` in these names means "no autograd aliasing check", not "no bounds check".
_SAFE_UNSAFE = frozenset({"unsafe_chunk", "unsafe_split", "unsafe_split_with_sizes",
                          "_unsafe_view"})  # fmt: skip

_SPARSE = ("memory safety: builds a sparse tensor from indices it does not check unless "
           "asked (later operators index out of bounds)")
_SPARSE_FROM_INDICES = re.compile(
    r"_?sparse_(coo|csr|csc|bsr|bsc|compressed)_tensor|_sparse_\w+_with_dims")

_EXCLUDED_TYPES = (
    (re.compile(r"\bStorage\b"), "raw memory: takes or returns an untyped Storage"),
    (re.compile(r"\bbool unsafe\b"), "memory safety: an `unsafe` switch skips index checks"),
    (re.compile(r"\bRRef\b"), _NETWORK),
    (re.compile(r"\bCapsule\b"), "opaque native object (Capsule)"),
)
#: Operators taking `size` and `stride` whose result torch bounds-checks (or allocates to fit).
_CHECKED_STRIDED = frozenset({
    "as_strided", "as_strided_", "as_strided_copy", "as_strided_scatter", "empty_strided",
    "new_empty_strided", "set_", "_assert_tensor_metadata",
})  # fmt: skip
_SIZE_LIST = re.compile(r"\b(?:Sym)?[Ii]nt\[\] size\b")
_STRIDE_LIST = re.compile(r"\b(?:Sym)?[Ii]nt\[\] stride\b")
_UNCHECKED_VIEW = ("memory safety: views memory at the sizes and strides it is given without "
                   "checking them against the storage")
_CUSTOM_CLASS = re.compile(r"__torch__\.torch\.classes\.([A-Za-z0-9_]+\.[A-Za-z0-9_]+)")

_OTHER_NAMESPACES: dict[str, str] = {
    "c10d": "network: distributed collectives",
    "_c10d_functional": "network: distributed collectives",
    "_c10d_functional_autograd": "network: distributed collectives",
    "symm_mem": "network: symmetric-memory transfers between processes",
    "_dtensor": "network: distributed tensors",
    "profiler": "process state: profiler hooks",
    "debugprims": _FILE_IO,
}


def _excluded_by_name(qualified: str) -> str | None:
    """The family reason for an operator name without overload, or None."""
    if qualified in _EXCLUDED_NAMES:
        return _EXCLUDED_NAMES[qualified]
    base = qualified.split("::", 1)[1]
    if base.startswith("_test_"):
        return _TEST
    if "unsafe" in base and base not in _SAFE_UNSAFE:
        return _MEMORY
    if _SPARSE_FROM_INDICES.match(base):
        return _SPARSE
    if base.startswith("_nested_view_from_"):
        return "memory safety: views a buffer at offsets and strides it is given"
    return None


def _excluded_by_type(schema_text: str) -> str | None:
    for pattern, reason in _EXCLUDED_TYPES:
        if pattern.search(schema_text):
            return reason
    base = schema_text.split("(", 1)[0].split("::", 1)[-1].split(".", 1)[0]
    if (_SIZE_LIST.search(schema_text) and _STRIDE_LIST.search(schema_text)
            and base not in _CHECKED_STRIDED):
        return _UNCHECKED_VIEW
    for match in _CUSTOM_CLASS.finditer(schema_text):
        if match.group(1) not in ALLOWED_CUSTOM_CLASSES:
            return f"custom class torch.classes.{match.group(1)} needs a native library"
    return None


def generate(schemas: Iterable[Any] | None = None) -> list[str]:
    """The lines of `opsallow.txt` for the running torch (imports torch when not given)."""
    if schemas is None:
        import torch

        schemas = torch._C._jit_get_all_schemas()
    lines = []
    for schema in schemas:
        namespace = schema.name.split("::", 1)[0]
        if namespace not in ALLOWED_NAMESPACES:
            continue
        overload = f"{schema.name}.{schema.overload_name or 'default'}"
        reason = _excluded_by_name(schema.name) or _excluded_by_type(str(schema))
        lines.append(f"!{overload}\t{reason}" if reason else overload)
    return sorted(set(lines), key=lambda line: line.lstrip("!"))


@lru_cache(maxsize=1)
def _table() -> tuple[frozenset[str], dict[str, str]]:
    """(allowed names, {excluded overload: reason}) read from the data file."""
    allowed: set[str] = set()
    excluded: dict[str, str] = {}
    for line in DATA_FILE.read_text("ascii").splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("!"):
            name, _, reason = line[1:].partition("\t")
            excluded[name] = reason
        else:
            allowed.add(line)
    bases = {name.rsplit(".", 1)[0] for name in allowed}
    tainted = {name.rsplit(".", 1)[0] for name in excluded}
    # An overload-free name is allowed only when every overload is: the inspector sees
    # `torch.set_(x, y)` and cannot tell which overload TorchScript will pick.
    allowed |= bases - tainted
    return frozenset(allowed), excluded


def _load_allowed() -> frozenset[str]:
    return _table()[0]


#: Qualified operator names: every allowed overload (`aten::add.Tensor`, `aten::relu.default`)
#: and every overload-free name all of whose overloads are allowed (`aten::add`).
ALLOWED_OPS: frozenset[str] = _load_allowed()


#: Qualified names, with and without overload, of operators torch has but the list excludes.
EXCLUDED_OPS: frozenset[str] = frozenset(
    {name for name in _table()[1]} | {name.rsplit(".", 1)[0] for name in _table()[1]}
)


def _normalise(name: str) -> str:
    name = name.strip()
    if name.startswith("torch.ops."):
        namespace, _, rest = name[len("torch.ops."):].partition(".")
        name = f"{namespace}::{rest}"
    return name


def is_allowed_op(name: str) -> bool:
    """True for `aten::relu`, `aten::relu.default`, `prim::dtype` when on the allowlist."""
    return _normalise(name) in ALLOWED_OPS


def refusal_reason(name: str) -> str:
    """Why `name` is outside the allowlist, in words; empty when it is allowed."""
    name = _normalise(name)
    if name in ALLOWED_OPS:
        return ""
    namespace, sep, rest = name.partition("::")
    if not sep or not rest:
        return f"{name!r} is not a qualified operator name (namespace::name)"
    if namespace not in ALLOWED_NAMESPACES:
        why = _OTHER_NAMESPACES.get(
            namespace,
            "custom operators come from native libraries loaded at run time "
            "(torch.ops.load_library)",
        )
        return f"operator namespace {namespace!r} is outside {ALLOWED_NAMESPACES}: {why}"
    excluded = _table()[1]
    base = name if name.count(".") == 0 else name.rsplit(".", 1)[0]
    reasons = sorted({r for n, r in excluded.items() if n == name or n.startswith(base + ".")})
    if reasons:
        return "; ".join(reasons)
    family = _excluded_by_name(base)
    if family:
        return family
    return f"{name} is not an operator known to the allowlist (see {DATA_FILE.name})"


def main(argv: list[str] | None = None) -> int:
    """`python -m secure_handler.serving.opsallow [--write]`: regenerate the data file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {DATA_FILE.name}")
    args = parser.parse_args(argv)
    import torch

    version = torch.__version__.split("+")[0]
    header = (
        f"# generated by `python -m secure_handler.serving.opsallow --write` from torch {version}"
        "; do not edit"
    )
    text = "\n".join([header, *generate()]) + "\n"
    if args.write:
        DATA_FILE.write_text(text, "ascii")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
