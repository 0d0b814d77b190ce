"""Attacks on the request envelope: base64, JSON shape, empty bodies, smuggled fields, headers.

CWE-20 (input validation), CWE-770 (allocation without limits: the stock handler turns any
JSON list into `torch.FloatTensor`), CWE-674 (uncontrolled recursion), CWE-444/CWE-436 (the
payload smuggled twice, two parties reading different bodies), CWE-807 (a decision taken on
a client-controlled header); ATLAS AML.T0029, AML.T0040 (inference API abuse).
"""

from __future__ import annotations

import base64
import json

import pytest
from attacks import craft
from attacks.harness import Build, Target, assert_class, assert_refused

from secure_handler.testing import Request

SMALL = {"max_request_bytes": 2048}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


# --- base64 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mangle", [
    pytest.param(lambda s: s[:40] + "!" + s[40:], id="CWE-20-bang-inside"),
    pytest.param(lambda s: s[:40] + "\x00" + s[40:], id="CWE-20-nul-inside"),
    pytest.param(lambda s: s[:40] + "é" + s[40:], id="CWE-20-non-ascii"),
    pytest.param(lambda s: s.replace("+", "-").replace("/", "_") + "-_", id="CWE-20-urlsafe"),
    pytest.param(lambda s: s + "A", id="CWE-20-one-char-over-a-quad"),
    pytest.param(lambda s: s + "===", id="CWE-20-excess-padding"),
    pytest.param(lambda s: s + "QQ==QQ==", id="CWE-20-padding-inside"),
    pytest.param(lambda s: "\n".join(s[i:i + 76] for i in range(0, len(s), 76)),
                 id="CWE-20-mime-line-breaks"),
    pytest.param(lambda s: "data:image/jpeg;base64," + s, id="CWE-20-data-url-prefix"),
])
def test_base64_with_junk_is_refused(target: Target, mangle: object) -> None:
    """CWE-20: strict base64 only; `b64decode` without `validate` would silently drop junk."""
    text = mangle(_b64(craft.solid()))  # type: ignore[operator]
    assert_refused(target.one(text.encode(), "text/plain"), 422, "invalid_base64")
    assert_refused(target.one(_json({"data": text}), "application/json"), 422, "invalid_base64")


def test_base64_text_body_is_accepted(target: Target) -> None:
    """Control: the same image as clean base64 in text and JSON bodies is served."""
    text = _b64(craft.solid(craft.GREEN))
    assert_class(target.one(f"  {text}\n".encode(), "text/plain"), "green")
    assert_class(target.one(_json({"data": text}), "application/json"), "green")
    assert_class(target.one(_json({"image": text}), "application/json"), "green")


@pytest.mark.parametrize("size", [
    pytest.param(2049, id="CWE-770-decodes-one-byte-over"),
    pytest.param(3000, id="CWE-770-text-over-before-decoding"),
])
def test_base64_expanding_past_the_byte_limit_is_refused(classifier: Build, size: int) -> None:
    """CWE-770: a base64 payload whose decoded bytes exceed `max_request_bytes`."""
    target = classifier(**SMALL)
    text = _b64(craft.png_declaring(8, 8) + b"\x00" * (size - len(craft.png_declaring(8, 8))))
    assert_refused(target.one(text.encode(), "text/plain"), 413, "payload_too_large")
    assert_refused(target.one(_json({"data": text}), "application/json"),
                   413, "payload_too_large")
    assert_refused(target.one(text.encode(), "application/octet-stream"),
                   413, "payload_too_large")


def test_raw_body_over_the_byte_limit_is_refused(classifier: Build) -> None:
    """CWE-770: a raw PNG one byte over `max_request_bytes`."""
    target = classifier(**SMALL)
    data = craft.encode(craft.noisy(craft.RED, (64, 64)), "PNG")
    assert len(data) > 2049
    assert_refused(target.one(data[:2049], "image/png"), 413, "payload_too_large")


def test_base64_padded_with_megabytes_of_whitespace_is_refused(classifier: Build) -> None:
    """CWE-770: the size check counts the text, whitespace included, before stripping."""
    target = classifier(**SMALL)
    text = " " * 100_000 + _b64(craft.solid((10, 10, 10), (8, 8)))
    assert_refused(target.one(text.encode(), "text/plain"), 413, "payload_too_large")


def test_base64_of_a_bomb_is_refused_as_a_bomb(target: Target) -> None:
    """CWE-409: base64 does not hide the header from the dimension check."""
    text = _b64(craft.png_declaring(65535, 65535))
    assert_refused(target.one(_json({"data": text}), "application/json"), 422, "image_too_large")


# --- JSON of the wrong shape ----------------------------------------------------------------


@pytest.mark.parametrize("value", [
    pytest.param([[[0.5] * 64] * 64] * 3, id="CWE-770-json-number-tensor"),
    pytest.param({"data": [0.0] * 200_000}, id="CWE-770-json-number-array-in-data"),
    pytest.param({"data": {"data": "QUJD"}}, id="CWE-20-object-in-data"),
    pytest.param({"data": 12345}, id="CWE-20-number-in-data"),
    pytest.param({"data": True}, id="CWE-20-bool-in-data"),
    pytest.param({"data": "QUJD", "image": "QUJD"}, id="CWE-436-two-payload-fields"),
    pytest.param({"data": "QUJD", "model": "other"}, id="CWE-20-unknown-field"),
    pytest.param({}, id="CWE-20-empty-object"),
    pytest.param(12345, id="CWE-20-top-level-number"),
    pytest.param(True, id="CWE-20-top-level-true"),
    pytest.param(False, id="CWE-20-top-level-false"),
    pytest.param([], id="CWE-20-empty-array"),
])
def test_json_of_the_wrong_shape_is_refused(target: Target, value: object) -> None:
    """CWE-20/CWE-770: only `{"data": "<base64>"}` or `{"image": "<base64>"}` is accepted."""
    assert_refused(target.one(_json(value), "application/json"), 400, "malformed_request")


