"""Attacks on the text path of `SecureTextClassifier`.

CWE-172/CWE-176 (encoding and Unicode handling: invalid UTF-8, overlong forms, surrogates,
normalisation expansion), CWE-20, CWE-158 (NUL bytes), CWE-150 (escape/control sequences),
CWE-451 and CVE-2021-42574 "Trojan Source" (bidi overrides), CWE-400/CWE-770 (huge strings,
token floods); ATLAS AML.T0029 (Denial of AI Service), AML.T0034.001 (resource-intensive
queries), AML.T0043 (crafted adversarial data).

The keyword model answers positive for "good"/"great", negative for "bad"/"awful".
"""

from __future__ import annotations

import json

import pytest
from attacks.harness import Build, Target, assert_class, assert_refused

from secure_handler.testing import Request

MB = 1024 * 1024


@pytest.fixture
def text_target(text_classifier: Build) -> Target:
    """Default text limits: 64 KiB, 10,000 characters, 512 tokens, no truncation."""
    return text_classifier()


def _text(raw: bytes, content_type: str = "text/plain") -> Request:
    return Request.as_worker(raw, content_type)


# --- encoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    pytest.param(b"good \xff\xfe bad", id="CWE-172-invalid-bytes"),
    pytest.param(b"good \xc0\xaf", id="CWE-172-overlong-slash"),
    pytest.param(b"good \xe0\x80\xaf", id="CWE-172-overlong-3-byte"),
    pytest.param(b"good \xed\xa0\x80", id="CWE-176-utf8-encoded-surrogate"),
    pytest.param(b"good \xf4\x90\x80\x80", id="CWE-176-above-u10ffff"),
    pytest.param(b"good \xe2\x82", id="CWE-172-truncated-sequence"),
    pytest.param("good".encode("utf-16"), id="CWE-172-utf16-with-bom"),
])
@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream"])
def test_invalid_utf8_is_refused(text_target: Target, raw: bytes, content_type: str) -> None:
    """CWE-172: strict UTF-8; no replacement characters smuggled into the model."""
    assert_refused(text_target.send(_text(raw, content_type))[0], 422, "invalid_text")


def test_invalid_utf8_inside_json_is_refused(text_target: Target) -> None:
    """CWE-172: the worker fails to parse such JSON and hands the raw bytes on."""
    raw = b'{"text": "good \xff bad"}'
    assert_refused(text_target.send(_text(raw, "application/json"))[0], 422, "invalid_text")


def test_lone_surrogate_via_json_escape_is_refused(text_target: Target) -> None:
    """CWE-176: `\\ud800` is valid JSON but not valid Unicode text."""
    raw = b'{"text": "good \\ud800 movie"}'
    assert_refused(text_target.send(_text(raw, "application/json"))[0], 422, "invalid_text")


# --- control and bidi characters ------------------------------------------------------------


@pytest.mark.parametrize("text", [
    pytest.param("good\x00bad", id="CWE-158-nul"),
    pytest.param("good \x00" * 100, id="CWE-158-many-nul"),
    pytest.param("good \x1b[2J\x1b[31m bad", id="CWE-150-ansi-escape"),
    pytest.param("good \x07\x08 bad", id="CWE-150-bell-backspace"),
    pytest.param("good \x7f", id="CWE-150-del"),
    pytest.param("good \x85 bad", id="CWE-150-c1-nel"),
    pytest.param("good \x9b31m", id="CWE-150-c1-csi"),
    pytest.param("good\x0bbad\x0c", id="CWE-150-vt-ff"),
])
def test_control_characters_are_refused(text_target: Target, text: str) -> None:
    """CWE-150/CWE-158: control characters that hide text from logs and reviewers."""
    assert_refused(text_target.send(_text(text.encode()))[0], 422, "invalid_text")
    body = json.dumps({"text": text}).encode()
    assert_refused(text_target.send(_text(body, "application/json"))[0], 422, "invalid_text")


@pytest.mark.parametrize("text", [
    pytest.param("awful \u202egood\u202c", id="CVE-2021-42574-rlo"),
    pytest.param("good \u202ddab\u202c", id="CVE-2021-42574-lro"),
    pytest.param("bad \u2066good\u2069", id="CVE-2021-42574-lri-pdi"),
    pytest.param("bad \u2067good\u2069", id="CVE-2021-42574-rli"),
    pytest.param("bad \u2068good\u2069", id="CVE-2021-42574-fsi"),
    pytest.param("bad \u202agood\u202c", id="CVE-2021-42574-lre"),
    pytest.param("bad \u202bgood\u202c", id="CVE-2021-42574-rle"),
])
def test_bidi_overrides_are_refused(text_target: Target, text: str) -> None:
    """CWE-451 / Trojan Source: what a reviewer reads differs from what the model reads."""
    assert_refused(text_target.send(_text(text.encode()))[0], 422, "invalid_text")


