"""The wire side of the client: requests validated before sending, answers mapped by code."""

from __future__ import annotations

import json
import logging
import mimetypes
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from secure_handler import errors
from secure_handler.errors import (
    ModelNotFound,
    SecureHandlerError,
    ServiceUnavailable,
    Unauthorized,
    UnexpectedResponse,
    error_class,
)
from secure_handler.limits import MAX_JSON_ITEMS, json_items

if TYPE_CHECKING:
    pass


logger = logging.getLogger(__name__)


__all__ = [
    "DEFAULT_CONTENT_TYPES",
    "NAME_PATTERN",
    "PredictRequest",
    "encode_body",
    "json_or_none",
    "raise_for",
    "retryable_answer",
    "validation_error",
]


#: Model names and versions: no path separators, no dots first, at most 64 characters.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

DEFAULT_CONTENT_TYPES = frozenset({
    "image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff",
    "application/json", "text/plain", "application/octet-stream",
})


# --- errors: the classes live in secure_handler.errors, mapped by code -------------


_TORCHSERVE_TYPES: dict[str, type[SecureHandlerError]] = {
    "InvalidKeyException": Unauthorized,
    "ModelNotFoundException": ModelNotFound,
    "ModelVersionNotFoundException": ModelNotFound,
    "ServiceUnavailableException": ServiceUnavailable,
}
_STATUS_FALLBACK: dict[int, type[SecureHandlerError]] = {
    401: Unauthorized, 403: errors.Forbidden, 404: ModelNotFound, 413: errors.PayloadTooLarge,
    415: errors.UnsupportedMediaType, 503: ServiceUnavailable, 507: errors.OutOfMemory,
}


def raise_for(status: int, body: bytes, headers: Mapping[str, str]) -> None:
    """Raise the typed error for a non-2xx response."""
    parsed = json_or_none(body)
    cls: type[SecureHandlerError] = UnexpectedResponse
    message = f"HTTP {status}"
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        code = str(parsed["error"].get("code", ""))
        message = str(parsed["error"].get("message", message))
        cls = error_class(code) or UnexpectedResponse
    elif isinstance(parsed, dict) and "type" in parsed:  # TorchServe's own error body
        message = str(parsed.get("message", message))
        cls = _TORCHSERVE_TYPES.get(str(parsed["type"]), _STATUS_FALLBACK.get(
            status, errors.InferenceFailed if status >= 500 else UnexpectedResponse))
    else:
        cls = _STATUS_FALLBACK.get(status, UnexpectedResponse)
    exc = cls(message)
    exc.http_status = status  # type: ignore[attr-defined]
    exc.body = parsed if parsed is not None else body[:1000]  # type: ignore[attr-defined]
    raise exc


def retryable_answer(status: int, body: bytes) -> bool:
    """Whether an error answer may succeed if sent again: by its code, else a bare 503."""
    if status < 400:
        return False
    parsed = json_or_none(body) if len(body) < 65536 else None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        cls = error_class(str(parsed["error"].get("code", "")))
        if cls is not None:
            return cls.retryable
    return status == 503


def json_or_none(body: bytes) -> Any:
    """The body's JSON, or None when it is not JSON, too deep, or holds more items than
    `MAX_JSON_ITEMS` (an answer is not allowed to cost the client seconds to parse)."""
    if json_items(body) > MAX_JSON_ITEMS:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


# --- requests ----------------------------------------------------------------------------


class PredictRequest(BaseModel):
    """One inference call, validated before it is sent.

    Validate with `context={"max_request_bytes": int, "content_types": set[str]}`.
    """

    model_config = ConfigDict(frozen=True)

    model: str = Field(pattern=NAME_PATTERN)
    version: str | None = Field(None, pattern=NAME_PATTERN)
    body: bytes
    content_type: str = Field(pattern=r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+"
                                      r"(\s*;\s*[A-Za-z0-9_.-]+=[A-Za-z0-9_.\"-]+)*$")

    @field_validator("body")
    @classmethod
    def _size(cls, value: bytes, info: ValidationInfo) -> bytes:
        limit = (info.context or {}).get("max_request_bytes")
        if limit is not None and len(value) > limit:
            raise PydanticCustomError(
                "payload_too_large", "body is {size} bytes, over the client's max_request_bytes "
                "{limit}", {"size": len(value), "limit": limit})
        if not value:
            raise PydanticCustomError("empty_body", "the body is empty")
        return value

    @field_validator("content_type")
    @classmethod
    def _allowed(cls, value: str, info: ValidationInfo) -> str:
        allowed = (info.context or {}).get("content_types")
        media = value.split(";", 1)[0].strip().lower()
        if allowed is not None and media not in allowed:
            raise PydanticCustomError(
                "unsupported_media_type", "{media} is not in the allowed types ({allowed})",
                {"media": media, "allowed": ", ".join(sorted(allowed))})
        return value

    @property
    def path(self) -> str:
        return f"/predictions/{self.model}" + (f"/{self.version}" if self.version else "")


def validation_error(exc: ValidationError) -> SecureHandlerError:
    """The typed error for the first problem, with every problem in the message."""
    problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    text = "; ".join(problems) + " (not sent)"
    # The first problem's error type is our code (PydanticCustomError above); pydantic's own
    # types (a bad name pattern, a wrong type) are not codes and mean a malformed request.
    cls = error_class(str(exc.errors()[0]["type"])) if exc.errors() else None
    return (cls or errors.MalformedRequest)(text)


def encode_body(data: Any, content_type: str | None, max_bytes: int) -> tuple[bytes, str]:
    """Body bytes and content type for `data` (bytes, str, JSON value or file path)."""
    if isinstance(data, Path):
        size = data.stat().st_size
        if size > max_bytes:  # check before reading: the file may be huge
            raise errors.PayloadTooLarge(f"{data} is {size} bytes, over the client's "
                                         f"max_request_bytes {max_bytes} (not sent)")
        guessed = mimetypes.guess_type(data.name)[0]
        return data.read_bytes(), content_type or guessed or "application/octet-stream"
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), content_type or "application/octet-stream"
    if isinstance(data, str):
        return data.encode("utf-8"), content_type or "text/plain; charset=utf-8"
    return json.dumps(data, separators=(",", ":")).encode(), content_type or "application/json"


