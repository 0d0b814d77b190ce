"""The gateway's gate and its inference and health endpoints (`Gateway`).

Every request goes through the same gate, in this order, and the first refusal answers:

1. the client address's bucket (optional; IPv6 by /64)                  → 429
2. the key (`Authorization: Bearer …`), looked up by hash              → 401
3. the key's bucket                                                     → 429
4. the scope (`inference` / `management`), then model and version       → 403
5. per operation: parameters (400), model source (403), content type (415),
   body bytes counted as they arrive (413), slow body (408)
6. management only: the attempt is audited first; no audit line, no call (503)
7. TorchServe, with TorchServe's token; its status and body pass through, nothing else
   (no headers, no cookies); unreachable → 502, too slow → 504

Denials and every management call (attempt and outcome) are appended to the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from secure_handler.errors import (
    EmptyBody,
    MalformedRequest,
    PayloadTooLarge,
    RateLimiterUnavailable,
    RequestTimeout,
    UnsupportedMediaType,
    error_body,
)
from secure_handler.gateway.audit import AuditLog, AuditRecord
from secure_handler.gateway.config import (
    NAME_RE,
    VERSION_RE,
    GatewayConfig,
    KeyEntry,
    RateLimit,
    Scope,
)
from secure_handler.gateway.errors import (
    AuditUnavailable,
    Forbidden,
    GatewayError,
    Unauthorized,
    rate_limited,
)
from secure_handler.gateway.keys import KeyRing, bearer_token
from secure_handler.gateway.ratelimit import RateLimiter, build_limiter
from secure_handler.gateway.routing import (
    Match,
    Receive,
    Send,
    client_bucket,
    send_bytes,
)
from secure_handler.gateway.routing import Scope as AsgiScope
from secure_handler.gateway.upstream import READY_CACHE_S, OneFlight, Upstream, UpstreamResponse

__all__ = ["Answer", "Call", "Gateway", "pass_through"]

logger = logging.getLogger(__name__)

#: Headers that decide something here; a request naming one twice is ambiguous and refused.
_SINGLE = frozenset({"authorization", "content-type", "content-length", "content-encoding"})


@dataclass
class Answer:
    """What a handler returns: status, body, content type, extra headers."""

    status: int
    body: bytes
    content_type: str | None = "application/json"
    headers: dict[str, str] | None = None


@dataclass
class Call:
    """One request as the gate sees it; filled in as it passes."""

    action: str
    client: str
    request_id: str
    headers: dict[str, str]
    query: list[tuple[str, str]]
    receive: Receive
    key: KeyEntry | None = None
    model: str | None = None
    version: str | None = None
    archive: str | None = None
    upstream_status: int | None = None


Handler = Callable[[Call], Awaitable[Answer]]
#: (code, message) → an error answer's body.
ErrorBody = Callable[[str, str], bytes]


class Gateway:
    """The state behind the app: keys, limiter, upstream client and audit log."""

    def __init__(self, config: GatewayConfig, limiter: RateLimiter | None = None) -> None:
        self.config = config
        self.keys = KeyRing(config.keys)
        self.limiter = limiter or build_limiter(config)
        self.upstream = Upstream(config.upstream)
        self.audit = AuditLog(config.audit_log, config.audit_denials_per_s)
        self._ready = OneFlight(READY_CACHE_S, self._ping)

    async def aclose(self) -> None:
        await self.upstream.aclose()
        await self.limiter.aclose()
        self.audit.close()

    # --- the gate ------------------------------------------------------------------------

    async def admit(self, call: Call, scope: Scope) -> KeyEntry:
        """Steps 1-4 of the module docstring, up to (not including) the model check."""
        if self.config.per_client is not None:
            bucket = f"addr:{client_bucket(call.client)}"
            await self._take(bucket, self.config.per_client, "client address")
        key = self.keys.authenticate(bearer_token(call.headers))
        if key is None:
            raise Unauthorized()
        call.key = key
        await self._take(f"key:{key.name}", key.rate, "key")
        if scope not in key.scopes:
            raise Forbidden(f"this key has no {scope} scope")
        return key

    async def _take(self, bucket: str, limit: RateLimit, what: str) -> None:
        try:
            decision = await self.limiter.hit(bucket, limit)
        except RateLimiterUnavailable as exc:
            logger.error("rate limiter unavailable: %s", exc)
            raise RateLimiterUnavailable("rate limiter unavailable; try again later") from exc
        if not decision.allowed:
            raise rate_limited(decision.retry_after_header, what)

    def check_model(self, key: KeyEntry, call: Call) -> None:
        """403 unless `key` is granted `call.model` (and `call.version`)."""
        model, version = call.model or "", call.version
        grant = key.grant(model) if NAME_RE.fullmatch(model) else None
        if version is not None and not VERSION_RE.fullmatch(version):
            grant = None
        if grant is None or model not in self.config.models:
            raise Forbidden("this key may not use this model")
        if not grant.allows(version):
            raise Forbidden("this key may not use this model version (name the version)")

    # --- running one endpoint -------------------------------------------------------------

    def endpoint(self, handler: Handler,
                 error_body: ErrorBody | None = None) -> Callable[..., Awaitable[None]]:
        """The router's endpoint for `handler`; `error_body` renders refusals (code, message)
        in another shape (the v1/v2 protocol routes)."""
        async def run(scope: AsgiScope, receive: Receive, send: Send, match: Match) -> None:
            await self.run(scope, receive, send, match, handler, error_body or _error_json)

        return run

    async def run(self, scope: AsgiScope, receive: Receive, send: Send, match: Match,
                  handler: Handler, render: ErrorBody) -> None:
        """Run `handler` inside the gate's error handling, audit and structured log."""
        started = time.perf_counter()
        client = scope["client"][0] if scope.get("client") else "unknown"
        call = Call(match.action, client, match.request_id, {}, [], receive,
                    model=match.params.get("model"), version=match.params.get("version"))
        try:
            call.headers = _headers(scope["headers"])
            call.query = parse_qsl(scope["query_string"].decode("latin-1"),
                                   keep_blank_values=True)
            answer = await handler(call)
        except GatewayError as exc:
            answer = Answer(exc.status, render(exc.code, exc.message), headers=dict(exc.headers))
            if not isinstance(exc, AuditUnavailable):  # it reported itself on stderr
                self._audit_outcome(call, exc.status, exc.code)
        except Exception:
            # Never a traceback to the client; the log has it with the request id.
            logger.exception("gateway error", extra={"gateway": {"request_id": call.request_id}})
            answer = Answer(500, render("internal_error", "internal error"))
            self._audit_outcome(call, 500, "internal_error")
        else:
            if call.action.startswith("management."):
                self._audit_outcome(call, answer.status, None)
        await send_bytes(send, answer.status, answer.body, answer.content_type,
                         call.request_id, answer.headers)
        self._log(call, answer.status, time.perf_counter() - started)

    def _record(self, call: Call, outcome: str, status: int | None,
                code: str | None) -> AuditRecord:
        return AuditRecord(
            key=call.key.name if call.key else None, client=call.client, action=call.action,
            model=call.model, version=call.version, outcome=outcome, status=status,
            code=code, request_id=call.request_id, archive=call.archive,
        )

    def audit_attempt(self, call: Call) -> None:
        """The management call about to be forwarded; raises 503 if it cannot be recorded."""
        self.audit.write(self._record(call, "attempted", None, None))

    def _audit_outcome(self, call: Call, status: int, code: str | None) -> None:
        if status < 400:
            outcome = "allowed"
        elif code in ("upstream_unavailable", "upstream_timeout") or call.upstream_status:
            outcome = "upstream_error" if status >= 500 else "upstream_refused"
        elif call.action.startswith("health."):
            return
        else:
            outcome = "denied"
        if outcome == "upstream_error" and not call.action.startswith("management."):
            return  # inference failures are operational, not audit events; they are logged
        record = self._record(call, outcome, status, code)
        # Floods come from clients without a key, or from a key past its own rate limit.
        floodable = outcome == "denied" and (call.key is None or status == 429)
        # The answer is already decided; a failing audit log reports itself on stderr.
        with contextlib.suppress(GatewayError):
            self.audit.write(record, floodable=floodable)

    def _log(self, call: Call, status: int, seconds: float) -> None:
        if call.action.startswith("health.") or not logger.isEnabledFor(logging.INFO):
            return  # probes every few seconds would drown the requests
        logger.info("request", extra={"gateway": {
            "request_id": call.request_id, "action": call.action, "client": call.client,
            "key": call.key.name if call.key else None, "model": call.model,
            "version": call.version, "status": status, "upstream_status": call.upstream_status,
            "ms": round(seconds * 1000, 2),
        }})

    # --- inference ----------------------------------------------------------------------------

    async def predict(self, call: Call) -> Answer:
        key = await self.admit(call, "inference")
        self.check_model(key, call)
        if call.query:
            # TorchServe turns query parameters into inputs that take precedence over the body.
            raise MalformedRequest("query parameters are not accepted")
        content_type = self._content_type(call, call.model or "")
        body = await self._read_body(call, self.config.body_limit(call.model or ""))
        path = f"/predictions/{call.model}" + (f"/{call.version}" if call.version else "")
        resp = await self.upstream.request(
            "inference", "POST", path, content=body, content_type=content_type
        )
        return pass_through(call, resp)

    def _content_type(self, call: Call, model: str) -> str:
        encoding = call.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            # A compressed body would defeat the byte limit (CWE-409).
            raise UnsupportedMediaType("Content-Encoding is not accepted")
        declared = call.headers.get("content-type", "")
        media = declared.split(";", 1)[0].strip().lower()
        if media not in self.config.models[model].content_types:
            allowed = ", ".join(self.config.models[model].content_types)
            message = f"content type must be one of: {allowed}"
            raise UnsupportedMediaType(message)
        return declared

    async def _read_body(self, call: Call, limit: int) -> bytes:
        """The body, counted chunk by chunk; 413 as soon as it passes `limit`."""
        declared = call.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise _too_large(limit)
        try:
            body = await asyncio.wait_for(_collect(call.receive, limit),
                                          self.config.body_timeout_s)
        except asyncio.TimeoutError as exc:
            raise RequestTimeout("the body arrived too slowly") from exc
        if not body:
            raise EmptyBody("the request has no body")
        return body


    # --- health ---------------------------------------------------------------------------------

    async def healthz(self, call: Call) -> Answer:
        """Liveness: the gateway answers. Says nothing about keys or models."""
        return Answer(200, b'{"status":"ok"}')

    async def readyz(self, call: Call) -> Answer:
        """Readiness: TorchServe answers its own `/ping` (cached a second: no key needed here,
        so this must not become a way to flood TorchServe)."""
        ok = await self._ready.get()
        return Answer(200 if ok else 503, _json({"status": "ready" if ok else "not_ready"}))

    async def _ping(self) -> bool:
        try:
            resp = await self.upstream.request("inference", "GET", "/ping")
        except GatewayError:
            return False
        return resp.status == 200


def pass_through(call: Call, resp: UpstreamResponse) -> Answer:
    """TorchServe's status, body and content type, and nothing else of its answer."""
    call.upstream_status = resp.status
    return Answer(resp.status, resp.content, resp.content_type)


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name_b, value_b in raw:
        name = name_b.decode("latin-1").lower()
        if name in headers and name in _SINGLE:
            raise MalformedRequest(f"header {name} given more than once")
        headers.setdefault(name, value_b.decode("latin-1"))
    return headers


def _json(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _error_json(code: str, message: str) -> bytes:
    return _json(error_body(code, message))


async def _collect(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise MalformedRequest("the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the body is over {limit} bytes")
