"""Row → payload: pick the one body of a request and check its envelope and size.

TorchServe hands each request over as a dict. The body sits under `body`; form fields and
query parameters sit under their own names, and stock handlers prefer `data` over `body`, so
`POST /predictions/m?data=...` silently replaces the body. Here a request that carries its
payload twice is refused instead.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from secure_handler.errors import EmptyBody, InvalidBase64, MalformedRequest, PayloadTooLarge

__all__ = ["Payload", "b64_limit", "check_size", "decode_base64", "extract", "json_field"]

PAYLOAD_KEYS = ("body", "data")
# Surrounding whitespace tolerated around base64 (a trailing CRLF from curl or a form).
_EDGE_WHITESPACE = 4


@dataclass(frozen=True, slots=True)
class Payload:
    """The request's single payload and the content type the client declared."""

    value: Any  # bytearray/bytes | str | parsed JSON (dict, list, number, ...)
    content_type: str  # lower-case, parameters stripped; "" when none was sent


def _content_type(headers: Mapping[str, Any] | None, key: str) -> str:
    entry = (headers or {}).get(key)
    raw = entry.get("content-type") if isinstance(entry, Mapping) else None
    return str(raw or "").split(";", 1)[0].strip().lower()


def extract(row: Mapping[str, Any], headers: Mapping[str, Any] | None) -> Payload:
    """Return the request's one payload.

    Raises:
        MalformedRequest: the payload arrives both as body and as a `data` field/parameter.
        EmptyBody: there is no payload, or it is empty.
    """
    present = [k for k in PAYLOAD_KEYS if k in row and row[k] is not None]
    if len(present) > 1:
        raise MalformedRequest(
            "the payload was sent twice (as the body and as a `data` field or query "
            "parameter); send it once"
        )
    if not present:
        raise EmptyBody("the request has no body")
    key = present[0]
    value = row[key]
    if isinstance(value, (bytes, bytearray, str)) and len(value) == 0:
        raise EmptyBody("the request body is empty")
    return Payload(value, _content_type(headers, key))


def check_size(size: int, limit: int, what: str = "request body") -> None:
    """Raise PayloadTooLarge when `size` bytes exceed `limit`."""
    if size > limit:
        raise PayloadTooLarge(f"{what} is {size} bytes; the limit is {limit} bytes")


def b64_limit(limit: int) -> int:
    """Most base64 characters that can decode to at most `limit` bytes."""
    return 4 * ((limit + 2) // 3)


def decode_base64(text: str | bytes | bytearray, limit: int) -> bytes:
    """Strict base64 (`validate=True`), refused by length before anything is decoded.

    Only surrounding whitespace is tolerated; characters outside the alphabet are refused
    rather than silently dropped (which is what `b64decode` does without `validate`).
    """
    # Measured before stripping: megabytes of padding whitespace are refused, not scanned.
    check_size(len(text), b64_limit(limit) + _EDGE_WHITESPACE, "base64 payload")
    data = text.strip()
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidBase64(f"payload is not valid base64: {exc}") from exc
    check_size(len(raw), limit, "decoded base64 payload")
    if not raw:
        raise EmptyBody("the base64 payload decodes to nothing")
    return raw


def json_field(obj: Any, keys: tuple[str, ...]) -> Any:
    """The value of the one allowed key of a JSON object envelope.

    Raises:
        MalformedRequest: not an object, unknown keys, none or several of `keys`.
    """
    expected = " or ".join(f'{{"{k}": ...}}' for k in keys)
    if not isinstance(obj, dict):
        raise MalformedRequest(f"JSON body must be an object {expected}; got {_kind(obj)}")
    unknown = sorted(set(obj) - set(keys))
    if unknown:
        shown = ", ".join(repr(k)[:40] for k in unknown[:5])
        raise MalformedRequest(f"unknown JSON field(s) {shown}; expected {expected}")
    found = [k for k in keys if k in obj]
    if len(found) != 1:
        raise MalformedRequest(f"JSON body must have exactly one field: {expected}")
    return obj[found[0]]


_KINDS: dict[type, str] = {dict: "an object", list: "an array", str: "a string"}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)
