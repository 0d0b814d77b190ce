"""A LINT of handler code (the old denylist scan): names known to be dangerous, on the AST.

`secure-handler scan --lint` runs it. It is advice for authors, not a guarantee: a denylist
over Python cannot be complete (a review beat it 60 times out of 60), so `archive`, `verify`
and `lock` never rely on it; they run the allowlist scan of `supply/scan.py`.

It flags spawning processes, unpickling, native code, network clients, dynamic imports, eval,
reflective attribute access, writing files and `torch.load` without `weights_only=True`, with
names resolved through imports and simple assignments (`import subprocess as sp`,
`o = os; o.system`, `getattr(os, "system")`). Comments waive nothing.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from secure_handler.supply.findings import Finding, finding

__all__ = ["lint_file", "lint_paths", "lint_source"]

_PROCESS_MODULES = frozenset({"subprocess", "pty", "commands", "popen2", "asyncio.subprocess"})
_OS_MODULES = frozenset({"os", "posix", "nt"})
_OS_PROCESS_FUNCS = frozenset(
    {
        "system", "popen", "popen2", "popen3", "popen4", "fork", "forkpty", "startfile",
        "posix_spawn", "posix_spawnp", "execl", "execle", "execlp", "execlpe", "execv",
        "execve", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
        "spawnve", "spawnvp", "spawnvpe",
    }
)  # fmt: skip
_OTHER_PROCESS_NAMES = frozenset(
    {"asyncio.create_subprocess_exec", "asyncio.create_subprocess_shell"}
)
_DESERIALIZE_MODULES = frozenset(
    {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib",
     "jsonpickle"}
)  # fmt: skip
_NATIVE_MODULES = frozenset({"ctypes", "_ctypes", "cffi"})
_NETWORK_MODULES = frozenset(
    {"socket", "_socket", "socketserver", "http.client", "http.server", "urllib.request",
     "urllib3", "requests", "httpx", "aiohttp", "ftplib", "smtplib", "poplib", "imaplib",
     "telnetlib", "nntplib", "xmlrpc", "websocket", "websockets", "paramiko", "torch.hub"}
)  # fmt: skip
_DYNAMIC_MODULES = frozenset(
    {"importlib", "imp", "runpy", "builtins", "__builtin__", "code", "codeop", "zipimport"}
)
_MODULE_RULES = (
    (_PROCESS_MODULES, "SH101", "runs OS processes"),
    (_DESERIALIZE_MODULES, "SH102", "deserializes with pickle-like formats (code execution)"),
    (_NATIVE_MODULES, "SH103", "loads and calls native code"),
    (_NETWORK_MODULES, "SH104", "opens network connections"),
    (_DYNAMIC_MODULES, "SH105", "imports or runs code chosen at run time"),
)
#: Names an attribute chain may reach without an import (`torch.os.subprocess`...).
#: `code`/`codeop` are left out: `.code` is a common attribute (ScriptModule.code).
_MODULE_LEAVES = {
    name: (rule, why)
    for names, rule, why in _MODULE_RULES
    for name in names
    if "." not in name and name not in {"code", "codeop"}
}

_EVAL_BUILTINS = frozenset({"eval", "exec", "compile", "__import__"})
_ATTR_BUILTINS = frozenset({"getattr", "setattr", "delattr"})
_REFLECTION_BUILTINS = frozenset({"globals", "vars", "locals"})
_REFLECTION_ATTRS = frozenset(
    {"__dict__", "__globals__", "__builtins__", "__subclasses__", "__code__", "__bases__",
     "__mro__", "__getattribute__", "__loader__"}
)  # fmt: skip
_REFLECTION_NAMES = frozenset({"sys.modules", "sys._getframe", "__builtins__"})
_ATTRGETTERS = frozenset({"operator.attrgetter", "operator.methodcaller"})
_OPEN_NAMES = frozenset({"open", "io.open", "builtins.open", "codecs.open"})
_TORCH_LOADS = frozenset({"torch.load", "torch.serialization.load"})
_PICKLE_CALLS = frozenset({"pandas.read_pickle", "numpy.load"})
_BUILTIN_PREFIX = "builtins."


@dataclass
class _Names:
    """What each local name refers to: `sp` → `subprocess`, `s` → `os.system`."""

    aliases: dict[str, str] = field(default_factory=dict)

    def qualify(self, node: ast.expr) -> str | None:
        """The dotted name an expression refers to, or None when it is not a plain name."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.qualify(node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call) and self.is_builtin(node.func, "getattr"):
            literal = _literal_str(node.args[1]) if len(node.args) >= 2 else None
            base = self.qualify(node.args[0]) if node.args else None
            return f"{base}.{literal}" if base and literal else None
        return None

    def is_builtin(self, node: ast.expr, name: str) -> bool:
        """True when `node` is the builtin `name` (not shadowed by an import or assignment)."""
        return self.qualify(node) in (name, _BUILTIN_PREFIX + name)


