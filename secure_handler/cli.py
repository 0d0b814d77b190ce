"""`secure-handler`: the command line. `main(argv) -> int` is testable in-process.

Exit codes, for every subcommand: 0 ok, 1 findings or refusal, 2 usage or IO error.
Each concern registers its own subcommands (`register(subparsers)`), so this module stays a
thin dispatcher.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["EXIT_FINDINGS", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2

# Modules that add subcommands; each defines `register(subparsers) -> None` and sets
# `func(args) -> int` on its parsers. Imported lazily so `--help` stays fast.
COMMAND_MODULES = (
    "secure_handler.supply.cli",
    "secure_handler.deploy.cli",
    "secure_handler.gateway.cli",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="secure-handler", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except OSError as exc:
        print(f"secure-handler {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
