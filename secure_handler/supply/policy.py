"""Operator waivers for the handler scan: a policy file the operator passes, never the archive.

An archive's author cannot waive a finding: comments are not read at all. An operator who has
reviewed a line writes a waiver into a policy file (YAML or JSON) and passes it with
`archive --policy`, `verify --policy` or `lock --policy`::

    format: secure-handler-policy/1
    waivers:
      - file: handler.py          # the archive member
        rule: SH212               # the one rule waived
        line_sha256: 3f2a...      # SHA-256 of the line's text, stripped of outer whitespace
        reason: reviewed by A. Person on 2026-11-30; the path is a constant

The line is named by the hash of its text, not its number, so a waiver survives edits
elsewhere in the file and dies when the line itself changes (for a statement written over
several lines, the hash covers all of them, so no argument can change under a waiver). The
scan prints the hash of each waivable finding (`line_sha256` in its message).

Only the scan's allowlist rules (SH110-SH114, SH210-SH213) can be waived; encoding, syntax
and parse failures (SH001-SH003) cannot, because the scan did not understand the file. The
waivers a MAR used are recorded in its lock entry, and `verify --lock` compares them: a lock
that records waivers verifies only with a policy that grants the same waivers, and a lock
without waivers never accepts any.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from secure_handler.supply.findings import Finding

__all__ = [
    "POLICY_FORMAT",
    "WAIVABLE_RULES",
    "Policy",
    "Waiver",
    "add_policy_argument",
    "apply_policy",
    "line_sha256",
    "load_policy",
    "policy_from_args",
]

POLICY_FORMAT = "secure-handler-policy/1"
#: The scan rules a reviewed line may be waived for.
WAIVABLE_RULES = frozenset(
    {"SH110", "SH111", "SH112", "SH113", "SH114", "SH210", "SH211", "SH212", "SH213"}
)
_MAX_POLICY_BYTES = 1 << 20


class Waiver(BaseModel):
    """One reviewed line: in this member, with this text, this rule does not refuse."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(min_length=1, max_length=1000)
    rule: str
    line_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    reason: str = Field(min_length=1, max_length=2000)

    @field_validator("rule")
    @classmethod
    def _waivable(cls, rule: str) -> str:
        if rule not in WAIVABLE_RULES:
            raise ValueError(f"{rule} cannot be waived; waivable: {sorted(WAIVABLE_RULES)}")
        return rule

    @field_validator("file")
    @classmethod
    def _member_path(cls, file: str) -> str:
        if file.startswith("/") or "\\" in file or ".." in file.split("/"):
            raise ValueError("name an archive member, e.g. handler.py or pkg/util.py")
        return file

    def key(self) -> tuple[str, str, str]:
        return (self.file, self.rule, self.line_sha256)

    def record(self) -> dict[str, str]:
        """How a used waiver is written into the lock file (the reason stays in the policy)."""
        return {"file": self.file, "rule": self.rule, "line_sha256": self.line_sha256}


class Policy(BaseModel):
    """An operator's policy file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["secure-handler-policy/1"]
    waivers: tuple[Waiver, ...] = ()


def line_sha256(text: str) -> str:
    """The hash a waiver names: SHA-256 of the line's UTF-8 text without outer whitespace.

    A statement over several lines is hashed as its lines, each stripped, joined by "\\n".
    """
    joined = "\n".join(line.strip() for line in text.split("\n"))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; ValueError says what is wrong with it."""
    if path.stat().st_size > _MAX_POLICY_BYTES:
        raise ValueError(f"{path}: a policy file is at most {_MAX_POLICY_BYTES} bytes")
    text = path.read_text("utf-8")
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path}: not a {POLICY_FORMAT} policy: {exc}") from exc


def apply_policy(
    hits: Iterable[tuple[Finding, str, str]], policy: Policy | None
) -> tuple[list[Finding], list[dict[str, str]]]:
    """Mark the findings the policy waives; return them and the waivers used (sorted).

    Each hit is (finding, archive member, SHA-256 of the flagged statement's stripped text).
    """
    waivers = {w.key(): w for w in policy.waivers} if policy else {}
    used: dict[tuple[str, str, str], Waiver] = {}
    out: list[Finding] = []
    for hit, member, digest in hits:
        waiver = waivers.get((member, hit.rule, digest)) if hit.rule in WAIVABLE_RULES else None
        if waiver is None:
            out.append(hit)
            continue
        used[waiver.key()] = waiver
        note = f"{hit.message} (waived by operator policy: {waiver.reason})"
        out.append(dataclasses.replace(hit, message=note, allowed=True))
    return out, [used[k].record() for k in sorted(used)]


def add_policy_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--policy FILE` for the commands that judge archives (archive, verify, lock, scan)."""
    parser.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="operator policy (YAML/JSON) with reviewed scan waivers; comments in the "
        "archive never waive anything",
    )


def policy_from_args(args: argparse.Namespace) -> Policy | None:
    """The --policy file, validated; ValueError (a usage error) when unreadable or invalid."""
    if args.policy is None:
        return None
    try:
        return load_policy(args.policy)
    except OSError as exc:
        raise ValueError(f"cannot read the policy file: {exc}") from exc