def _literal_str(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _module_rule(qualified: str) -> tuple[str, str] | None:
    """The rule a dotted module (or a name inside it) falls under, by its longest prefix."""
    parts = qualified.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        for names, rule, why in _MODULE_RULES:
            if prefix in names:
                return rule, f"{prefix} {why}"
    return None


def _process_name(qualified: str) -> bool:
    parts = qualified.split(".")
    pairs = zip(parts, parts[1:], strict=False)
    return qualified in _OTHER_PROCESS_NAMES or any(
        a in _OS_MODULES and b in _OS_PROCESS_FUNCS for a, b in pairs
    )


class _Visitor(ast.NodeVisitor):
    """Walks one module and collects raw findings as (rule, node, message)."""

    def __init__(self, names: _Names) -> None:
        self.names = names
        self.hits: list[tuple[str, ast.AST, str]] = []
        self._inner_attrs: set[int] = set()

    def hit(self, rule: str, node: ast.AST, message: str) -> None:
        self.hits.append((rule, node, message))

    # --- imports ------------------------------------------------------------------------

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_imported(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:
            return  # relative imports load the archive's own (scanned) modules
        for alias in node.names:
            if alias.name == "*":
                self._check_star(node.module, node)
            else:
                self._check_imported(f"{node.module}.{alias.name}", node)

    def _check_star(self, module: str, node: ast.AST) -> None:
        if module in _OS_MODULES:
            self.hit("SH101", node, f"`from {module} import *` brings in system/exec/spawn")
        elif rule := _module_rule(module):
            self.hit(rule[0], node, f"`from {module} import *`: {rule[1]}")

    def _check_imported(self, qualified: str, node: ast.AST) -> None:
        if _process_name(qualified):
            self.hit("SH101", node, f"imports {qualified}, which runs OS commands")
            return
        rule = _module_rule(qualified)
        if rule:
            self.hit(rule[0], node, f"imports {qualified}: {rule[1]}")

    # --- names and attributes ---------------------------------------------------------------

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Attribute):
            self._inner_attrs.add(id(node.value))
        if id(node) not in self._inner_attrs:
            self._check_chain(node)
        if node.attr in _REFLECTION_ATTRS:
            self.hit("SH205", node, f"reflective access to `.{node.attr}` can reach any object")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id == "__builtins__":
            self.hit("SH205", node, "`__builtins__` gives access to eval/exec/__import__")

    def _check_chain(self, node: ast.expr) -> None:
        # Only chains rooted at an imported name are module paths; `self.code` is not.
        qualified = self.names.qualify(node)
        root = _root_name(node)
        if not qualified or root is None or root not in self.names.aliases:
            return
        parts = qualified.split(".")
        if _process_name(qualified):
            self.hit("SH101", node, f"uses {qualified}, which runs OS commands")
        elif qualified in _REFLECTION_NAMES:
            self.hit("SH205", node, f"`{qualified}` gives access to any loaded module or frame")
        elif (rule := _module_rule(qualified)) and not _module_rule(self.names.aliases[root]):
            # `import torch` then `torch.hub.load`: the import alone was not a finding.
            self.hit(rule[0], node, f"uses {qualified}: {rule[1]}")
        else:
            # A module reached as an attribute of another module (`torch.os`, `np.ctypes`)
            # bypasses import statements, so flag the attribute itself.
            for part in parts[1:]:
                if part in _MODULE_LEAVES:
                    leaf_rule, why = _MODULE_LEAVES[part]
                    self.hit(leaf_rule, node, f"reaches {qualified}: {part} {why}")
                    break

    # --- calls ------------------------------------------------------------------------------

    def visit_Call(self, node: ast.Call) -> None:
        qualified = self.names.qualify(node.func) or ""
        bare = qualified.removeprefix(_BUILTIN_PREFIX)
        if bare in _EVAL_BUILTINS and qualified in (bare, _BUILTIN_PREFIX + bare):
            self.hit("SH201", node, f"`{bare}()` runs code built at run time")
        elif bare in _ATTR_BUILTINS and qualified in (bare, _BUILTIN_PREFIX + bare):
            self._check_attr_call(node, bare)
        elif bare in _REFLECTION_BUILTINS and qualified in (bare, _BUILTIN_PREFIX + bare):
            self.hit("SH205", node, f"`{bare}()` exposes namespaces by name")
        elif qualified in _ATTRGETTERS:
            self.hit("SH202", node, f"`{qualified}` looks attributes up by string")
        elif qualified in _OPEN_NAMES:
            self._check_open(node, qualified)
        elif qualified in _TORCH_LOADS:
            self._check_torch_load(node, qualified)
        elif qualified in _PICKLE_CALLS:
            self._check_pickle_call(node, qualified)
        self.generic_visit(node)

    def _check_attr_call(self, node: ast.Call, builtin: str) -> None:
        name = node.args[1] if len(node.args) >= 2 else None
        if name is None or _literal_str(name) is None:
            self.hit(
                "SH202",
                node,
                f"`{builtin}()` with a computed attribute name cannot be "
                "checked statically (e.g. getattr(os, 'sys' + 'tem'))",
            )
        elif builtin == "getattr":
            self._check_chain(node)

    def _check_open(self, node: ast.Call, qualified: str) -> None:
        path = node.args[0] if node.args else _keyword(node, "file")
        mode = node.args[1] if len(node.args) >= 2 else _keyword(node, "mode")
        reasons = []
        if path is not None and _literal_str(path) is None:
            reasons.append("a computed path")
        if mode is not None:
            literal = _literal_str(mode)
            if literal is None:
                reasons.append("a computed mode")
            elif set(literal) & set("wax+"):
                reasons.append(f"mode {literal!r} (writes)")
        if reasons:
            self.hit("SH203", node, f"`{qualified}()` with {' and '.join(reasons)}")

    def _check_torch_load(self, node: ast.Call, qualified: str) -> None:
        flag = _keyword(node, "weights_only")
        if not (isinstance(flag, ast.Constant) and flag.value is True):
            self.hit(
                "SH204",
                node,
                f"`{qualified}()` without weights_only=True unpickles arbitrary objects",
            )

    def _check_pickle_call(self, node: ast.Call, qualified: str) -> None:
        if qualified == "pandas.read_pickle":
            self.hit("SH204", node, "`pandas.read_pickle()` unpickles")
            return
        flag = _keyword(node, "allow_pickle")
        if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
            self.hit("SH204", node, "`numpy.load()` with allow_pickle unpickles object arrays")


def _root_name(node: ast.expr) -> str | None:
    """The name a chain like `a.b.c` or `getattr(a, "b").c` starts from."""
    while True:
        if isinstance(node, ast.Attribute):
            node = node.value
        elif isinstance(node, ast.Call) and node.args:
            node = node.args[0]
        else:
            return node.id if isinstance(node, ast.Name) else None


def _keyword(node: ast.Call, name: str) -> ast.expr | None:
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _collect_aliases(tree: ast.Module) -> _Names:
    """Map local names to dotted names: imports first, then `x = module.attr` assignments.

    The analysis is flow-insensitive on purpose: a name bound to `os` anywhere counts as `os`
    everywhere, which can only add findings.
    """
    names = _Names()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names.aliases[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names.aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if alias.name != "*":
                    names.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    # Assignments may chain (`a = os; b = a`), so resolve until nothing changes.
    assigns = [
        (node.targets[0].id, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, (ast.Name, ast.Attribute, ast.Call))
    ]
    for _ in range(len(assigns) + 1):
        changed = False
        for target, value in assigns:
            qualified = names.qualify(value)
            if qualified and qualified != target and names.aliases.get(target) != qualified:
                names.aliases[target] = qualified
                changed = True
        if not changed:
            break
    return names


def lint_source(source: str | bytes, filename: str = "<handler>") -> list[Finding]:
    """Lint Python source; return findings sorted by line.

    Example:
        >>> [f.rule for f in lint_source("import subprocess as sp\\nsp.run(['id'])\\n")]
        ['SH101']
    """
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            return [finding("SH001", filename, f"not UTF-8 ({exc.reason}); cannot be checked")]
    try:
        tree = ast.parse(source, filename=filename)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        line = getattr(exc, "lineno", None) or 0
        return [finding("SH001", f"{filename}:{line}", f"does not parse: {exc}")]
    try:
        visitor = _Visitor(_collect_aliases(tree))
        visitor.visit(tree)
    except RecursionError:  # absurd nesting is itself a reason to refuse
        return [finding("SH001", filename, "nested too deeply to be analysed")]
    return _to_findings(visitor.hits, filename)


def _to_findings(hits: Iterable[tuple[str, ast.AST, str]], filename: str) -> list[Finding]:
    seen: set[tuple[str, int, str]] = set()
    out: list[Finding] = []
    for rule, node, message in hits:
        line = getattr(node, "lineno", 0)
        if (rule, line, message) in seen:
            continue
        seen.add((rule, line, message))
        out.append(finding(rule, f"{filename}:{line}", message))
    return sorted(out, key=lambda f: (int(f.location.rsplit(":", 1)[1]), f.rule))


def lint_file(path: str | os.PathLike[str], display: str | None = None) -> list[Finding]:
    """Lint one `.py` file; `display` is the name used in locations (e.g. the MAR member)."""
    data = Path(path).read_bytes()
    return lint_source(data, display or os.fspath(path))


def _python_files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        yield from sorted(p for p in path.rglob("*.py") if p.is_file())
    else:
        yield path


def lint_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Finding]:
    """Lint files, and every `.py` under directories. Raises OSError for unreadable paths."""
    findings: list[Finding] = []
    for path in paths:
        for file in _python_files(Path(path)):
            findings.extend(lint_file(file))
    return findings
