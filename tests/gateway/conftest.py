"""Fixtures for the gateway: a real torchserve, a real redis-server, a config factory.

* `torchserve`: one session-wide torchserve on loopback, serving the tiny classifier as
  `tiny`, with a second archive `spare.mar` in the store (not loaded) for register tests.
  Its access log tells whether a request ever reached TorchServe.
* `redis_url`: one session-wide `redis-server` on a free loopback port, no persistence;
  installed from Debian's packages by `scripts/redis.sh install` when missing.
* `make_config(keys, **overrides)`: a gateway config in front of that torchserve.

Gateway servers themselves come from `gateway_support` (`serve_gateway`, `gateway_process`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # gateway_support, as tests/ does for support

from gateway_support import IMAGE_TYPES, REPO, KeySet, MakeConfig, Upstream
from support import classifier_mar, running_server

from secure_handler.deploy.launcher import free_port
from secure_handler.deploy.tsconfig import ModelSpec
from secure_handler.gateway.config import GatewayConfig


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    tmp = tmp_path_factory.mktemp("torchserve")
    store = tmp / "store"
    classifier_mar(tmp, store, "tiny")
    classifier_mar(tmp, store, "spare")
    spec = ModelSpec("tiny", "tiny.mar", batch_size=4, max_batch_delay_ms=5)
    # Register goes through the gateway only, so TorchServe's model API is on behind it.
    with running_server(tmp / "ts", store, [spec], overrides={"enable_model_api": "true"}) as info:
        yield Upstream(info, store, tmp / "ts")


def _redis_server() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        subprocess.run(["bash", str(REPO / "scripts" / "redis.sh"), "install"], check=True)
        exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed and scripts/redis.sh could not install it")
    return exe


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    cmd = [_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
           "--appendonly", "no", "--protected-mode", "yes", "--dir", str(workdir)]
    with open(workdir / "redis.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        _wait_for_redis(port, proc, workdir / "redis.log")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_for_redis(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"redis-server exited: {log.read_text()[-2000:]}")
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        pytest.fail("redis-server did not answer PING")
    finally:
        client.close()


@pytest.fixture
def make_config(tmp_path: Path, torchserve: Upstream) -> MakeConfig:
    """A gateway config in front of the session's torchserve; keyword arguments override."""

    def make(keys: KeySet, **overrides: object) -> GatewayConfig:
        info = torchserve.info
        data: dict[str, object] = {
            "upstream": {"inference_url": info.inference_url,
                         "management_url": info.management_url,
                         "key_file": str(torchserve.key_file)},
            "model_store": str(torchserve.store),
            "models": {"tiny": {"content_types": IMAGE_TYPES},
                       "spare": {"content_types": IMAGE_TYPES}},
            "keys": [k.model_dump(mode="json") for k in keys.entries],
            "audit_log": str(tmp_path / "audit.jsonl"),
            "max_body_bytes": 256 * 1024,
        }
        data.update(overrides)
        return GatewayConfig.model_validate(data)

    return make
