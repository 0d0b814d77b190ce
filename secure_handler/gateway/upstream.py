"""Talking to TorchServe: bounded calls with its own token, failures mapped to 502/503/504.

Only the headers built here go upstream (never the client's `Authorization`, never
TorchServe's `describe` header), and only status, body and content type come back: TorchServe's
cookies and other headers stop here (there is no cookie jar to replay them).

When an answer looks like TorchServe refused the gateway's token, `tokens.TokenSource` asks
TorchServe itself on a handlerless call; only a confirmed refusal changes anything. Then the
token is recovered (re-read, rotated at most once per interval) and:

* an idempotent call (`GET`) is sent once more with the new token;
* anything else, predictions above all, is never resent (it may have run): the client gets
  503 `service_unavailable` (`UpstreamTokenRefused`) with `Retry-After: 1`, and its retry
  meets the new token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

from secure_handler.errors import UpstreamTimeout, UpstreamUnavailable
from secure_handler.gateway.config import UpstreamConfig
from secure_handler.gateway.errors import UpstreamError, UpstreamTokenRefused
from secure_handler.gateway.http1 import HttpPool, RawResponse, ResponseTooLarge
from secure_handler.gateway.tokens import TokenKind, TokenSource, is_refusal

__all__ = ["Upstream", "UpstreamResponse"]

logger = logging.getLogger(__name__)

Method = Literal["GET", "POST", "PUT"]


@dataclass(frozen=True)
class UpstreamResponse:
    """What TorchServe answered, read fully (bounded by `max_response_bytes`)."""

    status: int
    content: bytes
    content_type: str | None


class Upstream:
    """Pooled HTTP/1.1 connections to TorchServe's inference and management ports."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        size, limit = config.max_connections, config.max_response_bytes
        self._pools = {
            "inference": HttpPool(config.inference_url, size, limit),
            "management": HttpPool(config.management_url, size, limit),
        }
        self.tokens = TokenSource(
            config.key_file, config.token_refresh_margin_s, self._check_token, self._rotate
        )

    async def request(
        self,
        kind: TokenKind,
        method: Method,
        path: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> UpstreamResponse:
        """Call TorchServe with its own token (see the module docstring for refusals)."""
        target = path + ("?" + urlencode(params) if params else "")
        token = await self._token(kind)
        resp = await self._send(kind, method, target, token, content, content_type)
        if token is None or not is_refusal(resp.status, resp.body):
            return _answer(resp)
        if not await self._refused(kind, token):
            return _answer(resp)  # a handler's own 400 that merely looks like a refusal
        logger.warning("TorchServe refused its %s token; recovering", kind)
        await self.tokens.recover(kind, token)
        if method != "GET":
            raise UpstreamTokenRefused(
                "TorchServe refused the gateway's token; it was renewed: retry",
                {"Retry-After": "1"},
            )
        token = await self._token(kind)
        return _answer(await self._send(kind, method, target, token, content, content_type))

    async def _token(self, kind: TokenKind) -> str | None:
        try:
            return await self.tokens.token(kind)
        except OSError as exc:
            raise _unreachable("TorchServe's key file is not readable") from exc

    async def _refused(self, kind: TokenKind, token: str) -> bool:
        try:
            return await self.tokens.refused(kind, token)
        except UpstreamError:
            return False  # TorchServe did not answer the check: nothing is known, nothing done

    async def _send(
        self,
        kind: TokenKind,
        method: str,
        target: str,
        token: str | None,
        content: bytes | None,
        content_type: str | None,
    ) -> RawResponse:
        headers = [("Accept-Encoding", "identity")]
        if token:
            headers.append(("Authorization", f"Bearer {token}"))
        if content_type:
            headers.append(("Content-Type", content_type))
        cfg = self.config
        # Registering a model may take minutes.
        timeout = cfg.management_timeout_s if kind == "management" else cfg.read_timeout_s
        try:
            return await self._pools[kind].request(
                method, target, headers, content, connect_timeout=cfg.connect_timeout_s,
                timeout=timeout, retry_stale=method == "GET",
            )
        except asyncio.TimeoutError as exc:
            raise UpstreamTimeout("TorchServe did not answer in time") from exc
        except ResponseTooLarge as exc:
            raise _unreachable("TorchServe's answer is too large") from exc
        except OSError as exc:  # refused, reset, closed early (UpstreamClosed is one)
            raise _unreachable("TorchServe is unreachable") from exc

    async def _check_token(self, kind: TokenKind, token: str) -> tuple[int, bytes]:
        # Calls with no handler behind them: only TorchServe itself can answer these.
        target = "/ping" if kind == "inference" else "/models?limit=1"
        resp = await self._send(kind, "GET", target, token, None, None)
        return resp.status, resp.body

    async def _rotate(self, kind: TokenKind, api_key: str) -> int:
        # TorchServe replaces the token and rewrites key_file.json (the answer has no body).
        try:
            resp = await self._send("management", "GET", f"/token?type={kind}", api_key,
                                    None, None)
        except UpstreamError as exc:
            logger.warning("TorchServe token rotation failed: %s", exc.code)
            return 0
        return resp.status

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()


def _answer(resp: RawResponse) -> UpstreamResponse:
    return UpstreamResponse(resp.status, resp.body, resp.headers.get("content-type"))


def _unreachable(message: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(message)


#: How long a health answer from TorchServe is reused (the health routes need no key).
READY_CACHE_S = 1.0


class OneFlight:
    """A yes/no answer from TorchServe, asked at most once per `ttl_s` however many callers
    want it at once: those who come while it is being asked wait for the same answer. The
    health routes need no key, so each caller asking TorchServe itself would let anyone
    fill the upstream pool while TorchServe is slow."""

    def __init__(self, ttl_s: float, ask: Callable[[], Awaitable[bool]]) -> None:
        self._ttl_s, self._ask = ttl_s, ask
        self._answer: tuple[float, bool] | None = None
        self._asking: asyncio.Future[bool] | None = None

    async def get(self) -> bool:
        answer = self._answer
        if answer is not None and time.monotonic() - answer[0] <= self._ttl_s:
            return answer[1]
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._refresh())
        # Shielded: a caller that goes away does not cancel the answer the others wait for.
        return await asyncio.shield(self._asking)

    async def _refresh(self) -> bool:
        try:
            value = await self._ask()
            self._answer = (time.monotonic(), value)
            return value
        finally:
            self._asking = None
