"""The gateway's refusals: an HTTP status, a stable code and the handlers' JSON error body.

* GatewayError                      any status, body `{"error": {"code", "message"}}`
  + Unauthorized                    401 unauthorized (with WWW-Authenticate: Bearer)
  + Forbidden                       403 forbidden / forbidden_model_source
  + RateLimited                     429 rate_limited (with Retry-After)
  + UpstreamError                   502 upstream_unavailable / 504 upstream_timeout

Plain GatewayErrors carry the other codes: 400 malformed_request / empty_body, 404 not_found /
model_not_found, 405 method_not_allowed, 408 request_timeout, 413 payload_too_large,
415 unsupported_media_type, 500 internal_error, 503 rate_limiter_unavailable. Codes are a
public contract, as in `secure_handler.errors`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import error_body

__all__ = ["Forbidden", "GatewayError", "RateLimited", "Unauthorized", "UpstreamError"]


class GatewayError(Exception):
    """A request the gateway answers itself, with `status` and a stable `code`."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})

    def to_body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)


class Unauthorized(GatewayError):
    """No key, or a key that matches no configured hash."""

    def __init__(self, message: str = "a valid API key is required") -> None:
        super().__init__(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


class Forbidden(GatewayError):
    """A valid key without the scope, model or version; or a refused operation."""

    def __init__(self, message: str, code: str = "forbidden") -> None:
        super().__init__(403, code, message)


class RateLimited(GatewayError):
    """The key's (or the address's) bucket is empty."""

    def __init__(self, retry_after: str, what: str) -> None:
        super().__init__(429, "rate_limited", f"rate limit of this {what} reached; retry later",
                         {"Retry-After": retry_after})


class UpstreamError(GatewayError):
    """TorchServe could not be reached (502) or did not answer in time (504)."""
