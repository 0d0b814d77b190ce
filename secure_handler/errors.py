"""The one exception tree and the one table of error codes of secure_handler.

Every error a handler, the client or the gateway can answer with is a class here, carrying the
HTTP status a client sees, a stable snake_case `code` and whether a retry may succeed. Codes are
a public contract: clients and dashboards match on them, so never rename one. `ERROR_TABLE`
(code -> status, class, retryable) is derived from the classes, so the table and the tree
cannot disagree; the README's error table is tested against it.

* SecureHandlerError                        500 internal_error
  x RequestError          (one request is refused; the rest of the batch is served)
    + MalformedRequest / EmptyBody           400
    + Unauthorized                           401 (WWW-Authenticate: Bearer)
    + Forbidden / ForbiddenModelSource       403
    + NotFound / ModelNotFound               404
    + MethodNotAllowed                       405
    + RequestTimeout                         408 (the client sent its body too slowly)
    + PayloadTooLarge                        413
    + UnsupportedMediaType                   415
    + InvalidContent and its kinds           422 (image, text, base64)
    + RateLimited                            429 (Retry-After), retryable
    + BatchLimitExceeded                     503, retryable
  x BatchError            (inference failed for every valid row of the batch)
  x UnavailableError      (the service could not take the request; it did not run)
  x UpstreamError         (502/504 between a proxy and TorchServe)
  x ClientError           (the client could not interpret what came back)
  x ConfigurationError    (initialize or a tool refuses; never sent to a client)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

__all__ = [
    "ERROR_TABLE", "AnimatedImage", "BatchError", "BatchLimitExceeded", "ClientError",
    "ConfigurationError", "ConnectionFailed", "ConnectionLost", "EmptyBody", "ErrorSpec",
    "Forbidden", "ForbiddenModelSource", "FormEncodedBody", "ImageTooComplex",
    "HeaderFieldsTooLarge", "ImageTooLarge", "InferenceFailed", "IntegrityError",
    "InvalidBase64", "InvalidContent", "InvalidImage", "InvalidText", "MalformedRequest",
    "MethodNotAllowed", "ModelNotFound", "NotFound", "OutOfMemory", "PayloadTooLarge",
    "RateLimited", "RateLimiterUnavailable", "RequestError", "RequestTimedOut",
    "RequestTimeout", "ResponseTooLarge", "SecureHandlerError", "ServiceUnavailable",
    "TextTooLong", "TooManyInstances", "TooManyTokens", "Unauthorized", "UnavailableError",
    "UnexpectedResponse", "UnsafeModelError", "UnsupportedMediaType", "UpstreamError",
    "UpstreamTimeout", "UpstreamUnavailable", "error_body", "error_class",
]


class SecureHandlerError(Exception):
    """Root of every error this library raises."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    #: True when the same request may succeed if sent again (it did not run).
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: Extra response headers (Retry-After, WWW-Authenticate) a server sends with it.
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def phrase(self) -> str:
        """The HTTP reason phrase for `status`."""
        return HTTPStatus(self.status).phrase

    def to_body(self) -> dict[str, Any]:
        """The JSON error body sent to the client."""
        return error_body(self.code, self.message)

    def to_json(self) -> str:
        """`to_body()` serialised compactly."""
        return json.dumps(self.to_body(), separators=(",", ":"))


def error_body(code: str, message: str) -> dict[str, Any]:
    """The one JSON error shape used by handlers, gateway and client."""
    return {"error": {"code": code, "message": message}}


# --- per-request errors -------------------------------------------------------------------


class RequestError(SecureHandlerError):
    """A single request is refused; its neighbours in the batch are still served."""
    status = 400
    code = "bad_request"


class MalformedRequest(RequestError):
    """The envelope is wrong: JSON of the wrong shape, a missing or ambiguous field."""
    code = "malformed_request"


class EmptyBody(RequestError):
    """The request carried no payload."""
    code = "empty_body"


class FormEncodedBody(MalformedRequest):
    """The body arrived as form fields (curl's default urlencoded type): nothing to read."""
    code = "form_encoded_body"


class Unauthorized(RequestError):
    """No credential, or one that matches nothing (TorchServe: InvalidKeyException)."""
    status = 401
    code = "unauthorized"

    def __init__(self, message: str = "a valid API key is required",
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, {"WWW-Authenticate": "Bearer", **(headers or {})})


class Forbidden(RequestError):
    """A valid key without the scope, model or version; or a refused operation."""
    status = 403
    code = "forbidden"


class ForbiddenModelSource(Forbidden):
    """A register call named an archive other than `<model_name>.mar` in the store."""
    code = "forbidden_model_source"


class NotFound(RequestError):
    """No such route."""
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    """No such model, version or archive is registered."""
    code = "model_not_found"


class MethodNotAllowed(RequestError):
    """The route exists, the method or operation is not offered."""
    status = 405
    code = "method_not_allowed"


class RequestTimeout(RequestError):
    """The client sent its headers or body too slowly (a server answers 408 and closes)."""
    status = 408
    code = "request_timeout"


class PayloadTooLarge(RequestError):
    """The payload (or what its base64 decodes to) is over `max_request_bytes`."""
    status = 413
    code = "payload_too_large"


class TooManyInstances(PayloadTooLarge):
    """A KServe v1 / OIP v2 request with more instances than `max_instances_per_request`."""
    code = "too_many_instances"


class HeaderFieldsTooLarge(RequestError):
    """The request's header section is over the gateway's byte or field-count cap."""
    status = 431
    code = "header_fields_too_large"


