"""KServe v1 and Open Inference Protocol (v2) routes of the gateway.

Inference (`POST /v1/models/{m}:predict`, `POST /v2/models/{m}[/versions/{v}]/infer`) passes
the same gate as `/predictions` (`Gateway.admit`, `Gateway.check_model`, the model's byte
limit, the audit log) and is forwarded to TorchServe's `/predictions/{m}[/{v}]` as JSON:
the handlers read v1/v2 bodies by their shape, so the route TorchServe sees does not matter,
and `/predictions` is the one that takes a version. The body must be JSON (declared as
`application/json`, or undeclared as tritonclient sends it) with the protocol's top-level key.

Health and metadata come from TorchServe's own status, read with TorchServe's tokens:

* `GET /v2/health/live`: the gateway answers (no key, like `/healthz`);
* `GET /v2/health/ready`: TorchServe answers `/ping` and every configured model has a READY
  worker (no key, cached a second, like `/readyz`): the probe KServe and Kubernetes use;
* `GET /v2/models/{m}[/versions/{v}]`, `.../ready` and v1 `GET /v1/models/{m}`: need a key
  with the inference scope and the model (they say which models exist).

Every refusal on these routes is in the protocols' error shape, `{"error": "[code] message",
"code": "code"}`, with the status `/predictions` would give: OIP clients read `error`.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from secure_handler.errors import (
    MalformedRequest,
    ModelNotFound,
    SecureHandlerError,
    UnsupportedMediaType,
    UpstreamError,
)

if TYPE_CHECKING:  # app.py imports this module to register the routes
    from secure_handler.gateway.app import Call, Gateway, Handler

__all__ = ["oip_routes", "protocol_error"]

_JSON = "application/json"
_READY_CACHE_S = 1.0
#: The v2 input the handlers read, for model metadata.
_V2_INPUT = {"name": "input-0", "datatype": "BYTES", "shape": [-1]}


def protocol_error(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The v1/v2 error body (OIP: `{"error": message}`), the stable code in it twice."""
    body = {"error": f"[{code}] {message}", "code": code}
    return JSONResponse(body, status, headers=headers)


