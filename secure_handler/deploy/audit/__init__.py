"""Audit a TorchServe `config.properties`, its command line and its environment.

The ShellTorch attacks on TorchServe (2023) came from configuration: a management API
reachable from outside, `allowed_urls` letting the server fetch any URL (CVE-2023-43654) and,
through a registered archive, YAML deserialization (CVE-2022-1471). This package reads a config
the way TorchServe 0.12 reads it and reports every setting that reopens one of those doors.

* `context`: what is audited, as both of TorchServe's readers see it (Java and the launcher);
* `rules` (with `rules_network`, `rules_sources`, `rules_jvm`, `rules_env`): one function per
  concern;
* `jregex` and `languages`: Java regular expressions, judged for every string at once;
* `jvm`: JVM options, split as their readers split them and judged by an allowlist;
* `report`: ratings, output formats and the exit code.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from secure_handler.deploy.audit.context import AuditContext, parse_cmdline
from secure_handler.deploy.audit.report import (
    ConfigFinding,
    Severity,
    blocking,
    count_by_severity,
    exit_code,
    format_findings,
    format_markdown,
    sort_findings,
)
from secure_handler.deploy.audit.rules import RULES
from secure_handler.deploy.tsconfig import HandlerLimits

__all__ = [
    "AuditContext",
    "ConfigFinding",
    "Severity",
    "audit",
    "audit_file",
    "blocking",
    "count_by_severity",
    "exit_code",
    "format_findings",
    "format_markdown",
    "parse_cmdline",
]


def audit(ctx: AuditContext) -> list[ConfigFinding]:
    """Run every rule; findings sorted high → low, then by key."""
    return sort_findings(finding for rule in RULES for finding in rule(ctx))


def audit_file(
    path: str | os.PathLike[str],
    *,
    cmdline: str | Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    limits: HandlerLimits | None = None,
    model_limits: Mapping[str, HandlerLimits] | None = None,
    model_store: Path | None = None,
    gateway_config: Path | None = None,
) -> list[ConfigFinding]:
    """Audit a config file as TorchServe reads it (ISO-8859-1 bytes for Java).

    `cmdline` is the `torchserve ...` command (a string is split like a shell would);
    `environ` the server's environment (None: no environment checks); `gateway_config` the
    secure-handler gateway config in front of this server, the one condition under which the
    model API may be on.

    Raises:
        OSError: the file cannot be read.
        PropertiesError: it is not valid Java properties.
    """
    text = Path(path).read_bytes().decode("latin-1")
    if isinstance(cmdline, str):
        cmdline = shlex.split(cmdline)
    ctx = AuditContext.build(
        text, config_path=Path(path), cmdline=cmdline, environ=environ, limits=limits,
        model_limits=model_limits, model_store=model_store, gateway_config=gateway_config,
    )
    return audit(ctx)
