"""`secure-handler serve | stop`: verify the store, start TorchServe, and stop it later.

`serve` verifies every MAR against the lock, writes or audits the config, starts the real
torchserve through the one launcher (`secure_handler.deploy.launcher`) and waits for READY.
Detached by default (`stop` ends it, via a state file); `--foreground` stays attached and stops
TorchServe on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from secure_handler.deploy import config_cmd
from secure_handler.deploy.audit import (
    AuditContext,
    ConfigFinding,
    audit_file,
    blocking,
    format_findings,
)
from secure_handler.deploy.audit.jregex import JavaRegexError, compile_java
from secure_handler.deploy.common import (
    EXIT_FINDINGS,
    EXIT_OK,
    UsageError,
    print_json,
    run_command,
    store_limits,
)
from secure_handler.deploy.config_cmd import StoreModel, build_config
from secure_handler.deploy.javaprops import load as load_properties
from secure_handler.deploy.launcher import TorchServe, TorchServeError, group_alive, stop_group
from secure_handler.deploy.tsconfig import read_mar_info, render_properties
from secure_handler.serving.loading import TRUST_STORE_ENV

__all__ = ["ServeState", "register", "state_path", "stop_server"]

STATE_FORMAT = "secure-handler-serve/1"
STATE_ENV = "SECURE_HANDLER_STATE_DIR"


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `serve` and `stop` to `sub`."""
    _register_serve(sub)
    _register_stop(sub)



