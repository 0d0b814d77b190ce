"""Inspect a TorchScript file's program WITHOUT loading it; refuse what is not allowed.

`torch.jit.load` compiles the printed code in `code/**.py` and unpickles `data.pkl`, running
any `__setstate__` the program defines, so a model can write files (`torch.from_file(...,
shared=True)` + `copy_`, `torch.save`) or read host files while loading or serving. Here, before
`torch.jit.load` ever sees the file, it is read as a zip:

* every member must have a known role (`_member_role`): printed code, the pickles, tensor data,
  version and id files, extra files. Anything else is refused;
* every code member is judged by `secure_handler.serving.tscode` (operators only from
  `secure_handler.serving.opsallow`, builtins, types and constructs only from fixed sets), and
  that covers `__setstate__`: it may call only what everything else may;
* every pickle (`data.pkl`, `constants.pkl`, `traced_inputs.pkl`, `*.debug_pkl`) is walked
  opcode by opcode with `pickletools` (never unpickled): opcodes from a fixed set, and globals
  only the tensor/storage rebuilders and list builders `torch.jit.save` writes, plus classes the
  program's own code defines and the allowed `torch.classes`; then replayed with inert
  stand-ins so every storage reference matches its record and every tensor view lies inside
  its storage (`secure_handler.serving.tspickle`).

Cost is bounded (`InspectLimits`): members, bytes of code, bytes of pickle, AST nodes, findings.
`inspect_torchscript` returns every `ScriptIssue`; `check_torchscript_program` raises
`UnsafeModelError` naming the first ones and the fix.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from secure_handler.errors import UnsafeModelError
from secure_handler.serving import tscode, tspickle

__all__ = ["InspectLimits", "ScriptIssue", "check_torchscript_program", "inspect_torchscript"]

#: One refused construct; `member` is relative to the archive's top folder.
ScriptIssue = tscode.CodeIssue


@dataclass(frozen=True)
class InspectLimits:
    """Bounds on what one inspection reads, so a hostile file cannot make it expensive."""

    # A scripted Transformer encoder prints ~80 KB of code (~17k AST nodes) and ~80 KB of
    # pickles: these bounds leave ample room and keep a worst case within seconds to tens of
    # seconds on a loaded 2-core machine (judging costs tens of microseconds a token).
    max_members: int = 50_000
    max_code_bytes: int = 8 << 20
    max_total_code_bytes: int = 32 << 20
    max_pickle_bytes: int = 64 << 20
    max_code_tokens: int = 500_000
    max_pickle_opcodes: int = 2_000_000
    max_issues: int = 100


_FIX = (
    "export the model with tensor operations only (no file, process, network, printing or "
    "custom operators, no custom classes) with torch.jit.script or torch.jit.trace; "
    "the allowed operators are listed in secure_handler/serving/opsallow.txt"
)
_DIGITS = re.compile(r"[0-9]+")
_SMALL_METADATA = frozenset({"version", ".data/version", "byteorder", ".data/serialization_id"})
_TENSOR_FOLDERS = frozenset({"data", "constants", "traced_inputs"})
_PICKLES = frozenset({"data.pkl", "constants.pkl", "traced_inputs.pkl"})
_TENSOR_PICKLES = frozenset({"data.pkl", "constants.pkl"})
_PRINTABLE = re.compile(r"[\x20-\x7e\n]*")


def check_torchscript_program(
    path: str | os.PathLike[str], limits: InspectLimits | None = None
) -> None:
    """Raise `UnsafeModelError` unless the program inside `path` passes the inspection."""
    issues = inspect_torchscript(path, limits)
    if issues:
        shown = "; ".join(str(i) for i in issues[:5])
        more = f" (and {len(issues) - 5} more)" if len(issues) > 5 else ""
        raise UnsafeModelError(
            f"{os.fspath(path)}: the TorchScript program is refused before loading: "
            f"{shown}{more}. Fix: {_FIX}"
        )


def inspect_torchscript(
    path: str | os.PathLike[str], limits: InspectLimits | None = None
) -> list[ScriptIssue]:
    """Every refused construct in the TorchScript file at `path`, read without loading it."""
    limits = limits or InspectLimits()
    try:
        with zipfile.ZipFile(os.fspath(path)) as zf:
            return _Inspection(zf, limits).run()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError,
            RuntimeError, zlib.error) as exc:  # fmt: skip
        return [ScriptIssue("", None, None, "zip", f"cannot be read as a zip: {exc}")]


def _issue(member: str, what: str, why: str) -> ScriptIssue:
    return ScriptIssue(member, None, None, what, why)


class _Inspection:
    """One pass over one file: members, then code (definitions first), then pickles."""

    def __init__(self, zf: zipfile.ZipFile, limits: InspectLimits) -> None:
        self.zf = zf
        self.limits = limits
        self.issues: list[ScriptIssue] = []
        self.program = tscode.Program()
        self.code_bytes = 0
        self.tokens = 0
        self.opcodes = 0
        self.records: dict[str, int] = {}  # member path under the top folder -> size

    def add(self, issues: Iterator[ScriptIssue] | list[ScriptIssue]) -> None:
        for issue in issues:
            if len(self.issues) >= self.limits.max_issues:
                self.issues.append(_issue("", "findings", f"over {self.limits.max_issues}; "
                                          "stopped reading"))
                raise _Stop
            self.issues.append(issue)

    def run(self) -> list[ScriptIssue]:
        with contextlib.suppress(_Stop):  # raised after its reason was added as the last issue
            self._run()
        return self.issues

    def _run(self) -> None:
        infos = self.zf.infolist()
        if len(infos) > self.limits.max_members:
            self.add([_issue("", "members", f"{len(infos)} over {self.limits.max_members}")])
            return
        roots = {info.filename.split("/", 1)[0] for info in infos}
        if len(roots) != 1:
            self.add([_issue("", "layout", "members are not under one top folder")])
            return
        root = roots.pop()
        code: list[tuple[str, zipfile.ZipInfo]] = []
        pickles: list[tuple[str, zipfile.ZipInfo]] = []
        for info in infos:
            name = info.filename[len(root) + 1:]
            role = _member_role(name)
            if role is None:
                self.add([_issue(name, "member", "not a part of a TorchScript file; refused "
                                 "as not understood")])
            elif role == "code":
                code.append((name, info))
            elif role == "pickle":
                pickles.append((name, info))
            self.records[name] = info.file_size
        trees = self._parse_all(code)
        for name, tree in trees:
            try:
                self.add(tscode.check_code(tree, name, self.program))
            except RecursionError:  # the printer hoists subexpressions: its code is shallow
                self.add([_issue(name, "code nesting", "nested deeper than the inspector "
                                 "follows; refused as not understood")])
        for name, info in pickles:
            self.add(self._check_pickle(name, info))

    def _parse_all(self, code: list[tuple[str, zipfile.ZipInfo]]) -> list[tuple[str, ast.Module]]:
        trees = []
        for name, info in code:
            text = self._read_code(name, info)
            if text is None:
                continue
            problem, tokens = _lexical_problem(text, self.limits.max_code_tokens - self.tokens)
            self.tokens += tokens
            if self.tokens > self.limits.max_code_tokens:
                self.add([_issue(name, "code size",
                                 f"all code over {self.limits.max_code_tokens} tokens")])
                raise _Stop
            if problem:
                self.add([_issue(name, "source text", problem)])
                continue
            try:
                tree = ast.parse(text, mode="exec")
            except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
                self.add([_issue(name, "source text", f"does not parse: {exc}")])
                continue
            tscode.collect(tree, _qualifier(name), self.program)
            trees.append((name, tree))
        return trees

    def _read_code(self, name: str, info: zipfile.ZipInfo) -> str | None:
        data = _read_bounded(self.zf, info, self.limits.max_code_bytes)
        if data is None:
            self.add([_issue(name, "code size", f"over {self.limits.max_code_bytes} bytes")])
            return None
        self.code_bytes += len(data)
        if self.code_bytes > self.limits.max_total_code_bytes:
            self.add([_issue(name, "code size",
                             f"all code over {self.limits.max_total_code_bytes} bytes")])
            raise _Stop
        try:
            return data.decode("ascii")
        except UnicodeDecodeError as exc:
            self.add([_issue(name, "source text", f"not ASCII: {exc}")])
            return None

    def _check_pickle(self, name: str, info: zipfile.ZipInfo) -> Iterator[ScriptIssue]:
        data = _read_bounded(self.zf, info, self.limits.max_pickle_bytes)
        if data is None:
            yield _issue(name, "pickle size", f"over {self.limits.max_pickle_bytes} bytes")
            return
        found = list(tspickle.walk_pickle(name, io.BytesIO(data), self.program, self))
        yield from found
        if any(issue.what == "pickle size" for issue in found):
            raise _Stop
        # Only a pickle of allowed opcodes and globals is replayed, and only those torch.jit.load
        # reads tensors from (it never reads traced_inputs.pkl; its records are saved empty).
        if not found and name in _TENSOR_PICKLES:
            yield from tspickle.check_storages(name, data, self.records, self.program)

    @property
    def max_pickle_opcodes(self) -> int:
        return self.limits.max_pickle_opcodes


class _Stop(Exception):
    """Stop reading: the finding or size budget is spent."""


def _read_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes | None:
    """The member's bytes, or None past `limit`: reads at most limit + 1 bytes, whatever the
    zip header claims."""
    with zf.open(info) as fh:
        data = fh.read(limit + 1)
    return None if len(data) > limit else data


def _lexical_problem(text: str, budget: int) -> tuple[str | None, int]:
    """Why the text is not in the printer's plain form (or None), and how many tokens were
    read: at most `budget` + 1, so an oversized member stops the tokenizer early.

    Python's parser and TorchScript's lexer must see the same tokens, or text that Python reads
    as a string could be code to TorchScript. So the text must be printable ASCII with `\\n`
    line ends (no tabs, `\\r`, form feeds), without comments, backslash continuations or
    strings other than plain `"..."`/`'...'`: exactly what the printer writes.
    """
    if not _PRINTABLE.fullmatch(text):
        bad = next(c for c in text if not _PRINTABLE.fullmatch(c))
        return f"character {bad!r}: only printable ASCII and \\n line ends are allowed", 0
    if "\\\n" in text:
        return "backslash line continuation", 0
    count = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            count += 1
            if count > budget:
                return None, count
            if token.type == tokenize.COMMENT:
                return f"comment on line {token.start[0]}", count
            if token.type == tokenize.STRING and (
                token.string[0] not in "\"'" or token.string[:3] in ('"""', "'''")
            ):
                return f"string literal {token.string[:20]!r} (prefixed or triple-quoted)", count
    except (tokenize.TokenError, IndentationError, SyntaxError) as exc:
        return f"cannot tokenize: {exc}", count
    return None, count


