"""Envelope checks: one payload, size limits, strict base64, JSON shape."""

from __future__ import annotations

import base64

import pytest

from secure_handler import EmptyBody, InvalidBase64, MalformedRequest, PayloadTooLarge
from secure_handler.serving.envelope import b64_limit, decode_base64, extract, json_field


def test_extract_reads_body_and_content_type() -> None:
    found = extract({"body": bytearray(b"x")}, {"body": {"content-type": "Image/JPEG; q=1"}})
    assert (bytes(found.value), found.content_type) == (b"x", "image/jpeg")


def test_payload_twice_and_empty_are_refused() -> None:
    with pytest.raises(MalformedRequest, match="sent twice"):
        extract({"body": bytearray(b"x"), "data": bytearray(b"y")}, None)
    with pytest.raises(EmptyBody):
        extract({"other": "x"}, None)
    with pytest.raises(EmptyBody):
        extract({"body": ""}, None)


def test_base64_is_strict_and_bounded_before_decoding() -> None:
    assert decode_base64(base64.b64encode(b"hello") + b"\n", 100) == b"hello"
    with pytest.raises(InvalidBase64):
        decode_base64("aGVs bG8=", 100)  # inner whitespace is not in the alphabet
    with pytest.raises(PayloadTooLarge, match="base64 payload"):
        decode_base64("A" * (b64_limit(30) + 4), 30)
    with pytest.raises(PayloadTooLarge, match="decoded base64 payload"):
        decode_base64(base64.b64encode(b"x" * 33), 31)  # 44 chars fit, 33 bytes do not


@pytest.mark.parametrize("obj", [[1, 2], 5, "x", {"data": 1, "extra": 2}, {}, {"data": 1, "image": 2}])
def test_json_shape_is_strict(obj: object) -> None:
    with pytest.raises(MalformedRequest):
        json_field(obj, ("data", "image"))


def test_json_field_returns_the_value() -> None:
    assert json_field({"image": "abc"}, ("data", "image")) == "abc"
