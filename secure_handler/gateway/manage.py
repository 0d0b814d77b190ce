"""The management endpoints: list, describe, scale workers, register; nothing else.

Each needs a key with the `management` scope (and, but for list, the model). Parameters are
checked by `management.py` before anything is forwarded; then the call is audited as
`attempted` (no audit line, no call: 503 `service_unavailable`), forwarded with TorchServe's
management token, and audited again with its outcome by `Gateway.run`.
"""

from __future__ import annotations

import json

from secure_handler.errors import MethodNotAllowed, UpstreamUnavailable
from secure_handler.gateway.app import Answer, Call, Gateway, pass_through
from secure_handler.gateway.errors import Forbidden
from secure_handler.gateway.management import (
    describe_params,
    list_params,
    register_params,
    scale_params,
)
from secure_handler.gateway.routing import Route
from secure_handler.gateway.upstream import Method, UpstreamResponse

__all__ = ["ManagementRoutes", "management_routes"]


class ManagementRoutes:
    """The management endpoints of one `Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def _forward(self, call: Call, method: Method, path: str,
                       params: dict[str, str]) -> UpstreamResponse:
        self.gw.audit_attempt(call)  # no audit line, no call
        resp = await self.gw.upstream.request("management", method, path, params=params)
        call.upstream_status = resp.status
        return resp

    async def list_models(self, call: Call) -> Answer:
        key = await self.gw.admit(call, "management")
        params = list_params(call.query)
        resp = await self._forward(call, "GET", "/models", params)
        if resp.status != 200:
            return pass_through(call, resp)
        try:
            data = json.loads(resp.content)
            granted = {g.name for g in key.models}
            data["models"] = [m for m in data.get("models", []) if m.get("modelName") in granted]
        except (ValueError, AttributeError, TypeError) as exc:
            message = "unexpected answer from TorchServe"
            raise UpstreamUnavailable(message) from exc
        return Answer(200, json.dumps(data, separators=(",", ":")).encode())

    async def describe_model(self, call: Call) -> Answer:
        key = await self.gw.admit(call, "management")
        self.gw.check_model(key, call)
        return await self._forward_model(call, "GET", describe_params(call.query))

    async def scale_model(self, call: Call) -> Answer:
        key = await self.gw.admit(call, "management")
        self.gw.check_model(key, call)
        params = scale_params(call.query, self.gw.config.max_workers)
        return await self._forward_model(call, "PUT", params)

    async def register_model(self, call: Call) -> Answer:
        # For the audit line even when the name is refused (clipped and JSON-escaped there).
        asked = dict(call.query)
        call.model, call.archive = asked.get("model_name"), asked.get("url")
        key = await self.gw.admit(call, "management")
        name, params = register_params(call.query, self.gw.config.model_store,
                                       self.gw.config.max_workers)
        call.model = name
        self.gw.check_model(key, call)
        grant = key.grant(name)
        if grant is not None and grant.versions:
            # The version comes from inside the archive; only an unrestricted grant may add one.
            raise Forbidden("registering needs a grant for every version of this model")
        return pass_through(call, await self._forward(call, "POST", "/models", params))

    async def refused_operation(self, call: Call) -> Answer:
        await self.gw.admit(call, "management")
        raise MethodNotAllowed("this management operation is not offered")

    async def _forward_model(self, call: Call, method: Method, params: dict[str, str]) -> Answer:
        path = f"/models/{call.model}" + (f"/{call.version}" if call.version else "")
        return pass_through(call, await self._forward(call, method, path, params))



def management_routes(gw: Gateway) -> list[Route]:
    """The management routes; every other method on them is a 405 (audited)."""
    m = ManagementRoutes(gw)
    ep = gw.endpoint
    refused = ("management.refused", ep(m.refused_operation))
    # Every other method the HTTP parser accepts is refused here, after the key check and
    # audited, rather than by the router's unaudited 405.
    every = dict.fromkeys(_METHODS, refused)
    model = {**every, "GET": ("management.describe", ep(m.describe_model)),
             "PUT": ("management.scale", ep(m.scale_model))}
    return [
        Route("/models", {**every, "GET": ("management.list", ep(m.list_models)),
                          "POST": ("management.register", ep(m.register_model))}),
        Route("/models/{model}", model),
        Route("/models/{model}/{version}", model),
    ]


_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
