"""Raw-socket HTTP for the hostile-connection tests: what an HTTP client library would hide
(slow bytes, unfinished headers, whether the server really closed the socket)."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Answer:
    """One HTTP/1.1 answer as bytes came back, and whether the server then closed."""

    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool
    raw: bytes = field(repr=False, default=b"")

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        return str(self.json()["error"]["code"])


def connect(port: int, source: str | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0) if source else None)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float = 20.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or `limit_s` passes (False)."""
    deadline = time.monotonic() + limit_s
    data = b""
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # reset: closed too
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def parse(data: bytes, closed: bool) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(status, headers, body, closed, data)


def exchange(port: int, request: bytes, limit_s: float = 20.0) -> Answer:
    """Send `request` on a new socket, read until the server closes (or `limit_s`)."""
    with connect(port) as sock:
        sock.sendall(request)
        data, closed = read_until_closed(sock, limit_s)
    return parse(data, closed)


def read_one(sock: socket.socket, limit_s: float = 20.0) -> Answer:
    """One answer with a Content-Length body, leaving the connection open."""
    deadline = time.monotonic() + limit_s
    data = b""
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            answer = parse(data, False)
            if len(body) >= int(answer.headers.get("content-length", "0")):
                return answer
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            return parse(data, True)
        data += chunk
    raise AssertionError(f"no complete answer in {limit_s} s: {data[:200]!r}")


def request(method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes = b"", host: str = "127.0.0.1") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
