"""`secure-handler`: build, check, deploy and guard TorchServe models safely.

Exit codes, for every subcommand: 0 ok, 1 findings or refusal, 2 usage or IO error.
Each concern registers its own subcommands (`register(subparsers)`), so this module stays a
thin dispatcher; `main(argv)` returns the exit code, so it can be called in-process.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from secure_handler import __version__

__all__ = ["EXIT_FINDINGS", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2

# Modules that add subcommands; each defines `register(subparsers) -> None` and sets
# `func(args) -> int` on its parsers. Imported lazily so `--help` stays fast.
COMMAND_MODULES = (
    "secure_handler.supply.cli",
    "secure_handler.deploy.cli",
    "secure_handler.gateway.cli",
)

DESCRIPTION = """\
Hardened TorchServe handlers and the tools around them.

  supply chain   archive, verify, scan, lock, sign: a tampered or unsafe model archive (.mar)
                 is refused before anything in it runs
  deployment     config, audit-config, serve, stop: a hardened config.properties, checked,
                 and TorchServe started only on a store that matches its lock
  gateway        gateway [new-key]: API keys, rate limits and an audit log in front of
                 TorchServe

Exit codes: 0 ok, 1 findings or refusal, 2 usage or IO error.
Run `secure-handler COMMAND --help` for the options of one command."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="secure-handler", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"secure-handler {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help, --version and on usage errors
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except OSError as exc:
        print(f"secure-handler {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
