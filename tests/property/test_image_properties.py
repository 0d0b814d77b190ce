"""Property: nothing but a valid item or a typed `RequestError` leaves the image path.

Arbitrary bytes, mutated real images (bit flips, cuts, header integers set to 0 / 2^16-1 /
2^32-1), base64 of either (sometimes corrupted) and arbitrary JSON go through
`SecureImageClassifier.read_payload` + `decode` on TorchServe's real Context. The peak RSS
each example adds stays under `IMAGE_PEAK_BOUND` (CWE-400/CWE-409: a bomb that slipped past
the header checks would blow it by orders of magnitude).
"""

from __future__ import annotations

from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st
from property.properties import (
    IMAGE_CODES,
    IMAGE_PEAK_BOUND,
    PROFILE,
    Loaded,
    PeakRss,
    image_requests,
    json_request,
    json_values,
    outcome,
)

from secure_handler.testing import Request, run_batch


def _check_item(handler: Any, code: str, item: Any) -> None:
    event(code)  # the outcome mix shows with --hypothesis-show-statistics
    if code == "ok":
        assert item == 0  # the batch slot of row 0, now holding the decoded crop
        assert handler._slots_np[0].shape[-1] == 3
    else:
        assert code in IMAGE_CODES


@PROFILE
@given(request=image_requests())
def test_any_image_request_yields_an_item_or_a_typed_error(image_handler: Loaded,
                                                           fresh_peak: PeakRss,
                                                           request: Request) -> None:
    handler, ctx = image_handler
    fresh_peak.reset()
    code, item = outcome(handler, ctx, request)
    assert fresh_peak.rise() < IMAGE_PEAK_BOUND, (code, fresh_peak.rise())
    _check_item(handler, code, item)


@PROFILE
@given(value=json_values)
def test_any_json_yields_an_item_or_a_typed_error(image_handler: Loaded, value: Any) -> None:
    handler, ctx = image_handler
    code, item = outcome(handler, ctx, json_request(value))
    _check_item(handler, code, item)


@PROFILE
@given(text=st.text(max_size=300))
def test_any_string_yields_an_item_or_a_typed_error(image_handler: Loaded, text: str) -> None:
    handler, ctx = image_handler
    code, item = outcome(handler, ctx, Request(text, "text/plain"))
    _check_item(handler, code, item)


@PROFILE
@given(requests=st.lists(image_requests(), min_size=1, max_size=4))
def test_any_batch_answers_every_row_with_a_known_status(image_handler: Loaded,
                                                        requests: list[Request]) -> None:
    """End to end through `handle()`: one answer per row, never `internal_error`."""
    handler, ctx = image_handler
    for status, body in run_batch(handler, ctx, requests):
        if status == 200:
            probabilities = [p["probability"] for p in body["predictions"]]
            assert all(0.0 <= p <= 1.0 for p in probabilities)
        else:
            assert body["error"]["code"] in IMAGE_CODES, body


def test_peak_meter_sees_a_large_allocation(fresh_peak: PeakRss) -> None:
    """Control for the memory property: 128 MiB touched now shows up as a rise above it."""
    fresh_peak.reset()
    block = bytearray(128 * 1024 * 1024)  # zero-filled by the allocator: every page touched
    block[::4096] = b"\x01" * len(block[::4096])
    assert fresh_peak.rise() >= 120 * 1024 * 1024
    del block
