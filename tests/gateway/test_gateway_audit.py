"""The audit trail of a real gateway process in front of a real TorchServe (issue 14, findings 6
and 9), plus TorchServe's cookies (finding 7) and the per-address limiter under churn.

* A failed reopen (a directory or a symlink planted at the path) fails closed: the management
  call is answered 503 and never forwarded, the lines go to stderr, and no HTTP answer ever
  lands in a log file (no stale descriptor number is reused).
* Each management call is audited as attempted before it is forwarded, then with its outcome.
* A flood of anonymous denials cannot fill the log: past a budget they are counted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_support import (
    REPO,
    KeySet,
    MakeConfig,
    Upstream,
    gateway_process,
    serve_gateway,
    write_config,
)
from rawhttp import connect, read_one, request
from support import image_bytes

from secure_handler.deploy.launcher import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def keys() -> KeySet:
    ks = KeySet()
    ks.add("ops", ["management"], ["tiny"])
    ks.add("infer", ["inference"], ["tiny"])
    return ks


@pytest.fixture
def gateway(make_config: MakeConfig, keys: KeySet, tmp_path: Path,
            torchserve: Upstream) -> Iterator[tuple[str, Path, Path]]:
    config = make_config(keys, audit_denials_per_s=2)
    port, log = free_port(), tmp_path / "gw.log"
    with gateway_process(write_config(config, tmp_path / "gateway.yaml"), port, log):
        yield f"http://127.0.0.1:{port}", config.audit_log, log


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _listings(torchserve: Upstream) -> int:
    return torchserve.requests_matching('"GET /models HTTP')


def _wait_listings(torchserve: Upstream, count: int) -> int:
    deadline = time.monotonic() + 10  # TorchServe's access log is written asynchronously
    while _listings(torchserve) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return _listings(torchserve)


def test_a_failed_reopen_fails_closed_and_no_answer_lands_in_a_log(
    gateway: tuple[str, Path, Path], keys: KeySet, torchserve: Upstream,
) -> None:
    url, audit, stderr = gateway
    ops = {"Authorization": f"Bearer {keys.plain['ops']}"}
    assert httpx.get(url + "/models", headers=ops).status_code == 200
    rotated = audit.with_name("audit.jsonl.1")
    audit.rename(rotated)  # logrotate's rename, then the reopen meets a directory
    audit.mkdir()
    listed = _wait_listings(torchserve, _listings(torchserve))
    refused = httpx.get(url + "/models", headers=ops)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "service_unavailable"
    # Other clients keep getting whole answers on fresh sockets while the log is down.
    for _ in range(20):
        with connect(int(url.rsplit(":", 1)[1])) as sock:
            sock.sendall(request("POST", "/predictions/tiny"))
            answer = read_one(sock)
        assert (answer.status, answer.code) == (401, "unauthorized")
    assert _wait_listings(torchserve, listed) == listed  # the refused call was never forwarded
    # No HTTP answer was written into the rotated file: it holds audit lines only.
    assert [line["outcome"] for line in _lines(rotated)] == ["attempted", "allowed"]
    reported = stderr.read_text()  # the refused attempt's line went to stderr instead
    assert "unwritable" in reported
    assert "management.list" in reported
    audit.rmdir()
    assert httpx.get(url + "/models", headers=ops).status_code == 200
    assert [line["outcome"] for line in _lines(audit)][-2:] == ["attempted", "allowed"]


def test_a_symlink_planted_at_the_audit_path_is_not_followed(
    gateway: tuple[str, Path, Path], keys: KeySet, tmp_path: Path,
) -> None:
    url, audit, _ = gateway
    ops = {"Authorization": f"Bearer {keys.plain['ops']}"}
    assert httpx.get(url + "/models", headers=ops).status_code == 200
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    audit.rename(audit.with_name("audit.jsonl.1"))
    audit.symlink_to(victim)
    refused = httpx.get(url + "/models", headers=ops)
    assert refused.status_code == 503
    assert victim.read_text() == "precious\n"


def test_a_symlink_at_the_audit_path_stops_the_gateway_at_start(
    make_config: MakeConfig, keys: KeySet, tmp_path: Path,
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    config = make_config(keys)
    config.audit_log.symlink_to(victim)
    path = write_config(config, tmp_path / "gateway.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = subprocess.run(
        [sys.executable, "-m", "secure_handler.cli", "gateway", "--config", str(path),
         "--port", str(free_port())], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120)
    assert started.returncode == 2
    assert "audit log" in started.stderr
    assert victim.read_text() == "precious\n"


def test_a_flood_of_anonymous_denials_is_counted_not_written(
    gateway: tuple[str, Path, Path], keys: KeySet,
) -> None:
    url, audit, _ = gateway
    flood = 300
    with httpx.Client(base_url=url) as client:
        statuses = {client.post("/predictions/tiny").status_code for _ in range(flood)}
    assert statuses == {401}
    time.sleep(1.0)  # the budget refills: the next line flushes the count
    ops = {"Authorization": f"Bearer {keys.plain['ops']}"}
    assert httpx.get(url + "/models", headers=ops).status_code == 200
    lines = _lines(audit)
    written = [a for a in lines if a.get("status") == 401]
    counted = [int(str(a["count"])) for a in lines if a["action"] == "audit.denials_suppressed"]
    assert counted  # at least one summary line, each written when lines flow again
    assert len(written) < flood // 2
    assert len(written) + sum(counted) == flood


# --- TorchServe's cookies stop at the gateway ---------------------------------------------------


class _CookieUpstream:
    """A stand-in for TorchServe that sets a cookie on every answer and records what it got
    (TorchServe itself sets none, so only a stand-in shows whether a jar would replay it)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.heads: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                head, sep, rest = data.partition(b"\r\n\r\n")
                if not sep:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                    continue
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.heads.append(head)
                data = rest[length:]
                body = b'{"ok": true}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Set-Cookie: session=upstream-secret; Path=/\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.sock.close()


