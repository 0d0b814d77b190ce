"""The gateway's ASGI shell: exact routes, JSON 404/405, an X-Request-ID on every answer.

A tiny router instead of Starlette's application stack: the gateway has nine routes, and
Starlette's middleware layers, slash redirects (built from the client's `Host`) and plain-text
fallbacks were per-request cost and attack surface it did not want. A path matches a route
segment by segment or not at all: `/predictions/alpha/` is a JSON 404, never a redirect.

Every answer leaving through `send` gets the request's id, whoever produced it.
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from secure_handler.errors import error_body

__all__ = [
    "ASGIApp", "Match", "Route", "Router", "client_bucket", "json_error", "new_request_id",
    "send_bytes", "send_json",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: (scope, receive, send, match) → None; the endpoint answers through `send`.
Endpoint = Callable[[Scope, Receive, Send, "Match"], Awaitable[None]]


def new_request_id() -> str:
    return uuid.uuid4().hex


def client_bucket(host: str) -> str:
    """What a per-client limit counts: the address, or its /64 for IPv6 (one host can hold a
    whole /64, so counting single IPv6 addresses would be no limit)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{host}/64", strict=False))
    return host


@dataclass(frozen=True)
class Route:
    """`pattern` segments: a literal, or `{name}` for one non-empty segment, optionally with
    a literal suffix inside the segment (`{model}:predict`)."""

    pattern: str
    methods: dict[str, tuple[str, Endpoint]]  # method → (audit action, endpoint)
    segments: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.pattern.strip("/").split("/")))

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.segments, parts, strict=True):
            if want.startswith("{"):
                name, _, suffix = want[1:].partition("}")
                if len(got) <= len(suffix) or not got.endswith(suffix):
                    return None
                params[name] = got[:len(got) - len(suffix)]
            elif want != got:
                return None
        return params


@dataclass
class Match:
    """The route a request matched, and its request id."""

    action: str
    params: dict[str, str]
    request_id: str


def json_error(status: int, code: str, message: str, request_id: str,
               extra: list[tuple[bytes, bytes]] | None = None, close: bool = False) -> bytes:
    """A whole HTTP/1.1 error answer, for layers below ASGI (the connection guard)."""
    body = json.dumps(error_body(code, message), separators=(",", ":")).encode()
    reason = _REASONS.get(status, b"Error")
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"content-type: application/json",
             b"content-length: %d" % len(body), b"x-request-id: " + request_id.encode()]
    lines += [name + b": " + value for name, value in extra or []]
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_REASONS = {400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            408: b"Request Timeout", 413: b"Content Too Large", 429: b"Too Many Requests",
            431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


class Router:
    """Dispatches http requests to routes; answers 404/405 itself, in JSON."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes

    def resolve(self, method: str, path: str) -> tuple[Route, dict[str, str]] | int:
        """The route and its parameters, or 404 / 405."""
        parts = path[1:].split("/") if path.startswith("/") else [""]
        allowed = False
        for route in self.routes:
            params = route.match(parts)
            if params is None:
                continue
            if method in route.methods:
                return route, params
            allowed = True
        return 405 if allowed else 404

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = new_request_id()
        found = self.resolve(scope["method"], scope["path"])
        if isinstance(found, int):
            code, message = ("not_found", "no such endpoint") if found == 404 else (
                "method_not_allowed", "method not allowed")
            await send_json(send, found, error_body(code, message), request_id)
            return
        route, params = found
        action, endpoint = route.methods[scope["method"]]
        await endpoint(scope, receive, send, Match(action, params, request_id))


async def send_json(send: Send, status: int, data: object, request_id: str,
                    headers: dict[str, str] | None = None) -> None:
    """One JSON answer with the request id (and `headers`)."""
    body = json.dumps(data, separators=(",", ":")).encode()
    await send_bytes(send, status, body, "application/json", request_id, headers)


async def send_bytes(send: Send, status: int, body: bytes, content_type: str | None,
                     request_id: str, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-length", b"%d" % len(body)), (b"x-request-id", request_id.encode())]
    if content_type:
        raw.append((b"content-type", content_type.encode("latin-1")))
    for name, value in (headers or {}).items():
        raw.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    if status in (408, 413, 431):
        # The rest of this request is unread or unwanted: the connection ends here.
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
