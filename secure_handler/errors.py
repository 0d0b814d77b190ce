"""The one exception tree of secure_handler.

Every error carries the HTTP status a client sees and a stable snake_case code. Codes are a
public contract: clients and dashboards match on them, so never rename one.

* SecureHandlerError                       500 internal_error
  x RequestError          (one request; the rest of the batch is served)
    + MalformedRequest                     400 malformed_request
    + EmptyBody                            400 empty_body
    + BatchLimitExceeded                   503 batch_limit_exceeded
    + PayloadTooLarge                      413 payload_too_large
    + UnsupportedMediaType                 415 unsupported_media_type
    + InvalidContent                       422 invalid_content
      - InvalidBase64                      422 invalid_base64
      - InvalidImage                       422 invalid_image
      - ImageTooLarge                      422 image_too_large
      - AnimatedImage                      422 animated_image
      - InvalidText                        422 invalid_text
      - TextTooLong                        422 text_too_long
      - TooManyTokens                      422 too_many_tokens
  x BatchError            (inference failed for every valid row of the batch)
    + InferenceFailed                      500 inference_failed
    + OutOfMemory                          507 out_of_memory
  x ConfigurationError    (initialize refuses to load; never sent to a client)
    + UnsafeModelError    (not TorchScript, eager manifest, pickles)
    + IntegrityError      (a digest or pin does not match)
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, ClassVar

__all__ = [
    "AnimatedImage",
    "BatchError",
    "BatchLimitExceeded",
    "ConfigurationError",
    "EmptyBody",
    "ImageTooLarge",
    "InferenceFailed",
    "IntegrityError",
    "InvalidBase64",
    "InvalidContent",
    "InvalidImage",
    "InvalidText",
    "MalformedRequest",
    "OutOfMemory",
    "PayloadTooLarge",
    "RequestError",
    "SecureHandlerError",
    "TextTooLong",
    "TooManyTokens",
    "UnsafeModelError",
    "UnsupportedMediaType",
    "error_body",
]


class SecureHandlerError(Exception):
    """Root of every error this library raises."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

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

    status = 400
    code = "malformed_request"


class EmptyBody(RequestError):
    """The request carried no payload."""

    status = 400
    code = "empty_body"


class BatchLimitExceeded(RequestError):
    """More rows arrived than `max_batch_size`; the surplus rows are refused, retryable."""

    status = 503
    code = "batch_limit_exceeded"


class PayloadTooLarge(RequestError):
    """The payload (or what its base64 decodes to) is over `max_request_bytes`."""

    status = 413
    code = "payload_too_large"


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


# --- load-time errors --------------------------------------------------------------------


class ConfigurationError(SecureHandlerError):
    """`initialize` refuses to load the model; the message names the problem and the fix."""

    code = "configuration_error"


class UnsafeModelError(ConfigurationError):
    """The archive would unpickle or run code we do not allow (eager model, torch.save file)."""

    code = "unsafe_model"


class IntegrityError(ConfigurationError):
    """A digest, manifest entry or external pin does not match the file."""

    code = "integrity_error"
