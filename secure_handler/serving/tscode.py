"""Judge the code of a TorchScript program (its `code/**.py` members) by an allowlist.

`torch.jit.save` prints each class and function as a small Python subset, and `torch.jit.load`
compiles that text again, so whatever the text names runs (`__setstate__` even during the load).
This module reads the text with Python's `ast` and allows only:

* the statements and expressions the TorchScript printer emits (`STATEMENTS`, `EXPRESSIONS`);
  anything else (lambdas, comprehensions, imports, f-strings, ...) is refused as not understood;
* calls to allowed operators only: `torch.NAME` is `aten::NAME` and `ops.NS.NAME` is
  `NS::NAME`, each on `opsallow.ALLOWED_OPS` with every overload; `x.NAME(...)` must be an
  allowed `aten::NAME`/`prim::NAME` method or a method the program defines, and is refused
  whenever `NAME` is an excluded operator (`x.save`, `getattr(x, "from_file")`);
* builtins from a fixed set (`BUILTIN_CALLS`: no `print`, `id`, `rpc_*`; `fork` only of a
  function of the program), type names from a fixed set, the program's own locals, constants,
  nested `def`s (the printer writes `torch.jit.fork` as a closure, judged like any body) and
  `__torch__` classes and functions, and `torch.classes.*` custom classes only from
  `opsallow.ALLOWED_CUSTOM_CLASSES`.

The text reaches this module only in the printer's plain lexical form (see
`torchscript._lexical_problem`), so Python's `ast` sees what TorchScript's lexer sees.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field

from secure_handler.serving.opsallow import (
    ALLOWED_CUSTOM_CLASSES,
    EXCLUDED_OPS,
    is_allowed_op,
    refusal_reason,
)
from secure_handler.serving.tsgrammar import (
    ALLOWED_NODES,
    BUILTIN_CALLS,
    CLASS_BASES,
    CLASS_LISTS,
    CONSTANT_REF,
    CONSTANT_TYPES,
    IDENTIFIER,
    ROOTS,
    TYPE_NAMES,
    VALUE_NAMES,
)

__all__ = ["IDENTIFIER", "TYPE_NAMES", "CodeIssue", "Program", "check_code", "collect"]


@dataclass(frozen=True)
class CodeIssue:
    """One refused construct: where (member, line, method), what, and why."""

    member: str
    line: int | None
    method: str | None
    what: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.member}:{self.line}" if self.line else self.member
        inside = f" in {self.method}" if self.method else ""
        return f"{where}{inside}: {self.what}: {self.reason}"


@dataclass
class Program:
    """What the program's code members define, collected before any body is judged."""

    functions: set[str] = field(default_factory=set)
    classes: dict[str, set[str]] = field(default_factory=dict)  # qualified name -> members
    methods: set[str] = field(default_factory=set)
    attributes: set[str] = field(default_factory=set)

    def resolve(self, dotted: list[str]) -> tuple[str | None, list[str]]:
        """The longest defined `__torch__` prefix of `dotted`, and the rest."""
        for cut in range(len(dotted), 0, -1):
            name = ".".join(dotted[:cut])
            if name in self.functions or name in self.classes:
                return name, dotted[cut:]
        return None, dotted


def collect(tree: ast.Module, qualifier: str, program: Program) -> None:
    """Record the classes, functions, methods and attributes one code member defines."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            program.functions.add(f"{qualifier}.{node.name}")
        elif isinstance(node, ast.ClassDef):
            members = program.classes.setdefault(f"{qualifier}.{node.name}", set())
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    members.add(item.name)
                    program.methods.add(item.name)
                elif isinstance(item, ast.AnnAssign | ast.Assign):
                    names = _class_member_names(item)
                    members.update(names)
                    program.attributes.update(names)


def _class_member_names(item: ast.AnnAssign | ast.Assign) -> set[str]:
    targets = [item.target] if isinstance(item, ast.AnnAssign) else item.targets
    names = set()
    for target in targets:
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
            names.add(str(target.slice.value))
    return names


def check_code(tree: ast.Module, member: str, program: Program) -> Iterator[CodeIssue]:
    """Every refused construct of one parsed code member."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield from _Body(member, node.name, program).function(node)
        elif isinstance(node, ast.ClassDef):
            yield from _check_class(node, member, program)
        else:
            yield _issue(member, node, None, type(node).__name__,
                         "only class and def statements may appear at module level")


