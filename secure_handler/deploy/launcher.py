"""The one way this project starts, watches and stops a real `torchserve`.

Used by `serve`/`stop`, the tests, the benchmarks and the demo, so every one of them avoids the
same traps:

* Always `--ncs --ts-config FILE`: otherwise an old config snapshot silently wins.
* Output goes to a file: the Java server inherits the pipe and a piped start hangs.
* Each server gets its own working directory (`key_file.json` and `logs/` land there) and its
  own `TMPDIR`/`TEMP` (its pid file, unpacked archives, worker sockets), so several can run side
  by side and no other user can plant files where it looks.
* The `torchserve` next to the running interpreter is used, so workers import this package
  from the same environment.
* The server runs in its own process group; `stop` signals the group (frontend and workers).
  `start(detached=True)` re-parents it away from this process, so it outlives the caller.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_handler.errors import ConfigurationError
from secure_handler.keyfile import read_key_file

__all__ = [
    "TorchServe", "TorchServeError", "free_port", "group_alive", "http_json", "java_problem",
    "read_key_file", "stop_group",
]


class TorchServeError(ConfigurationError, RuntimeError):
    """torchserve could not be started, or a model did not become ready."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def java_problem() -> str | None:
    """None when Java 17+ is on PATH (or JAVA_HOME), else what is missing."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home, "bin", "java")) if java_home else shutil.which("java")
    if not java:
        return "torchserve needs Java 17+; install it (Debian: apt-get install openjdk-17-jre)"
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    try:
        major = int(out.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        return f"cannot read the Java version from {java}: {out.strip()[:200]}"
    if major < 17:
        return f"torchserve needs Java 17+, found Java {major} at {java}"
    return None


@dataclass
class TorchServe:
    """One real torchserve process group, owned by this object.

    Use as a context manager, or call `start()` and `stop()` (stop is idempotent).
    """

    config_path: Path
    model_store: Path
    workdir: Path
    models: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    #: The torchserve pid and its process group (set by `start`, or by `attach`).
    pid: int | None = None
    pgid: int | None = None

    def command(self) -> list[str]:
        """The exact command line, with `--ncs --ts-config`."""
        exe = Path(sys.executable).with_name("torchserve")
        cmd = [str(exe) if exe.exists() else "torchserve", "--start", "--foreground", "--ncs"]
        cmd += ["--ts-config", str(self.config_path), "--model-store", str(self.model_store)]
        if self.models:
            cmd += ["--models", *self.models]
        return cmd + list(self.extra_args)

    @property
    def log_path(self) -> Path:
        return self.workdir / "torchserve.out"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def environment(self) -> dict[str, str]:
        """The environment torchserve gets: its own TMPDIR (pid file) and log folders."""
        logs, tmp = str(self.workdir / "logs"), str(self.workdir / "tmp")
        # TEMP too: the frontend unpacks every archive under <TEMP or /tmp>/models and puts the
        # worker sockets there, where another user of a shared /tmp could create them first.
        return {**os.environ, "TMPDIR": tmp, "TEMP": tmp, "LOG_LOCATION": logs,
                "METRICS_LOCATION": logs, **self.env}

    def prepare(self) -> dict[str, str]:
        """Make the working directory ready to start in; return `environment()`.

        A `key_file.json` left by an earlier run holds dead tokens that would be read as this
        run's, so it is removed; TorchServe writes a fresh one at start.
        """
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        return self.environment()

    def start(self, detached: bool = False) -> TorchServe:
        """Start torchserve in its own process group.

        Attached (the default), it is this process's child. Detached, a short-lived `sh` in a
        new session starts it in the background and exits, so torchserve is re-parented away
        from us (no zombie, no Popen left running) and outlives this process.
        """
        problem = java_problem()
        if problem:
            raise TorchServeError(problem)
        env = self.prepare()
        if detached:
            script = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'
            starter = subprocess.Popen(
                ["/bin/sh", "-c", script, "sh", str(self.log_path), *self.command()],
                cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            out, _ = starter.communicate(timeout=30)
            self.pid, self.pgid = int(out.decode().strip()), starter.pid
            return self
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pid = self.pgid = self.process.pid
        return self

    def attach(self, pid: int, pgid: int) -> TorchServe:
        """Take over a server started earlier (by `serve`), to watch or stop it."""
        self.pid, self.pgid = pid, pgid
        return self

    def alive(self) -> bool:
        """True while any process of the server's group is running."""
        if self.process is not None:
            return self.process.poll() is None
        return self.pgid is not None and group_alive(self.pgid)

    def stop(self, timeout: float = 20.0) -> bool:
        """SIGTERM the process group, SIGKILL after `timeout`; True when it had to be killed."""
        pgid, pid, proc = self.pgid, self.pid, self.process
        self.pgid = self.pid = self.process = None
        if pgid is None:
            return False
        return stop_group(pgid, pid, timeout, proc)

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def keys(self, timeout: float = 60.0) -> dict[str, str]:
        """Wait for and read `key_file.json` from the server's working directory."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self.key_file.is_file():
                with contextlib.suppress(ValueError, KeyError, OSError):
                    return read_key_file(self.key_file)  # else: being written; retry
            time.sleep(0.1)
        raise TorchServeError(f"no key_file.json after {timeout}s; see {self.log_path}")

    def _check_alive(self) -> None:
        if not self.alive():
            log = self.log_path
            tail = log.read_text("utf-8", "replace")[-3000:] if log.exists() else ""
            raise TorchServeError(f"torchserve exited; last output:\n{tail}")

    def wait_ready(self, management_url: str, model: str | Sequence[str],
                   timeout: float = 120.0) -> dict[str, Any]:
        """Poll `GET /models/{m}` until every worker of every model is READY.

        Returns the last model's description (for one model: its description).
        """
        pending = [model] if isinstance(model, str) else list(model)
        deadline = time.monotonic() + timeout
        token = self.keys(timeout)["management"]
        described: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            still = []
            for name in pending:
                found = _ready_description(management_url, name, token)
                if found is None:
                    still.append(name)
                else:
                    described = found
            pending = still
            if not pending:
                return described
            time.sleep(0.2)
        raise TorchServeError(f"not READY after {timeout}s: {pending}; see {self.log_path}")


def _ready_description(management_url: str, model: str, token: str) -> dict[str, Any] | None:
    try:
        described = http_json("GET", f"{management_url}/models/{model}", token)
        workers = described[0].get("workers", [])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    if workers and all(w.get("status") == "READY" for w in workers):
        return dict(described[0])
    return None


def stop_group(pgid: int, pid: int | None = None, timeout: float = 20.0,
               process: subprocess.Popen[bytes] | None = None) -> bool:
    """SIGTERM a process group, SIGKILL after `timeout`; True when it had to be killed."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return sig == signal.SIGKILL
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid, process)
            if not group_alive(pgid):
                return sig == signal.SIGKILL
            time.sleep(0.1)
    return True


def _reap(pid: int | None, process: subprocess.Popen[bytes] | None) -> None:
    # This process may be torchserve's parent; collect it so it is not left a zombie.
    if process is not None:
        process.poll()
    elif pid is not None:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def group_alive(pgid: int) -> bool:
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


def http_json(method: str, url: str, token: str | None = None, timeout: float = 10.0) -> Any:
    """A small loopback JSON call with a Bearer token (stdlib only, no extra dependency)."""
    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # loopback only
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as err:
        err.close()  # an HTTPError holds the response's socket until closed
        raise
