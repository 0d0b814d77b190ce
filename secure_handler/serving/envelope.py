"""Row → payload: the one envelope reader of every handler.

TorchServe hands each request over as a dict. The body sits under `body`; form fields and
query parameters sit under their own names, and stock handlers prefer `data` over `body`, so
`POST /predictions/m?data=...` silently replaces the body. Here a request that carries its
payload twice is refused instead.

The rules, the same for every handler:

* content types are compared lower-case with parameters dropped (`Application/JSON;
  charset=utf-8` is JSON); the worker only parses exactly `application/json`, so JSON that
  arrives as bytes is parsed here, strictly: UTF-8, no duplicate keys, no NaN/Infinity;
* a row that is not a mapping, or a body of a type the worker never produces, is a 400;
* a request whose body arrived as form fields (curl's default
  `application/x-www-form-urlencoded`) is a 400 `form_encoded_body` naming the fix;
* binary payloads (`binary_payload`): recognised by content, never by the declared type: a
  known magic is raw bytes; a body that starts like base64, or is printable text, is base64,
  strictly decoded, its decoded size counted against the limit; other bytes are named by the
  caller (415).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from secure_handler.errors import (
    EmptyBody,
    FormEncodedBody,
    InvalidBase64,
    MalformedRequest,
    PayloadTooLarge,
)
from secure_handler.limits import bounded_json_int, check_json_items

__all__ = [
    "JSON_TYPE",
    "Payload",
    "b64_limit",
    "binary_payload",
    "check_size",
    "decode_base64",
    "extract",
    "json_field",
    "parse_json",
    "read",
]

JSON_TYPE = "application/json"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
# Surrounding whitespace tolerated around base64 (a trailing CRLF from curl or a form).
_EDGE_WHITESPACE = 4
# What base64 text starts with (or a body of whitespace only, refused as empty).
# base64url's `-` and `_` too, so such a body is refused as invalid base64 (it is not ours).
_BASE64_START = re.compile(rb"\s*(?:[A-Za-z0-9+/_-]|\Z)")
# Printable ASCII text (what a client meant as base64, however mangled).
_PRINTABLE = re.compile(rb"[\x20-\x7e\t\r\n]*")


class Payload(NamedTuple):
    """The request's single payload and the content type the client declared (a NamedTuple:
    immutable, and built per request at a fraction of a frozen dataclass's cost)."""

    value: Any  # bytearray/bytes | str | parsed JSON (dict, list, number, ...)
    content_type: str  # lower-case, parameters stripped; "" when none was sent

    @property
    def is_json(self) -> bool:
        return self.content_type == JSON_TYPE


def media_type(raw: Any) -> str:
    """`Type/Sub; param=x` → `type/sub`."""
    return str(raw or "").split(";", 1)[0].strip().lower()


def _declared(headers: Mapping[str, Any] | None, key: str) -> str:
    entry = (headers or {}).get(key)
    return media_type(entry.get("content-type") if isinstance(entry, Mapping) else None)


def _http_content_type(headers: Mapping[str, Any] | None) -> str:
    """The request's own Content-Type header (TorchServe keeps the client's spelling)."""
    for name, value in (headers or {}).items():
        if isinstance(name, str) and name.lower() == "content-type" and isinstance(value, str):
            return media_type(value)
    return ""


