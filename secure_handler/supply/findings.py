"""Findings of the supply-chain checks: one rule table, one finding shape.

Every check (`scan`, `verify`, `archive`, `lock`) reports `Finding`s. Each names a stable rule
id, the CWE it maps to, where it was found (`file:line`, a MAR member, or a path) and why.
Rule ids are a public contract, like error codes: CI jobs and operator policy files name them.

* SH0xx  the scan could not judge a file: unparseable, not UTF-8, unknown syntax (scan)
* SH11x  imports outside the scan's allowlist              (scan)
* SH21x  names and attributes outside the allowlist        (scan)
* SH10x, SH20x  the old denylist, now only `scan --lint` (advice, never a refusal)
* SH3xx  the zip container is unsafe                     (verify)
* SH4xx  the archive's content is unsafe                 (verify, archive)
* SH5xx  integrity: digests, pins, lock files            (verify, lock)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RULES", "Finding", "Rule", "blocking", "finding"]


@dataclass(frozen=True)
class Rule:
    """A check with a stable id, a short name and the CWE it guards against."""

    id: str
    name: str
    cwe: str
    summary: str


_RULE_ROWS = [
    ("SH001", "unparseable-code", "CWE-20", "a .py file that cannot be parsed cannot be checked"),
    ("SH002", "source-encoding", "CWE-176", "a .py is not UTF-8 or declares another encoding"),
    ("SH003", "unsupported-syntax", "CWE-20", "syntax the allowlist scan does not judge"),
    ("SH110", "import-not-allowed", "CWE-749", "a module outside the scan's allowlist"),
    ("SH111", "name-not-allowed", "CWE-749", "a name outside its module's allowlist"),
    ("SH112", "star-import", "CWE-749", "`from m import *` brings in unknown names"),
    ("SH113", "relative-import-outside", "CWE-829", "a relative import outside the archive"),
    ("SH114", "module-as-value", "CWE-749", "a module used other than as `module.name`"),
    ("SH210", "builtin-not-allowed", "CWE-95", "eval, exec, open, __import__, type, vars..."),
    ("SH211", "private-attribute", "CWE-470", "_private, __special__, frame/code internals"),
    ("SH212", "unsafe-attribute", "CWE-749", "a method that writes files or loads code"),
    ("SH213", "computed-attribute", "CWE-470", "getattr/setattr without a literal name"),
    ("SH214", "base-not-allowed", "CWE-95", "an unnamed base class, or a pydantic model's"),
    ("SH101", "process-execution", "CWE-78", "lint: subprocess, pty or os process/exec/system"),
    ("SH102", "deserialization-module", "CWE-502", "lint: pickle, marshal, shelve, dill..."),
    ("SH103", "native-code", "CWE-94", "lint: ctypes/cffi load and call native code"),
    ("SH104", "network-client", "CWE-918", "lint: sockets, HTTP clients, torch.hub"),
    ("SH105", "dynamic-import", "CWE-94", "lint: importlib, runpy, builtins, code"),
    ("SH201", "code-evaluation", "CWE-95", "lint: eval, exec, compile, __import__"),
    ("SH202", "dynamic-attribute", "CWE-470", "lint: getattr/setattr/delattr with a computed name"),
    ("SH203", "file-write", "CWE-73", "lint: open() for writing or with a computed path"),
    ("SH204", "unsafe-deserialization-call", "CWE-502", "lint: torch.load without weights_only..."),
    ("SH205", "reflection", "CWE-470", "lint: __globals__, globals(), sys.modules..."),
    ("SH301", "not-a-zip", "CWE-20", "the file is not a readable zip archive"),
    ("SH302", "zip-absolute-path", "CWE-22", "a member name is absolute or has a drive/backslash"),
    ("SH303", "zip-path-traversal", "CWE-22", "a member name has a '..' or '.' component"),
    ("SH304", "zip-link-member", "CWE-59", "a member is a symlink or special file"),
    ("SH305", "zip-duplicate-member", "CWE-436", "two members have the same name"),
    ("SH306", "zip-encrypted-member", "CWE-345", "a member is encrypted and cannot be inspected"),
    ("SH307", "zip-too-many-members", "CWE-409", "more members than the limit"),
    ("SH308", "zip-too-large", "CWE-409", "total uncompressed size over the limit"),
    ("SH309", "zip-bomb-ratio", "CWE-409", "a member's compression ratio is over the limit"),
    ("SH310", "zip-header-mismatch", "CWE-436", "local headers differ from the central directory"),
    ("SH311", "zip-unsupported-method", "CWE-20", "compression other than stored/deflated"),
    ("SH312", "zip-not-canonical", "CWE-436", "a zip construct outside the form zipfile writes"),
    ("SH401", "manifest-invalid", "CWE-20", "MAR-INF/MANIFEST.json is missing or malformed"),
    ("SH402", "eager-model-file", "CWE-502", "modelFile makes TorchServe torch.load (unpickle)"),
    ("SH403", "requirements-file", "CWE-829", "a requirements file is pip-installed at load"),
    ("SH404", "unknown-handler", "CWE-94", "the handler is neither in the archive nor allowed"),
    ("SH405", "serialized-file-missing", "CWE-20", "serializedFile is absent or not a member"),
    ("SH406", "non-python-runtime", "CWE-94", "runtime other than python runs native handlers"),
    ("SH407", "not-torchscript", "CWE-502", "the serialized file is not a TorchScript archive"),
    ("SH408", "compiled-code", "CWE-94", "compiled code (.pyc/.so/...) cannot be reviewed"),
    ("SH409", "pickle-file", "CWE-502", "a pickle (or pickle container) among the files"),
    ("SH410", "nested-archive", "CWE-409", "an archive inside the archive"),
    ("SH411", "config-invalid", "CWE-20", "the model-config file is not a YAML mapping"),
    ("SH412", "module-shadowing", "CWE-427", "a member shadows an importable module"),
    ("SH413", "dangerous-pickle-globals", "CWE-502", "a pickle imports dangerous globals"),
    ("SH414", "config-launch-setting", "CWE-15", "model-config changes how TorchServe launches"),
    ("SH420", "torchscript-code", "CWE-94", "TorchScript code outside the operator allowlist"),
    ("SH421", "torchscript-pickle", "CWE-502", "a TorchScript pickle global or opcode not allowed"),
    ("SH501", "digests-missing", "CWE-345", "no embedded digest manifest"),
    ("SH502", "digest-mismatch", "CWE-345", "a member differs from its embedded digest"),
    ("SH503", "digest-unlisted-member", "CWE-345", "a member is not in the digest manifest"),
    ("SH504", "digest-missing-member", "CWE-345", "the digest manifest lists a missing member"),
    ("SH505", "digests-invalid", "CWE-345", "the digest manifest is malformed"),
    ("SH506", "sha256-mismatch", "CWE-494", "the whole-file SHA-256 differs from the pin"),
    ("SH507", "lock-mismatch", "CWE-494", "the archive differs from its lock-file entry"),
    ("SH508", "lock-unlisted", "CWE-494", "a model-store entry is not in the lock file"),
    ("SH509", "lock-missing-archive", "CWE-494", "the lock file lists an archive that is absent"),
    ("SH510", "signature-invalid", "CWE-347", "the signature does not verify"),
]

#: Every rule, by id.
RULES: dict[str, Rule] = {row[0]: Rule(*row) for row in _RULE_ROWS}


@dataclass(frozen=True)
class Finding:
    """One problem: which rule, where, and why. `allowed`: waived by the operator's policy."""

    rule: str
    cwe: str
    location: str
    message: str
    allowed: bool = False

    @property
    def name(self) -> str:
        """The rule's short name, e.g. `zip-path-traversal`."""
        return RULES[self.rule].name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as printed by `--json`."""
        return {
            "rule": self.rule,
            "name": self.name,
            "cwe": self.cwe,
            "location": self.location,
            "message": self.message,
            "allowed": self.allowed,
        }

    def __str__(self) -> str:
        waived = " (waived)" if self.allowed else ""
        return f"{self.location}: {self.rule} {self.name} [{self.cwe}] {self.message}{waived}"


def finding(rule: str, location: str, message: str, allowed: bool = False) -> Finding:
    """A `Finding` for `rule`, with the rule's CWE filled in."""
    return Finding(rule, RULES[rule].cwe, location, message, allowed)


def blocking(findings: list[Finding]) -> list[Finding]:
    """The findings that refuse: all but those waived by the operator's policy file."""
    return [f for f in findings if not f.allowed]
