"""Talking to TorchServe: its tokens from `key_file.json`, bounded calls, mapped failures.

TorchServe's tokens expire (60 minutes by default). The gateway re-reads the key file when a
token is close to expiry or the file changed, and when the file still holds an old token it asks
TorchServe for a new one with the API key (`GET /token?type=...` on the management port), which
rewrites the file. A 400 "Token Authorization failed" answer triggers one re-read and retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import httpx

from secure_handler.gateway.config import UpstreamConfig
from secure_handler.gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable

__all__ = [
    "TOKEN_FAILURE_MARKER",
    "TokenKind",
    "TokenSource",
    "Upstream",
    "UpstreamResponse",
    "parse_expiry",
]

logger = logging.getLogger(__name__)

TokenKind = Literal["inference", "management"]
#: TorchServe's 400 body when a token is wrong or expired (TokenAuthorizationHandler).
TOKEN_FAILURE_MARKER = "Token Authorization failed"


def parse_expiry(text: str) -> float:
    """A Java `Instant` string (`2024-02-16T21:12:24.801167Z`) → POSIX seconds."""
    text = text.strip().replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # Instant prints up to 9 fraction digits; Python 3.10 reads at most 6.
        digits = "".join(ch for ch in rest if ch.isdigit())
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


@dataclass
class _Token:
    key: str
    expires_at: float  # POSIX seconds; inf when the file gives no expiry


class TokenSource:
    """The current TorchServe token of each kind, refreshed before it expires."""

    #: At most one rotation per kind this often, whatever the margin says: a margin longer
    #: than TorchServe's token life must not turn into a rotation per request.
    MIN_ROTATION_INTERVAL_S = 5.0

    def __init__(self, config: UpstreamConfig, client: httpx.AsyncClient) -> None:
        self._path = config.key_file
        self._margin = config.token_refresh_margin_s
        self._management_url = config.management_url
        self._client = client
        self._tokens: dict[str, _Token] = {}
        self._mtime: float | None = None
        self._rotated_at: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def token(self, kind: TokenKind) -> str | None:
        """The token to send, or None when TorchServe runs without token auth."""
        if self._path is None:
            return None
        if self._needs_refresh(kind):
            async with self._lock:
                if self._needs_refresh(kind):  # another request may have refreshed meanwhile
                    await self._refresh(kind)
        found = self._tokens.get(kind)
        if found is None:
            raise _unreachable("TorchServe's key file is not readable")
        return found.key

    async def invalidate(self, kind: TokenKind, refused: str) -> None:
        """TorchServe refused `refused`: read the file again, and rotate if that is stale."""
        async with self._lock:
            current = self._tokens.get(kind)
            if current is not None and current.key != refused:
                return  # already replaced by a concurrent request
            self._read()
            current = self._tokens.get(kind)
            if current is None or current.key == refused:
                await self._rotate_if_due(kind, force=True)

    def _needs_refresh(self, kind: TokenKind) -> bool:
        current = self._tokens.get(kind)
        return current is None or self._stale(current) or self._file_changed()

    def _stale(self, token: _Token) -> bool:
        return time.time() >= token.expires_at - self._margin

    def _file_changed(self) -> bool:
        try:
            return self._path is not None and self._path.stat().st_mtime != self._mtime
        except OSError:
            return True

    async def _refresh(self, kind: TokenKind) -> None:
        self._read()
        token = self._tokens.get(kind)
        if token is not None and self._stale(token):
            await self._rotate_if_due(kind)

    async def _rotate_if_due(self, kind: TokenKind, force: bool = False) -> None:
        now = time.monotonic()
        last = self._rotated_at.get(kind)
        if "API" not in self._tokens:
            return
        if not force and last is not None and now - last < self.MIN_ROTATION_INTERVAL_S:
            return
        self._rotated_at[kind] = now
        await self._rotate(kind)
        self._read()

    def _read(self) -> None:
        assert self._path is not None
        try:
            mtime = self._path.stat().st_mtime
            data = json.loads(self._path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("cannot read TorchServe key file %s: %s", self._path, exc)
            return
        tokens: dict[str, _Token] = {}
        for kind, entry in data.items():
            if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                tokens[kind] = _Token(entry["key"], _expiry(entry.get("expiration time")))
        self._tokens, self._mtime = tokens, mtime

    async def _rotate(self, kind: TokenKind) -> None:
        # TorchServe replaces the token and rewrites key_file.json (the answer has no body).
        url = f"{self._management_url}/token"
        headers = {"Authorization": f"Bearer {self._tokens['API'].key}"}
        try:
            resp = await self._client.get(url, params={"type": kind}, headers=headers)
        except httpx.HTTPError as exc:
            logger.warning("TorchServe token rotation failed: %s", type(exc).__name__)
            return
        if resp.status_code != 200:
            logger.warning("TorchServe token rotation answered %s", resp.status_code)
        else:
            logger.info("rotated TorchServe %s token", kind)


def _expiry(value: object) -> float:
    if not isinstance(value, str):
        return float("inf")  # no expiry given: rely on the refused-token retry
    try:
        return parse_expiry(value)
    except ValueError:
        logger.warning("unreadable token expiry %r in TorchServe's key file", value[:40])
        return float("inf")


@dataclass(frozen=True)
class UpstreamResponse:
    """What TorchServe answered, read fully (bounded by `max_response_bytes`)."""

    status: int
    content: bytes
    content_type: str | None


class Upstream:
    """One pooled HTTP client for TorchServe's inference and management ports."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
        size = config.max_connections
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        # trust_env=False: no proxy variables, no .netrc; the upstream is exactly as configured.
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        self.tokens = TokenSource(config, self.client)

    async def request(
        self,
        kind: TokenKind,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> UpstreamResponse:
        """Call TorchServe with its own token; retry once if the token was refused."""
        base = self.config.inference_url if kind == "inference" else self.config.management_url
        for attempt in (1, 2):
            token = await self.tokens.token(kind)
            # Only these headers go upstream: never the client's Authorization, and never
            # TorchServe's `describe` header, which fails every co-batched request.
            headers = {"Accept-Encoding": "identity"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            if content_type:
                headers["Content-Type"] = content_type
            resp = await self._send(kind, method, base + path, params, content, headers)
            if attempt == 1 and token and resp.status == 400 and _token_refused(resp.content):
                logger.info("TorchServe refused its %s token; re-reading the key file", kind)
                await self.tokens.invalidate(kind, token)
                continue
            return resp
        return resp

    async def _send(
        self,
        kind: TokenKind,
        method: str,
        url: str,
        params: dict[str, str] | None,
        content: bytes | None,
        headers: dict[str, str],
    ) -> UpstreamResponse:
        timeout: httpx.Timeout | Any = httpx.USE_CLIENT_DEFAULT
        if kind == "management":  # registering a model may take minutes
            cfg = self.config
            timeout = httpx.Timeout(cfg.management_timeout_s, connect=cfg.connect_timeout_s)
        request = self.client.build_request(
            method, url, params=params, content=content, headers=headers, timeout=timeout
        )
        try:
            resp = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise _timeout() from exc
        except httpx.HTTPError as exc:
            raise _unreachable("TorchServe is unreachable") from exc
        try:
            body = await self._read_bounded(resp)
        finally:
            await resp.aclose()
        return UpstreamResponse(resp.status_code, body, resp.headers.get("content-type"))

    async def _read_bounded(self, resp: httpx.Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > self.config.max_response_bytes:
                    raise _unreachable("TorchServe's answer is too large")
                chunks.append(chunk)
        except httpx.TimeoutException as exc:
            raise _timeout() from exc
        except httpx.HTTPError as exc:
            raise _unreachable("TorchServe closed the connection") from exc
        return b"".join(chunks)

    async def aclose(self) -> None:
        await self.client.aclose()


def _token_refused(content: bytes) -> bool:
    return TOKEN_FAILURE_MARKER.encode() in content[:4096]


def _unreachable(message: str) -> UpstreamError:
    return UpstreamUnavailable(message)


def _timeout() -> UpstreamError:
    return UpstreamTimeout("TorchServe did not answer in time")
