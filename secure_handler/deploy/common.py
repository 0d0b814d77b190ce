"""What the deployment commands share: exit codes, usage errors, handler limits of a store."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from secure_handler.deploy.javaprops import PropertiesError
from secure_handler.deploy.tsconfig import HandlerLimits, read_mar_info
from secure_handler.errors import ConfigurationError

__all__ = [
    "EXIT_FINDINGS", "EXIT_OK", "EXIT_USAGE", "UsageError", "parse_handler_limits", "print_json",
    "run_command", "store_limits",
]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


class UsageError(ConfigurationError):
    """Bad arguments or unreadable inputs: exit code 2 with the message."""


def print_json(data: Mapping[str, Any]) -> None:
    """Machine-readable output of a command (`--json`)."""
    print(json.dumps(data, indent=2, sort_keys=True))


def run_command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so `UsageError` and parse errors become exit 2 with a message."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except (UsageError, PropertiesError, ValueError) as exc:
            print(f"secure-handler {args.command}: {exc}", file=sys.stderr)
            return EXIT_USAGE

    return wrapper


def parse_handler_limits(value: str) -> HandlerLimits:
    """`--handler-limits`: a YAML file (model-config.yaml or a bare `handler:` mapping) or
    inline `max_request_bytes=N,max_batch_size=N`."""
    path = Path(value)
    if path.is_file():
        data = yaml.safe_load(path.read_text("utf-8"))
        if isinstance(data, dict) and isinstance(data.get("handler"), dict):
            data = data["handler"]
        if not isinstance(data, dict):
            raise UsageError(f"{path}: expected a mapping of handler limits")
        return HandlerLimits.from_section(data)
    section: dict[str, Any] = {}
    for item in filter(None, value.split(",")):
        key, sep, number = item.partition("=")
        if not sep or not number.strip().isdigit():
            raise UsageError(f"--handler-limits: expected a file or KEY=N[,KEY=N], got {item!r}")
        section[key.strip()] = int(number)
    return HandlerLimits.from_section(section)


def store_limits(store: Path | None) -> dict[str, HandlerLimits]:
    """Handler limits of every MAR in the store, by model name (unreadable ones are skipped)."""
    found: dict[str, HandlerLimits] = {}
    if store is None or not store.is_dir():
        return found
    for mar in sorted(store.glob("*.mar")):
        try:
            info = read_mar_info(mar)
        except ValueError as exc:
            print(f"warning: {exc}", file=sys.stderr)
            continue
        found[info.name] = info.limits
    return found
