"""Allowlist scan of the Python in a model archive: code runs only if it is on the list.

TorchServe imports the handler `.py` of a MAR, and whatever it imports from the archive, in the
worker, so every `.py` in the archive is code execution by design. A denylist over Python cannot
be complete, so this scan judges each file by what it may do (`supply/scan_rules.py`):

* the file is UTF-8 and declares no other encoding (SH002);
* it uses only syntax the scan understands (SH003);
* it imports only listed modules (SH110) and only listed names from them (SH111), no `*`
  (SH112), no relative import outside the archive (SH113); a module is used only as
  `module.name` and an imported name is never rebound (SH114); no archive module takes the
  name of a module outside the archive, which is the one the worker would run (SH412);
* it names only listed builtins (SH210): a forbidden builtin may not be referenced at all, so
  `x = eval`, `[eval][0]`, `map(eval, ...)` and `def f(e=eval)` are refused alike;
* no private, special or frame attribute (SH211), no attribute that writes files or reaches
  native code on any value (SH212), `getattr`/`setattr` only with a literal name (SH213).

Comments are never read: a waiver comes only from the operator's policy (`supply/policy.py`).
"""

from __future__ import annotations

import ast
import codecs
import functools
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import os
import pkgutil
import re
import sys
import tokenize
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from secure_handler.supply.findings import Finding, finding
from secure_handler.supply.policy import WAIVABLE_RULES, Policy, apply_policy, line_sha256
from secure_handler.supply.scan_judge import (
    FIX,
    ScanContext,
    judge_module,
    module_name,
)
from secure_handler.supply.scan_rules import allowed_module_names

__all__ = [
    "ScanContext",
    "ScanReport",
    "module_name",
    "python_files",
    "scan_file",
    "scan_paths",
    "scan_source",
    "scan_tree",
    "shadows_outside_module",
]

_COOKIE = re.compile(rb"coding[:=][ \t]*([-\w.]+)", re.IGNORECASE)
_BOM = codecs.BOM_UTF8
_UTF8_NAMES = frozenset({"utf-8", "utf8", "utf_8"})
#: How Python counts lines (ast line numbers): not str.splitlines, which also splits on \f.
_LINES = re.compile(r"\r\n|\r|\n")


# --- source -------------------------------------------------------------------------------


def _decode(data: bytes) -> tuple[str | None, str]:
    """The source text, or None and why it is refused. Python's own detection must agree."""
    # Python reads a declaration on line 1 or 2; both ways of splitting lines are searched.
    head = b"\n".join([*data.split(b"\n", 2)[:2], *re.split(rb"\r\n|\r|\n", data, maxsplit=2)[:2]])
    for match in _COOKIE.finditer(head):
        name = match.group(1).decode("ascii", "replace").lower()
        if name not in _UTF8_NAMES:
            return None, f"declares the encoding {name!r} (only UTF-8 is read as it runs)"
    try:
        detected, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as exc:
        return None, f"has an encoding declaration Python refuses: {exc}"
    if detected not in ("utf-8", "utf-8-sig"):
        return None, f"Python would read it as {detected!r}, not UTF-8"
    try:
        return data.removeprefix(_BOM).decode("utf-8", "strict"), ""
    except UnicodeDecodeError as exc:
        return None, f"is not UTF-8 ({exc.reason} at byte {exc.start})"


def _defined_names(tree: ast.Module) -> frozenset[str]:
    """Names a module defines at top level (not those it imports): what others may import."""
    names: set[str] = set()
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.For, ast.With)):
            targets = [n for n in ast.walk(node) if isinstance(n, ast.Name)]
            names.update(n.id for n in targets if isinstance(n.ctx, ast.Store))
        elif isinstance(node, (ast.If, ast.Try, ast.While)):
            for block in ("body", "orelse", "finalbody"):
                stack.extend(getattr(node, block, []))
    return frozenset(names)


# --- archive module names ----------------------------------------------------------------

#: Run by name at interpreter start when they are on `sys.path`; never an archive's module.
_STARTUP_MODULES = frozenset({"sitecustomize", "usercustomize", "__main__"})