def extract(row: Any, headers: Mapping[str, Any] | None, raw_hint: str = "") -> Payload:
    """Return the request's one payload, as the worker delivered it.

    Raises:
        MalformedRequest: the row is not a mapping; the payload arrives twice.
        FormEncodedBody: the body arrived as form fields.
        EmptyBody: there is no payload, or it is empty.
    """
    if type(row) is not dict and not isinstance(row, Mapping):  # the worker's rows are dicts
        raise MalformedRequest(
            f"the request is {type(row).__name__}, not a body with fields; resend it")
    body, data = row.get("body"), row.get("data")
    if body is not None and data is not None:
        raise MalformedRequest(
            "the payload was sent twice (as the body and as a `data` field or query "
            "parameter); send it once"
        )
    if body is None and data is None:
        sent = _http_content_type(headers)
        if sent in FORM_TYPES:
            hint = raw_hint or "application/octet-stream"
            raise FormEncodedBody(
                f"the body arrived as form fields (Content-Type: {sent}, curl's default for "
                "--data and --data-binary), so there is no body to read; send the raw bytes "
                f"with their own type, e.g. `Content-Type: {hint}`, or the payload as a form "
                "field named `data`"
            )
        raise EmptyBody("the request has no body")
    key, value = ("body", body) if body is not None else ("data", data)
    if isinstance(value, (bytes, bytearray, str)) and len(value) == 0:
        raise EmptyBody("the request body is empty")
    return Payload(value, _declared(headers, key))


def read(row: Any, headers: Mapping[str, Any] | None, json_limit: int, raw_hint: str = "",
         utf8: Callable[[bytes], str] | None = None) -> Payload:
    """`extract`, then JSON the worker did not parse (any spelling of the type) parsed here;
    `utf8` decodes its bytes (a text handler names bad UTF-8 as bad text)."""
    found = extract(row, headers, raw_hint)
    value, is_json = found.value, found.is_json
    if is_json and isinstance(value, (bytes, bytearray, str)):
        check_size(len(value), json_limit, "JSON body")
        if utf8 is not None and not isinstance(value, str):
            value = utf8(bytes(value))
        return Payload(parse_json(value), found.content_type)
    if not is_json and not isinstance(value, (bytes, bytearray, str)):
        raise MalformedRequest(
            f"the body is {type(value).__name__}, which no content type produces; resend it")
    return found


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:  # json.loads would silently keep the last one
            raise MalformedRequest(f"JSON object has the key {key[:40]!r} twice; send it once")
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise MalformedRequest(f"JSON body holds {name}, which is not JSON")


def parse_json(body: bytes | bytearray | str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, bounded items and nesting.

    Raises:
        MalformedRequest: not strict UTF-8 JSON, or a key twice, NaN/Infinity, too deep.
        PayloadTooLarge: more than `MAX_JSON_ITEMS` objects, arrays and elements.
    """
    try:
        text = body if isinstance(body, str) else bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRequest("the body is declared as JSON but is not valid JSON") from exc
    check_json_items(text)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                          parse_int=bounded_json_int)
    except (ValueError, RecursionError) as exc:
        raise MalformedRequest("the body is declared as JSON but is not valid JSON") from exc


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


def binary_payload(found: Payload, limit: int, fields: tuple[str, ...],
                   is_raw: Callable[[bytes | bytearray], bool]) -> bytes | bytearray:
    """The payload's bytes, whatever the declared type: raw when `is_raw` recognises them,
    else base64 when they start like base64 or are printable text (strict, at most `limit`
    bytes once decoded), else the bytes as sent, for the caller to name their format (415)."""
    if found.is_json:
        field = json_field(found.value, fields)
        if not isinstance(field, str):
            raise MalformedRequest(
                f"JSON field must be a base64 string; got {type(field).__name__}")
        return decode_base64(field, limit)
    value: bytes | bytearray
    if isinstance(found.value, str):  # a text/* body the worker decoded: the same bytes
        check_size(len(found.value), b64_limit(limit) + _EDGE_WHITESPACE)
        try:
            value = found.value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate (a JSON string of an instance)
            raise InvalidBase64("payload is not valid base64: it holds an unpaired "
                                f"surrogate at character {exc.start}") from exc
    else:
        value = found.value
    if is_raw(value):
        check_size(len(value), limit)
        return value
    check_size(len(value), b64_limit(limit) + _EDGE_WHITESPACE)
    if _BASE64_START.match(value) or _PRINTABLE.fullmatch(value):
        return decode_base64(value, limit)
    return value


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
