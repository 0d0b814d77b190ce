"""Connection hygiene below the ASGI app: what uvicorn (and the other servers) leave open.

`guarded_protocol(config)` is uvicorn's httptools protocol with these rules added, for one
server (its counters live in the class it returns, never in module state):

* at most `max_connections_per_client` open sockets per client address (IPv6: per /64) and
  `max_connections` in all; past either, the socket gets one JSON 429 `rate_limited`
  (or 503 `service_unavailable`) and is closed before anything is read;
* a connection that sends nothing for `idle_timeout_s` (new, or between requests) is closed;
* a request's header section must be complete `header_timeout_s` after its first byte (one
  deadline, not reset by trickling bytes) → 408 `request_timeout`;
* at most `max_header_bytes` bytes and `max_header_count` fields in it → 431
  `header_fields_too_large`: bytes are counted as they arrive, before the parser buffers
  them, so memory per connection stays bounded whatever the client sends;
* no trailers (nothing reads them) → 400; and bytes after the headers that the parser
  buffers instead of passing on (a trailer's value, a chunk extension) at most
  `max_header_bytes` → 431;
* at most `max_concurrency` requests in the app at once → 503 `service_unavailable`;
* malformed HTTP → 400 `malformed_request`.

Every answer from this layer is the gateway's JSON error body with an X-Request-ID and
`Connection: close`, and the socket is closed after it. The app adds `Connection: close` to
its own 408 and 413, so uvicorn closes those too; and any answer sent before its request's
body was all read closes the connection (the rest is never waited for).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from secure_handler.gateway.config import GatewayConfig
from secure_handler.gateway.routing import client_bucket, json_error, new_request_id

__all__ = ["ConnectionBook", "GuardedProtocol", "guarded_protocol", "server_config"]


@dataclass
class ConnectionBook:
    """Open sockets per client bucket and in all, for one server."""

    per_client: int
    total: int
    open: dict[str, int] = field(default_factory=dict)
    count: int = 0

    def admit(self, peer: str) -> int | None:
        """None if the socket may stay; else the status to refuse it with."""
        if self.count >= self.total:
            return 503
        held = self.open.get(peer, 0)
        if held >= self.per_client:
            return 429
        self.open[peer] = held + 1
        self.count += 1
        return None

    def release(self, peer: str) -> None:
        held = self.open.get(peer, 0) - 1
        if held > 0:
            self.open[peer] = held
        else:
            self.open.pop(peer, None)  # the dict holds only addresses with open sockets
        self.count -= 1


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the answer is in `_refusal`."""


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the module docstring's rules."""

    config_g: ClassVar[GatewayConfig]
    book: ClassVar[ConnectionBook]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._peer: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = True  # reading a request's header section (or waiting for one)
        self._head_bytes = 0
        self._head_fields = 0
        self._quiet_bytes = 0  # fed after the headers without any parser callback
        self._progress = False
        self._refusal: bytes | None = None

    # --- accepting -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = client_bucket(self.client[0]) if self.client else "unknown"
        refused = self.book.admit(peer)
        if refused == 429:
            self._answer_and_close(429, "rate_limited",
                                   "too many open connections from this address",
                                   [(b"retry-after", b"1")])
        elif refused is not None:
            self._answer_and_close(503, "service_unavailable",
                                   "the gateway holds too many connections; retry later",
                                   [(b"retry-after", b"1")])
        else:
            self._peer = peer
            self._arm(self.config_g.idle_timeout_s, self._idle_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._peer is not None:
            self.book.release(self._peer)
            self._peer = None
        super().connection_lost(exc)

    # --- reading -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._peer is None or self.transport.is_closing():
            return  # refused at accept, or already answered: read nothing more
        if not self._in_head:
            self._body_data_received(data)
            return
        if self._head_bytes == 0:
            # The first byte of a request starts its one header deadline.
            self._arm(self.config_g.header_timeout_s, self._head_expired)
        allowance = self.config_g.max_header_bytes - self._head_bytes
        if len(data) <= allowance:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Feed only what the cap allows; if the header section is not complete within it,
        # the request is refused before the parser buffers another byte.
        self._head_bytes += allowance
        super().data_received(data[:allowance])
        if self.transport.is_closing():
            return
        if self._in_head:
            self._answer_and_close(431, "header_fields_too_large",
                                   f"the request's headers are over "
                                   f"{self.config_g.max_header_bytes} bytes")
            return
        self.data_received(data[allowance:])  # the body (or the next request), counted

    def _body_data_received(self, data: bytes) -> None:
        # The app counts the body against its limit as it arrives, but the parser itself
        # buffers what is neither body nor framing (a trailer's value, a chunk extension)
        # until it ends; such bytes come with no callback, and are capped here.
        self._progress = False
        super().data_received(data)
        if self._progress or self._in_head or self.transport.is_closing():
            self._quiet_bytes = 0
            return
        self._quiet_bytes += len(data)
        if self._quiet_bytes > self.config_g.max_header_bytes:
            self._answer_and_close(431, "header_fields_too_large",
                                   "chunk extensions or trailers are over the header cap")

    def on_body(self, body: bytes) -> None:
        self._progress = True
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_chunk_complete(self) -> None:
        self._progress = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A trailer (after a chunked body): nothing here reads them, so none is accepted.
            self._refusal = self._error(400, "malformed_request", "trailers are not accepted")
            raise _Refused
        self._head_fields += 1
        if self._head_fields > self.config_g.max_header_count:
            self._refusal = self._error(431, "header_fields_too_large",
                                        f"more than {self.config_g.max_header_count} "
                                        "header fields")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        cap = self.config_g.max_concurrency
        if cap is not None and len(self.tasks) >= cap:
            self._refusal = self._error(503, "service_unavailable",
                                        "the gateway is at its concurrency limit; retry later",
                                        [(b"retry-after", b"1")])
            raise _Refused
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes, self._head_fields = True, 0, 0
        self._progress = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_head and not self.transport.is_closing():
            # Answered before the body was all read (404, 405, a refusal): never keep reading
            # the rest, however slowly it comes.
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # Any parser error, or a callback above that refused: never uvicorn's plain text.
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            refusal = self._error(400, "malformed_request", "the request is not valid HTTP/1.1")
        self._write_and_close(refusal)

    # --- timers --------------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_expired(self) -> None:
        self._timer = None
        if self._in_head and self._head_bytes == 0 and not self.transport.is_closing():
            self.transport.close()  # nothing was asked: nothing to answer

    def _head_expired(self) -> None:
        self._timer = None
        if self._in_head and not self.transport.is_closing():
            self._answer_and_close(408, "request_timeout",
                                   "the request's headers arrived too slowly")

    # --- answers ---------------------------------------------------------------------------

    @staticmethod
    def _error(status: int, code: str, message: str,
               extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
        return json_error(status, code, message, new_request_id(), extra, close=True)

    def _answer_and_close(self, status: int, code: str, message: str,
                          extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self._write_and_close(self._error(status, code, message, extra))

    def _write_and_close(self, answer: bytes) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()


def guarded_protocol(config: GatewayConfig) -> type[GuardedProtocol]:
    """A protocol class for one server (uvicorn.Config(http=...)), with its own counters."""
    book = ConnectionBook(config.max_connections_per_client, config.max_connections)
    return type("GuardedProtocol", (GuardedProtocol,), {"config_g": config, "book": book})


def server_config(app: Any, config: GatewayConfig, **overrides: Any) -> Any:
    """The uvicorn.Config the gateway runs under (the CLI and the tests use this one)."""
    import uvicorn

    settings: dict[str, Any] = {
        "host": config.listen_host, "port": config.listen_port, "lifespan": "on",
        "http": guarded_protocol(config), "access_log": False, "log_config": None,
        "server_header": False, "proxy_headers": bool(config.forwarded_allow_ips),
        "forwarded_allow_ips": list(config.forwarded_allow_ips) or None,
        "timeout_graceful_shutdown": config.shutdown_grace_s,
        # Idle kept-alive connections; connections.py applies the same to new ones.
        "timeout_keep_alive": config.idle_timeout_s,
        "limit_concurrency": None,  # counted by GuardedProtocol, answered in JSON
        # No WebSocket upgrades: uvicorn would hand the socket to its WebSocket protocol,
        # past GuardedProtocol, whose connection_lost then never released the slot (four
        # upgrades locked an address out for good; the kserve extra installs websockets).
        "ws": "none",
        "ssl_certfile": config.tls_certfile, "ssl_keyfile": config.tls_keyfile,
    }
    settings.update(overrides)
    return uvicorn.Config(app, **settings)
