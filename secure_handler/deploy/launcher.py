"""Start, watch and stop a real `torchserve`, the way that avoids its traps.

* Always `--ncs --ts-config FILE`: otherwise an old config snapshot silently wins.
* Output goes to a file: the Java server inherits the pipe and a piped start hangs.
* Each server gets its own working directory (`key_file.json` and `logs/` land there) and its
  own `TMPDIR` (TorchServe keeps its pid file there), so several can run side by side.
* The `torchserve` next to the running interpreter is used, so workers import this package
  from the same environment.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_handler.errors import ConfigurationError

__all__ = ["TorchServe", "TorchServeError", "free_port", "java_problem", "read_key_file"]


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


def read_key_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """The `management`, `inference` and `API` keys from TorchServe's `key_file.json`."""
    data = json.loads(Path(path).read_text("utf-8"))
    return {kind: str(entry["key"]) for kind, entry in data.items() if "key" in entry}


@dataclass
class TorchServe:
    """One real torchserve process tree, owned by this object.

    Use as a context manager, or call `start()` and `stop()` (stop is idempotent).
    """

    config_path: Path
    model_store: Path
    workdir: Path
    models: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None

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
        logs = str(self.workdir / "logs")
        return {**os.environ, "TMPDIR": str(self.workdir / "tmp"), "LOG_LOCATION": logs,
                "METRICS_LOCATION": logs, **self.env}

    def prepare(self) -> dict[str, str]:
        """Make the working directory ready to start in; return `environment()`.

        A `key_file.json` left by an earlier run holds dead tokens that would be read as this
        run's, so it is removed; TorchServe writes a fresh one at start.
        """
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        return self.environment()

    def start(self) -> TorchServe:
        problem = java_problem()
        if problem:
            raise TorchServeError(problem)
        env = self.prepare()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the whole process group (frontend and workers), SIGKILL after `timeout`."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers may outlive the frontend for a moment; take the group down for good.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

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
                try:
                    return read_key_file(self.key_file)
                except (ValueError, KeyError):
                    pass  # being written; retry
            time.sleep(0.1)
        raise TorchServeError(f"no key_file.json after {timeout}s; see {self.log_path}")

    def _check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            log = self.log_path
            tail = log.read_text("utf-8", "replace")[-3000:] if log.exists() else ""
            raise TorchServeError(f"torchserve exited; last output:\n{tail}")

    def wait_ready(self, management_url: str, model: str, timeout: float = 120.0) -> dict[str, Any]:
        """Poll `GET /models/{model}` until every worker is READY; return the description."""
        token = self.keys(timeout)["management"]
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                last = http_json("GET", f"{management_url}/models/{model}", token)
                workers = last[0].get("workers", [])
                if workers and all(w.get("status") == "READY" for w in workers):
                    return dict(last[0])
            except (OSError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.2)
        raise TorchServeError(f"model {model!r} not READY after {timeout}s: {last}")


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
