"""The gateway's ASGI app: `create_app(config)`.

Every request goes through the same gate, in this order, and the first refusal answers:

1. the client address's bucket (optional)                                → 429
2. the key (`Authorization: Bearer …`), looked up by hash              → 401
3. the key's bucket                                                     → 429
4. the scope (`inference` / `management`), then model and version       → 403
5. per operation: parameters (400), SSRF (403), content type (415),
   body bytes counted as they arrive (413), slow body (408)
6. TorchServe, with TorchServe's token; its status and body pass through;
   unreachable → 502, too slow → 504

Every denial and every management call is appended to the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from secure_handler.errors import (
    EmptyBody,
    MalformedRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    UpstreamUnavailable,
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
from secure_handler.gateway.errors import Forbidden, GatewayError, Unauthorized, rate_limited
from secure_handler.gateway.keys import KeyRing, bearer_token
from secure_handler.gateway.management import (
    describe_params,
    list_params,
    register_params,
    scale_params,
)
from secure_handler.gateway.ratelimit import RateLimiter, RateLimiterUnavailable, build_limiter
from secure_handler.gateway.upstream import Upstream, UpstreamResponse

__all__ = ["Gateway", "create_app"]

logger = logging.getLogger(__name__)


@dataclass
class Call:
    """What is known about one request so far; filled in as it passes the gate."""

    action: str
    client: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    key: KeyEntry | None = None
    model: str | None = None
    version: str | None = None
    upstream_status: int | None = None


Handler = Callable[[Request, Call], Awaitable[Response]]


class Gateway:
    """The state behind the app: keys, limiter, upstream client and audit log."""

    def __init__(self, config: GatewayConfig, limiter: RateLimiter | None = None) -> None:
        self.config = config
        self.keys = KeyRing(config.keys)
        self.limiter = limiter or build_limiter(config)
        self.upstream = Upstream(config.upstream)
        self.audit = AuditLog(config.audit_log)
        self._ready: tuple[float, bool] | None = None

    async def aclose(self) -> None:
        await self.upstream.aclose()
        await self.limiter.aclose()
        self.audit.close()

    # --- the gate ------------------------------------------------------------------------

    async def admit(self, request: Request, call: Call, scope: Scope) -> KeyEntry:
        """Steps 1-4 of the module docstring, up to (not including) the model check."""
        if self.config.per_client is not None:
            await self._take(f"addr:{call.client}", self.config.per_client, "client address")
        key = self.keys.authenticate(bearer_token(request.headers))
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

    async def run(self, request: Request, action: str, handler: Handler) -> Response:
        """Run `handler` inside the gate's error handling, audit and structured log."""
        client = request.client.host if request.client else "unknown"
        call = Call(action=action, client=client)
        call.model = request.path_params.get("model")
        call.version = request.path_params.get("version")
        started = time.perf_counter()
        try:
            response = await handler(request, call)
        except GatewayError as exc:
            response = JSONResponse(exc.to_body(), exc.status, headers=exc.headers)
            self._audit(call, exc.status, exc.code)
        except Exception:
            # Never a traceback to the client; the log has it with the request id.
            logger.exception("gateway error", extra={"gateway": {"request_id": call.request_id}})
            response = JSONResponse(error_body("internal_error", "internal error"), 500)
            self._audit(call, 500, "internal_error")
        else:
            if action.startswith("management."):
                self._audit(call, response.status_code, None)
        response.headers["X-Request-ID"] = call.request_id
        self._log(call, response.status_code, time.perf_counter() - started)
        return response

    def _audit(self, call: Call, status: int, code: str | None) -> None:
        if status < 400:
            outcome = "allowed"
        elif code in ("upstream_unavailable", "upstream_timeout") or call.upstream_status:
            outcome = "upstream_error" if status >= 500 else "upstream_refused"
        else:
            outcome = "denied"
        if outcome == "upstream_error" and not call.action.startswith("management."):
            return  # inference failures are operational, not audit events; they are logged
        self.audit.write(AuditRecord(
            key=call.key.name if call.key else None, client=call.client, action=call.action,
            model=call.model, version=call.version, outcome=outcome, status=status,
            code=code, request_id=call.request_id,
        ))

    def _log(self, call: Call, status: int, seconds: float) -> None:
        logger.info("request", extra={"gateway": {
            "request_id": call.request_id, "action": call.action, "client": call.client,
            "key": call.key.name if call.key else None, "model": call.model,
            "version": call.version, "status": status, "upstream_status": call.upstream_status,
            "ms": round(seconds * 1000, 2),
        }})

    # --- inference ----------------------------------------------------------------------------

    async def predict(self, request: Request, call: Call) -> Response:
        key = await self.admit(request, call, "inference")
        self.check_model(key, call)
        if request.query_params:
            # TorchServe turns query parameters into inputs that take precedence over the body.
            raise MalformedRequest("query parameters are not accepted")
        content_type = self._content_type(request, call.model or "")
        body = await self._read_body(request, self.config.body_limit(call.model or ""))
        path = f"/predictions/{call.model}" + (f"/{call.version}" if call.version else "")
        resp = await self.upstream.request(
            "inference", "POST", path, content=body, content_type=content_type
        )
        return self._pass_through(call, resp)

    def _content_type(self, request: Request, model: str) -> str:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            # A compressed body would defeat the byte limit (CWE-409).
            raise UnsupportedMediaType("Content-Encoding is not accepted")
        declared = request.headers.get("content-type", "")
        media = declared.split(";", 1)[0].strip().lower()
        if media not in self.config.models[model].content_types:
            allowed = ", ".join(self.config.models[model].content_types)
            message = f"content type must be one of: {allowed}"
            raise UnsupportedMediaType(message)
        return declared

    async def _read_body(self, request: Request, limit: int) -> bytes:
        """The body, counted chunk by chunk; 413 as soon as it passes `limit`."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise _too_large(limit)
        try:
            body = await asyncio.wait_for(_collect(request, limit), self.config.body_timeout_s)
        except asyncio.TimeoutError as exc:
            raise RequestTimeout("the body arrived too slowly") from exc
        if not body:
            raise EmptyBody("the request has no body")
        return body

    @staticmethod
    def _pass_through(call: Call, resp: UpstreamResponse) -> Response:
        call.upstream_status = resp.status
        return Response(resp.content, resp.status, media_type=resp.content_type)

    # --- management ---------------------------------------------------------------------------

    async def list_models(self, request: Request, call: Call) -> Response:
        key = await self.admit(request, call, "management")
        params = list_params(request.query_params.multi_items())
        resp = await self.upstream.request("management", "GET", "/models", params=params)
        call.upstream_status = resp.status
        if resp.status != 200:
            return self._pass_through(call, resp)
        try:
            data = json.loads(resp.content)
            granted = {g.name for g in key.models}
            data["models"] = [m for m in data.get("models", []) if m.get("modelName") in granted]
        except (ValueError, AttributeError, TypeError) as exc:
            message = "unexpected answer from TorchServe"
            raise UpstreamUnavailable(message) from exc
        return JSONResponse(data)

    async def describe_model(self, request: Request, call: Call) -> Response:
        key = await self.admit(request, call, "management")
        self.check_model(key, call)
        params = describe_params(request.query_params.multi_items())
        return await self._forward_model(call, "GET", params)

    async def scale_model(self, request: Request, call: Call) -> Response:
        key = await self.admit(request, call, "management")
        self.check_model(key, call)
        params = scale_params(request.query_params.multi_items(), self.config.max_workers)
        return await self._forward_model(call, "PUT", params)

    async def register_model(self, request: Request, call: Call) -> Response:
        # For the audit line even when the name is refused (clipped and JSON-escaped there).
        call.model = request.query_params.get("model_name")
        key = await self.admit(request, call, "management")
        name, params = register_params(
            request.query_params.multi_items(), self.config.model_store, self.config.max_workers
        )
        call.model = name
        self.check_model(key, call)
        grant = key.grant(name)
        if grant is not None and grant.versions:
            # The version comes from inside the archive; only an unrestricted grant may add one.
            raise Forbidden("registering needs a grant for every version of this model")
        resp = await self.upstream.request("management", "POST", "/models", params=params)
        return self._pass_through(call, resp)

    async def refused_operation(self, request: Request, call: Call) -> Response:
        await self.admit(request, call, "management")
        raise MethodNotAllowed("this management operation is not offered")

    async def _forward_model(self, call: Call, method: str, params: dict[str, str]) -> Response:
        path = f"/models/{call.model}" + (f"/{call.version}" if call.version else "")
        resp = await self.upstream.request("management", method, path, params=params)
        return self._pass_through(call, resp)

    # --- health ---------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """Liveness: the gateway answers. Says nothing about keys or models."""
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Readiness: TorchServe answers its own `/ping` (cached a second: no key needed here,
        so this must not become a way to flood TorchServe)."""
        now = time.monotonic()
        if self._ready is None or now - self._ready[0] > 1.0:
            self._ready = (now, await self._ping())
        ok = self._ready[1]
        return JSONResponse({"status": "ready" if ok else "not_ready"}, 200 if ok else 503)

    async def _ping(self) -> bool:
        try:
            resp = await self.upstream.request("inference", "GET", "/ping")
        except GatewayError:
            return False
        return resp.status == 200


