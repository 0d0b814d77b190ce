"""`secure-handler config | audit-config | serve | stop`: deploy TorchServe safely.

* `config` writes a hardened `config.properties` for a model store and prints the exact
  `torchserve` command (always `--ncs --ts-config`).
* `audit-config` reports what is wrong with a config, its command line and its environment
  (`secure_handler.deploy.audit`); exit 1 when any finding is high.
* `serve` verifies every MAR against the lock, writes or audits the config, starts the real
  torchserve and waits for READY. Detached by default (`stop` ends it, via a state file);
  `--foreground` stays attached and stops TorchServe on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from secure_handler.deploy.audit import (
    ConfigFinding,
    audit_file,
    blocking,
    count_by_severity,
    format_findings,
    format_markdown,
)
from secure_handler.deploy.javaprops import PropertiesError
from secure_handler.deploy.javaprops import load as load_properties
from secure_handler.deploy.launcher import (
    TorchServe,
    TorchServeError,
    free_port,
    http_json,
    read_key_file,
)
from secure_handler.deploy.tsconfig import (
    HandlerLimits,
    ModelSpec,
    Ports,
    Tls,
    hardened_properties,
    is_loopback,
    read_mar_limits,
    render_properties,
)
from secure_handler.errors import ConfigurationError
from secure_handler.serving.loading import TRUST_STORE_ENV

__all__ = ["ServeState", "register", "state_path", "stop_server"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2
STATE_FORMAT = "secure-handler-serve/1"
STATE_ENV = "SECURE_HANDLER_STATE_DIR"


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `config`, `audit-config`, `serve` and `stop` to `sub`."""
    _register_config(sub)
    _register_audit(sub)
    _register_serve(sub)
    _register_stop(sub)


class UsageError(ConfigurationError):
    """Bad arguments or unreadable inputs: exit code 2 with the message."""


def _print_json(data: Mapping[str, Any]) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _run(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so `UsageError` and parse errors become exit 2 with a message."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except (UsageError, PropertiesError, ValueError) as exc:
            print(f"secure-handler {args.command}: {exc}", file=sys.stderr)
            return EXIT_USAGE

    return wrapper


# --- handler limits ----------------------------------------------------------------------


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
            name, limits = read_mar_limits(mar)
        except ValueError as exc:
            print(f"warning: {exc}", file=sys.stderr)
            continue
        found[name] = limits
    return found


# --- config ------------------------------------------------------------------------------


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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_config))


@dataclass(frozen=True)
class _StoreModel:
    name: str
    mar: str
    version: str
    limits: HandlerLimits


def _store_models(store: Path, requested: Sequence[str]) -> list[_StoreModel]:
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
        manifest_name, limits = read_mar_limits(store / mar)
        name = requested_name or manifest_name
        models.append(_StoreModel(name, mar, _mar_version(store / mar), limits))
    return models


def _mar_version(mar: Path) -> str:
    import zipfile

    with zipfile.ZipFile(mar) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    return str(manifest.get("model", {}).get("modelVersion") or "1.0")


def _ports(free: bool) -> Ports:
    return Ports(*(free_port() for _ in range(6))) if free else Ports()


def build_config(args: argparse.Namespace, models: Sequence[_StoreModel]) -> dict[str, str]:
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
    models = _store_models(store, args.model)
    props = build_config(args, models)
    header = "Written by `secure-handler config`; check it with `secure-handler audit-config`."
    args.out.write_text(render_properties(props, header), "ascii")
    command = torchserve_command(args.out, store)
    findings = audit_file(args.out, cmdline=command, environ={},
                          model_limits={m.name: m.limits for m in models}, model_store=store)
    if args.json:
        _print_json({"config": str(args.out.resolve()), "properties": props,
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


# --- audit-config ------------------------------------------------------------------------


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
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=_run(cmd_audit))


def cmd_audit(args: argparse.Namespace) -> int:
    store = args.model_store
    if store is None:
        store_value = load_properties(args.config).get("model_store")
        store = Path(store_value) if store_value else None
    limits = parse_handler_limits(args.handler_limits) if args.handler_limits else None
    findings = audit_file(
        args.config, cmdline=args.cmdline, environ=None if args.no_env else dict(os.environ),
        limits=limits, model_limits=store_limits(store), model_store=store,
    )
    _report(findings, args)
    return EXIT_FINDINGS if blocking(findings) else EXIT_OK


def _report(findings: Sequence[ConfigFinding], args: argparse.Namespace) -> None:
    if getattr(args, "json", False):
        _print_json({"config": str(args.config), "counts": count_by_severity(findings),
                     "findings": [f.to_dict() for f in findings]})
    elif getattr(args, "markdown", False):
        print(format_markdown(findings))
    else:
        print(format_findings(findings))


# --- serve / stop ------------------------------------------------------------------------


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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_serve))


def _register_stop(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("stop", help="stop the torchserve that `serve` started")
    p.add_argument("--state", type=Path, help="state file given to `serve --state`")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_stop))


def _verify_store(store: Path, lock: Path) -> list[Any]:
    from secure_handler.supply.verify import (
        verify_store,  # the supply-chain checks; imported only when serving
    )

    return list(verify_store(store, lock))


def _lock_models(lock: Path) -> list[dict[str, Any]]:
    from secure_handler.supply.verify import read_lock

    return list(read_lock(lock)["models"])


