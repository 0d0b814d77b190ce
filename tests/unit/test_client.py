"""`secure_handler.client` against a real HTTP server on loopback (scripted answers).

The server is a stdlib `ThreadingHTTPServer` that answers like TorchServe and our handlers do
(their JSON error bodies, TorchServe's own error shape, 503s) and records every request, so
tests can check what was sent, and that refused requests were never sent at all.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from secure_handler import errors
from secure_handler.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    ModelNotFound,
    RequestTimedOut,
    ResponseTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnexpectedResponse,
)
from secure_handler.deploy.launcher import free_port

pytest.importorskip("httpx")


@dataclass
class Answer:
    status: int = 200
    body: Any = field(default_factory=lambda: {"ok": True})
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Scripted:
    """Routes (method, path) → answers, in order (the last one repeats)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Answer]] = {}
        self.seen: list[Seen] = []
        self.on_request: Any = None

    def route(self, method: str, path: str, *answers: Answer) -> None:
        self.routes[(method, path)] = list(answers)

    def answer(self, method: str, path: str) -> Answer:
        answers = self.routes.get((method, path))
        if not answers:
            return Answer(404, {"code": 404, "type": "ModelNotFoundException",
                                "message": f"Model not found: {path}"})
        return answers.pop(0) if len(answers) > 1 else answers[0]


def _handler(script: Scripted) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            script.seen.append(Seen(self.command, self.path, dict(self.headers), body))
            if script.on_request:
                script.on_request(script.seen[-1])
            answer = script.answer(self.command, self.path)
            time.sleep(answer.delay)
            raw = answer.body if isinstance(answer.body, bytes) else json.dumps(
                answer.body).encode()
            self.send_response(answer.status)
            for key, value in {"Content-Type": "application/json", **answer.headers}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = _serve

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[Scripted, str]]:
    script = Scripted()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield script, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def client(url: str, **options: Any) -> Client:
    options.setdefault("token", "tok-inference")
    options.setdefault("backoff", 0.01)
    return Client(url, **options)