@functools.lru_cache(maxsize=1)
def _torchserve_script_modules() -> frozenset[str]:
    """Modules beside TorchServe's worker script: `python .../ts/model_service_worker.py`
    puts the `ts/` folder FIRST on `sys.path`, ahead of the model directory."""
    spec = importlib.util.find_spec("ts")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return frozenset(m.name for m in pkgutil.iter_modules(locations))


@functools.lru_cache(maxsize=1)
def _distribution_modules() -> frozenset[str]:
    return frozenset(importlib.metadata.packages_distributions())


@functools.lru_cache(maxsize=1024)
def shadows_outside_module(top: str) -> bool:
    """True when an archive module named `top` would take the name of a module outside it.

    The worker imports by name from a `sys.path` that holds the model directory AND the
    standard library, site-packages and TorchServe's own folder; whichever module Python
    finds first (or imported before the handler) is the one that runs. The scan judges the
    archive's `os.py` while the worker runs the real `os`, so such a name is refused.
    """
    if top in _STARTUP_MODULES or top in sys.stdlib_module_names:
        return True
    # Not `sys.modules`: what the scanning process happened to import is not the worker's.
    if top in sys.builtin_module_names or top in allowed_module_names():
        return True
    if top in _torchserve_script_modules() or top in _distribution_modules():
        return True
    # Not the current directory: the scanned folder itself must not find its own files.
    cwd = os.path.realpath(os.getcwd())
    search = [p for p in sys.path if p and os.path.realpath(p) != cwd]
    return importlib.machinery.PathFinder.find_spec(top, search) is not None


# --- entry points ---------------------------------------------------------------------------


@dataclass
class ScanReport:
    """Findings (waived ones marked `allowed`) and the policy waivers they used."""

    findings: list[Finding] = field(default_factory=list)
    waivers: list[dict[str, str]] = field(default_factory=list)


def _parse(data: bytes, display: str) -> tuple[ast.Module | None, Finding | None]:
    source, why = _decode(data)
    if source is None:
        return None, finding("SH002", f"{display}:1", f"{why}; fix: {FIX['SH002']}")
    try:
        return ast.parse(source, filename=display), None
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        line = getattr(exc, "lineno", None) or 0
        return None, finding("SH001", f"{display}:{line}", f"does not parse: {exc}")


def _statement_lines(node: ast.AST, parents: Mapping[int, ast.AST]) -> tuple[int, int]:
    """The lines a waiver covers: the simple statement holding `node`, else `node` itself."""
    statement: ast.AST | None = node
    while statement is not None and not isinstance(statement, ast.stmt):
        statement = parents.get(id(statement))
    if statement is None or hasattr(statement, "body"):  # a def/if/with header: the node
        statement = node
    start = getattr(statement, "lineno", 0)
    return start, getattr(statement, "end_lineno", None) or start


def _hits(tree: ast.Module, member: str, display: str, context: ScanContext,
          lines: list[str]) -> list[tuple[Finding, str, str]]:  # fmt: skip
    """(finding, member, statement hash) for each refusal in one module, sorted by line."""
    try:
        hits, parents = judge_module(tree, member, context)
    except RecursionError:  # absurd nesting is itself a reason to refuse
        return [(finding("SH001", f"{display}:0", "nested too deeply to be analysed"), "", "")]
    seen: set[tuple[str, int, str]] = set()
    out: list[tuple[Finding, str, str]] = []
    for rule, node, message in hits:
        start, end = _statement_lines(node, parents)
        digest = line_sha256("\n".join(lines[start - 1 : end]))
        if (rule, start, message) in seen:
            continue
        seen.add((rule, start, message))
        if rule in WAIVABLE_RULES:
            message = f"{message} [line_sha256 {digest}]"
        out.append((finding(rule, f"{display}:{start}", message), member, digest))
    return sorted(out, key=lambda h: (int(h[0].location.rsplit(":", 1)[1]), h[0].rule))


