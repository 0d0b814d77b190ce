"""One hostile row must cost only itself: its neighbours in the batch are served.

With the stock handlers any exception fails the whole batch (503 for every co-batched
request), so one attacker denies service to everyone batched with them: CWE-400 / ATLAS
AML.T0029 (Denial of AI Service), and CWE-703 (improper handling of exceptional conditions).
"""

from __future__ import annotations

import base64

from attacks import craft
from attacks.harness import Build, Target, assert_class, assert_refused

from secure_handler.testing import Request


def _raw(data: bytes, content_type: str = "image/jpeg") -> Request:
    return Request.as_worker(data, content_type)


def test_one_hostile_row_among_valid_ones(target: Target) -> None:
    """AML.T0029: a bomb in the middle of valid rows; only the bomb is refused."""
    results = target.send(
        _raw(craft.solid(craft.RED)),
        _raw(craft.png_declaring(65535, 65535), "image/png"),
        _raw(craft.solid(craft.GREEN, fmt="PNG"), "image/png"),
    )
    assert_class(results[0], "red")
    assert_refused(results[1], 422, "image_too_large")
    assert_class(results[2], "green")


def test_mixed_batch_of_every_kind_of_refusal(target: Target) -> None:
    """AML.T0029 / CWE-703: eight rows, five different refusals, three valid images.

    Valid rows sit in non-contiguous batch slots, so the assembled tensor must pick the
    right slots for the right rows.
    """
    results = target.send(
        _raw(craft.gif_frames(50), "image/gif"),
        _raw(craft.solid(craft.BLUE)),
        _raw(craft.truncate(craft.encode(craft.noisy(craft.RED), "PNG"), 0.5), "image/png"),
        _raw(b"QUJD!!", "text/plain"),
        _raw(craft.solid(craft.RED, fmt="PNG"), "image/png"),
        _raw(b"", "image/jpeg"),
        _raw(b'{"data": [1, 2, 3]}', "application/json"),
        _raw(b'{"data": "' + base64.b64encode(craft.solid(craft.GREEN)) + b'"}',
             "application/json"),
    )
    assert_refused(results[0], 415, "unsupported_media_type")
    assert_class(results[1], "blue")
    assert_refused(results[2], 422, "invalid_image")
    assert_refused(results[3], 422, "invalid_base64")
    assert_class(results[4], "red")
    assert_refused(results[5], 400, "empty_body")
    assert_refused(results[6], 400, "malformed_request")
    assert_class(results[7], "green")


def test_all_rows_hostile(target: Target) -> None:
    """CWE-703: a batch with no valid row at all never reaches the model and still answers."""
    results = target.send(_raw(b"\x00" * 10), _raw(craft.jpeg_declaring(65500, 65500)))
    assert_refused(results[0], 415, "unsupported_media_type")
    assert_refused(results[1], 422, "image_too_large")


def test_valid_batch_after_a_hostile_one_is_unaffected(target: Target) -> None:
    """CWE-703: a refused row leaves no state behind (batch slots are reused)."""
    target.send(_raw(craft.truncate(craft.solid(craft.BLUE, (200, 200)), 0.6)),
                _raw(craft.solid(craft.BLUE)))
    results = target.send(_raw(craft.solid(craft.GREEN)), _raw(craft.solid(craft.RED)))
    assert_class(results[0], "green")
    assert_class(results[1], "red")


def test_rows_beyond_max_batch_size_are_refused_retryable(classifier: Build) -> None:
    """CWE-770: more rows than `max_batch_size` (a frontend misconfiguration); the surplus
    gets a retryable 503, the rest are served.
    """
    target = classifier(batch_size=2, max_batch_size=2)
    results = target.send(*(_raw(craft.solid(c)) for c in (craft.RED, craft.GREEN, craft.BLUE)))
    assert_class(results[0], "red")
    assert_class(results[1], "green")
    assert_refused(results[2], 503, "batch_limit_exceeded")
