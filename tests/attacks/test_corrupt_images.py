"""Truncated and corrupt JPEG/PNG: refused per request, never half-decoded or crashing.

CWE-20 (improper input validation), CWE-125 class decoder faults (Pillow 9.0 JPEG EOF loop);
ATLAS AML.T0029. We never set `LOAD_TRUNCATED_IMAGES`, so a short file is an error, not a
grey-padded picture.
"""

from __future__ import annotations

import pytest
from attacks import craft
from attacks.harness import Target, assert_refused


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99], ids=lambda f: f"CWE-20-keep-{f:.0%}")
def test_truncated_jpeg_is_refused(target: Target, fraction: float) -> None:
    """CWE-20: a real JPEG cut inside its entropy-coded scan."""
    data = craft.truncate(craft.encode(craft.noisy(craft.RED), "JPEG", quality=95), fraction)
    assert_refused(target.one(data, "image/jpeg"), 422, "invalid_image")


def test_jpeg_cut_inside_its_headers_is_refused(target: Target) -> None:
    """CWE-20: only SOI and the first few header bytes arrive."""
    data = craft.solid(craft.RED, fmt="JPEG")[:40]
    assert_refused(target.one(data, "image/jpeg"), 422, "invalid_image")


@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.98], ids=lambda f: f"CWE-20-keep-{f:.0%}")
def test_truncated_png_is_refused(target: Target, fraction: float) -> None:
    """CWE-20: a real PNG cut inside its IDAT stream."""
    data = craft.truncate(craft.encode(craft.noisy(craft.GREEN), "PNG"), fraction)
    assert_refused(target.one(data, "image/png"), 422, "invalid_image")


def test_png_with_only_signature_and_partial_ihdr_is_refused(target: Target) -> None:
    """CWE-20: 20 bytes: the signature and half an IHDR."""
    data = craft.solid(craft.RED, fmt="PNG")[:20]
    assert_refused(target.one(data, "image/png"), 422, "invalid_image")


@pytest.mark.parametrize("build", [
    pytest.param(craft.jpeg_bad_sof_components, id="CWE-20-jpeg-sof-zero-components"),
    pytest.param(craft.jpeg_without_scan, id="CWE-20-jpeg-no-scan"),
    pytest.param(craft.png_bad_ihdr_crc, id="CWE-20-png-bad-ihdr-crc"),
    pytest.param(craft.png_corrupt_idat, id="CWE-20-png-garbage-zlib"),
])
def test_corrupt_image_is_refused(target: Target, build: craft.Builder) -> None:
    """CWE-20: structurally broken files whose magic bytes are right."""
    data = build()
    content_type = "image/png" if data.startswith(craft.PNG_SIGNATURE) else "image/jpeg"
    assert_refused(target.one(data, content_type), 422, "invalid_image")


def test_jpeg_with_zero_width_is_refused(target: Target) -> None:
    """CWE-369/CWE-20: a 0 x 16 SOF (division by zero in naive aspect-ratio code)."""
    assert_refused(target.one(craft.jpeg_declaring(0, 16), "image/jpeg"), 422, "invalid_image")


def test_png_with_zero_height_is_refused(target: Target) -> None:
    """CWE-369/CWE-20: IHDR declares 16 x 0."""
    assert_refused(target.one(craft.png_declaring(16, 0), "image/png"), 422, "invalid_image")


def test_apng_cut_inside_its_animation_header_is_refused(target: Target) -> None:
    """CWE-703: Pillow emits a UserWarning ("Invalid APNG") and then fails to identify it.

    The answer must be the same typed 422 whatever the worker's warning filter is (this
    suite runs with warnings as errors, like a worker started with PYTHONWARNINGS=error);
    it must never become a 500 `internal_error`.
    """
    assert_refused(target.one(craft.apng_cut_in_actl(), "image/png"), 422, "invalid_image")