def scan_tree(files: Mapping[str, bytes], prefix: str = "", policy: Policy | None = None
              ) -> ScanReport:  # fmt: skip
    """Scan an archive's `.py` files together (member name → bytes), waivers from `policy`.

    Locations are `{prefix}{member}:{line}`; imports between the files resolve to each other.
    """
    trees: dict[str, tuple[ast.Module, list[str]]] = {}
    refused: list[Finding] = []
    for member, data in sorted(files.items()):
        tree, problem = _parse(data, f"{prefix}{member}")
        if problem is not None:
            refused.append(problem)
        elif tree is not None:
            trees[member] = (tree, _LINES.split(data.removeprefix(_BOM).decode("utf-8")))
    parsed = {m: t for m, (t, _) in trees.items()}
    classes = {module_name(m): class_names(t) for m, t in parsed.items()}
    context = ScanContext(_local_modules(files, parsed), classes)
    refused += _shadowing(files, prefix)
    hits: list[tuple[Finding, str, str]] = []
    for member, (tree, lines) in trees.items():
        hits.extend(_hits(tree, member, f"{prefix}{member}", context, lines))
    findings, used = apply_policy(hits, policy)
    return ScanReport([*refused, *findings], used)


def _shadowing(files: Iterable[str], prefix: str) -> list[Finding]:
    """SH412 (verify's rule for members that shadow modules) for each archive module or
    package whose top-level name a module outside the archive has: the worker would run that
    one (already imported, or found first on `sys.path`) while the scan judged the archive's,
    so `import os` could mean either. Here so that `scan` on a folder says it too."""
    first: dict[str, str] = {}
    for member in sorted(files):
        first.setdefault(module_name(member).split(".")[0], member)
    return [
        finding("SH412", f"{prefix}{member}", f"the archive's module `{top}` takes the name of "
                "a module outside the archive, which is the one the worker runs; fix: rename "
                "it (and its imports) to a name no installed module has")  # fmt: skip
        for top, member in sorted(first.items())
        if shadows_outside_module(top)
    ]


def class_names(tree: ast.Module) -> frozenset[str]:
    """Names bound only by `class` statements anywhere in the module (never reassigned)."""
    classes: set[str] = set()
    other: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            classes.add(node.name)
        elif isinstance(node, ast.FunctionDef):
            other.add(node.name)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            other.add(node.id)
        elif isinstance(node, ast.arg):
            other.add(node.arg)
        elif isinstance(node, ast.alias):
            other.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            other.add(node.name)
    return frozenset(classes - other)


def _local_modules(files: Iterable[str], trees: Mapping[str, ast.Module]
                   ) -> dict[str, frozenset[str]]:  # fmt: skip
    """Module name → names it defines, for every module and package of the archive."""
    local: dict[str, frozenset[str]] = {}
    for member in files:  # packages without __init__.py are namespace packages
        parts = module_name(member).split(".")
        for end in range(1, len(parts) + 1):
            local.setdefault(".".join(parts[:end]), frozenset())
    local.update({module_name(m): _defined_names(t) for m, t in trees.items()})
    return local


def scan_source(source: str | bytes, filename: str = "handler.py") -> list[Finding]:
    """Scan one file on its own (no other archive modules to import, no waivers).

    Example:
        >>> [f.rule for f in scan_source("import subprocess as sp\\nsp.run(['id'])\\n")]
        ['SH110']
    """
    data = source.encode("utf-8") if isinstance(source, str) else source
    name = PurePosixPath(filename).name
    return scan_tree({name: data}, prefix=filename[: len(filename) - len(name)]).findings


def scan_file(path: str | os.PathLike[str], display: str | None = None) -> list[Finding]:
    """Scan one `.py` file; `display` is the name used in locations."""
    return scan_source(Path(path).read_bytes(), display or os.fspath(path))


def python_files(path: Path) -> Iterator[tuple[str, Path]]:
    """(member-style name, file) for a `.py` file, or every `.py` under a directory."""
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*.py") if p.is_file()):
            yield file.relative_to(path).as_posix(), file
    else:
        yield path.name, path


def scan_paths(paths: Iterable[str | os.PathLike[str]], policy: Policy | None = None
               ) -> ScanReport:  # fmt: skip
    """Scan files, and each directory as one archive tree. Raises OSError when unreadable.

    A waiver's `file` names a file as its path under the directory given (or its file name).
    """
    report = ScanReport()
    for path in map(Path, paths):
        files = {name: file.read_bytes() for name, file in python_files(path)}
        prefix = f"{path}/" if path.is_dir() else os.fspath(path)[: -len(path.name)]
        part = scan_tree(files, prefix, policy)
        report.findings += part.findings
        report.waivers += part.waivers
    return report
