"""Findings of `audit-config`: their ratings, how they print, and the exit code they give.

A finding is rated `high` (TorchServe would run code, fetch archives, or expose an API it
should not: `serve` refuses to start), `medium` (weaker than the hardened config, fix it) or
`low` (worth knowing). Output formats (text, `--json`, `--markdown`) and exit codes (0: no high
finding, 1: at least one) are part of the command's contract and stay stable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "EXIT_FINDINGS",
    "EXIT_OK",
    "ConfigFinding",
    "Severity",
    "blocking",
    "count_by_severity",
    "exit_code",
    "format_findings",
    "format_markdown",
    "sort_findings",
]

Severity = Literal["high", "medium", "low"]
RANK: dict[str, int] = {"high": 0, "medium": 1, "low": 2}
EXIT_OK, EXIT_FINDINGS = 0, 1


@dataclass(frozen=True)
class ConfigFinding:
    """One problem: how bad, which setting, why (CWE/CVE) and the fix."""

    severity: Severity
    key: str
    why: str
    fix: str
    cwe: tuple[str, ...] = ()
    cve: tuple[str, ...] = ()
    value: str | None = None
    source: str = "config"

    @property
    def references(self) -> str:
        """`CWE-306, CVE-2023-43654` style list, empty when none applies."""
        return ", ".join((*self.cwe, *self.cve))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as printed by `--json`."""
        return {
            "severity": self.severity, "key": self.key, "value": self.value,
            "source": self.source, "why": self.why, "fix": self.fix,
            "cwe": list(self.cwe), "cve": list(self.cve),
        }

    def __str__(self) -> str:
        refs = f" ({self.references})" if self.references else ""
        return f"{self.severity}: {self.key}: {self.why}{refs} Fix: {self.fix}"


def sort_findings(findings: Iterable[ConfigFinding]) -> list[ConfigFinding]:
    """High → low, then by key; one copy of findings that two views of the file both raise."""
    unique = list(dict.fromkeys(findings))
    return sorted(unique, key=lambda f: (RANK[f.severity], f.key))


def blocking(findings: Iterable[ConfigFinding]) -> list[ConfigFinding]:
    """The findings that refuse a start: every high one."""
    return [f for f in findings if f.severity == "high"]


def exit_code(findings: Iterable[ConfigFinding]) -> int:
    """`audit-config`'s exit status: 1 when any finding is high, else 0."""
    return EXIT_FINDINGS if blocking(findings) else EXIT_OK


def count_by_severity(findings: Iterable[ConfigFinding]) -> dict[str, int]:
    counts = dict.fromkeys(RANK, 0)
    for finding in findings:
        counts[finding.severity] += 1
    return counts


def format_findings(findings: Sequence[ConfigFinding]) -> str:
    """Human output: one block per finding and a summary line."""
    lines = []
    for f in findings:
        value = "" if f.value in (None, "") else f" = {_short(f.value)}"
        refs = f" [{f.references}]" if f.references else ""
        lines += [f"{f.severity.upper():<7}{f.key}{value}  ({f.source})",
                  f"       why: {f.why}{refs}", f"       fix: {f.fix}"]
    counts = count_by_severity(findings)
    lines.append(", ".join(f"{n} {sev}" for sev, n in counts.items()) if findings
                 else "no findings")
    return "\n".join(lines)


def format_markdown(findings: Sequence[ConfigFinding]) -> str:
    """A Markdown table (severity, key, why, fix) for reports and READMEs."""
    rows = ["| severity | key | why | fix |", "|---|---|---|---|"]
    for f in findings:
        refs = f" ({f.references})" if f.references else ""
        cells = [f.severity, f"`{f.key}`", f.why + refs, f.fix]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def _short(value: str, width: int = 60) -> str:
    # Values may hold the very characters an attack hides behind (U+2028, U+3000...):
    # print them escaped so the operator sees what TorchServe sees.
    shown = value.encode("unicode_escape").decode("ascii") if not value.isprintable() \
        else value
    return shown if len(shown) <= width else shown[: width - 3] + "..."
