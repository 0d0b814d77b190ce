"""`secure-handler gateway`: run the gateway, or mint a client key.

    secure-handler gateway --config gateway.yaml [--host H] [--port P] [--check]
    secure-handler gateway new-key NAME [--scopes inference management] [--models m m:1.0]
                                        [--rate 5/s] [--burst N] [--json]

Starlette and uvicorn are imported only when the gateway runs, so the rest of the CLI works
without the `[gateway]` extra.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from secure_handler.gateway.config import GatewayConfig, KeyEntry, load_config, parse_rate
from secure_handler.gateway.keys import generate_key, hash_key

__all__ = ["register"]

EXIT_OK, EXIT_USAGE = 0, 2
logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `gateway` (and `gateway new-key`) to `sub`."""
    parser = sub.add_parser(
        "gateway", help="authenticating, rate-limiting proxy in front of TorchServe",
        description="Run the gateway (API keys, scopes, model allowlist, rate limits, audit log).",
    )
    parser.add_argument("--config", type=Path, help="gateway.yaml")
    parser.add_argument("--host", help="listen address (overrides listen_host)")
    parser.add_argument("--port", type=int, help="listen port (overrides listen_port)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_dispatch, gateway_action=None)
    actions = parser.add_subparsers(dest="gateway_action", metavar="ACTION")
    new_key = actions.add_parser("new-key", help="mint a client key; prints it once")
    new_key.add_argument("name", help="the key's name (what the audit log shows)")
    new_key.add_argument("--scopes", nargs="+", default=["inference"],
                         choices=["inference", "management"])
    new_key.add_argument("--models", nargs="*", default=[], metavar="MODEL[:VERSION]",
                         help="models this key may use")
    new_key.add_argument("--rate", default="5/s", help="token refill rate: N, N/s, N/m or N/h")
    new_key.add_argument("--burst", type=int, help="bucket size (default: ⌈rate per second⌉)")
    # SUPPRESS: `gateway --json new-key` and `gateway new-key --json` both work.
    new_key.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="machine-readable output")


def _dispatch(args: argparse.Namespace) -> int:
    if args.gateway_action == "new-key":
        return _new_key(args)
    return _run(args)


def _new_key(args: argparse.Namespace) -> int:
    key = generate_key()
    try:
        rate = parse_rate(args.rate, args.burst)
        entry = KeyEntry.model_validate({
            "name": args.name, "sha256": hash_key(key), "scopes": args.scopes,
            "models": args.models, "rate": rate.model_dump(),
        })
    except (ValueError, ValidationError) as exc:
        print(f"secure-handler gateway new-key: {exc}", file=sys.stderr)
        return EXIT_USAGE
    data = entry.model_dump(mode="json")
    data["scopes"] = sorted(data["scopes"])
    data["models"] = [_grant_text(g) for g in data["models"]]
    if args.json:
        print(json.dumps({"key": key, "entry": data}, indent=2))
        return EXIT_OK
    print(f"API key for {args.name!r} (shown only now; keep it in a secret store):\n\n  {key}\n")
    print("Add this entry under `keys:` in gateway.yaml (it holds only the key's SHA-256):\n")
    print(yaml.safe_dump([data], sort_keys=False, default_flow_style=None).rstrip())
    return EXIT_OK


def _grant_text(grant: dict[str, Any]) -> str | dict[str, Any]:
    versions = grant["versions"]
    if not versions:
        return str(grant["name"])
    if len(versions) == 1:
        return f"{grant['name']}:{versions[0]}"
    return grant


def _load(args: argparse.Namespace) -> GatewayConfig | None:
    if args.config is None:
        print("secure-handler gateway: --config gateway.yaml is required", file=sys.stderr)
        return None
    try:
        config = load_config(args.config)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"secure-handler gateway: {args.config}: {exc}", file=sys.stderr)
        return None
    pairs = (("listen_host", args.host), ("listen_port", args.port))
    updates = {k: v for k, v in pairs if v is not None}
    return config.model_copy(update=updates) if updates else config


def _summary(config: GatewayConfig) -> dict[str, Any]:
    return {
        "listen": f"{config.listen_host}:{config.listen_port}",
        "upstream": {"inference": config.upstream.inference_url,
                     "management": config.upstream.management_url},
        "models": sorted(config.models),
        "keys": [{"name": k.name, "scopes": sorted(k.scopes)} for k in config.keys],
        "rate_limit_backend": config.rate_limit_backend,
        "audit_log": str(config.audit_log),
    }


def _run(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_USAGE
    if args.check:
        summary = _summary(config)
        print(json.dumps(summary, indent=2) if args.json else _human(summary))
        return EXIT_OK
    try:
        import uvicorn

        from secure_handler.gateway.connections import server_config
        from secure_handler.gateway.logs import configure_logging
        from secure_handler.gateway.server import create_app
    except ImportError as exc:
        print(f"secure-handler gateway needs the [gateway] extra: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(args.log_level)
    _warn_if_exposed(config)
    try:
        app = create_app(config)
    except OSError as exc:  # the audit log: a symlink at the path (O_NOFOLLOW), no permission
        print(f"secure-handler gateway: audit log {config.audit_log}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_USAGE
    server = uvicorn.Server(server_config(app, config))
    _exit_cleanly_on_stop_signals()
    server.run()  # SIGTERM/SIGINT: stop accepting, finish in-flight requests, then lifespan end
    return EXIT_OK


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(EXIT_OK)


def _exit_cleanly_on_stop_signals() -> None:
    # uvicorn handles SIGTERM/SIGINT itself while serving, then restores the previous handlers
    # and raises the signal again; with these handlers a graceful stop exits 0, not -15.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)


def _warn_if_exposed(config: GatewayConfig) -> None:
    try:
        loopback = ipaddress.ip_address(config.listen_host).is_loopback
    except ValueError:
        loopback = config.listen_host == "localhost"
    if not loopback and config.tls_certfile is None:
        logger.warning("listening on %s without TLS: API keys cross the network in clear text",
                       config.listen_host)


def _human(summary: dict[str, Any]) -> str:
    keys = ", ".join(f"{k['name']} ({'+'.join(k['scopes'])})" for k in summary["keys"]) or "none"
    return "\n".join([
        "gateway config OK",
        f"  listen     {summary['listen']}",
        f"  upstream   {summary['upstream']['inference']} / {summary['upstream']['management']}",
        f"  models     {', '.join(summary['models'])}",
        f"  keys       {keys}",
        f"  limits     {summary['rate_limit_backend']}",
        f"  audit log  {summary['audit_log']}",
    ])