def default_state_dir() -> Path:
    """`$SECURE_HANDLER_STATE_DIR`, else `$XDG_STATE_HOME/secure-handler`."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "secure-handler"


def state_path(value: Path | None) -> Path:
    return value if value is not None else default_state_dir() / "serve.json"


@dataclass
class ServeState:
    """What `stop` needs to find and stop a server `serve` started."""

    pid: int
    pgid: int
    workdir: str
    config: str
    model_store: str
    lock: str
    inference_url: str
    management_url: str
    metrics_url: str
    key_file: str
    log: str
    models: list[str]
    foreground: bool
    started: str
    format: str = STATE_FORMAT

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.chmod(0o600)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ServeState | None:
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise UsageError(f"{path}: not a serve state file ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise UsageError(f"{path}: not a {STATE_FORMAT} state file")
        return cls(**data)


def _register_serve(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("serve", help="verify the store against a lock, then start torchserve")
    p.add_argument("--model-store", required=True, type=Path)
    p.add_argument("--lock", required=True, type=Path, help="lock file from `secure-handler lock`")
    p.add_argument("--config", type=Path, help="use (and audit) this config instead of "
                   "generating one")
    p.add_argument("--foreground", action="store_true",
                   help="stay attached; Ctrl-C or SIGTERM stops TorchServe")
    p.add_argument("--workdir", type=Path,
                   help="server working directory (key_file.json, logs); default: next to the "
                   "state file")
    p.add_argument("--state", type=Path, help="state file (default: $XDG_STATE_HOME/"
                   "secure-handler/serve.json)")
    p.add_argument("--free-ports", action="store_true",
                   help="generated config: pick unused loopback ports")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for READY")
    p.add_argument("--gateway-config", type=Path, metavar="GATEWAY_YAML",
                   help="the gateway in front of this server; lets a config with "
                   "enable_model_api=true pass the audit")
    p.add_argument("--policy", type=Path, metavar="FILE",
                   help="the operator policy the lock was made with (scan waivers)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_command(cmd_serve))


def _register_stop(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("stop", help="stop the torchserve that `serve` started")
    p.add_argument("--state", type=Path, help="state file given to `serve --state`")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_command(cmd_stop))


def _verify_store(store: Path, lock: Path, args: argparse.Namespace) -> list[Any]:
    # The supply-chain checks, imported only when serving. A lock that records scan waivers
    # verifies only with the same operator policy (`--policy`), as `verify --lock` does.
    from secure_handler.supply.inspection import VerifyOptions
    from secure_handler.supply.policy import policy_from_args
    from secure_handler.supply.verify import verify_store

    return list(verify_store(store, lock, VerifyOptions(policy=policy_from_args(args))))


def _lock_models(lock: Path) -> list[dict[str, Any]]:
    from secure_handler.supply.verify import read_lock

    return list(read_lock(lock)["models"])


def _generate_config(args: argparse.Namespace, workdir: Path, lock: Path) -> Path:
    models = []
    for entry in _lock_models(lock):
        mar = str(entry["mar"])
        info = read_mar_info(args.model_store / mar)
        models.append(StoreModel(str(entry["name"]), mar, str(entry.get("version", "1.0")),
                                 info.limits))
    # `config`'s own defaults, read from its parser, so a new `config` option cannot be missed.
    parser = argparse.ArgumentParser(add_help=False)
    config_cmd.register(parser.add_subparsers())
    gen = parser.parse_args(["config", "--model-store", str(args.model_store),
                             *(["--free-ports"] if args.free_ports else [])])
    config = workdir / "config.properties"
    header = "Written by `secure-handler serve` for a store verified against " + str(lock)
    config.write_text(render_properties(build_config(gen, models), header), "ascii")
    return config


def _server_env(lock: Path) -> dict[str, str]:
    # The workers verify each model against the same lock (`serving.pin.verify_trust_store`).
    return {TRUST_STORE_ENV: str(lock.resolve())}


def trust_store_hidden(config: Path, cmdline: Sequence[str],
                       environ: Mapping[str, str]) -> str | None:
    """Why the workers would not see `$SECURE_HANDLER_TRUST_STORE`, or None.

    TorchServe hands a worker every variable that `blacklist_env_vars` (config or, with
    `enable_envvars_config`, `TS_BLACKLIST_ENV_VARS`) does not fully match. A pattern that
    matches the trust-store variable turns the worker's pin off without a word, so a pattern
    that does, or one that cannot be read the way Java reads it, refuses the start.
    """
    text = config.read_bytes().decode("latin-1")
    ctx = AuditContext.build(text, config_path=config, cmdline=cmdline, environ=environ)
    pattern = ctx.get("blacklist_env_vars")
    if not pattern:
        return None
    fix = f"write blacklist_env_vars so that it does not match {TRUST_STORE_ENV}"
    try:
        hides = compile_java(pattern).matches(TRUST_STORE_ENV)
    except JavaRegexError as exc:
        return (f"blacklist_env_vars {pattern!r} cannot be read as Java reads it ({exc}), so it "
                f"may hide {TRUST_STORE_ENV} from the workers and turn their pin off; {fix}")
    if hides:
        return (f"blacklist_env_vars {pattern!r} matches {TRUST_STORE_ENV}: the workers would "
                f"not see the lock and would load models unpinned; {fix}")
    return None


def _models_to_wait_for(props: Mapping[str, str], lock: Path) -> list[str]:
    by_mar = {str(m["mar"]): str(m["name"]) for m in _lock_models(lock)}
    names = []
    for item in filter(None, (x.strip() for x in props.get("load_models", "").split(","))):
        if item.upper() == "ALL":
            return sorted(by_mar.values())
        name, sep, mar = item.partition("=")
        names.append(name if sep else by_mar.get(item, Path(item).stem))
    return names


def _local_url(address: str) -> str:
    """A URL this host can reach for a bind address (a wildcard bind answers on loopback)."""
    return address.replace("://0.0.0.0:", "://127.0.0.1:")


def cmd_serve(args: argparse.Namespace) -> int:
    store, lock = args.model_store.resolve(), args.lock.resolve()
    state_file = state_path(args.state)
    if not store.is_dir():
        raise UsageError(f"{store}: not a directory")
    existing = ServeState.load(state_file)
    if existing is not None and group_alive(existing.pgid):
        print(f"a server is already running (pid {existing.pid}, {state_file}); "
              "run `secure-handler stop` first", file=sys.stderr)
        return EXIT_FINDINGS
    refused = _verify_store(store, lock, args)
    if refused:
        print(f"refusing to serve {store}: it does not match {lock}", file=sys.stderr)
        for finding in refused:
            print(f"  {finding}", file=sys.stderr)
        return EXIT_FINDINGS
    workdir = (args.workdir or state_file.parent / "run").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = args.config.resolve() if args.config else _generate_config(args, workdir, lock)
    server = TorchServe(config, store, workdir, env=_server_env(lock))
    findings = audit_file(config, cmdline=server.command(), environ=server.environment(),
                          model_limits=store_limits(store), model_store=store,
                          gateway_config=args.gateway_config)
    if blocking(findings):
        print(f"refusing to start with {config}:", file=sys.stderr)
        print(format_findings(findings), file=sys.stderr)
        return EXIT_FINDINGS
    hidden = trust_store_hidden(config, server.command(), server.environment())
    if hidden:
        print(f"refusing to start with {config}: {hidden}", file=sys.stderr)
        return EXIT_FINDINGS
    props = load_properties(config)
    state = _start(server, props, args, lock, state_file)
    _print_started(state, state_file, findings, args.json)
    return _supervise(server, state_file) if args.foreground else EXIT_OK


def _start(server: TorchServe, props: Mapping[str, str], args: argparse.Namespace,
           lock: Path, state_file: Path) -> ServeState:
    models = _models_to_wait_for(props, lock)
    urls = [_local_url(props.get(k, d)) for k, d in (
        ("inference_address", "http://127.0.0.1:8080"),
        ("management_address", "http://127.0.0.1:8081"),
        ("metrics_address", "http://127.0.0.1:8082"))]
    server.start(detached=not args.foreground)
    assert server.pid is not None
    assert server.pgid is not None
    pid, pgid = server.pid, server.pgid
    state = ServeState(
        pid=pid, pgid=pgid, workdir=str(server.workdir), config=str(server.config_path),
        model_store=str(server.model_store), lock=str(lock), inference_url=urls[0],
        management_url=urls[1], metrics_url=urls[2], key_file=str(server.key_file),
        log=str(server.log_path), models=models, foreground=args.foreground,
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    state.save(state_file)
    try:
        server.wait_ready(state.management_url, models, args.timeout)
    except (TorchServeError, KeyboardInterrupt):
        server.stop()
        state_file.unlink(missing_ok=True)
        raise
    return state






def _log_tail(log: str, size: int = 3000) -> str:
    try:
        return Path(log).read_text("utf-8", "replace")[-size:]
    except OSError:
        return ""


def _print_started(state: ServeState, state_file: Path, findings: Sequence[ConfigFinding],
                   as_json: bool) -> None:
    if as_json:
        print_json({**asdict(state), "state_file": str(state_file),
                     "findings": [f.to_dict() for f in findings]})
        return
    print(f"torchserve is READY (pid {state.pid}), models: {', '.join(state.models) or '-'}")
    print(f"  inference:  {state.inference_url}")
    print(f"  management: {state.management_url}")
    print(f"  metrics:    {state.metrics_url}")
    print(f"  tokens:     {state.key_file}")
    print(f"  config:     {state.config}")
    print(f"  log:        {state.log}")
    if findings:
        print(format_findings(findings))
    if not state.foreground:
        print(f"stop it with: secure-handler stop --state {state_file}")


def _supervise(server: TorchServe, state_file: Path) -> int:
    """Foreground: wait; SIGTERM/SIGINT stop TorchServe; exit when it ends."""

    def _stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert server.process is not None
        code = server.process.wait()
        stopped = not state_file.exists()  # `secure-handler stop` removes it first
        print(f"torchserve exited with {code}", file=sys.stderr)
        return EXIT_OK if stopped else EXIT_FINDINGS
    except KeyboardInterrupt:
        print("stopping torchserve", file=sys.stderr)
        return EXIT_OK
    finally:
        server.stop()
        state_file.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_stop(args: argparse.Namespace) -> int:
    state_file = state_path(args.state)
    state = ServeState.load(state_file)
    if state is None:
        print(f"nothing to stop: no {state_file}")
        return EXIT_OK
    if not _owned(state):
        state_file.unlink(missing_ok=True)
        print(f"torchserve (pid {state.pid}) is not running; removed {state_file}")
        return EXIT_OK
    state_file.unlink(missing_ok=True)
    forced = stop_server(state, args.timeout)
    if args.json:
        print_json({"stopped": state.pid, "forced": forced})
    else:
        print(f"stopped torchserve (pid {state.pid}{', killed' if forced else ''})")
    return EXIT_OK


def _owned(state: ServeState) -> bool:
    """The recorded pid is alive and still runs our torchserve (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return group_alive(state.pgid)
    return state.config.encode() in cmdline and group_alive(state.pgid)






def stop_server(state: ServeState, timeout: float = 30.0) -> bool:
    """Stop the server a state file describes; True when it had to be killed."""
    return stop_group(state.pgid, state.pid, timeout)
