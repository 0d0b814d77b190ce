"""Hostile KServe v1 / OIP v2 bodies: each is built here and refused with its exact status and
code, in the protocols' error shape, while its batch neighbours are served.

Families: instance floods (per request and across the batch), a body too large to parse or
holding too many JSON items, the binary tensor extension, ambiguous JSON (a key twice, NaN,
huge integers, a BOM, JSON that is not UTF-8), envelope confusion (a protocol body inside an
instance, both protocol keys, a wrong or deeply nested model name), protocols turned off,
nesting deep enough to break a recursive parser, and a lone surrogate in an image instance.
"""

from __future__ import annotations

import base64
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from attacks.harness import Target
from support import image_bytes

from secure_handler.testing import Request

RED = base64.b64encode(image_bytes("red", fmt="PNG")).decode()
Build = Callable[..., Target]


def v2(data: list[Any], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input-0", "shape": [len(data)], "datatype": "BYTES",
                        "data": data}], **extra}


def raw(body: bytes, content_type: str = "", **kw: Any) -> Request:
    return Request.as_worker(body, content_type, **kw)


def refused(result: tuple[int, Any], status: int, code: str) -> None:
    """The exact status and code, in the protocols' shape `{"error": "[code] ...", "code"}`."""
    got, body = result
    assert (got, body.get("code")) == (status, code), body
    assert set(body) == {"error", "code"}
    assert body["error"].startswith(f"[{code}] ")


def served(result: tuple[int, Any]) -> None:
    got, body = result
    assert got == 200, body
    assert body["predictions"][0]["predictions"][0]["label"] == "red"


NEIGHBOUR = Request({"instances": [RED]}, "application/json")


@pytest.mark.parametrize("body", [
    {"instances": [RED] * 10_000},
    v2([RED] * 10_000),
    v2([None] * 100_000),  # counted before a single element is looked at
])
def test_instance_flood_is_413_before_any_instance_is_read(classifier: Build,
                                                            body: dict[str, Any]) -> None:
    result, neighbour = classifier().send(Request(body, "application/json"), NEIGHBOUR)
    refused(result, 413, "too_many_instances")
    served(neighbour)


def test_instances_beyond_the_batch_are_503_retryable(classifier: Build) -> None:
    target = classifier(batch_size=4, max_batch_size=4, max_instances_per_request=4)
    first, second, third = target.send(Request({"instances": [RED] * 3}, "application/json"),
                                       Request(v2([RED] * 2), "application/json"),
                                       Request({"instances": [RED]}, "application/json"))
    assert first[0] == 200
    refused(second, 503, "batch_limit_exceeded")
    served(third)  # the fourth slot was still free


def test_a_raw_body_too_large_to_parse_is_413(classifier: Build) -> None:
    # Four instances, each under the per-image limit, whose body together is over the bound
    # on what is parsed (one image's base64 + 64 KiB): the cost per request stays about that
    # of one image.
    target = classifier(max_request_bytes=30_000)
    one = base64.b64encode(b"\x89PNG" + b"\x00" * 25_000).decode()
    body = json.dumps({"instances": [one] * 4}).encode()
    result, neighbour = target.send(raw(body), NEIGHBOUR)
    refused(result, 413, "payload_too_large")
    served(neighbour)


def test_the_binary_tensor_extension_is_400(classifier: Build) -> None:
    header = json.dumps(v2(["x"])).encode()
    result = classifier().send(raw(header + b"\x00\x01binary", headers={
        "Inference-Header-Content-Length": str(len(header))}))[0]
    refused(result, 400, "malformed_request")
    assert "binary_data=False" in result[1]["error"]


@pytest.mark.parametrize("body", [
    b'{"instances": ["x"], "instances": ["' + RED.encode() + b'"]}',
    b'{"inputs": [{"name": "a", "name": "b", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}',
    b'{"inputs": [{"name": "a", "shape": [NaN], "datatype": "BYTES", "data": ["x"]}]}',
    b'{"instances": [Infinity]}',
])
def test_ambiguous_json_in_a_protocol_body_is_400(classifier: Build, body: bytes) -> None:
    result, neighbour = classifier().send(raw(body), NEIGHBOUR)
    refused(result, 400, "malformed_request")
    served(neighbour)


@pytest.mark.parametrize(("body", "where"), [
    ({"instances": [{"instances": [RED]}]}, "instance 0"),  # no protocol inside an instance
    ({"instances": [RED], "inputs": []}, "either"),
    (v2([RED], model_name="another-model"), "not this model"),
    (v2([RED], id={"$ne": 1}), '"id"'),
    ({"instances": [[RED]]}, "instance 0 must be"),
])
def test_envelope_confusion_is_400(classifier: Build, body: dict[str, Any], where: str) -> None:
    result, neighbour = classifier().send(Request(body, "application/json"), NEIGHBOUR)
    refused(result, 400, "malformed_request")
    assert where in result[1]["error"]
    served(neighbour)