def _issue(member: str, node: ast.AST, method: str | None, what: str, why: str) -> CodeIssue:
    return CodeIssue(member, getattr(node, "lineno", None), method, what, why)


def _check_class(node: ast.ClassDef, member: str, program: Program) -> Iterator[CodeIssue]:
    bases = [b.id if isinstance(b, ast.Name) else ast.dump(b) for b in node.bases]
    if node.keywords or node.decorator_list or any(b not in CLASS_BASES for b in bases):
        yield _issue(member, node, node.name, f"class {node.name}({', '.join(bases)})",
                     f"bases must be among {sorted(CLASS_BASES)}, without decorators")
    is_enum = bases == ["Enum"]
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            yield from _Body(member, f"{node.name}.{item.name}", program).function(item)
        elif isinstance(item, ast.AnnAssign):
            body = _Body(member, node.name, program)
            yield from body.type_expr(item.annotation)
            if item.value is not None:
                yield from body.constant(item.value)
        elif isinstance(item, ast.Assign):
            yield from _check_class_assign(item, member, node.name, program, is_enum)
        elif not isinstance(item, ast.Pass):
            yield _issue(member, item, node.name, type(item).__name__,
                         "a class body holds only attributes and methods")


def _check_class_assign(
    item: ast.Assign, member: str, owner: str, program: Program, is_enum: bool
) -> Iterator[CodeIssue]:
    body = _Body(member, owner, program)
    target = item.targets[0] if len(item.targets) == 1 else None
    if isinstance(target, ast.Name) and target.id in CLASS_LISTS:
        values = item.value.elts if isinstance(item.value, ast.List) else None
        if values is None or not all(
            isinstance(v, ast.Constant) and isinstance(v.value, str) for v in values
        ):
            yield _issue(member, item, owner, target.id, "must be a list of names")
    elif isinstance(target, ast.Name) and target.id == "__annotations__":
        if not (isinstance(item.value, ast.List) and not item.value.elts):
            yield _issue(member, item, owner, "__annotations__", "must start as []")
    elif (
        isinstance(target, ast.Subscript)
        and isinstance(target.value, ast.Name)
        and target.value.id == "__annotations__"
        and isinstance(target.slice, ast.Constant)
        and isinstance(target.slice.value, str)
    ):
        yield from body.type_expr(item.value)
    elif is_enum and isinstance(target, ast.Name):
        yield from body.constant(item.value)
    else:
        yield _issue(member, item, owner, "class attribute assignment",
                     "not a form the TorchScript printer writes")