def test_torchserve_cookies_are_never_replayed_or_passed_on(
    make_config: MakeConfig, keys: KeySet,
) -> None:
    upstream = _CookieUpstream()
    try:
        base = f"http://127.0.0.1:{upstream.port}"
        config = make_config(keys, upstream={"inference_url": base, "management_url": base})
        headers = {"Authorization": f"Bearer {keys.plain['infer']}", "Content-Type": "image/jpeg"}
        with serve_gateway(config) as url:
            answers = [httpx.post(url + "/predictions/tiny", content=image_bytes("red"),
                                  headers=headers) for _ in range(3)]
    finally:
        upstream.close()
    assert [a.status_code for a in answers] == [200] * 3
    assert all("set-cookie" not in a.headers for a in answers)
    assert len(upstream.heads) == 3
    assert not [h for h in upstream.heads if b"cookie:" in h.lower()]


class _EndlessHeaderUpstream(_CookieUpstream):
    """A stand-in whose answer's header section never ends (a handler can set headers)."""

    def _conn(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Handler: ")
                for _ in range(4096):  # up to 256 MiB, unless the gateway hangs up first
                    conn.sendall(b"a" * 65536)
            except OSError:
                self.heads.append(b"hung up")


def test_an_endless_upstream_header_is_bounded_and_answered_502(
    make_config: MakeConfig, keys: KeySet,
) -> None:
    upstream = _EndlessHeaderUpstream()
    try:
        base = f"http://127.0.0.1:{upstream.port}"
        config = make_config(keys, upstream={"inference_url": base, "management_url": base,
                                              "max_response_bytes": 1024 * 1024})
        headers = {"Authorization": f"Bearer {keys.plain['infer']}", "Content-Type": "image/jpeg"}
        with serve_gateway(config) as url:
            answer = httpx.post(url + "/predictions/tiny", content=image_bytes("red"),
                                headers=headers, timeout=60)
            deadline = time.monotonic() + 10
            while not upstream.heads and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        upstream.close()
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_unavailable"
    assert upstream.heads == [b"hung up"]


# --- the per-address limiter under address churn ---------------------------------------------


def test_an_exhausted_address_stays_limited_while_other_addresses_churn(
    make_config: MakeConfig, keys: KeySet, torchserve: Upstream,
) -> None:
    config = make_config(keys, per_client={"per_second": 0.001, "burst": 2})
    with serve_gateway(config) as url:
        port = int(url.rsplit(":", 1)[1])

        def post_from(source: str) -> int:
            with connect(port, source) as sock:
                sock.sendall(request("POST", "/predictions/tiny"))
                return read_one(sock).status

        assert [post_from("127.0.0.2") for _ in range(3)] == [401, 401, 429]
        churn = [post_from(f"127.0.{i // 250 + 1}.{i % 250 + 2}") for i in range(300)]
        assert set(churn) == {401}
        assert post_from("127.0.0.2") == 429