def test_a_protocol_that_is_off_is_400_whatever_the_declared_type(classifier: Build) -> None:
    target = classifier(protocols=["torchserve"])
    for request in (Request({"instances": [RED]}, "application/json"),
                    raw(json.dumps(v2([RED])).encode(), "text/plain"),
                    raw(json.dumps({"instances": [RED]}).encode(), "image/png")):
        result = target.send(request)[0]
        refused(result, 400, "malformed_request")
        assert "handler.protocols" in result[1]["error"]


def test_deep_nesting_is_refused_not_a_crash(classifier: Build) -> None:
    body = b'{"instances": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    result, neighbour = classifier(max_request_bytes=1024 * 1024).send(raw(body), NEIGHBOUR)
    assert 400 <= result[0] < 500
    served(neighbour)


def test_text_instances_get_the_text_checks(text_classifier: Build) -> None:
    target = text_classifier()
    bidi, nul, ok = target.send(
        Request({"instances": ["good \u202e doog"]}, "application/json"),
        raw(json.dumps(v2(["bad\u0000"])).encode()),
        Request({"instances": ["good"]}, "application/json"))
    refused(bidi, 422, "invalid_text")
    refused(nul, 422, "invalid_text")
    assert ok[0] == 200


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON", ""])
def test_a_flood_of_tiny_json_items_is_refused_before_it_is_parsed(classifier: Build,
                                                                    content_type: str) -> None:
    # 3 MB of `{}`: under the byte bound, but a million dicts if parsed (with the duplicate-
    # key hook, 14 MB took 3 s and 350 MB). Counted first: never parsed, on either path.
    body = b'{"instances": [' + b",".join([b"{}"] * 1_000_000) + b"]}"
    # Bytes whatever the type, as the hardened config has the worker pass them on
    # (decode_input_request=false); with the worker's own json.loads the cost would be its.
    request = Request(bytearray(body), content_type or "application/octet-stream")
    tracemalloc.start()
    try:
        result, neighbour = classifier().send(request, NEIGHBOUR)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    served(neighbour)
    assert peak < 40 * 1024 * 1024  # the body and its text, not a million objects
    if content_type:  # declared JSON: the plain reader's own bound, in its shape
        assert result[0] == 413
        assert result[1]["error"]["code"] == "payload_too_large"
    else:  # not known to be JSON: read as the image bytes it claims to be
        assert 400 <= result[0] < 500


@pytest.mark.parametrize(("body", "what"), [
    (b'{"instances": ["x"], "n": ' + b"7" * 5000 + b"}", "integer of more than 64 digits"),
    (b"\xef\xbb\xbf" + json.dumps({"instances": [RED]}).encode(), "byte-order mark"),
])
def test_a_protocol_body_the_parser_chokes_on_is_400_in_protocol_shape(
        text_classifier: Build, body: bytes, what: str) -> None:
    # These used to fall back to the plain path, which classified the raw JSON text (200).
    for content_type in ("", "text/plain"):
        result = text_classifier().send(raw(body, content_type))[0]
        refused(result, 400, "malformed_request")
        assert what in result[1]["error"]


def test_json_too_deep_to_parse_is_answered_as_a_plain_body(text_classifier: Build) -> None:
    # Deeper than the parser goes, it is not known to be a protocol body: declared JSON, the
    # plain reader refuses it; as text/plain it is text, under the text checks.
    body = b'{"instances": ["x"], "x": ' + b"[" * 1200 + b"]" * 1200 + b"}"
    result = text_classifier().send(raw(body, "application/json"))[0]
    assert result == (400, {"error": {"code": "malformed_request",
                                      "message": "the body is declared as JSON but is not "
                                                 "valid JSON"}})


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_json_that_is_not_utf8_is_refused_as_on_predictions(classifier: Build,
                                                             encoding: str) -> None:
    # json.loads(bytes) guesses UTF-16/32; the plain path's reader accepts only UTF-8.
    body = json.dumps({"instances": [RED]}).encode(encoding)
    result, neighbour = classifier().send(raw(body, "application/json"), NEIGHBOUR)
    assert result == (400, {"error": {"code": "malformed_request",
                                      "message": "the body is declared as JSON but is not "
                                                 "valid JSON"}})
    served(neighbour)


@pytest.mark.parametrize("body", [
    {"instances": ["\ud800"]},
    v2(["abcd\udfff"]),
])
def test_an_image_instance_with_a_lone_surrogate_is_422(classifier: Build,
                                                         body: dict[str, Any]) -> None:
    # Only a protocol instance can carry one (TorchServe decodes text/* bodies strictly);
    # it was a 500 internal_error from str.encode.
    result, neighbour = classifier().send(Request(body, "application/json"), NEIGHBOUR)
    refused(result, 422, "invalid_base64")
    served(neighbour)


def test_a_deeply_nested_model_name_is_400_in_protocol_shape(classifier: Build) -> None:
    nested: Any = "x"
    for _ in range(990):
        nested = [nested]
    result = classifier().send(Request(v2([RED], model_name=nested), "application/json"))[0]
    refused(result, 400, "malformed_request")
    assert '"model_name" an array' in result[1]["error"]
