"""A client for TorchServe's inference API (and management API) that fails safely.

Needs httpx: `pip install 'secure-handler[client]'`.

* Every request is validated (pydantic) before it leaves: model name and version match a
  strict pattern, the body is within `max_request_bytes`, the content type is allowed.
  A refused request raises the same typed error the server would (`PayloadTooLarge`,
  `UnsupportedMediaType`, `MalformedRequest`) and is never sent.
* Bearer token from `token=` or from TorchServe's `key_file.json` (re-read once when the
  server rejects it: keys change when TorchServe restarts).
* Explicit connect and read timeouts; bounded retries with exponential backoff, only on 503
  and on connection failures (the request cannot have been processed then).
* Our handlers' JSON error bodies become the matching `secure_handler.errors` class, carrying
  `code`, `http_status` and the body; TorchServe's own errors become the client errors below.

Every error is a `secure_handler.errors` class, chosen from the error body's `code` through
the one error table (`secure_handler.errors.ERROR_TABLE`), never from message text; TorchServe's
own error shape (`{"type": ...}`) maps by its type. The client-side ones: `ConnectionFailed`
(no connection after every retry), `ConnectionLost` (broke mid-request; not retried),
`RequestTimedOut` (read timeout; not retried), `ResponseTooLarge`, `UnexpectedResponse`.
"""

from __future__ import annotations

from secure_handler.client._clients import AsyncClient, Client
from secure_handler.client._wire import DEFAULT_CONTENT_TYPES, NAME_PATTERN, PredictRequest
from secure_handler.errors import (
    ClientError,
    ConnectionFailed,
    ConnectionLost,
    ModelNotFound,
    RequestTimedOut,
    ResponseTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnexpectedResponse,
)

__all__ = [
    "DEFAULT_CONTENT_TYPES",
    "NAME_PATTERN",
    "AsyncClient",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "ConnectionLost",
    "ModelNotFound",
    "PredictRequest",
    "RequestTimedOut",
    "ResponseTooLarge",
    "ServiceUnavailable",
    "Unauthorized",
    "UnexpectedResponse",
]
