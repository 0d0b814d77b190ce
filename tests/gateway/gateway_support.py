"""Helpers for the gateway tests: key sets, the torchserve handle, gateway servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from support import ServerInfo

from secure_handler.deploy.launcher import free_port
from secure_handler.gateway.config import GatewayConfig, KeyEntry, RateLimit
from secure_handler.gateway.keys import generate_key, hash_key

REPO = Path(__file__).resolve().parents[2]
IMAGE_TYPES = ["image/jpeg", "image/png"]
GENEROUS = RateLimit(per_second=1000, burst=1000)


@dataclass
class Upstream:
    """The session's torchserve, its model store and its access log."""

    info: ServerInfo
    store: Path
    workdir: Path

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def access_lines(self) -> list[str]:
        path = self.workdir / "logs" / "access_log.log"
        return path.read_text("utf-8", "replace").splitlines() if path.exists() else []

    def requests_matching(self, needle: str) -> int:
        return sum(needle in line for line in self.access_lines())


@dataclass
class KeySet:
    """Client keys by name, and their config entries (hash only)."""

    plain: dict[str, str] = field(default_factory=dict)
    entries: list[KeyEntry] = field(default_factory=list)

    def add(self, name: str, scopes: Sequence[str], models: Sequence[str],
            rate: RateLimit = GENEROUS) -> str:
        key = generate_key()
        self.plain[name] = key
        self.entries.append(KeyEntry.model_validate({
            "name": name, "sha256": hash_key(key), "scopes": list(scopes),
            "models": list(models), "rate": rate.model_dump(),
        }))
        return key


MakeConfig = Callable[..., GatewayConfig]


@contextmanager
def serve_gateway(config: GatewayConfig) -> Iterator[str]:
    """The gateway under a real uvicorn (in a thread) on a free loopback port, with the
    connection guard and settings of `secure-handler gateway` (connections.server_config)."""
    import uvicorn

    from secure_handler.gateway import create_app
    from secure_handler.gateway.connections import server_config

    port = free_port()
    server = uvicorn.Server(server_config(
        create_app(config), config, host="127.0.0.1", port=port, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name=f"gateway-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail("the gateway did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def write_config(config: GatewayConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


@contextmanager
def gateway_process(config_path: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`secure-handler gateway --config ... --port ...` as a real process; SIGTERM at the end."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "secure_handler.cli", "gateway", "--config", str(config_path),
           "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM (graceful shutdown), SIGKILL if it does not exit in `timeout`; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"gateway exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    pytest.fail(f"gateway not healthy after 60 s: {log.read_text()[-3000:]}")