def test_json_with_nan_is_refused(target: Target) -> None:
    """CWE-20: `NaN` (accepted by Python's json, not by JSON) where base64 belongs."""
    assert_refused(target.one(b'{"data": NaN}', "application/json"), 400, "malformed_request")


@pytest.mark.parametrize(("depth", "status", "code"), [
    pytest.param(500, 400, "malformed_request", id="CWE-674-nested-500"),
    pytest.param(5_000, 400, "malformed_request", id="CWE-674-nested-5000-recursion-error"),
    pytest.param(200_000, 413, "payload_too_large", id="CWE-400-nested-200000-items"),
])
def test_deeply_nested_json_is_refused(target: Target, depth: int, status: int,
                                       code: str) -> None:
    """CWE-674: nesting deep enough to blow the parser's recursion is a 400, not a crash.

    At 5,000 levels `json.loads` raises RecursionError (in the worker, which then hands the
    raw bytes over, and in the handler's strict reader). At 200,000 the body holds more
    objects than any body is parsed with (`MAX_JSON_ITEMS`): 413 before parsing.
    """
    raw = b'{"data":' * depth + b'"QUJD"' + b"}" * depth
    assert_refused(target.one(raw, "application/json"), status, code)


def test_invalid_json_is_refused(target: Target) -> None:
    """CWE-20: a body declared as JSON that is not JSON (the worker passes the bytes on)."""
    assert_refused(target.one(b'{"data": "QUJD"', "application/json"), 400, "malformed_request")


def test_json_that_is_an_image_is_refused(target: Target) -> None:
    """CWE-436: a real JPEG declared as `application/json` is not guessed at."""
    assert_refused(target.one(craft.solid(), "application/json"), 400, "malformed_request")


# --- empty bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "content_type"), [
    pytest.param(b"", "image/jpeg", id="CWE-20-empty-binary"),
    pytest.param(b"", "text/plain", id="CWE-20-empty-text"),
    pytest.param(b"  \n\t ", "text/plain", id="CWE-20-whitespace-text"),
    pytest.param(b"null", "application/json", id="CWE-20-json-null"),
    pytest.param(b'{"data": ""}', "application/json", id="CWE-20-json-empty-string"),
    pytest.param(b'{"image": "   "}', "application/json", id="CWE-20-json-blank-string"),
])
def test_empty_body_is_refused(target: Target, raw: bytes, content_type: str) -> None:
    """CWE-20: nothing to classify is a 400 `empty_body`, not a decoder error."""
    assert_refused(target.one(raw, content_type), 400, "empty_body")


def test_request_without_any_body_is_refused(target: Target) -> None:
    """CWE-20: a row with no `body` and no `data` at all (e.g. a form with other fields)."""
    request = Request(None, params={"top_k": bytearray(b"5")})
    assert_refused(target.send(request)[0], 400, "empty_body")


# --- smuggled payloads and client headers ---------------------------------------------------


@pytest.mark.parametrize("injected", [
    pytest.param(bytearray(b"x"), id="CWE-444-data-field-junk"),
    pytest.param(bytearray(_b64(craft.solid(craft.BLUE)).encode()), id="CWE-444-data-field-image"),
])
def test_payload_smuggled_as_a_second_data_field_is_refused(target: Target,
                                                            injected: bytearray) -> None:
    """CWE-444: a row carrying both `body` and `data`; stock handlers silently take `data`.

    Such a row comes from a form (multipart or urlencoded) with fields named `body` and
    `data`; `data` would also be where query parameters land if a TorchServe version passed
    them on (0.12.0 does not: verified on a real server, `?data=` never reaches the worker,
    see benchmarks/soak.py). The body says red; the second field smuggles another payload.
    Refused, not silently swapped.
    """
    request = Request(bytearray(craft.solid(craft.RED)), "image/jpeg",
                      params={"data": injected})
    assert_refused(target.send(request)[0], 400, "malformed_request")


def test_unrelated_form_field_is_ignored(target: Target) -> None:
    """Control: an extra `foo` field does not change how the body is read."""
    request = Request(bytearray(craft.solid(craft.RED)), "image/jpeg",
                      params={"foo": bytearray(b"bar")})
    assert_class(target.send(request)[0], "red")


@pytest.mark.parametrize("header", ["describe", "explain"])
def test_client_describe_or_explain_header_does_not_hijack_the_batch(target: Target,
                                                                     header: str) -> None:
    """CWE-807: `describe: True` on request 0 made the stock handler answer the whole batch
    with one describe result (→ 503 for every co-batched request). Here it is ignored.
    """
    hostile = Request(bytearray(craft.solid(craft.RED)), "image/jpeg",
                      headers={header: "True"})
    neighbour = Request(bytearray(craft.solid(craft.BLUE)), "image/jpeg")
    first, second = target.send(hostile, neighbour)
    assert_class(first, "red")
    assert_class(second, "blue")
