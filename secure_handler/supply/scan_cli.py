"""`secure-handler scan`: the allowlist scan on files (what archive and verify run), or a lint.

Exit codes: 0 ok, 1 findings, 2 usage or IO error. `--lint` runs the old denylist, which is
advice for authors and never a reason to trust a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secure_handler.supply.findings import Finding, blocking
from secure_handler.supply.lint import lint_paths
from secure_handler.supply.policy import add_policy_argument, policy_from_args
from secure_handler.supply.scan import scan_paths

__all__ = ["add_scan", "emit", "finding_lines"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


def add_scan(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "scan",
        help="allowlist scan of handler .py files (what archive and verify run)",
        description="Judge .py files by the allowlist archive and verify apply: rule id, "
        "file:line, CWE and the fix per finding. A directory is one archive tree. Comments "
        "waive nothing; an operator waives a reviewed line with --policy FILE.",
    )
    p.add_argument("paths", nargs="+", type=Path, help=".py files or directories")
    p.add_argument(
        "--lint",
        action="store_true",
        help="run the old denylist LINT instead: advice for authors, not a guarantee",
    )
    add_policy_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_scan)


def _cmd_scan(args: argparse.Namespace) -> int:
    if args.lint:
        return _cmd_lint(args)
    try:
        report = scan_paths(args.paths, policy_from_args(args))
    except (OSError, ValueError) as exc:
        return _usage_error(exc)
    refused = blocking(report.findings)
    head = [
        f"{'REFUSED' if refused else 'OK'}: {len(refused)} finding(s), "
        f"{len(report.findings) - len(refused)} waived by the operator policy"
    ]
    payload = {
        "ok": not refused,
        "findings": [f.to_dict() for f in report.findings],
        "waivers": report.waivers,
    }
    emit(args, payload, [*head, *finding_lines(report.findings)])
    return EXIT_FINDINGS if refused else EXIT_OK


def _cmd_lint(args: argparse.Namespace) -> int:
    if args.policy is not None:
        return _usage_error(ValueError("--lint takes no --policy: it refuses nothing"))
    try:
        findings = lint_paths(args.paths)
    except OSError as exc:
        return _usage_error(exc)
    head = [f"LINT (advice, not a guarantee; `scan` without --lint decides): "
            f"{len(findings)} finding(s)"]  # fmt: skip
    payload = {"ok": not findings, "lint": True, "findings": [f.to_dict() for f in findings]}
    emit(args, payload, [*head, *finding_lines(findings)])
    return EXIT_FINDINGS if findings else EXIT_OK


def emit(args: argparse.Namespace, payload: dict[str, Any], lines: Sequence[str]) -> None:
    """`--json`: the payload; otherwise the lines (shared by every supply command)."""
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        for line in lines:
            print(line)


def finding_lines(findings: Sequence[Finding], indent: str = "  ") -> list[str]:
    """One indented line per finding."""
    return [f"{indent}{f}" for f in findings]


def _usage_error(exc: BaseException) -> int:
    print(f"secure-handler scan: {exc}", file=sys.stderr)
    return EXIT_USAGE
