"""Hostile connections against a real `secure-handler gateway` process, with raw sockets.

Issue 14, findings 3-5 and 8: slow or endless headers, silent sockets, oversized header
sections, connections kept after 408/413, too many sockets from one address, plain-text or
id-less answers from the server layer, slash redirects built from the client's Host.
Each test builds the hostile input, and asserts the exact status, code and that the socket
was closed by the gateway.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_support import KeySet, MakeConfig, Upstream, gateway_process, write_config
from rawhttp import Answer, connect, exchange, parse, read_one, read_until_closed, request
from support import image_bytes

from secure_handler.deploy.launcher import free_port

pytestmark = pytest.mark.integration

TIGHT = {
    "header_timeout_s": 1.5, "idle_timeout_s": 1.0, "body_timeout_s": 1.0,
    "max_header_bytes": 8192, "max_header_count": 32, "max_connections_per_client": 6,
    "max_concurrency": 4,
}


@pytest.fixture
def keys() -> KeySet:
    ks = KeySet()
    ks.add("infer", ["inference"], ["tiny"])
    return ks


def _start(make_config: MakeConfig, keys: KeySet, tmp_path: Path,
           **overrides: object) -> Iterator[int]:
    config = make_config(keys, **{**TIGHT, **overrides})
    path = write_config(config, tmp_path / "gateway.yaml")
    port = free_port()
    with gateway_process(path, port, tmp_path / "gw.log"):
        yield port


@pytest.fixture
def port(make_config: MakeConfig, keys: KeySet, tmp_path: Path,
         torchserve: Upstream) -> Iterator[int]:
    yield from _start(make_config, keys, tmp_path)


def _flood_then_read(sock: socket.socket, chunk: bytes, limit: int) -> tuple[bytes, bool]:
    """Send `chunk` until `limit` bytes or until the gateway closes, then read its answer."""
    sent = 0
    try:
        while sent < limit:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the gateway closed while we were still sending
    return read_until_closed(sock, 10)


def _assert_json_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer.raw[:300]
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-request-id"]
    assert answer.headers["connection"] == "close"
    assert answer.code == code
    assert answer.closed, "the gateway kept the socket open after its error answer"


def _auth(keys: KeySet) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys.plain['infer']}", "Content-Type": "image/jpeg"}


# --- headers ------------------------------------------------------------------------------


def test_headers_trickled_one_line_at_a_time_get_408_and_the_socket_closes(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        data, closed = b"", False
        for _ in range(100):  # a header line every 0.3 s would go on for 30 s
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            data, closed = read_until_closed(sock, 0.3)
            if data or closed:
                break
        if not closed:
            more, closed = read_until_closed(sock, 10)
            data += more
    _assert_json_error(parse(data, closed), 408, "request_timeout")


def test_a_silent_connection_is_closed_without_an_answer(port: int) -> None:
    with connect(port) as sock:
        data, closed = read_until_closed(sock, 20)
    assert closed
    assert data == b""


def test_a_kept_alive_connection_that_goes_silent_is_closed(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(request("GET", "/healthz"))
        assert read_one(sock).status == 200
        data, closed = read_until_closed(sock, 20)
    assert closed
    assert data == b""


def test_an_endless_header_section_gets_431_before_it_is_buffered(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        # unfinished: no CRLF ever comes
        data, closed = _flood_then_read(sock, b"a" * 16384, 4 * 1024 * 1024)
    _assert_json_error(parse(data, closed), 431, "header_fields_too_large")


def test_too_many_header_fields_get_431(port: int) -> None:
    fields = {f"X-F{i}": "v" for i in range(40)}  # 40 tiny fields: under the byte cap
    answer = exchange(port, request("GET", "/healthz", fields))
    _assert_json_error(answer, 431, "header_fields_too_large")


def test_malformed_http_gets_a_json_400_with_a_request_id(port: int) -> None:
    answer = exchange(port, b"GET /healthz HTTP/1.1\r\nHost x no colon\r\n\r\n")
    _assert_json_error(answer, 400, "malformed_request")


def _chunked_head(keys: KeySet) -> bytes:
    head = request("POST", "/predictions/tiny", _auth(keys))
    return head.replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")


def test_a_trailer_after_a_chunked_body_is_refused(port: int, keys: KeySet) -> None:
    answer = exchange(port, _chunked_head(keys) + b"3\r\nabc\r\n0\r\nX-Late: 1\r\n\r\n")
    _assert_json_error(answer, 400, "malformed_request")


def test_an_endless_trailer_value_gets_431_before_it_is_buffered(
    port: int, keys: KeySet,
) -> None:
    with connect(port) as sock:
        sock.sendall(_chunked_head(keys) + b"3\r\nabc\r\n0\r\nX-Late: ")
        # the trailer's value never ends
        data, closed = _flood_then_read(sock, b"a" * 16384, 4 * 1024 * 1024)
    _assert_json_error(parse(data, closed), 431, "header_fields_too_large")


# --- bodies: 413 and 408 end the connection ---------------------------------------------------


def test_413_closes_the_connection_instead_of_reading_the_body(
    port: int, keys: KeySet,
) -> None:
    head = request("POST", "/predictions/tiny", _auth(keys))
    head = head.replace(b"Content-Length: 0", b"Content-Length: 50000000")
    with connect(port) as sock:
        sock.sendall(head)
        data, closed = _flood_then_read(sock, b"\xff" * 65536, 8 * 1024 * 1024)
    _assert_json_error(parse(data, closed), 413, "payload_too_large")


def test_408_for_a_slow_body_closes_and_a_late_byte_does_not_revive_it(
    port: int, keys: KeySet,
) -> None:
    head = request("POST", "/predictions/tiny", _auth(keys))
    head = head.replace(b"Content-Length: 0", b"Content-Length: 1000")
    with connect(port) as sock:
        sock.sendall(head + b"\xff" * 10)
        data, closed = read_until_closed(sock, 10)
        if not closed:  # the finding: one more byte cancelled the close
            try:
                sock.sendall(b"\xff")
            except OSError:
                closed = True
            more, closed = read_until_closed(sock, 10)
            data += more
    _assert_json_error(parse(data, closed), 408, "request_timeout")


def test_an_answer_before_the_body_is_read_ends_the_connection(port: int) -> None:
    # The router refuses at once; the declared body must not keep the socket open.
    head = request("POST", "/nope").replace(b"Content-Length: 0", b"Content-Length: 100000")
    with connect(port) as sock:
        sock.sendall(head + b"x" * 10)
        answer = read_one(sock)
        data, closed = read_until_closed(sock, 10)
    assert (answer.status, answer.code) == (404, "not_found")
    assert closed
    assert data == b""


# --- sockets per address, concurrency -------------------------------------------------------


def test_sockets_per_address_are_capped_and_freed_on_close(
    make_config: MakeConfig, keys: KeySet, tmp_path: Path, torchserve: Upstream,
) -> None:
    for port in _start(make_config, keys, tmp_path, idle_timeout_s=60, header_timeout_s=60):
        held = [connect(port) for _ in range(TIGHT["max_connections_per_client"])]
        try:
            for sock in held:  # each is served, kept alive and counted
                sock.sendall(request("GET", "/healthz"))
                assert read_one(sock).status == 200
            with connect(port) as extra:
                data, closed = read_until_closed(extra, 10)
            answer = parse(data, closed)
            _assert_json_error(answer, 429, "rate_limited")
            assert answer.headers["retry-after"] == "1"
            held.pop().close()
            time.sleep(0.2)  # let the gateway see the close
            with connect(port) as fresh:
                fresh.sendall(request("GET", "/healthz"))
                assert read_one(fresh).status == 200
        finally:
            for sock in held:
                sock.close()


def test_slow_header_sockets_do_not_starve_health_checks(port: int) -> None:
    # Finding 3: six slow-header sockets kept /healthz at 503 under max_concurrency: 6.
    slow = [connect(port) for _ in range(TIGHT["max_concurrency"] + 1)]
    try:
        for sock in slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        with connect(port) as probe:
            probe.sendall(request("GET", "/healthz"))
            health = read_one(probe)
        assert health.status == 200, health.raw
        assert health.json() == {"status": "ok"}
    finally:
        for sock in slow:
            sock.close()


def test_requests_past_max_concurrency_get_a_json_503(
    make_config: MakeConfig, keys: KeySet, tmp_path: Path, torchserve: Upstream,
) -> None:
    for port in _start(make_config, keys, tmp_path, max_concurrency=1, body_timeout_s=30):
        head = request("POST", "/predictions/tiny", _auth(keys))
        head = head.replace(b"Content-Length: 0", b"Content-Length: 1000")
        with connect(port) as holder:
            holder.sendall(head + b"\xff")  # inside the app, waiting for its body
            time.sleep(0.3)
            answer = exchange(port, request("GET", "/healthz"))
        _assert_json_error(answer, 503, "service_unavailable")
        assert answer.headers["retry-after"] == "1"


# --- no redirects, an id on every answer ---------------------------------------------------


def test_a_trailing_slash_is_a_json_404_never_a_redirect_to_the_clients_host(
    port: int, keys: KeySet,
) -> None:
    with connect(port) as sock:
        sock.sendall(request("POST", "/predictions/tiny/", _auth(keys), image_bytes("red"),
                             host="evil.example"))
        answer = read_one(sock)
    assert answer.status == 404
    assert "location" not in answer.headers
    assert answer.headers["x-request-id"]
    assert answer.code == "not_found"


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/healthz", 200), ("GET", "/readyz", 200), ("GET", "/nope", 404),
    ("GET", "/predictions/tiny", 405), ("DELETE", "/healthz", 405),
    ("POST", "/predictions/tiny", 401), ("GET", "/models/", 404), ("GET", "//healthz", 404),
])
def test_every_answer_carries_a_request_id(port: int, method: str, path: str,
                                           status: int) -> None:
    with connect(port) as sock:
        sock.sendall(request(method, path))
        answer = read_one(sock)
    assert answer.status == status
    assert len(answer.headers["x-request-id"]) == 32
    if status >= 400:
        assert answer.headers["content-type"] == "application/json"
        assert set(answer.json()["error"]) == {"code", "message"}
