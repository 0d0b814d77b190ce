"""Unusual but legitimate images must be ACCEPTED and classified right; extreme shapes refused.

The stock VisionHandler breaks on these modes (TorchServe issue #65: greyscale, RGBA, CMYK,
P and 16-bit images fail `Normalize`), turning valid requests into a batch-wide 503: a
denial of service by honest clients (CWE-20, ATLAS AML.T0029). Extreme aspect ratios are a
resource attack on resize (CWE-400).
"""

from __future__ import annotations

import pytest
from attacks import craft
from attacks.harness import Build, Target, assert_class, assert_refused
from PIL import Image

from secure_handler.testing import Request


def _cmyk_jpeg(colour: craft.RGB) -> bytes:
    return craft.encode(Image.new("RGB", (48, 32), colour).convert("CMYK"), "JPEG")


def _palette_png_with_transparency(colour: craft.RGB) -> bytes:
    """Palette PNG (tRNS): index 0 fully transparent, index 1 opaque `colour`, half each."""
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, *colour] + [0] * (254 * 3))
    img.paste(1, (0, 0, 40, 20))
    return craft.encode(img, "PNG", transparency=0)


def _rgba_png(colour: craft.RGB, alpha: int) -> bytes:
    return craft.encode(Image.new("RGBA", (40, 40), (*colour, alpha)), "PNG")


ACCEPTED = [
    pytest.param(lambda: craft.png_rgb16(craft.RED), "image/png", "red",
                 id="png-48bit-rgb16"),
    pytest.param(lambda: craft.png_rgb16(craft.BLUE), "image/png", "blue",
                 id="png-48bit-rgb16-blue"),
    pytest.param(lambda: _cmyk_jpeg(craft.RED), "image/jpeg", "red", id="jpeg-cmyk-red"),
    pytest.param(lambda: _cmyk_jpeg(craft.GREEN), "image/jpeg", "green", id="jpeg-cmyk-green"),
    pytest.param(lambda: _palette_png_with_transparency(craft.BLUE), "image/png", "blue",
                 id="png-palette-trns"),
    pytest.param(lambda: _palette_png_with_transparency(craft.GREEN), "image/png", "green",
                 id="png-palette-trns-green"),
    pytest.param(lambda: _rgba_png(craft.RED, 128), "image/png", "red", id="png-rgba-half"),
    pytest.param(lambda: craft.encode(Image.new("RGB", (40, 40), craft.GREEN).convert("P"),
                                      "PNG"), "image/png", "green", id="png-palette"),
    pytest.param(lambda: craft.solid(craft.BLUE, fmt="JPEG", progressive=True),
                 "image/jpeg", "blue", id="jpeg-progressive"),
]


@pytest.mark.parametrize(("build", "content_type", "label"), ACCEPTED)
def test_unusual_mode_is_accepted_and_classified(target: Target, build: craft.Builder,
                                                 content_type: str, label: str) -> None:
    """CWE-20 (no over-blocking): decoded to RGB and given the right class."""
    assert_class(target.one(build(), content_type), label)


@pytest.mark.parametrize(("build", "content_type"), [
    pytest.param(lambda: craft.png_gray16(0x8000), "image/png", id="png-gray16"),
    pytest.param(lambda: craft.encode(Image.new("L", (30, 30), 77), "JPEG"), "image/jpeg",
                 id="jpeg-grayscale"),
    pytest.param(lambda: craft.encode(Image.new("1", (30, 30), 1), "PNG"), "image/png",
                 id="png-1bit"),
    pytest.param(lambda: craft.encode(Image.new("LA", (30, 30), (90, 120)), "PNG"),
                 "image/png", id="png-gray-alpha"),
])
def test_grey_images_are_accepted_with_no_dominant_channel(classifier: Build,
                                                           build: craft.Builder,
                                                           content_type: str) -> None:
    """CWE-20: greyscale (8/16-bit, 1-bit, with alpha) → RGB with equal channels.

    The tiny model scores each channel's mean; with the same mean/std on every channel,
    equal channels give equal scores for red, green and blue: proof the image was expanded
    to three identical channels (and not, say, read as one channel of zeros).
    """
    target = classifier(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    status, body = target.one(build(), content_type)
    assert status == 200, body
    scores = {p["label"]: p["probability"] for p in body["predictions"]}
    assert scores["red"] == scores["green"] == scores["blue"] > scores["none"], body


def test_sixteen_bit_grey_is_scaled_not_clipped(target: Target) -> None:
    """A 16-bit grey at 25% must look like 8-bit grey 64, not white (Pillow clips I;16 → L).

    Sent in one batch with the 8-bit grey: the answers match only if the 16-bit image was
    scaled (>> 8) rather than saturated.
    """
    grey16 = Request.as_worker(craft.png_gray16(0x4000), "image/png")
    grey8 = Request.as_worker(craft.encode(Image.new("L", (32, 24), 0x40), "PNG"), "image/png")
    (s16, b16), (s8, b8) = target.send(grey16, grey8)
    assert (s16, s8) == (200, 200)
    assert b16 == b8


@pytest.mark.parametrize(("size", "fmt"), [
    pytest.param((4000, 10), "PNG", id="CWE-400-png-400-to-1"),
    pytest.param((1, 2000), "PNG", id="CWE-400-png-1-to-2000"),
    pytest.param((2100, 100), "JPEG", id="CWE-400-jpeg-21-to-1"),
])
def test_extreme_aspect_ratio_is_refused(target: Target, size: tuple[int, int],
                                         fmt: str) -> None:
    """CWE-400: a sliver image (resize/crop of a degenerate box) over `max_aspect_ratio`."""
    data = craft.solid(craft.RED, size, fmt)
    assert_refused(target.one(data, f"image/{fmt.lower()}"), 422, "image_too_large")


def test_aspect_ratio_at_the_limit_is_accepted(target: Target) -> None:
    """Control: exactly 20:1 (the default limit) is served."""
    assert_class(target.one(craft.solid(craft.RED, (400, 20), "PNG"), "image/png"), "red")


def test_aspect_ratio_limit_is_configurable(classifier: Build) -> None:
    """A model that wants panoramas can raise `max_aspect_ratio`; 400:1 then passes."""
    target = classifier(max_aspect_ratio=500)
    assert_class(target.one(craft.solid(craft.RED, (4000, 10), "PNG"), "image/png"), "red")
