"""Property: nothing but token ids or a typed `RequestError` leaves the text path.

Arbitrary strings (weighted towards controls, bidi overrides, BOMs, NFKC-expanding and
combining characters), arbitrary bytes and arbitrary JSON go through
`SecureTextClassifier.read_payload` + `decode`. Accepted text gives 1..max_tokens ids inside
the vocabulary; the peak RSS an example adds stays under `TEXT_PEAK_BOUND`.
"""

from __future__ import annotations

from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st
from property.properties import (
    PROFILE,
    TEXT_CODES,
    TEXT_PEAK_BOUND,
    Loaded,
    PeakRss,
    json_request,
    json_values,
    outcome,
    text_request,
    texts,
)

from secure_handler.testing import Request, run_batch

TEXT_TYPES = ["text/plain", "application/octet-stream", "application/json",
              "text/html; charset=latin-1"]


def _check_item(handler: Any, code: str, item: Any) -> None:
    event(code)  # the outcome mix shows with --hypothesis-show-statistics
    if code == "ok":
        assert 1 <= len(item) <= handler.limits.max_tokens
        assert all(0 <= i <= handler.tokenizer.max_id for i in item)
    else:
        assert code in TEXT_CODES


@PROFILE
@given(text=texts, content_type=st.sampled_from(TEXT_TYPES))
def test_any_text_yields_ids_or_a_typed_error(text_handler: Loaded, fresh_peak: PeakRss, text: str,
                                              content_type: str) -> None:
    handler, ctx = text_handler
    fresh_peak.reset()
    code, item = outcome(handler, ctx, text_request(text, content_type))
    assert fresh_peak.rise() < TEXT_PEAK_BOUND, (code, fresh_peak.rise())
    _check_item(handler, code, item)


@PROFILE
@given(data=st.binary(max_size=4096), content_type=st.sampled_from(TEXT_TYPES))
def test_any_bytes_yield_ids_or_a_typed_error(text_handler: Loaded, data: bytes,
                                              content_type: str) -> None:
    handler, ctx = text_handler
    code, item = outcome(handler, ctx, Request.as_worker(data, content_type))
    _check_item(handler, code, item)


@PROFILE
@given(value=json_values)
def test_any_json_yields_ids_or_a_typed_error(text_handler: Loaded, value: Any) -> None:
    handler, ctx = text_handler
    code, item = outcome(handler, ctx, json_request(value))
    _check_item(handler, code, item)


@PROFILE
@given(batch=st.lists(st.tuples(texts, st.sampled_from(TEXT_TYPES)), min_size=1, max_size=4))
def test_any_text_batch_answers_every_row_with_a_known_status(
        text_handler: Loaded, batch: list[tuple[str, str]]) -> None:
    """End to end through `handle()`: one answer per row, never `internal_error`."""
    handler, ctx = text_handler
    results = run_batch(handler, ctx, [text_request(t, c) for t, c in batch])
    for status, body in results:
        if status != 200:
            assert body["error"]["code"] in TEXT_CODES, body
