"""One envelope reader for every handler: the same body gets the same answer.

CWE-20 (input validation), CWE-436 (interpretation conflict: the last of duplicate JSON keys
silently winning; `Application/JSON` read as JSON by one handler and not by another),
CWE-178 (case sensitivity), CWE-703 (a `None` row answered 500). Each hostile row is sent
between two valid rows of one batch; the neighbours must be served.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import pytest
from attacks import craft
from attacks.harness import Build, Target, assert_class, assert_refused
from ts.context import RequestProcessor

from secure_handler.testing import Request

SMALL = {"max_request_bytes": 2048}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _image_json(colour: craft.RGB = craft.GREEN) -> bytes:
    return json.dumps({"data": _b64(craft.solid(colour))}).encode()


def _around(target: Target, middle: Request, text: bool = False) -> tuple[int, Any]:
    """`middle` between two valid rows; the neighbours must be served."""
    if text:
        first_req = last_req = Request("a great film", "text/plain")
    else:
        first_req = Request(bytearray(craft.solid(craft.RED)), "image/jpeg")
        last_req = Request(bytearray(craft.solid(craft.BLUE)), "image/jpeg")
    first, result, last = target.send(first_req, middle, last_req)
    assert first[0] == 200, first
    assert last[0] == 200, last
    return result


def _rows(target: Target, rows: list[Any], headers: list[Mapping[str, Any]]
          ) -> list[tuple[int, Any]]:
    """Rows exactly as given (even ones the worker should never produce), one batch."""
    ctx = target.context
    ctx.request_processor = [RequestProcessor(dict(h)) for h in headers]
    ctx.request_ids = {i: f"req-{i}" for i in range(len(rows))}
    out = target.handler.handle(rows, ctx)
    return [(ctx.get_response_status(i)[0], json.loads(body)) for i, body in enumerate(out)]


# --- content types: case-insensitive, parameters ignored -----------------------------------


@pytest.mark.parametrize("declared", ["Application/JSON", "application/json; charset=utf-8",
                                      "APPLICATION/JSON;charset=UTF-8", "application/json"])
def test_json_in_any_spelling_is_json(target: Target, text_classifier: Build,
                                      declared: str) -> None:
    """CWE-178/436: TorchServe passes `Application/JSON` on as bytes; it is still JSON."""
    image = Request(bytearray(_image_json(craft.GREEN)), declared)
    assert_class(_around(target, image), "green")
    words = Request(bytearray(b'{"text": "a great film"}'), declared)
    status, body = _around(text_classifier(), words, text=True)
    assert status == 200, body


@pytest.mark.parametrize("declared", ["Application/JSON", "application/json"])
def test_duplicate_json_keys_are_refused(target: Target, text_classifier: Build,
                                         declared: str) -> None:
    """CWE-436: `{"data": A, "data": B}` used to serve B silently; a client and a proxy
    could each read a different key. (Exact `application/json` reaches the handler as bytes
    when TorchServe runs with TS_DECODE_INPUT_REQUEST=false.)"""
    red, blue = _b64(craft.solid(craft.RED)), _b64(craft.solid(craft.BLUE))
    raw = f'{{"data": "{red}", "data": "{blue}"}}'.encode()
    result = _around(target, Request(bytearray(raw), declared))
    assert_refused(result, 400, "malformed_request")
    assert "twice" in result[1]["error"]["message"]
    raw_text = b'{"text": "a great film", "text": "awful"}'
    assert_refused(_around(text_classifier(), Request(bytearray(raw_text), declared), True),
                   400, "malformed_request")


@pytest.mark.parametrize("raw", [b'{"data": NaN}', b'{"data": Infinity}', b'{"data": "QUJD"'])
def test_json_bytes_that_are_not_json_are_refused(target: Target, raw: bytes) -> None:
    """CWE-20: JSON the handler parses itself is strict (no NaN, no Infinity, complete)."""
    assert_refused(_around(target, Request(bytearray(raw), "Application/JSON")), 400,
                   "malformed_request")


# --- base64: recognised by content, whatever the declared type ----------------------------


BASE64_TYPES = ["application/octet-stream", "text/plain", "Text/Plain", "image/jpeg",
                "application/x-custom", ""]


def _as_worker(raw: bytes, declared: str) -> Request:
    return Request.as_worker(raw, declared)


@pytest.mark.parametrize("declared", BASE64_TYPES)
def test_base64_counts_its_decoded_size_whatever_the_type(classifier: Build,
                                                          declared: str) -> None:
    """CWE-436: base64 of an image that fits the limit once decoded (its text does not)
    was 413 as octet-stream and 200 as text/plain; now served under every type."""
    image = craft.encode(craft.noisy(craft.GREEN, (27, 27)), "PNG")  # 1.5 to 2 KB
    text = _b64(image).encode()
    assert len(image) <= SMALL["max_request_bytes"] < len(text)
    assert_class(_around(classifier(**SMALL), _as_worker(text, declared)), "green")


@pytest.mark.parametrize("declared", BASE64_TYPES)
def test_base64_over_the_limit_once_decoded_is_413_whatever_the_type(classifier: Build,
                                                                     declared: str) -> None:
    """CWE-770: decoded bytes over `max_request_bytes` are 413 under every type."""
    blob = craft.png_declaring(8, 8) + b"\x00" * 2100
    text = _b64(blob).encode()
    assert_refused(_around(classifier(**SMALL), _as_worker(text, declared)), 413,
                   "payload_too_large")


@pytest.mark.parametrize("declared", BASE64_TYPES)
@pytest.mark.parametrize("text", ["QUJD!" + "QUJD" * 10, "%%%", "!!not base64!!",
                                  "data:image/jpeg;base64,QUJD"])
def test_junk_base64_is_invalid_base64_whatever_the_type(target: Target, declared: str,
                                                         text: str) -> None:
    """CWE-20: text that is not base64 is 422 invalid_base64 under every declared type."""
    assert_refused(_around(target, _as_worker(text.encode(), declared)), 422,
                   "invalid_base64")


@pytest.mark.parametrize("declared", BASE64_TYPES)
def test_binary_of_no_known_format_is_415_whatever_the_type(target: Target,
                                                            declared: str) -> None:
    """Bytes that are neither a known image nor text are named as unrecognised (415)."""
    assert_refused(_around(target, _as_worker(b"\x00\x9f\x92\x96" * 8, declared)), 415,
                   "unsupported_media_type")


# --- rows the worker should never produce -------------------------------------------------


def _valid_row() -> tuple[dict[str, Any], dict[str, Any]]:
    return ({"body": bytearray(craft.solid(craft.RED))},
            {"body": {"content-type": "image/jpeg"}})


@pytest.mark.parametrize("row", [None, [1, 2], "body", 7],
                         ids=["none", "list", "str", "int"])
def test_a_row_that_is_not_a_request_is_400(target: Target, row: Any) -> None:
    """CWE-703: a `None` row answered 500 internal_error; it is the request that is wrong."""
    good, headers = _valid_row()
    results = _rows(target, [good, row, good], [headers, {}, headers])
    assert_refused(results[1], 400, "malformed_request")
    assert_class(results[0], "red")
    assert_class(results[2], "red")


@pytest.mark.parametrize("body", [12345, 1.5, True])
def test_a_body_no_content_type_produces_is_400(target: Target, body: Any) -> None:
    """CWE-20: a number body under an image type cannot come from TorchServe: 400."""
    good, headers = _valid_row()
    results = _rows(target, [good, {"body": body}, good],
                    [headers, {"body": {"content-type": "image/jpeg"}}, headers])
    assert_refused(results[1], 400, "malformed_request")


# --- bodies that arrived as form fields -----------------------------------------------------


@pytest.mark.parametrize("form_type", ["application/x-www-form-urlencoded",
                                       "multipart/form-data; boundary=x",
                                       "Application/X-WWW-Form-Urlencoded"])
def test_body_sent_as_form_fields_says_so_and_names_the_fix(target: Target,
                                                            text_classifier: Build,
                                                            form_type: str) -> None:
    """`curl --data-binary @cut.jpg` (urlencoded by default) splits the bytes into fields:
    400 form_encoded_body naming the fix, not a baffling "the request has no body"."""
    fields = {"\ufffd\ufffd\ufffdJFIF": bytearray(b"\x00\x01garbage"), "x": bytearray(b"1")}
    form = Request(None, params=fields, headers={"Content-Type": form_type})
    result = _around(target, form)
    assert_refused(result, 400, "form_encoded_body")
    message = result[1]["error"]["message"]
    assert "form fields" in message
    assert "Content-Type: image/jpeg" in message
    assert "application/octet-stream" in message
    text_result = _around(text_classifier(), form, text=True)
    assert_refused(text_result, 400, "form_encoded_body")
    assert "text/plain" in text_result[1]["error"]["message"]


def test_form_with_a_data_field_is_still_read(target: Target) -> None:
    """Control: a form whose field is named `data` carries the payload and is served."""
    form = Request(None, params={"data": bytearray(craft.solid(craft.GREEN))},
                   headers={"Content-Type": "multipart/form-data; boundary=x",
                            "data": {"content-type": "image/jpeg"}})
    assert_class(_around(target, form), "green")