class ProtocolRoutes:
    """The v1/v2 endpoints of one `Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self._ready: tuple[float, bool] | None = None

    # --- inference ----------------------------------------------------------------------

    async def infer_v2(self, request: Request, call: Call) -> Response:
        return await self._infer(request, call, "inputs")

    async def predict_v1(self, request: Request, call: Call) -> Response:
        return await self._infer(request, call, "instances")

    async def _infer(self, request: Request, call: Call, key_field: str) -> Response:
        key = await self.gw.admit(request, call, "inference")
        self.gw.check_model(key, call)
        if request.query_params:
            raise MalformedRequest("query parameters are not accepted")
        _check_json_type(request)
        body = await self.gw._read_body(request, self.gw.config.body_limit(call.model or ""))
        _check_envelope(body, key_field)
        path = f"/predictions/{call.model}" + (f"/{call.version}" if call.version else "")
        resp = await self.gw.upstream.request("inference", "POST", path, content=body,
                                              content_type=_JSON)
        call.upstream_status = resp.status
        if resp.status >= 400 and not _is_protocol_error(resp.content):
            # TorchServe's own refusals (queue full, no worker) come in its shape.
            return protocol_error(resp.status, "upstream_error", _upstream_message(resp.content))
        return Response(resp.content, resp.status, media_type=resp.content_type or _JSON)

    # --- health and metadata ------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def alive_v1(self, request: Request) -> Response:
        """KServe v1 liveness (`GET /`), what KServe's own model server answers."""
        return JSONResponse({"status": "alive"})

    async def ready(self, request: Request) -> Response:
        now = time.monotonic()
        if self._ready is None or now - self._ready[0] > _READY_CACHE_S:
            self._ready = (now, await self._all_ready())
        ok = self._ready[1]
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    async def _all_ready(self) -> bool:
        try:
            ping = await self.gw.upstream.request("inference", "GET", "/ping")
        except SecureHandlerError:
            return False
        if ping.status != 200:
            return False
        for model in self.gw.config.models:
            if not (await self._model_status(model, None))[0]:
                return False
        return True

    async def _model_status(self, model: str, version: str | None) -> tuple[bool, list[str]]:
        """(any version asked for has a READY worker, the versions TorchServe has)."""
        path = f"/models/{model}" + (f"/{version}" if version else "")
        try:
            resp = await self.gw.upstream.request("management", "GET", path)
        except UpstreamError:
            return False, []
        if resp.status != 200:
            return False, []
        try:
            described = json.loads(resp.content)
            versions = [str(m["modelVersion"]) for m in described]
            ready = any(w.get("status") == "READY" for m in described for w in m["workers"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return False, []
        return ready, versions

    async def model_metadata(self, request: Request, call: Call) -> Response:
        await self._admit_model(request, call)
        ready, versions = await self._model_status(call.model or "", call.version)
        if not versions:
            raise ModelNotFound("TorchServe has no such model version")
        return JSONResponse({"name": call.model, "versions": versions,
                             "platform": "pytorch_torchscript", "inputs": [_V2_INPUT],
                             "outputs": []})

    async def model_ready(self, request: Request, call: Call) -> Response:
        await self._admit_model(request, call)
        ready, _ = await self._model_status(call.model or "", call.version)
        return JSONResponse({"name": call.model, "ready": ready}, 200 if ready else 503)

    async def _admit_model(self, request: Request, call: Call) -> None:
        key = await self.gw.admit(request, call, "inference")
        self.gw.check_model(key, call)


def _check_json_type(request: Request) -> None:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType("Content-Encoding is not accepted")
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in ("", _JSON):
        raise UnsupportedMediaType(
            "v1/v2 bodies are JSON: send application/json (or no content type)")
    if "inference-header-content-length" in request.headers:
        raise UnsupportedMediaType(
            "the binary tensor extension is not supported; send JSON data")


def _check_envelope(body: bytes, key_field: str) -> None:
    """The body is a JSON object with the route's protocol key (and not the other's), so a
    plain body cannot ride a protocol route and come back in another shape."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MalformedRequest("the body is not valid JSON") from exc
    other = "instances" if key_field == "inputs" else "inputs"
    if not isinstance(parsed, dict) or key_field not in parsed or other in parsed:
        raise MalformedRequest(f'the body must be a JSON object with "{key_field}"')


def _is_protocol_error(content: bytes) -> bool:
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), str)


def _upstream_message(content: bytes) -> str:
    try:
        body: Any = json.loads(content)
        message = body.get("message") if isinstance(body, dict) else None
    except (ValueError, RecursionError):
        message = None
    return str(message or "TorchServe refused the request")[:300]


def _in_protocol_shape(response: Response) -> Response:
    """A gateway refusal (`{"error": {"code", "message"}}`) re-shaped for OIP clients."""
    if response.status_code < 400:
        return response
    try:
        error = json.loads(bytes(response.body)).get("error")
    except (ValueError, AttributeError):
        return response
    if not isinstance(error, dict):
        return response
    shaped = protocol_error(response.status_code, str(error.get("code")),
                            str(error.get("message")))
    for name in ("www-authenticate", "retry-after", "x-request-id"):
        if name in response.headers:
            shaped.headers[name] = response.headers[name]
    return shaped


def oip_routes(gw: Gateway) -> list[Route]:
    """The v1/v2 routes, to add to the gateway's app (`create_app`)."""
    routes = ProtocolRoutes(gw)

    def ep(action: str, handler: Handler) -> Any:
        async def endpoint(request: Request) -> Response:
            return _in_protocol_shape(await gw.run(request, action, handler))
        return endpoint

    infer = ep("inference.oip_v2", routes.infer_v2)
    metadata = ep("inference.metadata", routes.model_metadata)
    ready = ep("inference.ready", routes.model_ready)
    return [
        Route("/", routes.alive_v1, methods=["GET"]),
        Route("/v2/health/live", routes.live, methods=["GET"]),
        Route("/v2/health/ready", routes.ready, methods=["GET"]),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}", metadata, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}", metadata, methods=["GET"]),
        Route("/v2/models/{model}/ready", ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/ready", ready, methods=["GET"]),
        Route("/v1/models/{model}:predict", ep("inference.kserve_v1", routes.predict_v1),
              methods=["POST"]),
        Route("/v1/models/{model}", ready, methods=["GET"]),
    ]
