"""Optional gateway (extra `[gateway]`): API keys, scopes, rate limits and an audit log.

`create_app(config)` builds the ASGI app; `load_config(path)` reads `gateway.yaml`. The app
module (Starlette, httpx) is imported on first use, so importing this package needs only the
core dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from secure_handler.gateway.config import (
    GatewayConfig,
    KeyEntry,
    ModelGrant,
    ModelPolicy,
    RateLimit,
    load_config,
)
from secure_handler.gateway.keys import generate_key, hash_key

if TYPE_CHECKING:
    from secure_handler.gateway.server import create_app

__all__ = [
    "GatewayConfig",
    "KeyEntry",
    "ModelGrant",
    "ModelPolicy",
    "RateLimit",
    "create_app",
    "generate_key",
    "hash_key",
    "load_config",
]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from secure_handler.gateway.server import create_app

        return create_app
    raise AttributeError(name)
