"""A small pooled HTTP/1.1 client for the one upstream the gateway talks to: TorchServe.

Why not httpx: on the gateway's hot path httpx/httpcore cost more CPU than everything else
together (async-library detection on every call, a cookie jar, redirects, auth flows), and
the gateway needs none of it. This client does exactly one thing: send one request on a
kept-alive connection to a fixed host and read one response, parsed by httptools (llhttp,
the parser uvicorn uses), with the body bounded and the whole exchange under one timeout.

* No cookie jar, no redirects, no proxies, no environment: what TorchServe sets is dropped.
* A connection goes back to the pool only after a complete response that keeps it alive.
* `retry_stale=True` (idempotent calls only) resends once when a pooled connection turns out
  closed before any byte of an answer; a prediction is never resent (it may have run).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

__all__ = ["HttpPool", "RawResponse", "ResponseTooLarge", "UpstreamClosed"]


class UpstreamClosed(ConnectionError):
    """The connection ended before a complete answer; `answered` if any byte came back."""

    def __init__(self, message: str, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


class ResponseTooLarge(ValueError):
    """The answer's body passed the pool's byte limit."""


@dataclass(frozen=True)
class RawResponse:
    """One complete answer; header names are lower-case, repeated headers keep the last."""

    status: int
    headers: dict[str, str]
    body: bytes


class _Reader:
    """httptools callbacks for one response."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.size = 0
        self.keep_alive = False
        self.complete = False
        self.too_large = False
        self.extra = False  # bytes of a second answer followed this one
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.extra = self.complete

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.limit:
            self.too_large = True
            raise ResponseTooLarge  # httptools turns this into HttpParserCallbackError
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def usable(self) -> bool:
        # The server closed an idle connection: its EOF is already in our buffer.
        return not (self.writer.is_closing() or self.reader.at_eof())

    def close(self) -> None:
        self.writer.close()


class HttpPool:
    """Kept-alive connections to `base_url` (http only: TorchServe on loopback or a private
    network), at most `max_connections` at once."""

    def __init__(self, base_url: str, max_connections: int, max_response_bytes: int) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream URL must be http://host:port, not {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._host_header = parts.netloc.encode("ascii")
        self._idle: deque[_Connection] = deque()
        self._slots = asyncio.Semaphore(max_connections)
        self._limit = max_response_bytes

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        *,
        connect_timeout: float,
        timeout: float,
        retry_stale: bool = False,
    ) -> RawResponse:
        """Send one request and read its answer.

        Raises TimeoutError (connect or answer too slow), OSError/UpstreamClosed (refused,
        reset, closed early) and ResponseTooLarge.
        """
        head = self._head(method, target, headers, body)
        if self._slots.locked():
            # Waiting for a free connection counts against the same timeout as the answer.
            await asyncio.wait_for(self._slots.acquire(), timeout)
        else:
            await self._slots.acquire()  # free: no wait, no timer task
        try:
            for attempt in (1, 2):
                conn, reused = await self._connection(connect_timeout)
                try:
                    return await asyncio.wait_for(self._exchange(conn, head, body), timeout)
                except UpstreamClosed as exc:
                    conn.close()
                    if retry_stale and reused and not exc.answered and attempt == 1:
                        continue
                    raise
                except BaseException:
                    conn.close()
                    raise
        finally:
            self._slots.release()
        raise AssertionError("unreachable")  # pragma: no cover

    def _head(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1".encode("ascii"), b"Host: " + self._host_header]
        lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
        if body is not None or method in ("POST", "PUT"):
            lines.append(b"Content-Length: %d" % len(body or b""))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _connection(self, connect_timeout: float) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: least likely to be stale
            if conn.usable():
                return conn, True
            conn.close()
        opening = asyncio.open_connection(self._host, self._port)
        reader, writer = await asyncio.wait_for(opening, connect_timeout)
        return _Connection(reader, writer), False

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes | None) -> RawResponse:
        conn.writer.write(head + body if body else head)
        response = _Reader(self._limit)
        answered, total = False, 0
        while not response.complete:
            data = await conn.reader.read(65536)
            if not data:
                raise UpstreamClosed("TorchServe closed the connection", answered)
            answered, total = True, total + len(data)
            if total > self._limit + 65536:
                # Headers a handler set (set_response_header) are buffered by the parser
                # too: the whole answer is bounded, not only its body.
                raise ResponseTooLarge("TorchServe's answer is too large")
            try:
                response.parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                if response.too_large:
                    raise ResponseTooLarge("TorchServe's answer is too large") from exc
                raise UpstreamClosed("unparseable answer from TorchServe", True) from exc
            except httptools.HttpParserError as exc:
                raise UpstreamClosed("unparseable answer from TorchServe", True) from exc
        status = response.parser.get_status_code()
        # Bytes after the answer would be a second, unasked-for answer: do not reuse then.
        if response.keep_alive and not response.extra:
            self._idle.append(conn)
        else:
            conn.close()
        return RawResponse(status, response.headers, b"".join(response.chunks))

    async def aclose(self) -> None:
        while self._idle:
            conn = self._idle.pop()
            conn.close()
            with contextlib.suppress(OSError):
                await conn.writer.wait_closed()
