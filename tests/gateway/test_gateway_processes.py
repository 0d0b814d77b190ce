"""Gateway processes (`secure-handler gateway`) sharing one Redis limit; shutdown; TorchServe down."""

from __future__ import annotations

import itertools
import json
import signal
import time
from pathlib import Path

import httpx
import pytest
from gateway_support import KeySet, MakeConfig, Upstream, gateway_process, write_config
from support import image_bytes, running_server

from secure_handler.deploy.launcher import free_port
from secure_handler.gateway.config import RateLimit

pytestmark = pytest.mark.integration

JPEG = {"Content-Type": "image/jpeg"}


def test_two_gateway_processes_share_one_redis_limit(
    make_config: MakeConfig, redis_url: str, tmp_path: Path, torchserve: Upstream,
) -> None:
    ks = KeySet()
    # Refill so slow that nothing comes back during the test: exactly `burst` may pass.
    key = ks.add("shared", ["inference"], ["tiny"], RateLimit(per_second=0.001, burst=4))
    config = make_config(ks, rate_limit_backend="redis",
                         redis={"url": redis_url, "prefix": f"rl-{tmp_path.name}:"})
    path = write_config(config, tmp_path / "gateway.yaml")
    ports = [free_port(), free_port()]
    with gateway_process(path, ports[0], tmp_path / "a.log"), \
            gateway_process(path, ports[1], tmp_path / "b.log"):
        statuses = []
        for port in itertools.islice(itertools.cycle(ports), 10):
            resp = httpx.post(f"http://127.0.0.1:{port}/predictions/tiny", timeout=30,
                              content=image_bytes("red"),
                              headers={"Authorization": f"Bearer {key}", **JPEG})
            statuses.append((port, resp.status_code))
    assert [s for _, s in statuses].count(200) == 4
    assert [s for _, s in statuses].count(429) == 6
    # Both processes refused: the limit is one limit, not two of 4.
    assert {p for p, s in statuses if s == 429} == set(ports)
    # Both appended to the same audit log, one whole JSON object per line.
    lines = [json.loads(line) for line in config.audit_log.read_text().splitlines()]
    assert [line["status"] for line in lines] == [429] * 6


def test_sigterm_shuts_down_cleanly_with_structured_logs(
    make_config: MakeConfig, tmp_path: Path,
) -> None:
    config = make_config(KeySet())
    path = write_config(config, tmp_path / "gateway.yaml")
    port, log = free_port(), tmp_path / "gw.log"
    with gateway_process(path, port, log) as proc:
        refused = httpx.post(f"http://127.0.0.1:{port}/predictions/tiny")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    messages = [r["message"] for r in records]
    assert messages.index("gateway started") < messages.index("gateway stopped")
    [request] = [r for r in records if r["message"] == "request"]
    assert request["request_id"] == refused.headers["x-request-id"]
    assert (request["action"], request["status"], request["key"]) == ("inference.predict", 401, None)


def test_torchserve_going_down_gives_502(
    make_config: MakeConfig, tmp_path: Path, torchserve: Upstream,
) -> None:
    """A second, real torchserve (no models) is stopped under a running gateway process."""
    ks = KeySet()
    key = ks.add("infer", ["inference"], ["tiny"])
    with running_server(tmp_path / "ts", torchserve.store, []) as info:
        config = make_config(ks, upstream={
            "inference_url": info.inference_url, "management_url": info.management_url,
            "key_file": str(tmp_path / "ts" / "key_file.json")})
        path = write_config(config, tmp_path / "gateway.yaml")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with gateway_process(path, port, tmp_path / "gw.log"):
            headers = {"Authorization": f"Bearer {key}", **JPEG}

            def predict() -> httpx.Response:
                return httpx.post(url + "/predictions/tiny", content=image_bytes("red"),
                                  headers=headers, timeout=30)

            up = predict()  # TorchServe answers: tiny is not loaded there
            assert httpx.get(url + "/readyz").status_code == 200
            info.server.stop()
            _wait_port_closed(info.inference_url)
            down = predict()
            ready = _poll_readyz(url, 503)  # readiness is cached for a second
    assert up.status_code == 404
    assert down.status_code == 502
    assert down.json() == {"error": {"code": "upstream_unavailable",
                                     "message": "TorchServe is unreachable"}}
    assert ready.json() == {"status": "not_ready"}


def _poll_readyz(url: str, status: int) -> httpx.Response:
    deadline = time.monotonic() + 10
    while True:
        resp = httpx.get(url + "/readyz")
        if resp.status_code == status or time.monotonic() > deadline:
            return resp
        time.sleep(0.2)


def _wait_port_closed(url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/ping", timeout=1)
        except httpx.TransportError:
            return
        time.sleep(0.1)
    pytest.fail(f"{url} still answers after stop()")