def test_tab_newline_and_crlf_are_accepted(text_target: Target) -> None:
    """Control: ordinary whitespace from forms and files is not a control-char attack."""
    assert_class(text_target.send(_text(b"a\tgood\r\nmovie\n"))[0], "positive")


# --- size ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream"])
def test_ten_megabyte_string_is_refused(text_target: Target, content_type: str) -> None:
    """CWE-770: 10 MB of text against the default 64 KiB limit."""
    raw = b"good " * (2 * MB)
    assert_refused(text_target.send(_text(raw, content_type))[0], 413, "payload_too_large")


def test_ten_megabyte_json_string_is_refused(text_target: Target) -> None:
    """CWE-770: the same 10 MB inside `{"text": ...}`."""
    raw = json.dumps({"text": "good " * (2 * MB)}).encode()
    assert_refused(text_target.send(_text(raw, "application/json"))[0], 413, "payload_too_large")


def test_ten_million_characters_within_the_byte_limit_are_refused(text_classifier: Build) -> None:
    """CWE-400: an operator raised the byte limit; `max_text_chars` still bounds the work."""
    target = text_classifier(max_request_bytes=16 * MB)
    raw = b"good " * (2 * MB)
    assert_refused(target.send(_text(raw))[0], 422, "text_too_long")


def test_normalisation_expansion_is_refused(text_target: Target) -> None:
    """CWE-176/CWE-400: U+FDFA expands 18x under NFKC; 1,000 of them → 18,000 characters."""
    raw = ("good " + "\ufdfa" * 1000).encode()
    assert len(raw) < 64 * 1024
    assert_refused(text_target.send(_text(raw))[0], 422, "text_too_long")


@pytest.mark.parametrize(("word", "count"), [("ok ", 513), ("a ", 4_999)])
def test_many_tokens_are_refused(text_target: Target, word: str, count: int) -> None:
    """AML.T0034.001: more than `max_tokens` (512) words, inside every other limit."""
    raw = (word * count).encode()
    assert len(raw) <= 10_000
    assert_refused(text_target.send(_text(raw))[0], 422, "too_many_tokens")


def test_many_tokens_are_truncated_when_the_operator_allows(text_classifier: Build) -> None:
    """Control: with `truncate: true` the first `max_tokens` tokens are classified."""
    target = text_classifier(truncate=True)
    assert_class(target.send(_text(("awful " * 1500).encode()))[0], "negative")


# --- envelope -------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "content_type", "status", "code"), [
    pytest.param(b"", "text/plain", 400, "empty_body", id="CWE-20-empty"),
    pytest.param("\ufeff".encode(), "text/plain", 400, "empty_body", id="CWE-20-bom-only"),
    pytest.param(b'{"text": 5}', "application/json", 400, "malformed_request",
                 id="CWE-20-number"),
    pytest.param(b'{"text": ["good"]}', "application/json", 400, "malformed_request",
                 id="CWE-770-array"),
    pytest.param(b'{"text": "good", "data": "bad"}', "application/json", 400,
                 "malformed_request", id="CWE-436-two-fields"),
    pytest.param(b'{"text": "good"', "application/json", 400, "malformed_request",
                 id="CWE-20-invalid-json"),
    pytest.param(b'{"text":' * 7_000 + b'"good"' + b"}" * 7_000, "application/json", 400,
                 "malformed_request", id="CWE-674-nested-7000-recursion-error"),
])
def test_text_envelope_attacks_are_refused(text_target: Target, raw: bytes, content_type: str,
                                           status: int, code: str) -> None:
    """CWE-20/CWE-674/CWE-770: wrong JSON shape, recursion bombs, nothing to classify."""
    assert_refused(text_target.send(_text(raw, content_type))[0], status, code)


def test_text_smuggled_as_a_second_data_field_is_refused(text_target: Target) -> None:
    """CWE-444: the body says "good", a second form field `data=awful` tries to replace it."""
    request = Request("good movie", "text/plain", params={"data": bytearray(b"awful")})
    assert_refused(text_target.send(request)[0], 400, "malformed_request")


def test_hostile_text_row_among_valid_ones(text_target: Target) -> None:
    """AML.T0029: four hostile rows between three valid ones; each valid row is served."""
    results = text_target.send(
        _text(b"good movie"),
        _text(b"bad \xff"),
        _text("bad \u202egood".encode()),
        _text(b"awful film"),
        _text(("ok " * 600).encode()),
        _text(b"x\x00"),
        _text(b"meh"),
    )
    assert_class(results[0], "positive")
    assert_refused(results[1], 422, "invalid_text")
    assert_refused(results[2], 422, "invalid_text")
    assert_class(results[3], "negative")
    assert_refused(results[4], 422, "too_many_tokens")
    assert_refused(results[5], 422, "invalid_text")
    assert_class(results[6], "neutral")