class UnsupportedMediaType(RequestError):
    """The magic bytes or declared type name a format that is not allowed."""
    status = 415
    code = "unsupported_media_type"


class InvalidContent(RequestError):
    """A well-formed request whose content is invalid."""
    status = 422
    code = "invalid_content"


class InvalidBase64(InvalidContent):
    """Base64 with characters outside the alphabet or bad padding."""
    code = "invalid_base64"


class InvalidImage(InvalidContent):
    """The image is truncated, corrupt or cannot be decoded."""
    code = "invalid_image"


class ImageTooLarge(InvalidContent):
    """Width, height, pixel count or aspect ratio is over the limit (read from the header)."""
    code = "image_too_large"


class ImageTooComplex(InvalidContent):
    """A structural cap (JPEG scans/markers/fill, PNG chunks, EXIF size/IFDs) or the decode
    memory estimated from the header is over its limit: decoding would exceed the budget."""

    code = "image_too_complex"


class AnimatedImage(InvalidContent):
    """The image has more frames than allowed."""
    code = "animated_image"


class InvalidText(InvalidContent):
    """Text that is not strict UTF-8 or holds forbidden control characters."""
    code = "invalid_text"


class TextTooLong(InvalidContent):
    """Text over `max_text_chars`."""
    code = "text_too_long"


class TooManyTokens(InvalidContent):
    """Text over `max_tokens` while `truncate` is off."""
    code = "too_many_tokens"


class RateLimited(RequestError):
    """The key's (or the address's) bucket is empty; `Retry-After` says when to come back."""
    status = 429
    code = "rate_limited"
    retryable = True


class BatchLimitExceeded(RequestError):
    """More rows arrived than `max_batch_size`; the surplus rows are refused, retryable."""
    status = 503
    code = "batch_limit_exceeded"
    retryable = True


# --- whole-batch errors ------------------------------------------------------------------


class BatchError(SecureHandlerError):
    """Inference failed for the valid rows of a batch; the worker stays alive."""
    status = 500
    code = "inference_failed"


class InferenceFailed(BatchError):
    """The model raised while running the batch."""


class OutOfMemory(BatchError):
    """The model ran out of host or device memory on this batch."""
    status = 507
    code = "out_of_memory"


# --- the service could not take the request (it did not run) ----------------------------


class UnavailableError(SecureHandlerError):
    """Nothing ran; the same request may succeed later."""
    status = 503
    code = "service_unavailable"
    retryable = True


class ServiceUnavailable(UnavailableError):
    """TorchServe's queue is full or no worker is up (503 after every retry)."""


class ConnectionFailed(UnavailableError):
    """No connection could be made, after every retry."""
    code = "connection_failed"


class RateLimiterUnavailable(UnavailableError):
    """The gateway's shared rate limiter (Redis) cannot be reached; it fails closed."""
    code = "rate_limiter_unavailable"


# --- between a proxy and TorchServe -------------------------------------------------------


class UpstreamError(SecureHandlerError):
    """The gateway could not get an answer from TorchServe."""
    status = 502
    code = "upstream_unavailable"


class UpstreamUnavailable(UpstreamError):
    """TorchServe refused the connection or sent something unreadable (it may have run)."""


class RequestTimedOut(SecureHandlerError):
    """No answer within the read timeout (never retried: the request may have run)."""
    status = 504
    code = "response_timeout"


class UpstreamTimeout(RequestTimedOut, UpstreamError):
    """The gateway's call to TorchServe timed out."""
    status = 504
    code = "upstream_timeout"


# --- client side ---------------------------------------------------------------------------


class ClientError(SecureHandlerError):
    """The client could not interpret or accept what came back."""
    status = 502
    code = "client_error"


class ResponseTooLarge(ClientError):
    """The response body is over the client's `max_response_bytes`; it was not read."""
    code = "response_too_large"


class ConnectionLost(ClientError):
    """The connection broke after the request was sent (never retried: it may have run)."""
    code = "connection_lost"


class UnexpectedResponse(ClientError):
    """A response the client cannot interpret (not JSON, or an unknown error shape)."""
    code = "unexpected_response"


# --- load-time and tool errors (never sent to a client) ------------------------------------


class ConfigurationError(SecureHandlerError):
    """`initialize` refuses to load the model; the message names the problem and the fix."""
    code = "configuration_error"


class UnsafeModelError(ConfigurationError):
    """The archive would unpickle or run code we do not allow (eager model, torch.save file)."""
    code = "unsafe_model"


class IntegrityError(ConfigurationError):
    """A digest, manifest entry or external pin does not match the file."""
    code = "integrity_error"


# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorSpec:
    """One row of the error contract."""

    code: str
    status: int
    cls: type[SecureHandlerError]
    retryable: bool


def _build_table() -> dict[str, ErrorSpec]:
    table: dict[str, ErrorSpec] = {}
    pending: list[type[SecureHandlerError]] = [SecureHandlerError]
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if cls.__module__ != __name__:
            continue  # only this module defines codes; subclasses elsewhere reuse them
        known = table.get(cls.code)
        # A subclass that only narrows the meaning (InferenceFailed) keeps its parent's row
        # unless it is the more specific class for that code.
        if known is None or issubclass(cls, known.cls):
            table[cls.code] = ErrorSpec(cls.code, cls.status, cls, cls.retryable)
    return table


#: code -> (status, class, retryable): every code any part of the project answers with.
ERROR_TABLE: Mapping[str, ErrorSpec] = _build_table()


def error_class(code: str) -> type[SecureHandlerError] | None:
    """The class for an error body's `code`, or None when the code is not ours."""
    spec = ERROR_TABLE.get(code)
    return spec.cls if spec else None
