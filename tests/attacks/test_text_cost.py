"""Costly and evasive texts: each sent between two valid rows of one batch.

CWE-400/CWE-407 (uncontrolled resource consumption, algorithmic complexity: NFC/NFKC reorder
a run of combining marks in quadratic time; NFKC grows U+FDFA 18-fold), CWE-1007 and
CWE-176 (invisible characters: a zero-width space inside a word turns it into unknown tokens
and flips the class while a person reads the same word); ATLAS AML.T0029 (Denial of AI
Service), AML.T0043 (crafted adversarial data), AML.T0015 (evade ML model).

The budget (README, "Cost budget"): no request costs more than 1 s of CPU or 200 MB of extra
memory. Memory is asserted from the peak RSS of this process (VmHWM, reset before each
batch); time is never asserted.
"""

from __future__ import annotations

import pytest
from attacks.harness import Build, Target, assert_class, assert_refused
from property.properties import PeakRss, peak_rss_meter

from secure_handler.testing import Request

MB = 1024 * 1024
BUDGET_BYTES = 200 * MB


@pytest.fixture
def peak() -> PeakRss:
    meter = peak_rss_meter()
    if meter is None:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    return meter


def _text(value: str) -> Request:
    return Request.as_worker(value.encode("utf-8"), "text/plain")


def sandwich(target: Target, peak: PeakRss, hostile: Request) -> tuple[int, object]:
    """Send `hostile` between two valid rows; check the neighbours and the memory budget."""
    peak.reset()
    results = target.send(_text("good movie"), hostile, _text("awful film"))
    rise = peak.rise()
    assert_class(results[0], "positive")
    assert_class(results[2], "negative")
    assert rise < BUDGET_BYTES, f"peak RSS rose {rise / MB:.0f} MB"
    return results[1]


# --- combining-mark runs (quadratic normalisation) ------------------------------------------


@pytest.mark.parametrize(("unit", "count"), [
    pytest.param("\u0301\u0316", 20_000, id="CWE-407-alternating-classes-40k"),
    pytest.param("\u0301", 40_000, id="CWE-407-one-mark-40k"),
    pytest.param("\u05b0\u05b1\u05b2\u0591", 10_000, id="CWE-407-hebrew-points"),
    pytest.param("\uff9e", 40_000, id="CWE-407-halfwidth-voiced-mark"),
    pytest.param("\u0344", 40_000, id="CWE-407-mark-decomposing-to-two"),
    pytest.param("\u0301\u200b", 20_000, id="CWE-407-run-hidden-by-zero-width-space"),
    pytest.param("\u0301\u034f", 20_000, id="CWE-407-run-hidden-by-grapheme-joiner"),
])
@pytest.mark.parametrize("form", ["NFKC", "NFC"])
def test_long_combining_runs_are_refused_before_normalising(
        text_classifier: Build, peak: PeakRss, unit: str, count: int, form: str) -> None:
    target = text_classifier(max_text_chars=100_000, max_request_bytes=1 * MB, normalize=form)
    result = sandwich(target, peak, _text("a" + unit * count))
    assert_refused(result, 422, "invalid_text")
    assert "combining marks" in result[1]["error"]["message"]


# --- growth under normalisation -------------------------------------------------------------


@pytest.mark.parametrize("char", [
    pytest.param("\ufdfa", id="CWE-400-arabic-ligature-x18"),
    pytest.param("\u3300", id="CWE-400-squared-katakana-x4"),
    pytest.param("\ufb2c", id="CWE-400-hebrew-presentation-form"),
])
def test_text_that_would_outgrow_the_limit_is_refused_before_it_is_built(
        text_classifier: Build, peak: PeakRss, char: str) -> None:
    """At the largest settings the limits allow, 1,000,000 characters."""
    target = text_classifier(max_text_chars=1_000_000, max_request_bytes=16 * MB,
                             normalize="NFKC" if char != "\ufb2c" else "NFC")
    result = sandwich(target, peak, _text(char * 1_000_000))
    assert_refused(result, 422, "text_too_long")
    assert "could be up to" in result[1]["error"]["message"]


@pytest.mark.parametrize("text", [
    pytest.param("ab " * 333_333, id="CWE-400-token-flood"),
    pytest.param("\u1100\u1161\u11a8" * 333_333, id="CWE-400-hangul-jamo-recomposed"),
    pytest.param("a\u0301" * 500_000, id="CWE-400-short-mark-runs"),
])
def test_the_largest_allowed_text_stays_within_budget(
        text_classifier: Build, peak: PeakRss, text: str) -> None:
    target = text_classifier(max_text_chars=1_000_000, max_request_bytes=16 * MB,
                             truncate=True)
    status, body = sandwich(target, peak, _text(text))
    assert status == 200, body


# --- invisible characters (evasion) ---------------------------------------------------------


@pytest.mark.parametrize("char", [
    pytest.param("\u200b", id="ZWSP"),
    pytest.param("\u200c", id="ZWNJ"),
    pytest.param("\u200d", id="ZWJ"),
    pytest.param("\u2060", id="WJ"),
    pytest.param("\u00ad", id="SHY"),
    pytest.param("\ufeff", id="inner-BOM"),
    pytest.param("\ufe0f", id="variation-selector-16"),
    pytest.param("\U000e0101", id="variation-selector-18"),
    pytest.param("\U000e0061", id="tag-latin-a"),
    pytest.param("\u180e", id="mongolian-vowel-separator"),
    pytest.param("\u034f", id="grapheme-joiner"),
    pytest.param("\u2064", id="invisible-plus"),
    pytest.param("\u200e", id="left-to-right-mark"),
])
def test_an_invisible_character_inside_a_word_does_not_flip_the_class(
        text_classifier: Build, peak: PeakRss, char: str) -> None:
    """AML.T0015: "aw<ZWSP>ful" reads as "awful" to a person; before, the model saw two
    unknown tokens and answered neutral."""
    target = text_classifier()
    hostile = _text(f"aw{char}ful, b{char}{char}ad")
    assert_class(sandwich(target, peak, hostile), "negative")


@pytest.mark.parametrize("char", ["\u200b", "\u00ad", "\U000e0061", "\ufe0f"])
def test_invisible_characters_are_refused_when_configured(
        text_classifier: Build, peak: PeakRss, char: str) -> None:
    target = text_classifier(ignorables="reject")
    assert_refused(sandwich(target, peak, _text(f"aw{char}ful")), 422, "invalid_text")


def test_only_invisible_characters_is_an_empty_body(text_classifier: Build,
                                                    peak: PeakRss) -> None:
    assert_refused(sandwich(text_classifier(), peak, _text("\u200b\u2060\ufeff\u200d")),
                   400, "empty_body")


def test_a_bidi_override_is_still_refused_not_removed(text_classifier: Build,
                                                      peak: PeakRss) -> None:
    """CVE-2021-42574: bidi controls are default-ignorable too, but refused first."""
    assert_refused(sandwich(text_classifier(), peak, _text("good\u202edab")), 422,
                   "invalid_text")
