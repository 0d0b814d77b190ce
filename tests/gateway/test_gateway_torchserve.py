"""The gateway in front of a real torchserve: auth, limits, bodies, management, audit, tokens."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gateway_support import KeySet, MakeConfig, Upstream, serve_gateway
from support import image_bytes

from secure_handler.deploy.launcher import free_port
from secure_handler.gateway.config import GatewayConfig, RateLimit
from secure_handler.gateway.keys import generate_key, hash_key
from secure_handler.gateway.tokens import TokenSource

pytestmark = pytest.mark.integration

JPEG = {"Content-Type": "image/jpeg"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keys() -> KeySet:
    ks = KeySet()
    ks.add("infer", ["inference"], ["tiny"])
    ks.add("other-model", ["inference"], ["spare"])
    ks.add("ops", ["management"], ["tiny", "spare"])
    ks.add("pinned", ["inference"], ["tiny:1.0"])
    ks.add("pinned-other", ["inference"], ["tiny:2.0"])
    return ks


@pytest.fixture
def gateway(make_config: MakeConfig, keys: KeySet) -> Iterator[tuple[str, GatewayConfig]]:
    config = make_config(keys)
    with serve_gateway(config) as url:
        yield url, config


def audit_lines(config: GatewayConfig) -> list[dict[str, object]]:
    path = config.audit_log
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def predictions_seen(torchserve: Upstream) -> int:
    return torchserve.requests_matching('"POST /predictions/tiny')


def wait_for_access_count(torchserve: Upstream, count: int) -> int:
    """TorchServe writes its access log asynchronously: wait until `count` lines are there."""
    deadline = time.monotonic() + 10
    while predictions_seen(torchserve) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return predictions_seen(torchserve)


# --- the auth matrix ------------------------------------------------------------------------

MATRIX = [
    # (case, key name or literal header, method, path, status, code)
    ("no key", None, "POST", "/predictions/tiny", 401, "unauthorized"),
    ("not bearer", "Basic Zm9vOmJhcg==", "POST", "/predictions/tiny", 401, "unauthorized"),
    ("unknown key", "random", "POST", "/predictions/tiny", 401, "unauthorized"),
    ("TorchServe's own token", "ts-token", "POST", "/predictions/tiny", 401, "unauthorized"),
    ("stored hash as key", "hash-of-infer", "POST", "/predictions/tiny", 401, "unauthorized"),
    ("wrong scope (management key)", "ops", "POST", "/predictions/tiny", 403, "forbidden"),
    ("wrong scope (inference key)", "infer", "GET", "/models", 403, "forbidden"),
    ("wrong model", "other-model", "POST", "/predictions/tiny", 403, "forbidden"),
    ("model not configured", "infer", "POST", "/predictions/secret", 403, "forbidden"),
    ("version not granted", "pinned-other", "POST", "/predictions/tiny/1.0", 403, "forbidden"),
    ("default version, pinned key", "pinned", "POST", "/predictions/tiny", 403, "forbidden"),
    ("pinned version", "pinned", "POST", "/predictions/tiny/1.0", 200, None),
    ("good key", "infer", "POST", "/predictions/tiny", 200, None),
    ("good management key", "ops", "GET", "/models/tiny", 200, None),
]


def _auth_header(who: str | None, keys: KeySet, torchserve: Upstream) -> dict[str, str]:
    if who is None:
        return {}
    if who.startswith("Basic"):
        return {"Authorization": who}
    literal = {"random": generate_key(), "ts-token": torchserve.info.tokens["inference"],
               "hash-of-infer": hash_key(keys.plain.get("infer", ""))}
    return bearer(literal.get(who) or keys.plain[who])


@pytest.mark.parametrize(("case", "who", "method", "path", "status", "code"), MATRIX,
                         ids=[row[0] for row in MATRIX])
def test_auth_matrix(gateway: tuple[str, GatewayConfig], keys: KeySet, torchserve: Upstream,
                     case: str, who: str | None, method: str, path: str, status: int,
                     code: str | None) -> None:
    url, config = gateway
    headers = {**_auth_header(who, keys, torchserve), **JPEG}
    resp = httpx.request(method, url + path, headers=headers, timeout=30,
                         content=image_bytes("red") if method == "POST" else None)
    assert resp.status_code == status, resp.text
    assert resp.headers["x-request-id"]
    if code is None:
        return
    assert resp.json() == {"error": {"code": code, "message": resp.json()["error"]["message"]}}
    if status == 401:
        assert resp.headers["www-authenticate"] == "Bearer"
    [line] = [a for a in audit_lines(config) if a["request_id"] == resp.headers["x-request-id"]]
    assert line["outcome"] == "denied"
    assert line["status"] == status
    assert line["code"] == code


def test_good_key_gets_torchserve_answers_and_per_request_statuses(
    gateway: tuple[str, GatewayConfig], keys: KeySet,
) -> None:
    url, _ = gateway
    headers = {**bearer(keys.plain["infer"]), **JPEG}
    ok = httpx.post(url + "/predictions/tiny", content=image_bytes("blue"), headers=headers)
    assert ok.status_code == 200
    assert ok.json()["predictions"][0]["label"] == "blue"
    # The handler's own 4xx and JSON body pass through unchanged.
    bad = httpx.post(url + "/predictions/tiny", content=b"\xff\xd8\xff junk", headers=headers)
    assert bad.status_code == 422
    assert set(bad.json()["error"]) == {"code", "message"}


# --- request validation before forwarding -------------------------------------------------------


@pytest.mark.parametrize(("headers", "params", "status", "code"), [
    ({"Content-Type": "text/plain"}, None, 415, "unsupported_media_type"),
    ({}, None, 415, "unsupported_media_type"),
    ({"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}, None, 415,
     "unsupported_media_type"),
    ({"Content-Type": "image/jpeg"}, {"data": "xyz"}, 400, "malformed_request"),
])
def test_refused_requests_never_reach_torchserve(
    gateway: tuple[str, GatewayConfig], keys: KeySet, torchserve: Upstream,
    headers: dict[str, str], params: dict[str, str] | None, status: int, code: str,
) -> None:
    url, _ = gateway
    before = predictions_seen(torchserve)
    resp = httpx.post(url + "/predictions/tiny", content=image_bytes("red"), params=params,
                      headers={**bearer(keys.plain["infer"]), **headers})
    assert (resp.status_code, resp.json()["error"]["code"]) == (status, code)
    _assert_next_request_is_the_only_new_one(url, keys, torchserve, before)


def _assert_next_request_is_the_only_new_one(
    url: str, keys: KeySet, torchserve: Upstream, before: int
) -> None:
    # A good request afterwards shows up in TorchServe's access log; the refused one never did.
    good = httpx.post(url + "/predictions/tiny", content=image_bytes("green"),
                      headers={**bearer(keys.plain["infer"]), **JPEG})
    assert good.status_code == 200
    assert wait_for_access_count(torchserve, before + 1) == before + 1


def _chunks(total: int, size: int = 16 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"\xff" * min(size, total - sent)
        sent += size


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_oversize_body_refused_before_any_byte_is_forwarded(
    gateway: tuple[str, GatewayConfig], keys: KeySet, torchserve: Upstream, declared: bool,
) -> None:
    url, config = gateway
    limit = config.body_limit("tiny")
    before = predictions_seen(torchserve)
    body: bytes | Iterator[bytes] = b"\xff" * (limit + 1) if declared else _chunks(limit * 4)
    resp = httpx.post(url + "/predictions/tiny", content=body,
                      headers={**bearer(keys.plain["infer"]), **JPEG})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"
    _assert_next_request_is_the_only_new_one(url, keys, torchserve, before)


def test_body_at_the_limit_is_forwarded(
    gateway: tuple[str, GatewayConfig], keys: KeySet,
) -> None:
    url, config = gateway
    body = image_bytes("red", fmt="PNG")
    body += b"\0" * (config.body_limit("tiny") - len(body))  # PNG ignores trailing bytes
    resp = httpx.post(url + "/predictions/tiny", content=body,
                      headers={**bearer(keys.plain["infer"]), "Content-Type": "image/png"})
    assert resp.status_code == 200, resp.text


# --- rate limits ----------------------------------------------------------------------------


def test_key_rate_limit_429_retry_after_then_recovery(
    make_config: MakeConfig, torchserve: Upstream,
) -> None:
    ks = KeySet()
    # One token per 4 s: no refill can sneak in between the first three requests, however
    # slow the machine; those are refused before TorchServe (415), which still costs a token.
    key = ks.add("slow", ["inference"], ["tiny"], RateLimit(per_second=0.25, burst=2))
    config = make_config(ks)
    with serve_gateway(config) as url:
        def send(content_type: str) -> httpx.Response:
            return httpx.post(url + "/predictions/tiny", content=image_bytes("red"), timeout=30,
                              headers={**bearer(key), "Content-Type": content_type})

        statuses = [send("text/plain") for _ in range(3)]
        assert [r.status_code for r in statuses] == [415, 415, 429]
        limited = statuses[-1]
        assert limited.json()["error"]["code"] == "rate_limited"
        retry_after = int(limited.headers["retry-after"])
        assert 1 <= retry_after <= 4
        time.sleep(retry_after)
        assert send("image/jpeg").status_code == 200
    [line] = [a for a in audit_lines(config) if a["status"] == 429]
    assert line["key"] == "slow"
    assert line["code"] == "rate_limited"


def test_per_client_limit_applies_before_authentication(make_config: MakeConfig) -> None:
    config = make_config(KeySet(), per_client={"per_second": 0.01, "burst": 2})
    with serve_gateway(config) as url:
        statuses = [httpx.post(url + "/predictions/tiny", headers=bearer(generate_key()))
                    for _ in range(3)]
    assert [r.status_code for r in statuses] == [401, 401, 429]
    assert statuses[-1].headers["retry-after"]


# --- management -----------------------------------------------------------------------------


def test_management_allowlisted_operations(
    gateway: tuple[str, GatewayConfig], keys: KeySet,
) -> None:
    url, config = gateway
    ops = bearer(keys.plain["ops"])
    listing = httpx.get(url + "/models", headers=ops)
    assert listing.status_code == 200
    assert "tiny" in {m["modelName"] for m in listing.json()["models"]}
    described = httpx.get(url + "/models/tiny", headers=ops)
    assert described.status_code == 200
    assert described.json()[0]["modelName"] == "tiny"
    scaled = httpx.put(url + "/models/tiny", headers=ops, timeout=60,
                       params={"min_worker": "1", "max_worker": "1", "synchronous": "true"})
    assert scaled.status_code == 200, scaled.text
    refused = [
        httpx.get(url + "/models/tiny", params={"customized": "true"}, headers=ops),
        httpx.put(url + "/models/tiny", params={"max_worker": "99"}, headers=ops),
        httpx.delete(url + "/models/tiny", headers=ops),
        httpx.post(url + "/models/tiny", headers=ops),
    ]
    assert [r.status_code for r in refused] == [400, 400, 405, 405]
    # A forwarded call is audited as attempted before it goes, then with its outcome.
    actions = [(a["action"], a["outcome"], a["status"]) for a in audit_lines(config)]
    assert actions == [
        ("management.list", "attempted", None), ("management.list", "allowed", 200),
        ("management.describe", "attempted", None), ("management.describe", "allowed", 200),
        ("management.scale", "attempted", None), ("management.scale", "allowed", 200),
        ("management.describe", "denied", 400), ("management.scale", "denied", 400),
        ("management.refused", "denied", 405), ("management.refused", "denied", 405),
    ]


def test_list_shows_only_granted_models(
    make_config: MakeConfig, torchserve: Upstream,
) -> None:
    ks = KeySet()
    key = ks.add("spare-ops", ["management"], ["spare"])
    with serve_gateway(make_config(ks)) as url:
        listing = httpx.get(url + "/models", headers=bearer(key))
    assert listing.status_code == 200
    assert "tiny" not in {m["modelName"] for m in listing.json()["models"]}


SSRF_QUERIES = [
    "model_name=spare&url=http://169.254.169.254/latest/meta-data/",
    "model_name=spare&url=https%3A%2F%2Fattacker.example%2Fspare.mar",
    "model_name=spare&url=file:///etc/passwd",
    "model_name=spare&url=file://{store}/spare.mar",
    "model_name=spare&url={store}/spare.mar",
    "model_name=spare&url=../spare.mar",
    "model_name=spare&url=..%2Fspare.mar",
    "model_name=spare&url=%2e%2e%2fspare.mar",
    "model_name=spare&url=%252e%252e%252fspare.mar",
    "model_name=spare&url=spare.mar%00.txt",
    "model_name=spare&url=spare.mar&url=http://attacker.example/x.mar",
    "model_name=spare&handler=image_classifier",
    "url=http://attacker.example/spare.mar",
]


def test_register_refuses_ssrf_and_path_tricks(
    gateway: tuple[str, GatewayConfig], keys: KeySet, torchserve: Upstream,
) -> None:
    url, config = gateway
    ops = bearer(keys.plain["ops"])
    before = torchserve.requests_matching('"POST /models')
    for query in SSRF_QUERIES:
        resp = httpx.post(f"{url}/models?{query.format(store=torchserve.store)}", headers=ops)
        assert resp.status_code in (400, 403), (query, resp.text)
        assert resp.json()["error"]["code"] in ("forbidden_model_source", "malformed_request")
    denials = [a for a in audit_lines(config) if a["action"] == "management.register"]
    assert len(denials) == len(SSRF_QUERIES)
    assert all(a["outcome"] == "denied" for a in denials)
    assert [a["model"] for a in denials].count("spare") == len(SSRF_QUERIES) - 1
    # A describe afterwards reaches TorchServe's access log; the refused registers never did.
    described = torchserve.requests_matching('"GET /models/tiny ')
    assert httpx.get(url + "/models/tiny", headers=ops).status_code == 200
    deadline = time.monotonic() + 10
    while torchserve.requests_matching('"GET /models/tiny ') == described:
        assert time.monotonic() < deadline, "TorchServe's access log did not show the describe"
        time.sleep(0.05)
    assert torchserve.requests_matching('"POST /models') == before


def test_register_by_name_from_the_store(
    gateway: tuple[str, GatewayConfig], keys: KeySet, torchserve: Upstream,
) -> None:
    url, config = gateway
    ops = bearer(keys.plain["ops"])
    resp = httpx.post(url + "/models", headers=ops, timeout=120, params={
        "model_name": "spare", "initial_workers": "1", "synchronous": "true"})
    assert resp.status_code in (200, 409), resp.text  # 409: an earlier run registered it
    described = httpx.get(url + "/models/spare", headers=ops)
    assert described.status_code == 200
    assert described.json()[0]["modelUrl"] == "spare.mar"
    lines = [a for a in audit_lines(config) if a["action"] == "management.register"]
    assert [a["outcome"] for a in lines] == ["attempted", "allowed" if resp.status_code == 200
                                            else "upstream_refused"]
    assert {(a["model"], a["key"], a["request_id"]) for a in lines} == {
        ("spare", "ops", resp.headers["x-request-id"])}


# --- audit log ------------------------------------------------------------------------------


def test_audit_lines_are_complete_and_free_of_secrets(
    gateway: tuple[str, GatewayConfig], keys: KeySet, torchserve: Upstream,
) -> None:
    url, config = gateway
    ids = [
        httpx.post(url + "/predictions/tiny", headers=bearer(keys.plain["infer"] + "x")),
        httpx.post(url + "/predictions/tiny", headers=bearer(keys.plain["ops"])),
        httpx.get(url + "/models", headers=bearer(keys.plain["ops"])),
        httpx.post(url + "/models?model_name=spare&url=http://a.example/x.mar",
                   headers=bearer(keys.plain["ops"])),
    ]
    lines = audit_lines(config)
    expected_ids = [r.headers["x-request-id"] for r in ids]
    expected_ids.insert(2, expected_ids[2])  # the list call: attempted, then its outcome
    assert [a["request_id"] for a in lines] == expected_ids
    fields = {"time", "key", "client", "action", "model", "version", "outcome", "status",
              "code", "request_id", "archive"}
    for line in lines:
        assert set(line) == fields
        assert line["client"] == "127.0.0.1"
    assert [(a["key"], a["action"], a["outcome"], a["status"]) for a in lines] == [
        (None, "inference.predict", "denied", 401),
        ("ops", "inference.predict", "denied", 403),
        ("ops", "management.list", "attempted", None),
        ("ops", "management.list", "allowed", 200),
        ("ops", "management.register", "denied", 403),
    ]
    text = config.audit_log.read_text()
    secrets = [*keys.plain.values(), *(hash_key(k) for k in keys.plain.values()),
               *torchserve.info.tokens.values(), *json_tokens(torchserve.key_file)]
    assert not [s for s in secrets if s in text]
    assert config.audit_log.stat().st_mode & 0o777 == 0o600


def json_tokens(key_file: Path) -> list[str]:
    return [v["key"] for v in json.loads(key_file.read_text()).values()]


# --- TorchServe's tokens ----------------------------------------------------------------------


def _rotate_inference_token(torchserve: Upstream) -> str:
    api = json.loads(torchserve.key_file.read_text())["API"]["key"]
    old = str(json.loads(torchserve.key_file.read_text())["inference"]["key"])
    req = urllib.request.Request(f"{torchserve.info.management_url}/token?type=inference",
                                 headers={"Authorization": f"Bearer {api}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    return old


def test_token_rotated_behind_the_gateway_is_picked_up(
    gateway: tuple[str, GatewayConfig], keys: KeySet, torchserve: Upstream,
) -> None:
    url, _ = gateway
    headers = {**bearer(keys.plain["infer"]), **JPEG}
    assert httpx.post(url + "/predictions/tiny", content=image_bytes("red"),
                      headers=headers).status_code == 200
    old = _rotate_inference_token(torchserve)
    new = json.loads(torchserve.key_file.read_text())["inference"]["key"]
    assert new != old
    # Several requests at once all meet the refused token; one re-read serves them all.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: httpx.post(
            url + "/predictions/tiny", content=image_bytes("red"), headers=headers, timeout=30),
            range(8)))
    assert [r.status_code for r in answers] == [200] * 8


def test_token_near_expiry_is_rotated_by_the_gateway(
    make_config: MakeConfig, keys: KeySet, torchserve: Upstream,
) -> None:
    # A refresh margin longer than the token's life: every token counts as about to expire.
    config = make_config(keys, upstream={
        "inference_url": torchserve.info.inference_url,
        "management_url": torchserve.info.management_url,
        "key_file": str(torchserve.key_file), "token_refresh_margin_s": 10 ** 7})
    old = json.loads(torchserve.key_file.read_text())["inference"]["key"]
    # Rotation happens at most once per interval across processes, counted from the key
    # file's last change: an earlier test may just have rotated.
    interval = TokenSource.MIN_ROTATION_INTERVAL_S
    while time.time() - torchserve.key_file.stat().st_mtime < interval:
        time.sleep(0.2)
    with serve_gateway(config) as url:
        resp = httpx.post(url + "/predictions/tiny", content=image_bytes("red"),
                          headers={**bearer(keys.plain["infer"]), **JPEG})
    assert resp.status_code == 200
    assert json.loads(torchserve.key_file.read_text())["inference"]["key"] != old


# --- TorchServe slow or down -------------------------------------------------------------------


def _upstream(config: GatewayConfig, url: str, **timeouts: float) -> GatewayConfig:
    upstream = config.upstream.model_copy(
        update={"inference_url": url, "management_url": url, **timeouts})
    return config.model_copy(update={"upstream": upstream})


def test_unreachable_torchserve_gives_502(make_config: MakeConfig, keys: KeySet) -> None:
    config = _upstream(make_config(keys), f"http://127.0.0.1:{free_port()}")
    with serve_gateway(config) as url:
        resp = httpx.post(url + "/predictions/tiny", content=image_bytes("red"),
                          headers={**bearer(keys.plain["infer"]), **JPEG})
        ready = httpx.get(url + "/readyz")
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "upstream_unavailable"
    assert ready.status_code == 503


class _SilentServer:
    """Accepts connections and reads, never answers: a TorchServe that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_hanging_torchserve_gives_504(make_config: MakeConfig, keys: KeySet) -> None:
    silent = _SilentServer()
    try:
        config = _upstream(make_config(keys), f"http://127.0.0.1:{silent.port}",
                           read_timeout_s=0.5)
        with serve_gateway(config) as url:
            resp = httpx.post(url + "/predictions/tiny", content=image_bytes("red"),
                              headers={**bearer(keys.plain["infer"]), **JPEG}, timeout=30)
    finally:
        silent.close()
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "upstream_timeout"


def test_healthz_needs_no_key_and_says_nothing(gateway: tuple[str, GatewayConfig]) -> None:
    url, _ = gateway
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(url + "/readyz").json() == {"status": "ready"}
    missing = httpx.get(url + "/nope")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
