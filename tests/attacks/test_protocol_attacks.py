"""Hostile KServe v1 / OIP v2 bodies: each is built here and refused with its exact status and
code, in the protocols' error shape, while its batch neighbours are served.

Families: instance floods (per request and across the batch), a body too large to parse,
the binary tensor extension, ambiguous JSON (a key twice, NaN), envelope confusion (a protocol
body inside an instance, both protocol keys, a wrong model name), protocols turned off, and
nesting deep enough to break a recursive parser.
"""

from __future__ import annotations

import base64
import json
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
