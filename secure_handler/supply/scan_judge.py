"""The judge of the allowlist scan: walks one module's AST and names what is not allowed.

`supply/scan.py` decodes and parses the archive's files and calls `judge_module` on each;
the lists it checks against live in `supply/scan_rules.py`. Every name, attribute and import
node is judged where it occurs (not only calls), so an alias cannot hide a forbidden object.
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from secure_handler.supply import scan_rules as R

__all__ = ["FIX", "Hit", "ScanContext", "judge_module", "module_name"]

#: Every builtin not on the allowlist (`__name__` etc. are the module's own, not builtins').
_FORBIDDEN_BUILTINS = (
    frozenset(dir(builtins))
    - R.ALLOWED_BUILTINS
    - R.ATTRIBUTE_CALL_BUILTINS
    - R.ALLOWED_DUNDER_NAMES
)
FIX = R.FIX

#: (rule, node, message): one thing the judge refused.
Hit = tuple[str, ast.AST, str]


@dataclass(frozen=True)
class ScanContext:
    """What the other files of the archive provide: module name → names it defines."""

    local: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: Module name → the names it binds only with `class` (what may be subclassed).
    classes: Mapping[str, frozenset[str]] = field(default_factory=dict)


def module_name(member: str) -> str:
    """`pkg/mod.py` → `pkg.mod`, `pkg/__init__.py` → `pkg`."""
    parts = list(PurePosixPath(member).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@dataclass(frozen=True)
class _Bound:
    """What an import bound a name to: an allowlisted module, an archive module, or a value."""

    kind: str  # "module" | "local" | "value"
    target: str


class _Judge:
    """Walks one module and collects (rule, node, message) for everything not allowed."""

    def __init__(self, tree: ast.Module, member: str, context: ScanContext) -> None:
        self.tree, self.member, self.context = tree, member, context
        self.specs = R.allowed_module_names()
        self.refused_attrs = R.refused_value_attributes()
        self.hits: list[Hit] = []
        self.parents: dict[int, ast.AST] = {}
        self.bound: dict[str, _Bound] = {}
        self.classes = context.classes.get(module_name(member), frozenset())

    def hit(self, rule: str, node: ast.AST, message: str) -> None:
        self.hits.append((rule, node, f"{message}; fix: {FIX[rule]}"))

    def run(self) -> None:
        nodes = list(ast.walk(self.tree))
        for node in nodes:
            for child in ast.iter_child_nodes(node):
                self.parents[id(child)] = node
        for node in nodes:  # imports first: every later name is judged by what they bound
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                self._import(node)
        for node in nodes:
            self._node(node)

    def _node(self, node: ast.AST) -> None:
        if type(node) not in R.ALLOWED_NODES:
            parent = self.parents.get(id(node))
            if parent is None or type(parent) in R.ALLOWED_NODES:  # once per construct
                what = type(node).__name__
                self.hit("SH003", node, f"`{what}` is syntax the scan does not allow")
        elif isinstance(node, ast.Name):
            self._name(node, node.id)
            if not isinstance(node.ctx, ast.Load) and self._in_class_body(node):
                self._class_attribute(node)
        elif isinstance(node, ast.Attribute):
            self._attribute(node, node.value, node.attr)
        elif isinstance(node, ast.Call):
            self._call(node)
        elif isinstance(node, ast.arg):
            self._name(node, node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            self._definition(node)
            if isinstance(node, ast.ClassDef):
                self._bases(node)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            self._name(node, node.name)

    # --- imports ----------------------------------------------------------------------------

    def _import(self, node: ast.Import | ast.ImportFrom) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                self._import_module(node, alias)
            return
        base = self._from_base(node)
        if base is None:
            return
        for alias in node.names:
            if alias.name == "*":
                self.hit("SH112", node, f"`from {base} import *` brings in unknown names")
            else:
                self._import_name(node, base, alias)

    def _import_module(self, node: ast.Import, alias: ast.alias) -> None:
        kind = self._module_kind(alias.name)
        if kind is None:
            self.hit("SH110", node, f"imports {alias.name}, which is not an allowed module")
            return
        target = alias.name if alias.asname else alias.name.split(".")[0]
        self._bind(node, alias.asname or target, _Bound(kind, target))

    def _from_base(self, node: ast.ImportFrom) -> str | None:
        if not node.level:
            return node.module
        package = module_name(self.member).split(".")
        if not self.member.endswith("__init__.py"):
            package = package[:-1]
        keep = len(package) - (node.level - 1)
        base = ".".join([*package[: max(keep, 0)], *([node.module] if node.module else [])])
        if keep <= 0 or self._module_kind(base) != "local":
            self.hit("SH113", node, f"relative import of {base or '.'!r} outside the archive")
            return None
        return base

    def _import_name(self, node: ast.ImportFrom, base: str, alias: ast.alias) -> None:
        kind = self._module_kind(base)
        full = f"{base}.{alias.name}"
        if kind is None:
            self.hit("SH110", node, f"imports from {base}, which is not an allowed module")
        elif sub := self._module_kind(full):
            self._bind(node, alias.asname or alias.name, _Bound(sub, full))
        elif self._member_allowed(kind, base, alias.name):
            self._bind(node, alias.asname or alias.name, _Bound("value", full))
        else:
            self.hit("SH111", node, f"{full} is not on the allowlist of {base}")

    def _bind(self, node: ast.AST, name: str, bound: _Bound) -> None:
        # `import numpy as __builtins__` would make np.load every function's bare `load`.
        if name in _FORBIDDEN_BUILTINS or name in R.ATTRIBUTE_CALL_BUILTINS:
            self.hit("SH210", node, f"an import bound to the builtin name `{name}`")
        elif R.is_dunder(name) and name not in R.ALLOWED_DUNDER_NAMES:
            self.hit("SH211", node, f"an import bound to the special name `{name}`")
        if self.bound.get(name, bound) != bound:
            self.hit("SH114", node, f"`{name}` is bound to two different imports")
        self.bound[name] = bound

    def _module_kind(self, dotted: str) -> str | None:
        if dotted in self.context.local:
            return "local"
        parts = dotted.split(".")
        for end in range(1, len(parts)):
            parent = ".".join(parts[:end])
            if parent not in self.specs or parts[end] not in self.specs[parent].submodules:
                return None
        return "module" if dotted in self.specs else None

    def _member_allowed(self, kind: str, module: str, name: str) -> bool:
        if kind == "local":
            return name in self.context.local.get(module, frozenset())
        spec = self.specs[module]
        return name in spec.names or bool(spec.extra and spec.extra(name))

    # --- names ------------------------------------------------------------------------------

    def _name(self, node: ast.AST, name: str) -> None:
        """Any occurrence of a name (load, store, parameter, definition, `except ... as`)."""
        if name in _FORBIDDEN_BUILTINS:
            self.hit("SH210", node, f"`{name}` is a builtin that is not allowed (it runs "
                     "code, reads or writes files, or reaches any object by name)")  # fmt: skip
        elif name in R.ATTRIBUTE_CALL_BUILTINS and not self._is_attribute_call(node):
            self.hit("SH213", node, f"`{name}` may only be called with a literal name")
        elif R.is_dunder(name) and name not in R.ALLOWED_DUNDER_NAMES:
            self.hit("SH211", node, f"`{name}` is a special name")
        elif name in self.bound and not isinstance(node, ast.Name):
            self.hit("SH114", node, f"`{name}` rebinds an imported name")
        elif name in self.bound and isinstance(node, ast.Name):
            self._bound_name(node, self.bound[name])

    def _bound_name(self, node: ast.Name, bound: _Bound) -> None:
        if not isinstance(node.ctx, ast.Load):
            self.hit("SH114", node, f"`{node.id}` rebinds an imported name")
        elif bound.kind != "value" and not self._is_base_of_attribute(node):
            self.hit("SH114", node, f"module {bound.target} is used as a value")
        elif bound.target in R.TYPE_ONLY and not self._type_position(node):
            self._type_only(node, bound.target)
        elif bound.target in R.CALL_ARITY:
            self._arity(node, bound.target)

    def _arity(self, node: ast.expr, full: str) -> None:
        call, most = self.parents.get(id(node)), R.CALL_ARITY[full]
        if not (isinstance(call, ast.Call) and call.func is node and len(call.args) <= most
                and not call.keywords and not any(isinstance(a, ast.Starred) for a in call.args)):
            self.hit("SH111", node, f"{full} only called in place with {most} argument(s): "
                     "other arguments name the attributes it copies")  # fmt: skip

    def _type_only(self, node: ast.expr, full: str) -> None:
        self.hit("SH111", node, f"{full} may be named only as a type (a function annotation, "
                 "isinstance/issubclass): calling it builds objects from raw memory")  # fmt: skip

    def _type_position(self, node: ast.expr) -> bool:
        """A parameter or return annotation, or isinstance's classes: compared, never kept."""
        child: ast.AST = node
        parent = self.parents.get(id(child))
        while isinstance(parent, (ast.Tuple, ast.Subscript, ast.BinOp, ast.Attribute)):
            child, parent = parent, self.parents.get(id(parent))
        if isinstance(parent, ast.arg):
            return parent.annotation is child
        if isinstance(parent, ast.FunctionDef):
            return parent.returns is child
        return isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and (
            parent.func.id in ("isinstance", "issubclass")
            and len(parent.args) == 2
            and parent.args[1] is child
        )

    def _is_base_of_attribute(self, node: ast.expr) -> bool:
        parent = self.parents.get(id(node))
        if isinstance(parent, ast.Attribute) and parent.value is node:
            return True
        return isinstance(parent, ast.Call) and self._is_attribute_call(parent.func) and (
            bool(parent.args) and parent.args[0] is node
        )

    def _is_attribute_call(self, node: ast.AST) -> bool:
        parent = self.parents.get(id(node))
        return (
            isinstance(node, ast.Name)
            and isinstance(parent, ast.Call)
            and parent.func is node
            and len(parent.args) >= 2
            and not any(isinstance(a, ast.Starred) for a in parent.args[:2])
            and isinstance(parent.args[1], ast.Constant)
            and isinstance(parent.args[1].value, str)
        )

    def _definition(self, node: ast.FunctionDef | ast.ClassDef) -> None:
        name = node.name
        if not R.is_dunder(name):
            self._name(node, name)
        in_class = isinstance(self.parents.get(id(node)), ast.ClassDef)
        if R.is_dunder(name) and name not in R.ALLOWED_DUNDER_DEFS:
            self.hit("SH211", node, f"defines `{name}`, which changes how the library sees it")
        elif in_class and name.startswith("_") and not R.is_dunder(name):
            self.hit("SH211", node, f"defines the private method `{name}` (it can override "
                     "the library's own)")  # fmt: skip

    def _in_class_body(self, node: ast.AST) -> bool:
        statement = self.parents.get(id(node))
        while statement is not None and not isinstance(statement, ast.stmt):
            statement = self.parents.get(id(statement))
        return statement is not None and isinstance(self.parents.get(id(statement)), ast.ClassDef)

    def _class_attribute(self, node: ast.Name) -> None:
        """A private class attribute would override the library's own (`_pool = None`)."""
        if node.id.startswith("_") and not R.is_dunder(node.id) and node.id != "_":
            self.hit("SH211", node, f"defines the private class attribute `{node.id}` (it can "
                     "override the library's own)")  # fmt: skip

    def _bases(self, node: ast.ClassDef) -> None:
        metaclass = [k.value for k in node.keywords if k.arg == "metaclass"]
        if any(k.arg is None for k in node.keywords):  # `**kw` could carry a metaclass
            self.hit("SH214", node, f"class {node.name}: `**` in the class keywords")
        for base in [*node.bases, *metaclass]:
            if why := self._base_problem(base):
                self.hit("SH214", base, f"class {node.name}: {why}")

    def _base_problem(self, base: ast.expr) -> str | None:
        """Why a base class is not allowed: it must be NAMED (an imported class, a builtin, or
        a class this file defines only with `class`), and never a pydantic model, whose
        subclasses have their annotations evaluated as code (strings included)."""
        if isinstance(base, ast.Attribute) and (module := self._module_of(base.value)):
            return self._imported_base(f"{module.target}.{base.attr}")
        if not isinstance(base, ast.Name):
            return "a base class must be named directly (an imported class or one defined here)"
        bound = self.bound.get(base.id)
        if bound is not None:
            return self._imported_base(bound.target) if bound.kind == "value" else "not a class"
        if base.id in R.ALLOWED_BUILTINS or base.id in self.classes:
            return None
        return f"`{base.id}` is neither an imported class nor one defined only by `class` here"

    def _imported_base(self, target: str) -> str | None:
        module, _, name = target.rpartition(".")
        if self._module_kind(module) == "local":
            local = self.context.classes.get(module, frozenset())
            return None if name in local else f"{target} is not a class defined by `class`"
        if R.evaluates_annotations(target):
            return f"{target} is a pydantic model: subclassing it evaluates annotations as code"
        return None

    # --- attributes --------------------------------------------------------------------------

    def _call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id == "super" and (node.args or node.keywords):
            # super(Base, obj) starts the lookup past any class named, up to bases the
            # allowlist never names (TorchServe's BaseHandler loads models by path).
            self.hit("SH210", node, "`super` with arguments reaches past the classes named "
                     "(write `super()`)")  # fmt: skip
        if isinstance(func, ast.Name) and self._is_attribute_call(func):
            literal = node.args[1]
            if isinstance(literal, ast.Constant) and isinstance(literal.value, str):
                self._attribute(node, node.args[0], literal.value)

    def _attribute(self, node: ast.expr, value: ast.expr, attr: str) -> None:
        if attr.startswith("_"):
            if not (attr in R.ALLOWED_DUNDER_DEFS and _is_super_call(value)):
                self.hit("SH211", node, f"`.{attr}` is a private or special attribute")
            return
        if attr.startswith(R.FRAME_PREFIXES) or attr == "cell_contents":
            self.hit("SH211", node, f"`.{attr}` reaches frame or code internals")
            return
        module = self._module_of(value)
        root = self._import_root(value)
        if module is None and attr in R.CALL_WITHOUT_UPDATE and not self._in_place(node):
            self.hit("SH212", node, f"`.{attr}` only called in place, without `update=` or `**` "
                     "(an update names any attribute, `__array_interface__` too)")  # fmt: skip
        if module is None and root is not None and _setter(node):
            self.hit("SH114", node, f"assigns to `.{attr}` of the imported {root.target}")
            return
        if module is None:
            if attr in self.refused_attrs:
                self.hit("SH212", node, f"`.{attr}` writes files, runs code or exposes memory "
                         "on some value the handler can reach")  # fmt: skip
            return
        self._module_attribute(node, module, attr)

    def _module_attribute(self, node: ast.expr, module: _Bound, attr: str) -> None:
        full = f"{module.target}.{attr}"
        if _setter(node):
            self.hit("SH114", node, f"assigns to {full} (modules are read-only here)")
        elif self._module_kind(full) is not None:
            if not (isinstance(node, ast.Attribute) and self._is_base_of_attribute(node)):
                self.hit("SH114", node, f"module {full} is used as a value")
        elif not self._member_allowed(module.kind, module.target, attr):
            self.hit("SH111", node, f"{full} is not on the allowlist of {module.target}")
        elif full in R.TYPE_ONLY and not self._type_position(node):
            self._type_only(node, full)
        elif full in R.CALL_ARITY:
            self._arity(node, full)

    def _in_place(self, node: ast.expr) -> bool:
        call = self.parents.get(id(node))
        return isinstance(call, ast.Call) and call.func is node and not any(
            k.arg is None or k.arg == "update" for k in call.keywords
        )

    def _import_root(self, node: ast.expr) -> _Bound | None:
        """What an import bound the name at the root of `a.b[c](d).e`, if anything."""
        while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
            node = node.func if isinstance(node, ast.Call) else node.value
        return self.bound.get(node.id) if isinstance(node, ast.Name) else None

    def _module_of(self, node: ast.expr) -> _Bound | None:
        if isinstance(node, ast.Name):
            bound = self.bound.get(node.id)
            return bound if bound and bound.kind != "value" else None
        if isinstance(node, ast.Attribute):
            base = self._module_of(node.value)
            full = f"{base.target}.{node.attr}" if base else ""
            kind = self._module_kind(full) if base else None
            return _Bound(kind, full) if kind else None
        return None


def _is_super_call(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and getattr(node.func, "id", "") == "super"


def _setter(node: ast.expr) -> bool:
    """`torch.x = ...`, `del torch.x`, `setattr(torch, "x", ...)`, `delattr(torch, "x")`."""
    if isinstance(node, ast.Attribute):
        return isinstance(node.ctx, (ast.Store, ast.Del))
    return isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("setattr", "delattr")


def judge_module(tree: ast.Module, member: str, context: ScanContext
                 ) -> tuple[list[Hit], dict[int, ast.AST]]:  # fmt: skip
    """What the allowlist refuses in `tree` (member `member`), and each node's parent (by id)."""
    judge = _Judge(tree, member, context)
    judge.run()
    return judge.hits, judge.parents
