"""The vocabulary of TorchScript's printer, as far as the code judge (`tscode`) allows it.

The node types, builtins, type names, roots and class forms `torch.jit.save` writes; kept apart
from the judge so the judge reads as rules and this reads as the list to review.
"""

from __future__ import annotations

import ast
import re

__all__ = [
    "ALLOWED_NODES", "BUILTIN_CALLS", "CLASS_BASES", "CLASS_LISTS", "CONSTANT_REF",
    "CONSTANT_TYPES", "EXPRESSIONS", "IDENTIFIER", "ROOTS", "STATEMENTS", "TYPE_NAMES",
    "VALUE_NAMES",
]

STATEMENTS = (
    ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr, ast.If, ast.For, ast.While, ast.With,
    ast.Return, ast.Pass, ast.Break, ast.Continue, ast.Raise, ast.Assert,
)  # fmt: skip
EXPRESSIONS = (
    ast.Call, ast.Attribute, ast.Name, ast.Constant, ast.Tuple, ast.List, ast.Dict,
    ast.Subscript, ast.Slice, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp,
    ast.keyword, ast.withitem, ast.expr_context, ast.operator, ast.unaryop, ast.boolop,
    ast.cmpop,
)  # fmt: skip
ALLOWED_NODES = STATEMENTS + EXPRESSIONS

#: Bare names TorchScript compiles to pure operators or compile-time forms.
BUILTIN_CALLS = frozenset({
    "annotate", "unchecked_cast", "uninitialized", "isinstance", "getattr", "hasattr", "range",
    "int", "float", "bool", "str", "complex", "len", "sorted", "min", "max", "abs", "all",
    "any", "divmod", "round", "ord", "chr", "list", "dict", "tuple", "zip", "enumerate",
    "sum", "pow", "hex", "oct", "bin", "fork",
})  # fmt: skip
TYPE_NAMES = frozenset({
    "Tensor", "int", "float", "bool", "str", "complex", "NoneType", "Device", "Any", "number",
    "Scalar", "Layout", "ScalarType", "MemoryFormat", "QScheme", "Generator", "Stream",
    "List", "Dict", "Tuple", "Optional", "Union", "Final", "Future", "Await",
})  # fmt: skip
#: Also what a pickle's type tag may name (with the program's classes).
VALUE_NAMES = frozenset({"inf", "nan"})
ROOTS = frozenset({"torch", "ops", "CONSTANTS", "__torch__"})
CLASS_BASES = frozenset({"Module", "NamedTuple", "Interface", "ModuleInterface", "Enum"})
CLASS_LISTS = frozenset({"__parameters__", "__buffers__", "__forward_hooks__",
                          "__forward_pre_hooks__"})  # fmt: skip
CONSTANT_TYPES = (str, int, float, bool, complex, type(None))
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CONSTANT_REF = re.compile(r"c[0-9]+")