def _member_role(name: str) -> str | None:
    """`code`, `pickle`, `data` or None (unknown) for a member path under the top folder."""
    parts = name.split("/")
    if name in _SMALL_METADATA or name in _PICKLES:
        return "pickle" if name in _PICKLES else "data"
    if len(parts) == 2 and parts[0] in _TENSOR_FOLDERS and _DIGITS.fullmatch(parts[1]):
        return "data"
    if parts[0] == "extra" and len(parts) >= 2 and all(parts[1:]):
        return "data"  # `_extra_files`: handed to the caller as bytes, never interpreted
    if parts[0] != "code" or len(parts) < 2 or parts[1].split(".")[0] != "__torch__":
        return None
    stem = name[len("code/"):]
    if stem.endswith(".py.debug_pkl"):
        stem, role = stem[: -len(".debug_pkl")], "pickle"
    else:
        role = "code"
    dotted = stem[: -len(".py")].split("/") if stem.endswith(".py") else None
    if dotted is None or not all(tscode.IDENTIFIER.fullmatch(p) for p in dotted):
        return None
    return role


def _qualifier(name: str) -> str:
    """`code/__torch__/a/b.py` is where TorchScript looks for the qualifier `__torch__.a.b`."""
    return name[len("code/"): -len(".py")].replace("/", ".")