async def _collect(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> GatewayError:
    return PayloadTooLarge(f"the body is over {limit} bytes")


Endpoint = Callable[[Request], Awaitable[Response]]


def _endpoint(gateway: Gateway, action: str, handler: Handler) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return await gateway.run(request, action, handler)

    return endpoint


def _management_routes(gw: Gateway) -> list[Route]:
    def ep(action: str, handler: Handler) -> Endpoint:
        return _endpoint(gw, f"management.{action}", handler)

    refused = gw.refused_operation
    model_paths = ("/models/{model}", "/models/{model}/{version}")
    routes = [
        Route("/models", ep("list", gw.list_models), methods=["GET"]),
        Route("/models", ep("register", gw.register_model), methods=["POST"]),
        Route("/models", ep("refused", refused), methods=["PUT", "DELETE", "PATCH"]),
    ]
    for path in model_paths:
        routes += [
            Route(path, ep("describe", gw.describe_model), methods=["GET"]),
            Route(path, ep("scale", gw.scale_model), methods=["PUT"]),
            Route(path, ep("refused", refused), methods=["POST", "DELETE", "PATCH"]),
        ]
    return routes


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body("not_found", "no such endpoint"), 404)


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body("method_not_allowed", "method not allowed"), 405)


def create_app(config: GatewayConfig, limiter: RateLimiter | None = None) -> Starlette:
    """The ASGI app for `config`; `limiter` overrides the configured backend (tests)."""
    gw = Gateway(config, limiter)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        logger.info("gateway started", extra={"gateway": {"models": sorted(config.models)}})
        try:
            yield
        finally:
            await gw.aclose()
            logger.info("gateway stopped")

    predict = _endpoint(gw, "inference.predict", gw.predict)
    routes = [
        Route("/healthz", gw.healthz, methods=["GET"]),
        Route("/readyz", gw.readyz, methods=["GET"]),
        Route("/predictions/{model}", predict, methods=["POST"]),
        Route("/predictions/{model}/{version}", predict, methods=["POST"]),
        *_management_routes(gw),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _method_not_allowed},
    )
    app.state.gateway = gw
    return app
