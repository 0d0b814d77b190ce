"""Decompression bombs: tiny files that declare huge images or endless animations.

CWE-400 (uncontrolled resource consumption), CWE-409 (highly compressed data), CWE-770;
MITRE ATLAS AML.T0029 (Denial of AI Service), AML.T0034.001 (resource-intensive queries).
Every bomb here is a few hundred bytes to a few KB; the handler must refuse it from the
header, before allocating pixels.
"""

from __future__ import annotations

import pytest
from attacks import craft
from attacks.harness import Build, Target, assert_class, assert_refused

GIF_ALLOWED = {"allowed_formats": ["PNG", "JPEG", "GIF"]}


@pytest.mark.parametrize(("width", "height"), [
    pytest.param(65535, 65535, id="CWE-409-png-65535x65535"),
    pytest.param(2**31 - 1, 1, id="CWE-409-png-2G-wide"),
    pytest.param(5000, 5000, id="CWE-400-png-just-over-side-limit"),
])
def test_png_declaring_huge_dimensions_is_refused(target: Target, width: int,
                                                  height: int) -> None:
    """CWE-409: a ~100-byte PNG whose IHDR declares a multi-gigabyte image."""
    bomb = craft.png_declaring(width, height)
    assert len(bomb) < 200
    assert_refused(target.one(bomb, "image/png"), 422, "image_too_large")


def test_png_bomb_hidden_behind_a_leading_chunk_is_refused(target: Target) -> None:
    """CWE-409: IHDR is not the first chunk, so a fixed-offset header read misses it."""
    bomb = craft.png_declaring(65535, 65535, before_ihdr=craft.png_chunk(b"tEXt", b"k\x00v"))
    assert_refused(target.one(bomb, "image/png"), 422, "image_too_large")


def test_png_over_the_pixel_limit_is_refused(classifier: Build) -> None:
    """CWE-400: within the side limit but over `max_image_pixels`."""
    target = classifier(max_image_pixels=1_000_000)
    assert_refused(target.one(craft.png_declaring(1200, 1200), "image/png"),
                   422, "image_too_large")


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_jpeg_sof_declaring_65k_square_is_refused(target: Target, progressive: bool) -> None:
    """CWE-409: a 16x16 JPEG whose SOF claims 65500 x 65500 (12.8 GB of RGB)."""
    bomb = craft.jpeg_declaring(65500, 65500, progressive=progressive)
    assert_refused(target.one(bomb, "image/jpeg"), 422, "image_too_large")


@pytest.mark.parametrize(("width", "height"), [
    pytest.param(8000, 8000, id="CWE-400-second-sof-8000"),
    pytest.param(65500, 65500, id="CWE-409-second-sof-65500"),
])
def test_jpeg_second_sof_with_huge_size_is_refused(target: Target, width: int,
                                                   height: int) -> None:
    """CWE-409 / AML.T0074: the first SOF says 16x16, a second one says huge.

    A header parser that stops at the first SOF is fooled; the authoritative size check
    after `Image.open` must still refuse it as too large.
    """
    bomb = craft.jpeg_double_sof(width, height)
    assert_refused(target.one(bomb, "image/jpeg"), 422, "image_too_large")


def test_png_ztxt_zlib_bomb_is_refused(target: Target) -> None:
    """CWE-409: a valid 8x8 PNG with a zTXt chunk that inflates to 64 MB."""
    bomb = craft.png_with_ztxt_bomb(64)
    assert len(bomb) < 200_000
    assert_refused(target.one(bomb, "image/png"), 422, "invalid_image")


def test_gif_with_thousands_of_frames_is_refused_when_gif_is_off(target: Target) -> None:
    """CWE-400: GIF is not on the default allowlist; refused by magic bytes."""
    assert_refused(target.one(craft.gif_frames(3000), "image/gif"), 415,
                   "unsupported_media_type")


def test_gif_with_thousands_of_frames_is_refused_by_default_policy(classifier: Build) -> None:
    """CWE-400: GIF allowed, animations rejected (the default `animated: reject`)."""
    target = classifier(**GIF_ALLOWED)
    assert_refused(target.one(craft.gif_frames(3000), "image/gif"), 422, "animated_image")


def test_gif_with_thousands_of_frames_is_refused_over_max_frames(classifier: Build) -> None:
    """CWE-400: with `animated: first_frame`, more than `max_frames` frames are refused."""
    target = classifier(**GIF_ALLOWED, animated="first_frame", max_frames=100)
    assert_refused(target.one(craft.gif_frames(3000), "image/gif"), 422, "animated_image")


def test_gif_logical_screen_bomb_is_refused(classifier: Build) -> None:
    """CWE-409: a one-frame GIF whose logical screen declares 65535 x 65535."""
    target = classifier(**GIF_ALLOWED)
    bomb = craft.gif_frames(1, screen=(65535, 65535))
    assert_refused(target.one(bomb, "image/gif"), 422, "image_too_large")


def test_apng_is_refused_by_default(target: Target) -> None:
    """CWE-400: an animated PNG (acTL) is refused; PNG itself is allowed."""
    bomb = craft.apng([craft.RED, craft.BLUE, craft.GREEN])
    assert_refused(target.one(bomb, "image/png"), 422, "animated_image")


def test_apng_declaring_two_billion_frames_is_refused(classifier: Build) -> None:
    """CWE-400: acTL lies about the frame count; over `max_frames` even in first-frame mode."""
    target = classifier(animated="first_frame", max_frames=100)
    bomb = craft.apng([craft.RED, craft.BLUE], declared_frames=2**31 - 1)
    assert_refused(target.one(bomb, "image/png"), 422, "animated_image")


def test_apng_within_max_frames_serves_the_first_frame(classifier: Build) -> None:
    """Control: in first-frame mode a short animation is classified by frame 0 (red)."""
    target = classifier(animated="first_frame", max_frames=100)
    assert_class(target.one(craft.apng([craft.RED, craft.BLUE]), "image/png"), "red")
