"""Image structures that fooled the walk before decoding (issue 13, third review).

Each input is built here and sent between two valid rows: it is refused with its exact typed
4xx, cheaply, and its neighbours are served. CWE-20 (a structure cut short gave an untyped
500), CWE-407 (a run of 0xFF inside scan data made libjpeg's re-feeding quadratic, ~1 s;
empty deflate blocks padding a small PNG's IDAT, ~1.5 s to inflate), CWE-1284 (an IHDR
that is not 13 bytes), CWE-436 (a decoy first
IHDR: our checks read the first, Pillow decodes by the last).
"""

from __future__ import annotations

import struct
import zlib

import pytest
from attacks import craft
from attacks.harness import Build, assert_class, assert_refused
from PIL import Image

from secure_handler.testing import Request

RED = craft.solid(craft.RED)
BLUE = craft.solid(craft.BLUE)


def between(target: Build, hostile: bytes) -> tuple[int, dict]:
    first, middle, last = target().send(*(Request(bytearray(d), "application/octet-stream")
                                          for d in (RED, hostile, BLUE)))
    assert_class(first, "red")
    assert_class(last, "blue")
    return middle


def _png_with(*chunks: bytes) -> bytes:
    return craft.PNG_SIGNATURE + b"".join(chunks) + craft.png_chunk(b"IEND", b"")


@pytest.mark.parametrize("hostile", [
    pytest.param(_png_with(craft.ihdr(64, 48), craft.png_chunk(b"eXIf", b"II*\x00"),
                           craft.png_chunk(b"IDAT", zlib.compress(b"\x00" * 9264))),
                 id="png-exif-4-bytes"),
    pytest.param(RED.replace(b"\xff\xd8", b"\xff\xd8\xff\xe1\x00\x0cExif\x00\x00MM\x00*", 1),
                 id="jpeg-exif-cut-before-its-first-ifd"),
    pytest.param(RED[:RED.index(b"\xff\xda")] + b"\xff\xda\x00\x02", id="jpeg-sos-at-the-end"),
])
def test_a_structure_cut_short_is_422_not_500(classifier: Build, hostile: bytes) -> None:
    assert_refused(between(classifier, hostile), 422, "invalid_image")


def test_a_run_of_fill_bytes_inside_scan_data_is_refused(classifier: Build) -> None:
    # After the scan the walk stops (libjpeg refuses a second sequential scan), so fill
    # counting never saw this run; the search for a run covers the whole file.
    eoi = RED.rindex(b"\xff\xd9")
    hostile = RED[:eoi] + b"\xff" * (4 * 1024 * 1024) + RED[eoi:]
    middle = between(classifier, hostile)
    assert_refused(middle, 422, "image_too_complex")
    assert "max_jpeg_fill_bytes" in middle[1]["error"]["message"]


def test_a_few_fill_bytes_are_still_served(classifier: Build) -> None:
    eoi = RED.rindex(b"\xff\xd9")
    assert_class(classifier().send(Request(bytearray(RED[:eoi] + b"\xff" * 64 + RED[eoi:]),
                                           "image/jpeg"))[0], "red")


def _padded_stream(count: int) -> bytes:
    """A valid zlib stream of a 64x48 red image padded with `count` empty deflate blocks
    (stored ones here, 5 bytes each; the review used empty dynamic-Huffman blocks, for which
    zlib also rebuilds its tables): each block is parsed and writes nothing."""
    out = zlib.compressobj(9, zlib.DEFLATED, 15)
    pixels = b"".join(b"\x00" + bytes([255, 0, 0]) * 64 for _ in range(48))
    body = out.compress(pixels) + out.flush(zlib.Z_FULL_FLUSH)
    # Z_FULL_FLUSH ends on a byte boundary with an empty stored block; more of those are the
    # cheapest padding zlib itself writes, and each is a block the decoder must parse.
    padding = b"\x00\x00\x00\xff\xff" * count
    return body + padding + out.flush()


def test_image_data_larger_than_its_pixels_could_need_is_refused(classifier: Build) -> None:
    idat = _padded_stream(200_000)  # 1 MB of blocks for 9 KB of pixels
    assert zlib.decompress(idat) == b"".join(b"\x00" + bytes([255, 0, 0]) * 64
                                             for _ in range(48))
    middle = between(classifier, _png_with(craft.ihdr(64, 48), craft.png_chunk(b"IDAT", idat)))
    assert_refused(middle, 422, "image_too_complex")
    assert "IDAT" in middle[1]["error"]["message"]


def test_a_png_encoded_at_level_0_is_still_served(classifier: Build) -> None:
    # Stored blocks are the largest honest encoding: 5 bytes per 65,535.
    img = Image.new("RGB", (300, 200), (255, 0, 0))
    assert_class(classifier().send(Request(bytearray(craft.encode(img, "PNG", compress_level=0)),
                                           "image/png"))[0], "red")


def test_a_decoy_first_ihdr_is_refused(classifier: Build) -> None:
    # The walk sized the memory estimate from the first IHDR; Pillow decoded by the last.
    decoy = craft.png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0))
    real = craft.solid(craft.RED, fmt="PNG")
    hostile = real[:8] + decoy + real[8:]
    assert_refused(between(classifier, hostile), 422, "invalid_image")


def test_an_ihdr_of_the_wrong_length_is_refused(classifier: Build) -> None:
    short = craft.png_chunk(b"IHDR", struct.pack(">IIBB", 64, 48, 8, 2))
    hostile = _png_with(short, craft.png_chunk(b"IDAT", zlib.compress(b"\x00" * 9264)))
    assert_refused(between(classifier, hostile), 422, "invalid_image")
