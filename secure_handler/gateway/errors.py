"""The gateway's refusals: classes of the one tree in `secure_handler.errors`.

The gateway answers with the same classes, codes and JSON body as the handlers, so the client
maps them by code like any other. `GatewayError` is the root the gateway catches to render one;
`rate_limited` and `too_large` build the two refusals whose messages carry a parameter.
"""

from __future__ import annotations

from secure_handler.errors import (
    Forbidden,
    ForbiddenModelSource,
    RateLimited,
    SecureHandlerError,
    ServiceUnavailable,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = [
    "AuditUnavailable", "Forbidden", "ForbiddenModelSource", "GatewayError", "RateLimited",
    "Unauthorized",
    "UpstreamError", "UpstreamTimeout", "UpstreamTokenRefused", "UpstreamUnavailable",
    "rate_limited",
]

#: Everything the gateway renders as a JSON error answer.
GatewayError = SecureHandlerError


def rate_limited(retry_after: str, what: str) -> RateLimited:
    """429 with `Retry-After`: the key's (or the address's) bucket is empty."""
    return RateLimited(f"rate limit of this {what} reached; retry later",
                       {"Retry-After": retry_after})


class AuditUnavailable(ServiceUnavailable):
    """The audit log cannot be written: the gateway fails closed (503 service_unavailable;
    nothing was forwarded)."""


class UpstreamTokenRefused(ServiceUnavailable):
    """TorchServe confirmed it refused the gateway's token, so nothing ran; the token was
    renewed and the call is not resent (503 service_unavailable, retryable)."""
