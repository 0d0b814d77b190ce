"""The gateway's ASGI application: `create_app(config)`.

It joins the `Gateway` (app.py: the gate, inference, health) with the management routes
(manage.py) and the KServe v1 / OIP v2 routes (oip.py) under the exact-match router
(routing.py), and runs the lifespan: the start and stop log lines, and closing TorchServe's
connections and the audit log at shutdown.
"""

from __future__ import annotations

import logging

from secure_handler.gateway.app import Gateway
from secure_handler.gateway.config import GatewayConfig
from secure_handler.gateway.manage import management_routes
from secure_handler.gateway.oip import oip_routes
from secure_handler.gateway.ratelimit import RateLimiter
from secure_handler.gateway.routing import Receive, Route, Router, Scope, Send

__all__ = ["GatewayApp", "create_app"]

logger = logging.getLogger(__name__)


def _routes(gw: Gateway) -> list[Route]:
    ep = gw.endpoint
    predict = ("inference.predict", ep(gw.predict))
    return [
        Route("/healthz", {"GET": ("health.live", ep(gw.healthz))}),
        Route("/readyz", {"GET": ("health.ready", ep(gw.readyz))}),
        Route("/predictions/{model}", {"POST": predict}),
        Route("/predictions/{model}/{version}", {"POST": predict}),
        *management_routes(gw),
        *oip_routes(gw),  # KServe v1 / OIP v2 (oip.py), the same gate
    ]


class GatewayApp:
    """The ASGI callable: lifespan (start/stop logs, closing upstream and audit) and http."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.router = Router(_routes(gateway))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.router(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                models = sorted(self.gateway.config.models)
                logger.info("gateway started", extra={"gateway": {"models": models}})
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.gateway.aclose()
                logger.info("gateway stopped")
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(config: GatewayConfig, limiter: RateLimiter | None = None) -> GatewayApp:
    """The ASGI app for `config`; `limiter` overrides the configured backend (tests)."""
    return GatewayApp(Gateway(config, limiter))