def test_predict_sends_a_validated_request_with_the_token(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.route("POST", "/predictions/resnet-18/2.0", Answer(body={"cat": 0.9}))
    with client(url) as c:
        assert c.predict("resnet-18", b"\xff\xd8jpeg", content_type="image/jpeg",
                         version="2.0") == {"cat": 0.9}
    [seen] = script.seen
    assert seen.headers["Authorization"] == "Bearer tok-inference"
    assert seen.headers["Content-Type"] == "image/jpeg"
    assert seen.body == b"\xff\xd8jpeg"


def test_json_text_and_file_inputs(server: tuple[Scripted, str], tmp_path: Path) -> None:
    script, url = server
    script.route("POST", "/predictions/m", Answer(body=[1, 2]))
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG....")
    with client(url) as c:
        c.predict("m", {"instances": [1]})
        c.predict("m", "héllo")
        c.predict("m", image)
    types = [s.headers["Content-Type"] for s in script.seen]
    assert types == ["application/json", "text/plain; charset=utf-8", "image/png"]
    assert script.seen[1].body == "héllo".encode()


def test_token_from_key_file_and_reload_after_restart(server: tuple[Scripted, str],
                                                      tmp_path: Path) -> None:
    script, url = server
    key_file = tmp_path / "key_file.json"

    def write_keys(inference: str) -> None:
        key_file.write_text(json.dumps({
            "management": {"key": "mgmt", "expiration time": "later"},
            "inference": {"key": inference, "expiration time": "later"},
            "API": {"key": "api"}}))

    write_keys("old")
    denied = Answer(400, {"code": 400, "type": "InvalidKeyException",
                          "message": "Token Authorization failed."})
    script.route("GET", "/ping", denied, Answer(body={"status": "Healthy"}))
    # The "restart": new keys land in the file before the client retries once.
    script.on_request = lambda seen: write_keys("new")
    with Client(url, key_file=key_file) as c:
        assert c.health() == {"status": "Healthy"}
    assert [s.headers["Authorization"] for s in script.seen] == ["Bearer old", "Bearer new"]


def test_wrong_token_is_unauthorized(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.route("GET", "/ping", Answer(400, {"code": 400, "type": "InvalidKeyException",
                                              "message": "Token Authorization failed."}))
    with client(url) as c, pytest.raises(Unauthorized) as info:
        c.health()
    assert info.value.code == "unauthorized"
    assert len(script.seen) == 1


@pytest.mark.parametrize(("status", "code", "cls"), [
    (413, "payload_too_large", errors.PayloadTooLarge),
    (415, "unsupported_media_type", errors.UnsupportedMediaType),
    (422, "invalid_image", errors.InvalidImage),
    (422, "image_too_large", errors.ImageTooLarge),
    (400, "malformed_request", errors.MalformedRequest),
    (507, "out_of_memory", errors.OutOfMemory),
    (500, "inference_failed", errors.InferenceFailed),
])
def test_our_error_bodies_become_typed_exceptions(server: tuple[Scripted, str], status: int,
                                                  code: str, cls: type[Exception]) -> None:
    script, url = server
    script.route("POST", "/predictions/m", Answer(status, errors.error_body(code, "nope")))
    with client(url) as c, pytest.raises(cls) as info:
        c.predict("m", b"x")
    exc = info.value
    assert type(exc) is cls
    assert exc.code == code  # type: ignore[attr-defined]
    assert exc.http_status == status  # type: ignore[attr-defined]
    assert str(exc) == "nope"
    assert len(script.seen) == 1  # 4xx and 500 are never retried


def test_torchserve_errors_and_unknown_shapes(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.route("POST", "/predictions/weird", Answer(418, errors.error_body("teapot", "?")))
    script.route("POST", "/predictions/html", Answer(200, b"<html>"))
    script.route("POST", "/predictions/moved", Answer(302, b"", {"Location": "http://x/"}))
    with client(url) as c:
        with pytest.raises(ModelNotFound):
            c.predict("absent", b"x")
        with pytest.raises(UnexpectedResponse):
            c.predict("weird", b"x")
        with pytest.raises(UnexpectedResponse, match="not JSON"):
            c.predict("html", b"x")
        with pytest.raises(UnexpectedResponse):
            c.predict("moved", b"x")


def test_an_answer_too_costly_to_parse_is_unexpected(server: tuple[Scripted, str]) -> None:
    # A hostile or broken server: a million tiny items (seconds and hundreds of MB for
    # json.loads) or nesting deeper than the parser goes (RecursionError) must end as the
    # typed error, cheaply, never as an unhandled exception.
    script, url = server
    flood = b"[" + b",".join([b"{}"] * 1_000_000) + b"]"
    deep = b"[" * 5000 + b"]" * 5000
    script.route("POST", "/predictions/flood", Answer(200, flood))
    script.route("POST", "/predictions/deep", Answer(200, deep))
    script.route("POST", "/predictions/flood-error", Answer(400, flood))
    with client(url) as c:
        with pytest.raises(UnexpectedResponse, match="more than 65536 items"):
            c.predict("flood", b"x")
        with pytest.raises(UnexpectedResponse, match="not JSON"):
            c.predict("deep", b"x")
        with pytest.raises(UnexpectedResponse, match="HTTP 400"):
            c.predict("flood-error", b"x")


def test_503_is_retried_with_backoff_then_succeeds(server: tuple[Scripted, str]) -> None:
    script, url = server
    busy = Answer(503, errors.error_body("batch_limit_exceeded", "busy"), {"Retry-After": "0"})
    script.route("POST", "/predictions/m", busy, busy, Answer(body={"ok": 1}))
    with client(url, retries=2) as c:
        assert c.predict("m", b"x") == {"ok": 1}
    assert len(script.seen) == 3


def test_retries_are_bounded(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.route("POST", "/predictions/m", Answer(503, {"code": 503, "message": "full",
                                                        "type": "ServiceUnavailableException"}))
    with client(url, retries=1) as c, pytest.raises(ServiceUnavailable):
        c.predict("m", b"x")
    assert len(script.seen) == 2


def test_connection_refused_is_retried_then_typed() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with client(url, retries=2) as c, pytest.raises(ConnectionFailed) as info:
        c.predict("m", b"x")
    assert info.value.code == "connection_failed"


def test_read_timeout_is_not_retried(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.route("POST", "/predictions/slow", Answer(delay=1.0))
    with client(url, read_timeout=0.2) as c, pytest.raises(RequestTimedOut):
        c.predict("slow", b"x")
    assert len(script.seen) == 1


@pytest.mark.parametrize(("kwargs", "cls"), [
    ({"model": "../etc", "data": b"x"}, errors.MalformedRequest),
    ({"model": "a/b", "data": b"x"}, errors.MalformedRequest),
    ({"model": ".hidden", "data": b"x"}, errors.MalformedRequest),
    ({"model": "m" * 65, "data": b"x"}, errors.MalformedRequest),
    ({"model": "m", "data": b"x", "version": "1.0/../2"}, errors.MalformedRequest),
    ({"model": "m", "data": b"x" * 1025}, errors.PayloadTooLarge),
    ({"model": "m", "data": b""}, errors.EmptyBody),
    ({"model": "m", "data": b"x", "content_type": "application/x-python-pickle"},
     errors.UnsupportedMediaType),
    ({"model": "m", "data": b"x", "content_type": "image/png\r\nX-Evil: 1"},
     errors.MalformedRequest),
])
def test_invalid_requests_are_refused_before_sending(server: tuple[Scripted, str],
                                                     kwargs: dict[str, Any],
                                                     cls: type[Exception]) -> None:
    script, url = server
    model, data = kwargs.pop("model"), kwargs.pop("data")
    with client(url, max_request_bytes=1024) as c, pytest.raises(cls, match="not sent"):
        c.predict(model, data, **kwargs)
    assert script.seen == []


def test_large_file_is_refused_without_reading_it(server: tuple[Scripted, str],
                                                  tmp_path: Path) -> None:
    script, url = server
    big = tmp_path / "big.jpg"
    with big.open("wb") as handle:
        handle.truncate(50 * 1024 * 1024)  # sparse: 50 MiB on paper, nothing read
    with client(url, max_request_bytes=1024 * 1024) as c, pytest.raises(errors.PayloadTooLarge):
        c.predict("m", big)
    assert script.seen == []


def test_response_size_is_capped(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.route("POST", "/predictions/m", Answer(body={"x": "y" * 10_000}))
    with client(url, max_response_bytes=1000) as c, pytest.raises(ResponseTooLarge):
        c.predict("m", b"x")


def test_management_calls_use_the_management_token(server: tuple[Scripted, str],
                                                   tmp_path: Path) -> None:
    script, url = server
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "M"}, "inference": {"key": "I"}}))
    script.route("GET", "/models", Answer(body={"models": []}))
    script.route("GET", "/models/m/1.0", Answer(body=[{"modelName": "m"}]))
    with Client(url, management_url=url, key_file=key_file) as c:
        assert c.models() == {"models": []}
        assert c.describe("m", "1.0") == [{"modelName": "m"}]
        with pytest.raises(errors.MalformedRequest):
            c.describe("../m")
    assert {s.headers["Authorization"] for s in script.seen} == {"Bearer M"}


def test_constructor_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="http"):
        Client("ftp://127.0.0.1:21")
    with pytest.raises(ValueError, match="not both"):
        Client(token="a", key_file="k.json")
    with pytest.raises(ValueError, match="retries"):
        Client(retries=100)
    with Client() as c, pytest.raises(ValueError, match="management_url"):
        c.models()


def test_async_client(server: tuple[Scripted, str]) -> None:
    script, url = server
    busy = Answer(503, errors.error_body("batch_limit_exceeded", "busy"))
    script.route("POST", "/predictions/m", busy, Answer(body={"ok": 2}))
    script.route("POST", "/predictions/bad", Answer(422, errors.error_body("invalid_image", "x")))

    async def run() -> None:
        async with AsyncClient(url, token="t", backoff=0.01) as c:
            assert await c.predict("m", b"x") == {"ok": 2}
            with pytest.raises(errors.InvalidImage):
                await c.predict("bad", b"x")
            with pytest.raises(errors.PayloadTooLarge):
                await c.predict("m", b"x" * (11 * 1024 * 1024))

    asyncio.run(run())
    assert len(script.seen) == 3