class _Body:
    """Judges one function or method: its signature, then every node of its body."""

    def __init__(self, member: str, method: str, program: Program,
                 outer_callables: frozenset[str] = frozenset()) -> None:
        self.member = member
        self.method = method
        self.program = program
        self.outer_callables = outer_callables  # a closure may call what its function may
        self.locals: set[str] = set()
        self.callables: set[str] = set()

    def issue(self, node: ast.AST, what: str, why: str) -> CodeIssue:
        return _issue(self.member, node, self.method, what, why)

    def function(self, node: ast.FunctionDef) -> Iterator[CodeIssue]:
        args = node.args
        if node.decorator_list or args.vararg or args.kwarg or args.kwonlyargs:
            yield self.issue(node, f"def {node.name}", "decorators, *args and **kwargs are "
                             "not in the TorchScript printer's output")
        for arg in [*args.posonlyargs, *args.args]:
            yield from self.bind(arg, arg.arg)
            if arg.annotation is not None:
                yield from self.type_expr(arg.annotation)
        for default in args.defaults:
            yield from self.constant(default)
        if node.returns is not None:
            yield from self.type_expr(node.returns)
        stores, aliases, nested = _stores_and_aliases(node)
        for item in stores:
            yield from self.bind(item, item.id)
        for inner in nested:
            yield from self.bind(inner, inner.name)
        # Locals bound only to `__torch__` functions (the printer hoists callees: `_0 =
        # __torch__.torch.nn.functional.relu`) may be called: that calls the program's code,
        # judged where the chain is assigned.
        targets = {id(alias) for alias in aliases}
        others = {a.arg for a in [*args.posonlyargs, *args.args]}
        others.update(item.id for item in stores if id(item) not in targets)
        mine = {alias.id for alias in aliases} | {n.name for n in nested}
        self.callables = (mine | self.outer_callables) - others
        for statement in node.body:
            yield from self.visit(statement)

    def bind(self, node: ast.AST, name: str) -> Iterator[CodeIssue]:
        # Only the roots: a local shadowing a builtin is harmless (every value a local can hold
        # comes from an expression judged where it is written; the printer names locals `min`).
        if name in ROOTS:
            yield self.issue(node, name, "rebinds a name TorchScript resolves specially")
        self.locals.add(name)

    def visit(self, node: ast.AST) -> Iterator[CodeIssue]:
        if isinstance(node, ast.FunctionDef):  # a closure (fork): judged, seeing our locals
            inner = _Body(self.member, f"{self.method}.{node.name}", self.program,
                          frozenset(self.callables))
            inner.locals = set(self.locals)
            yield from inner.function(node)
            return
        if not isinstance(node, ALLOWED_NODES):
            yield self.issue(node, type(node).__name__, "not a construct the TorchScript "
                             "printer writes; refused as not understood")
            return
        if isinstance(node, ast.Constant) and not isinstance(node.value, CONSTANT_TYPES):
            yield self.issue(node, repr(node.value)[:40], "constant of a refused type")
        elif isinstance(node, ast.Dict) and any(key is None for key in node.keys):
            yield self.issue(node, "**mapping", "dict unpacking is not understood")
        elif isinstance(node, ast.Call):
            yield from self.call(node)
            return
        elif isinstance(node, ast.Attribute):
            yield from self.attribute(node, called=False)
            return
        elif isinstance(node, ast.Name):
            yield from self.name(node)
        for child in ast.iter_child_nodes(node):
            yield from self.visit(child)

    def name(self, node: ast.Name) -> Iterator[CodeIssue]:
        known = node.id in self.locals or node.id in TYPE_NAMES or node.id in VALUE_NAMES
        if isinstance(node.ctx, ast.Load) and not known:
            why = ("may only start an attribute (torch.NAME, ops.NS.NAME, ...)"
                   if node.id in ROOTS else "unknown name (not a local, type or builtin)")
            yield self.issue(node, node.id, why)

    def call(self, node: ast.Call) -> Iterator[CodeIssue]:
        func = node.func
        if isinstance(func, ast.Name):
            yield from self._builtin_call(node, func)
        elif isinstance(func, ast.Attribute):
            yield from self.attribute(func, called=True)
        else:
            yield self.issue(node, "computed call", "the callee must be a name or attribute")
        if any(k.arg is None for k in node.keywords):
            yield self.issue(node, "**kwargs", "argument unpacking is not understood")
        for child in [*node.args, *node.keywords]:
            yield from self.visit(child)

    def _builtin_call(self, node: ast.Call, func: ast.Name) -> Iterator[CodeIssue]:
        if func.id in self.callables:
            return  # bound only to `__torch__` functions, each judged where it is assigned
        if func.id not in BUILTIN_CALLS:
            why = ("calls a local value" if func.id in self.locals
                   else "not an allowed builtin (print, id, rpc_* are outside)")
            yield self.issue(node, f"{func.id}()", why)
        elif func.id == "fork":
            target = node.args[0] if node.args else None
            if not ((isinstance(target, ast.Name) and target.id in self.callables)
                    or (isinstance(target, ast.Attribute) and _is_torch_chain(target))):
                yield self.issue(node, "fork()", "forks only a function of the program")
        elif func.id in ("getattr", "hasattr"):
            name = node.args[1] if len(node.args) == 2 else None
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                yield self.issue(node, f"{func.id}()", "the attribute name must be a literal")
            else:
                yield from self._attribute_name(node, name.value, called=False)

    def attribute(self, node: ast.Attribute, called: bool) -> Iterator[CodeIssue]:
        names: list[str] = []
        root: ast.expr = node
        while isinstance(root, ast.Attribute):
            names.insert(0, root.attr)
            root = root.value
        if isinstance(root, ast.Name) and root.id in ROOTS:
            yield from self._rooted(node, root.id, names)
            return
        yield from self.visit(root)
        for index, attr in enumerate(names):
            yield from self._attribute_name(node, attr, called and index == len(names) - 1)

    def _attribute_name(self, node: ast.AST, attr: str, called: bool) -> Iterator[CodeIssue]:
        """`x.attr`: a call is an operator method or the program's own method; a name that
        is also an excluded operator is refused, except as a read of a declared attribute."""
        builtin = [f"aten::{attr}", f"prim::{attr}"]
        tainted = [op for op in builtin if op in EXCLUDED_OPS]
        if tainted and (called or attr not in self.program.attributes):
            yield self.issue(node, f".{attr}", refusal_reason(tainted[0]))
        elif called and attr not in self.program.methods and not any(
            is_allowed_op(op) for op in builtin
        ):
            yield self.issue(node, f".{attr}()", "neither an allowed operator method nor a "
                             "method the program defines")

    def _rooted(self, node: ast.AST, root: str, names: list[str]) -> Iterator[CodeIssue]:
        dotted = f"{root}.{'.'.join(names)}"
        if root == "torch" and len(names) == 1:
            op = f"aten::{names[0]}"
        elif root == "ops" and len(names) == 2:
            op = f"{names[0]}::{names[1]}"
        elif root == "CONSTANTS" and len(names) == 1 and CONSTANT_REF.fullmatch(names[0]):
            return
        elif root == "__torch__":
            yield from self._torch_class(node, [root, *names])
            return
        else:
            yield self.issue(node, dotted, "not a form TorchScript resolves here")
            return
        if not is_allowed_op(op):
            yield self.issue(node, op, refusal_reason(op))

    def _torch_class(self, node: ast.AST, dotted: list[str]) -> Iterator[CodeIssue]:
        name = ".".join(dotted)
        if dotted[:3] == ["__torch__", "torch", "classes"]:
            custom = ".".join(dotted[3:])
            if custom not in ALLOWED_CUSTOM_CLASSES:
                yield self.issue(node, f"torch.classes.{custom}", "custom class outside "
                                 f"{sorted(ALLOWED_CUSTOM_CLASSES)}: it needs a native library")
            return
        found, rest = self.program.resolve(dotted)
        if found is None:
            yield self.issue(node, name, "not defined by the program's code")
        elif rest and (len(rest) > 1 or found not in self.program.classes or (
            rest[0] not in self.program.classes[found] and rest[0] != "__new__"
        )):
            yield self.issue(node, name, f"{'.'.join(rest)} is not a member of {found}")

    def type_expr(self, node: ast.expr) -> Iterator[CodeIssue]:
        """Annotations: type names, `__torch__` classes, subscripts and tuples of those."""
        if isinstance(node, ast.Name) and node.id in TYPE_NAMES:
            return
        if isinstance(node, ast.Constant) and node.value is None:
            return
        if isinstance(node, ast.Attribute):
            yield from self.attribute(node, called=False)
        elif isinstance(node, ast.Subscript):
            yield from self.type_expr(node.value)
            yield from self.type_expr(node.slice)
        elif isinstance(node, ast.Tuple | ast.List):
            for element in node.elts:
                yield from self.type_expr(element)
        else:
            yield self.issue(node, ast.unparse(node)[:60], "not a type TorchScript allows here")

    def constant(self, node: ast.expr) -> Iterator[CodeIssue]:
        """Default values and class constants: literals, tuples/lists of them, inf, nan."""
        if isinstance(node, ast.Constant) and isinstance(node.value, CONSTANT_TYPES):
            return
        if isinstance(node, ast.Name) and node.id in VALUE_NAMES:
            return
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            yield from self.constant(node.operand)
        elif isinstance(node, ast.Tuple | ast.List):
            for element in node.elts:
                yield from self.constant(element)
        else:
            yield self.issue(node, ast.unparse(node)[:60], "not a constant")


def _stores_and_aliases(
    node: ast.FunctionDef,
) -> tuple[list[ast.Name], list[ast.Name], list[ast.FunctionDef]]:
    """One walk: every name the function stores, the targets of `NAME = __torch__.<...>`, and
    the functions defined inside it."""
    stores: list[ast.Name] = []
    aliases: list[ast.Name] = []
    nested: list[ast.FunctionDef] = []
    for item in ast.walk(node):
        if isinstance(item, ast.Name) and isinstance(item.ctx, ast.Store):
            stores.append(item)
        elif isinstance(item, ast.FunctionDef) and item is not node:
            nested.append(item)
        elif (isinstance(item, ast.Assign) and len(item.targets) == 1
              and isinstance(item.targets[0], ast.Name) and _is_torch_chain(item.value)):
            aliases.append(item.targets[0])
    return stores, aliases, nested


def _is_torch_chain(node: ast.expr) -> bool:
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and node.id == "__torch__"
