"""`secure-handler config`: a hardened `config.properties` for a model store.

Sizes the frontend by each archive's handler limits (read once, bounded, from the archive), binds
loopback unless TLS is given, and prints the exact `torchserve` command (always
`--ncs --ts-config`).
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_handler.deploy import profiles
from secure_handler.deploy.audit import audit_file, blocking, format_findings
from secure_handler.deploy.common import (
    EXIT_FINDINGS,
    EXIT_OK,
    UsageError,
    parse_handler_limits,
    print_json,
    run_command,
)
from secure_handler.deploy.launcher import TorchServe, free_port
from secure_handler.deploy.tsconfig import (
    HandlerLimits,
    ModelSpec,
    Ports,
    Tls,
    hardened_properties,
    is_loopback,
    read_mar_info,
    render_properties,
)

__all__ = ["StoreModel", "build_config", "register", "torchserve_command"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `config` to `sub`."""
    _register_config(sub)


def _register_config(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("config", help="write a hardened config.properties for a model store")
    p.add_argument("--model-store", required=True, type=Path, help="directory of .mar files")
    p.add_argument("--model", action="append", default=[], metavar="NAME=FILE.mar",
                   help="a model to load (repeatable); default: every .mar in the store")
    p.add_argument("--handler-limits", metavar="FILE|KEY=N,...",
                   help="override the handler limits read from the MARs' model-config.yaml")
    p.add_argument("--out", type=Path, default=Path("config.properties"))
    p.add_argument("--free-ports", action="store_true",
                   help="pick unused loopback ports instead of 8080/8081/8082/7070/7071/9000")
    p.add_argument("--bind", default="127.0.0.1",
                   help="inference API address; anything but loopback needs --tls-cert/key")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8,
                   help="capped at each handler's max_batch_size")
    p.add_argument("--max-batch-delay-ms", type=int, default=5)
    p.add_argument("--response-timeout", type=int, default=60, help="seconds")
    p.add_argument("--job-queue-size", type=int, default=100)
    p.add_argument("--enable-model-api", action="store_true",
                   help="turn register/unregister on, for the gateway's register path "
                   "(needs --gateway-config)")
    p.add_argument("--gateway-config", type=Path, metavar="GATEWAY_YAML",
                   help="the gateway in front of this server (audited with the config)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--profile", choices=profiles.PROFILES, default="local",
                   help="kserve: the deploy/ layout (/mnt/models, loopback ports behind the "
                        "gateway in the pod); see secure_handler/deploy/profiles.py")
    p.set_defaults(func=run_command(cmd_config))


@dataclass(frozen=True)
class StoreModel:
    name: str
    mar: str
    version: str
    limits: HandlerLimits


def _store_models(store: Path, requested: Sequence[str]) -> list[StoreModel]:
    pairs: list[tuple[str | None, str]] = []
    for item in requested:
        name, sep, mar = item.partition("=")
        if not sep or not name or "/" in mar or not mar.endswith(".mar"):
            raise UsageError(f"--model: expected NAME=FILE.mar (a file in the store), got {item!r}")
        pairs.append((name, mar))
    if not pairs:
        pairs = [(None, p.name) for p in sorted(store.glob("*.mar"))]
    if not pairs:
        raise UsageError(f"{store}: no .mar files; archive a model first")
    models = []
    for requested_name, mar in pairs:
        if not (store / mar).is_file():
            raise UsageError(f"{store / mar}: no such archive in the model store")
        info = read_mar_info(store / mar)  # one bounded read of manifest and model config
        models.append(StoreModel(requested_name or info.name, mar, info.version, info.limits))
    return models



def _ports(free: bool) -> Ports:
    return Ports(*(free_port() for _ in range(6))) if free else Ports()


def build_config(args: argparse.Namespace, models: Sequence[StoreModel]) -> dict[str, str]:
    """The hardened properties for `models`, sized by their handler limits."""
    override = parse_handler_limits(args.handler_limits) if args.handler_limits else None
    limits = override or HandlerLimits.combined(m.limits for m in models)
    specs = tuple(
        ModelSpec(m.name, m.mar, m.version, workers=args.workers,
                  batch_size=max(1, min(args.batch_size, (override or m.limits).max_batch_size)),
                  max_batch_delay_ms=args.max_batch_delay_ms,
                  response_timeout_s=args.response_timeout)
        for m in models
    )
    if getattr(args, "profile", "local") == "kserve":
        return profiles.kserve_properties(specs, limits.max_request_bytes,
                                          args.job_queue_size, args.response_timeout)
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        for path in (args.tls_cert, args.tls_key):
            if not path.is_file():
                raise UsageError(f"{path}: no such file")
        tls = Tls(args.tls_cert, args.tls_key)
    return hardened_properties(
        args.model_store, _ports(args.free_ports), specs, limits.max_request_bytes,
        args.job_queue_size, bind=args.bind, tls=tls, response_timeout_s=args.response_timeout,
        enable_model_api=args.enable_model_api,
    )


def torchserve_command(config: Path, store: Path) -> list[str]:
    """The command line to start TorchServe with this config (never without --ncs)."""
    command = TorchServe(config.resolve(), store.resolve(), Path.cwd()).command()
    return [arg for arg in command if arg != "--foreground"]


def cmd_config(args: argparse.Namespace) -> int:
    store: Path = args.model_store
    if not store.is_dir():
        raise UsageError(f"{store}: not a directory")
    if not is_loopback(args.bind) and not (args.tls_cert and args.tls_key):
        raise UsageError(f"--bind {args.bind} is not loopback: give --tls-cert and --tls-key")
    if args.enable_model_api and args.gateway_config is None:
        raise UsageError("--enable-model-api needs --gateway-config (the gateway in front)")
    models = _store_models(store, args.model)
    props = build_config(args, models)
    header = "Written by `secure-handler config`; check it with `secure-handler audit-config`."
    args.out.write_text(render_properties(props, header), "ascii")
    command = torchserve_command(args.out, store)
    audited = command
    if args.profile == "kserve":  # the pod's paths and command, with this file as the config
        store, command = Path(str(profiles.KSERVE_STORE)), profiles.kserve_command()
        audited = profiles.kserve_command(args.out)
    findings = audit_file(args.out, cmdline=audited, environ={},
                          model_limits={m.name: m.limits for m in models}, model_store=store,
                          gateway_config=args.gateway_config)
    if args.profile == "kserve":
        findings += profiles.kserve_file_findings(args.out, audited)
    if args.json:
        print_json({"config": str(args.out.resolve()), "properties": props,
                     "command": command, "findings": [f.to_dict() for f in findings]})
    else:
        print(f"wrote {args.out}")
        for model in models:
            print(f"  model {model.name} {model.version} ({model.mar}): handler "
                  f"max_request_bytes={model.limits.max_request_bytes} "
                  f"max_batch_size={model.limits.max_batch_size}")
        print("start it with:\n  " + shlex.join(command))
        print("or, verifying the store against a lock first:\n  secure-handler serve "
              f"--model-store {store} --lock models.lock --config {args.out}")
        if findings:
            print(format_findings(findings))
    return EXIT_FINDINGS if blocking(findings) else EXIT_OK
