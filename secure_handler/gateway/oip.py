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
from typing import Any

from secure_handler.errors import (
    MalformedRequest,
    ModelNotFound,
    SecureHandlerError,
    UnsupportedMediaType,
    UpstreamError,
)
from secure_handler.gateway.app import Answer, Call, Gateway
from secure_handler.gateway.routing import Route
from secure_handler.gateway.upstream import READY_CACHE_S, OneFlight
from secure_handler.limits import bounded_json_int, check_json_items

__all__ = ["oip_routes", "protocol_body", "protocol_error"]

_JSON = "application/json"
#: The v2 input the handlers read, for model metadata.
_V2_INPUT = {"name": "input-0", "datatype": "BYTES", "shape": [-1]}


def protocol_body(code: str, message: str) -> bytes:
    """The v1/v2 error body (OIP: `{"error": message}`), the stable code in it twice."""
    return json.dumps({"error": f"[{code}] {message}", "code": code}).encode()


def protocol_error(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> Answer:
    """A v1/v2 error answer."""
    return Answer(status, protocol_body(code, message), _JSON, headers)


def _answer(data: object, status: int = 200) -> Answer:
    return Answer(status, json.dumps(data, separators=(",", ":")).encode(), _JSON)


class ProtocolRoutes:
    """The v1/v2 endpoints of one `Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self._ready = OneFlight(READY_CACHE_S, self._all_ready)

    # --- inference ----------------------------------------------------------------------

    async def infer_v2(self, call: Call) -> Answer:
        return await self._infer(call, "inputs")

    async def predict_v1(self, call: Call) -> Answer:
        return await self._infer(call, "instances")

    async def _infer(self, call: Call, key_field: str) -> Answer:
        key = await self.gw.admit(call, "inference")
        self.gw.check_model(key, call)
        if call.query:
            raise MalformedRequest("query parameters are not accepted")
        _check_json_type(call.headers)
        body = await self.gw._read_body(call, self.gw.config.body_limit(call.model or ""))
        _check_envelope(body, key_field)
        path = f"/predictions/{call.model}" + (f"/{call.version}" if call.version else "")
        resp = await self.gw.upstream.request("inference", "POST", path, content=body,
                                              content_type=_JSON)
        call.upstream_status = resp.status
        if resp.status >= 400 and not _is_protocol_error(resp.content):
            # TorchServe's own refusals (queue full, no worker) come in its shape.
            return protocol_error(resp.status, "upstream_error", _upstream_message(resp.content))
        return Answer(resp.status, resp.content, resp.content_type or _JSON)

    # --- health and metadata ------------------------------------------------------------

    async def live(self, call: Call) -> Answer:
        return _answer({"live": True})

    async def alive_v1(self, call: Call) -> Answer:
        """KServe v1 liveness (`GET /`), what KServe's own model server answers."""
        return _answer({"status": "alive"})

    async def ready(self, call: Call) -> Answer:
        ok = await self._ready.get()
        return _answer({"ready": ok}, 200 if ok else 503)

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

    async def model_metadata(self, call: Call) -> Answer:
        await self._admit_model(call)
        ready, versions = await self._model_status(call.model or "", call.version)
        if not versions:
            raise ModelNotFound("TorchServe has no such model version")
        return _answer({"name": call.model, "versions": versions,
                        "platform": "pytorch_torchscript", "inputs": [_V2_INPUT],
                        "outputs": []})

    async def model_ready(self, call: Call) -> Answer:
        await self._admit_model(call)
        ready, _ = await self._model_status(call.model or "", call.version)
        return _answer({"name": call.model, "ready": ready}, 200 if ready else 503)

    async def _admit_model(self, call: Call) -> None:
        key = await self.gw.admit(call, "inference")
        self.gw.check_model(key, call)


def _check_json_type(headers: dict[str, str]) -> None:
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType("Content-Encoding is not accepted")
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in ("", _JSON):
        raise UnsupportedMediaType(
            "v1/v2 bodies are JSON: send application/json (or no content type)")
    if "inference-header-content-length" in headers:
        raise UnsupportedMediaType(
            "the binary tensor extension is not supported; send JSON data")


def _check_envelope(body: bytes, key_field: str) -> None:
    """The body is a JSON object with the route's protocol key (and not the other's), so a
    plain body cannot ride a protocol route and come back in another shape. Strict UTF-8,
    and counted before it is parsed, as in the worker: a body of millions of tiny items
    would hold the event loop for seconds."""
    check_json_items(body)
    try:
        parsed = json.loads(body.decode("utf-8"), parse_int=bounded_json_int)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
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


def oip_routes(gw: Gateway) -> list[Route]:
    """The v1/v2 routes, to add to the gateway's routes (`app._routes`); the gateway's own
    refusals on them are rendered in the protocols' error shape (`protocol_body`)."""
    routes = ProtocolRoutes(gw)

    def ep(action: str, handler: Any) -> tuple[str, Any]:
        return action, gw.endpoint(handler, error_body=protocol_body)

    infer = {"POST": ep("inference.oip_v2", routes.infer_v2)}
    metadata = {"GET": ep("inference.metadata", routes.model_metadata)}
    ready = {"GET": ep("inference.ready", routes.model_ready)}
    return [
        Route("/", {"GET": ep("health.kserve_v1", routes.alive_v1)}),
        Route("/v2/health/live", {"GET": ep("health.oip_live", routes.live)}),
        Route("/v2/health/ready", {"GET": ep("health.oip_ready", routes.ready)}),
        Route("/v2/models/{model}/infer", infer),
        Route("/v2/models/{model}/versions/{version}/infer", infer),
        Route("/v2/models/{model}", metadata),
        Route("/v2/models/{model}/versions/{version}", metadata),
        Route("/v2/models/{model}/ready", ready),
        Route("/v2/models/{model}/versions/{version}/ready", ready),
        Route("/v1/models/{model}:predict",
              {"POST": ep("inference.kserve_v1", routes.predict_v1)}),
        Route("/v1/models/{model}", ready),
    ]
