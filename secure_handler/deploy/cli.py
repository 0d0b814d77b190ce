"""`secure-handler config | audit-config | serve | stop`: deploy TorchServe safely.

* `config` writes a hardened `config.properties` for a model store (`config_cmd`).
* `audit-config` reports what is wrong with a config, its command line and its environment
  (`secure_handler.deploy.audit`); exit 1 when any finding is high.
* `serve` / `stop` verify the store against a lock and run TorchServe (`serve`).
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secure_handler.deploy import config_cmd, profiles, serve
from secure_handler.deploy.audit import (
    ConfigFinding,
    audit_file,
    blocking,
    count_by_severity,
    format_findings,
    format_markdown,
)
from secure_handler.deploy.common import (
    EXIT_FINDINGS,
    EXIT_OK,
    parse_handler_limits,
    print_json,
    run_command,
    store_limits,
)
from secure_handler.deploy.javaprops import load as load_properties

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `config`, `audit-config`, `serve` and `stop` to `sub`."""
    config_cmd.register(sub)
    _register_audit(sub)
    serve.register(sub)


def _register_audit(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("audit-config", help="report what is unsafe in a config.properties")
    p.add_argument("config", type=Path)
    p.add_argument("--cmdline", help='the torchserve command, e.g. "torchserve --start ..."')
    p.add_argument("--handler-limits", metavar="FILE|KEY=N,...",
                   help="handler limits to size against (default: the MARs in the store)")
    p.add_argument("--model-store", type=Path,
                   help="store to read handler limits from (default: from the config)")
    p.add_argument("--no-env", action="store_true",
                   help="skip the checks of this shell's environment")
    p.add_argument("--gateway-config", type=Path, metavar="GATEWAY_YAML",
                   help="the secure-handler gateway in front of this server; only then may "
                   "enable_model_api=true pass (management on loopback, same port and store)")
    p.add_argument("--profile", choices=profiles.PROFILES, default="local",
                   help="kserve: also the kserve profile's rules (deploy/ pod layout)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=run_command(cmd_audit))


def cmd_audit(args: argparse.Namespace) -> int:
    store = args.model_store
    if store is None:
        store_value = load_properties(args.config).get("model_store")
        store = Path(store_value) if store_value else None
    limits = parse_handler_limits(args.handler_limits) if args.handler_limits else None
    findings = audit_file(
        args.config, cmdline=args.cmdline, environ=None if args.no_env else dict(os.environ),
        limits=limits, model_limits=store_limits(store), model_store=store,
        gateway_config=args.gateway_config,
    )
    if args.profile == "kserve":  # the pod's command unless one is given
        command = shlex.split(args.cmdline) if args.cmdline else None
        findings += profiles.kserve_file_findings(
            args.config, command or profiles.kserve_command(args.config))
    _report(findings, args)
    return EXIT_FINDINGS if blocking(findings) else EXIT_OK


def _report(findings: Sequence[ConfigFinding], args: argparse.Namespace) -> None:
    if getattr(args, "json", False):
        print_json({"config": str(args.config), "counts": count_by_severity(findings),
                     "findings": [f.to_dict() for f in findings]})
    elif getattr(args, "markdown", False):
        print(format_markdown(findings))
    else:
        print(format_findings(findings))