def _generate_config(args: argparse.Namespace, workdir: Path, lock: Path) -> Path:
    models = []
    for entry in _lock_models(lock):
        mar = str(entry["mar"])
        _, limits = read_mar_limits(args.model_store / mar)
        models.append(_StoreModel(str(entry["name"]), mar, str(entry.get("version", "1.0")),
                                  limits))
    gen = argparse.Namespace(
        model_store=args.model_store, handler_limits=None, free_ports=args.free_ports,
        bind="127.0.0.1", tls_cert=None, tls_key=None, workers=1, batch_size=8,
        max_batch_delay_ms=5, response_timeout=60, job_queue_size=100,
    )
    config = workdir / "config.properties"
    header = "Written by `secure-handler serve` for a store verified against " + str(lock)
    config.write_text(render_properties(build_config(gen, models), header), "ascii")
    return config


def _server_env(lock: Path) -> dict[str, str]:
    # The workers verify each model against the same lock (`loading.verify_trust_store`).
    return {TRUST_STORE_ENV: str(lock.resolve())}


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
    if existing is not None and _group_alive(existing.pgid):
        print(f"a server is already running (pid {existing.pid}, {state_file}); "
              "run `secure-handler stop` first", file=sys.stderr)
        return EXIT_FINDINGS
    refused = _verify_store(store, lock)
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
                          model_limits=store_limits(store), model_store=store)
    if blocking(findings):
        print(f"refusing to start with {config}:", file=sys.stderr)
        print(format_findings(findings), file=sys.stderr)
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
    if args.foreground:
        server.start()
        assert server.process is not None
        pid = pgid = server.process.pid
    else:
        pid, pgid = spawn_detached(server)
    state = ServeState(
        pid=pid, pgid=pgid, workdir=str(server.workdir), config=str(server.config_path),
        model_store=str(server.model_store), lock=str(lock), inference_url=urls[0],
        management_url=urls[1], metrics_url=urls[2], key_file=str(server.key_file),
        log=str(server.log_path), models=models, foreground=args.foreground,
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    state.save(state_file)
    try:
        wait_ready(state, args.timeout)
    except (TorchServeError, KeyboardInterrupt):
        if args.foreground:
            server.stop()
        else:
            stop_server(state)
        state_file.unlink(missing_ok=True)
        raise
    return state


def spawn_detached(server: TorchServe) -> tuple[int, int]:
    """Start torchserve so it outlives this process; return (pid, process group id).

    A short-lived `sh` in a new session starts torchserve in the background and exits, so
    torchserve is re-parented away from us (no zombie, no Popen left running) and its process
    group is the one `stop` signals.
    """
    problem = _java_problem()
    if problem:
        raise TorchServeError(problem)
    env = server.prepare()
    script = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'
    launcher = subprocess.Popen(
        ["/bin/sh", "-c", script, "sh", str(server.log_path), *server.command()],
        cwd=server.workdir, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    out, _ = launcher.communicate(timeout=30)
    return int(out.decode().strip()), launcher.pid


def _java_problem() -> str | None:
    from secure_handler.deploy.launcher import java_problem

    return java_problem()


def wait_ready(state: ServeState, timeout: float) -> None:
    """Wait for key_file.json and every model READY; raise TorchServeError if it dies."""
    deadline = time.monotonic() + timeout
    pending = list(state.models)
    token: str | None = None
    while time.monotonic() < deadline:
        if not _group_alive(state.pgid):
            raise TorchServeError(f"torchserve exited; last output:\n{_log_tail(state.log)}")
        if token is None and Path(state.key_file).is_file():
            with contextlib.suppress(ValueError, KeyError, OSError):
                token = read_key_file(state.key_file)["management"]
        if token is not None:
            pending = [m for m in pending if not _model_ready(state.management_url, m, token)]
            if not pending:
                return
        time.sleep(0.25)
    raise TorchServeError(f"not READY after {timeout}s: {pending or 'key_file.json'}; "
                          f"see {state.log}")


def _model_ready(management_url: str, model: str, token: str) -> bool:
    try:
        described = http_json("GET", f"{management_url}/models/{model}", token)
        workers = described[0].get("workers", [])
    except (OSError, ValueError, KeyError, IndexError):
        return False
    return bool(workers) and all(w.get("status") == "READY" for w in workers)


def _log_tail(log: str, size: int = 3000) -> str:
    try:
        return Path(log).read_text("utf-8", "replace")[-size:]
    except OSError:
        return ""


def _print_started(state: ServeState, state_file: Path, findings: Sequence[ConfigFinding],
                   as_json: bool) -> None:
    if as_json:
        _print_json({**asdict(state), "state_file": str(state_file),
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
        _print_json({"stopped": state.pid, "forced": forced})
    else:
        print(f"stopped torchserve (pid {state.pid}{', killed' if forced else ''})")
    return EXIT_OK


def _owned(state: ServeState) -> bool:
    """The recorded pid is alive and still runs our torchserve (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _group_alive(state.pgid)
    return state.config.encode() in cmdline and _group_alive(state.pgid)


def stop_server(state: ServeState, timeout: float = 30.0) -> bool:
    """SIGTERM the server's process group, SIGKILL after `timeout`; True if it was killed."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(state.pgid, sig)
        except ProcessLookupError:
            return sig == signal.SIGKILL
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(state.pid)
            if not _group_alive(state.pgid):
                return sig == signal.SIGKILL
            time.sleep(0.1)
    return True


def _reap(pid: int) -> None:
    # In-process callers (tests) may be torchserve's parent; collect it so it is not a zombie.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _group_alive(pgid: int) -> bool:
    """True while any non-zombie process is in the group."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    return any(_in_group(stat_file, pgid) for stat_file in _stat_files(proc))


def _stat_files(proc: Path) -> Iterator[Path]:
    for entry in proc.iterdir():
        if entry.name.isdigit():
            yield entry / "stat"


def _in_group(stat_file: Path, pgid: int) -> bool:
    try:
        fields = stat_file.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    # fields after the command: state, ppid, pgrp, ...
    return fields[0] != "Z" and fields[2] == str(pgid)
