"""Cost attacks on image decoding: each request's CPU and memory stay within the budget.

CWE-400 (uncontrolled resource consumption), CWE-407 (inefficient algorithmic complexity),
CWE-409 (data amplification), CWE-770 (allocation without limits); ATLAS AML.T0029 (denial
of ML service). Every hostile input of issue 13's review is built here (tests/attacks/
costly.py), sent between two valid rows of one batch, and must be refused with 422
`image_too_complex` naming its limit, its neighbours served, the peak memory of the batch
under the 200 MB budget (Linux VmHWM, as the property suite measures it). The costliest
inputs each cap still lets through are served within the same budget. No timing is asserted:
the caps bound the work structurally.
"""

from __future__ import annotations

import ctypes
import gc
import io
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from attacks import costly, craft
from attacks.harness import Build, Target, assert_class, assert_refused
from PIL import Image, ImageOps, PngImagePlugin

from secure_handler.limits import ImageLimits
from secure_handler.serving.image import decode
from secure_handler.testing import Request

MB = 1000 * 1000
BUDGET = 200 * MB


class PeakMeter:
    """Peak RSS rise since `reset()` (VmHWM is reset by writing 5 to clear_refs)."""

    def __init__(self) -> None:
        self.base = 0

    @staticmethod
    def _kib(field: str) -> int:
        text = Path("/proc/self/status").read_text()
        found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
        assert found is not None, field
        return int(found.group(1))

    def reset(self) -> None:
        gc.collect()
        # Freed heap goes back to the OS first, so the peak is measured from a true baseline.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        self.base = self._kib("VmRSS")

    def rise(self) -> int:
        return max(0, self._kib("VmHWM") - self.base) * 1024


@pytest.fixture
def peak() -> PeakMeter:
    meter = PeakMeter()
    try:
        meter.reset()
    except (OSError, AttributeError):
        pytest.skip("needs Linux /proc/self/clear_refs and glibc to measure the peak RSS")
    return meter


def _raw(data: bytes) -> Request:
    return Request(bytearray(data), "application/octet-stream")


def _between(target: Target, data: bytes) -> tuple[int, Any]:
    """`data` between a red and a blue image in one batch; the neighbours must be served."""
    first, middle, last = target.send(_raw(craft.solid(craft.RED)), _raw(data),
                                      _raw(craft.solid(craft.BLUE)))
    assert first[0] == 200, first
    assert last[0] == 200, last
    return middle


REVIEW = {name: costly.COSTLY[name] for name in costly.REFUSED}
LIMIT_NAMED = {
    "jpeg-progressive-1600-repeated-scans": "max_jpeg_scans",
    "jpeg-soi-plus-9.9MB-fill": "max_jpeg_fill_bytes",
    "jpeg-9.9MB-empty-app-segments": "max_jpeg_metadata_segments",
    "png-9.9MB-private-chunks": "max_png_ancillary_chunks",
    "png-exif-orientation6-1MB-rationals-4-ifds": "max_exif_bytes",
    "png-exif-orientation6-1MB-shorts-4-ifds": "max_exif_bytes",
    "jpeg-exif-orientation6-1MB-rationals-4-ifds": "max_exif_bytes",
    "png-rgba16-interlaced-4096": "max_decode_memory",
    "jpeg-9.7MB-dqt-tables": "max_jpeg_parsed_bytes",
    "jpeg-63-photoshop-segments": "max_jpeg_parsed_bytes",
}


@pytest.mark.parametrize("name", list(REVIEW))
def test_review_input_is_refused_within_the_budget(classifier: Build, detector: Target,
                                                   peak: PeakMeter, name: str) -> None:
    """CWE-400/407/409: the review's input is refused by both handlers, its limit named."""
    data = REVIEW[name]()
    for target in (classifier(), detector):
        peak.reset()
        result = _between(target, data)
        assert peak.rise() < BUDGET, (name, peak.rise())
        assert_refused(result, 422, "image_too_complex")
        assert f"handler.{LIMIT_NAMED[name]}" in result[1]["error"]["message"]


AT_THE_CAPS = [name for name in costly.COSTLY if name not in REVIEW]


@pytest.mark.parametrize("name", AT_THE_CAPS)
def test_costliest_input_a_cap_lets_through_is_served_within_the_budget(
        classifier: Build, detector: Target, peak: PeakMeter, name: str) -> None:
    """CWE-400: what each cap still admits is served, under the memory budget."""
    data = costly.COSTLY[name]()
    for target in (classifier(), detector):
        peak.reset()
        status, body = _between(target, data)
        assert peak.rise() < BUDGET, (name, peak.rise())
        assert status == 200, body


# --- one past each cap ----------------------------------------------------------------------


def _exif_cycle() -> bytes:
    """EXIF whose IFD0 names itself as the next IFD: a reader that follows it never ends."""
    entry = struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + struct.pack("<I", 8)


def _exif_entries(count: int) -> bytes:
    entries = b"".join(struct.pack("<HHIHH", 0xC000 + i, 3, 1, 0, 0) for i in range(count))
    return b"II*\x00" + struct.pack("<IH", 8, count) + entries + struct.pack("<I", 0)


def _junk_after_first_segment(count: int) -> bytes:
    """Non-0xFF junk after APP0, which Pillow's marker loop skips one byte at a time."""
    good = costly.small_jpeg()
    end = costly.segment_ends(good)[0]
    return good[:end] + b"\x00" * count + good[end:]


OVER = {
    "jpeg-33-scans": (lambda: costly.jpeg_with_scans(33, 256), "max_jpeg_scans"),
    "jpeg-1025-fill-bytes": (lambda: costly.jpeg_at_caps(fill=1025), "max_jpeg_fill_bytes"),
    "jpeg-junk-between-segments": (lambda: _junk_after_first_segment(1025),
                                   "max_jpeg_fill_bytes"),
    "jpeg-65-metadata-segments": (lambda: costly.jpeg_at_caps(metadata=65, markers=0),
                                  "max_jpeg_metadata_segments"),
    "jpeg-257-markers": (lambda: costly.jpeg_at_caps(metadata=1, markers=257),
                         "max_jpeg_markers"),
    "jpeg-dqt-over-256KiB": (lambda: costly.jpeg_dqt_tables(256 * 1024 + 65),
                             "max_jpeg_parsed_bytes"),
    "jpeg-photoshop-over-256KiB": (lambda: costly.jpeg_photoshop_resources(5, 60000),
                                   "max_jpeg_parsed_bytes"),
    "png-4097-chunks": (lambda: costly.png_at_caps(chunks=4097, ancillary=0),
                        "max_png_chunks"),
    "png-33-ancillary-chunks": (lambda: costly.png_at_caps(chunks=64, ancillary=33,
                                                           ancillary_bytes=33 * 12),
                                "max_png_ancillary_chunks"),
    "png-ancillary-bytes-over": (lambda: costly.png_at_caps(chunks=64, ancillary=2,
                                                            ancillary_bytes=2 * 2**20 + 64),
                                 "max_png_ancillary_bytes"),
    "png-exif-over-64KiB": (lambda: costly.png_with_exif(costly.exif_amplified(65 * 1024, 3, 1)),
                            "max_exif_bytes"),
    "png-exif-ifd-cycle": (lambda: costly.png_with_exif(_exif_cycle()), "max_exif_ifds"),
    "jpeg-exif-ifd-cycle": (lambda: costly.jpeg_with_exif(_exif_cycle()), "max_exif_ifds"),
    "jpeg-exif-1025-entries": (lambda: costly.jpeg_with_exif(_exif_entries(1025)),
                               "max_exif_entries"),
    "png-rgba16-4096-not-interlaced": (lambda: costly.png_zeros(depth=16, colour=6),
                                       "max_decode_memory"),
}


@pytest.mark.parametrize("name", list(OVER))
def test_one_past_each_cap_is_refused(classifier: Build, detector: Target, name: str) -> None:
    """CWE-400: the first input over each cap is refused by both handlers, naming the cap."""
    build, key = OVER[name]
    data = build()
    for target in (classifier(), detector):
        result = _between(target, data)
        assert_refused(result, 422, "image_too_complex")
        assert f"handler.{key}" in result[1]["error"]["message"]


def test_a_lower_decode_memory_limit_refuses_a_normal_image(classifier: Build) -> None:
    """The memory estimate is a limit like any other: 12 MiB refuses a 2048² RGB PNG."""
    data = costly.png_zeros(side=2048, colour=2)
    assert_refused(_between(classifier(max_decode_memory=12 * 2**20), data), 422,
                   "image_too_complex")
    assert _between(classifier(), data)[0] == 200


def test_caps_are_limits_with_safe_defaults() -> None:
    """Every cap is a field of the image limits model, with a positive default."""
    fields = ImageLimits.model_fields
    for key in {key for _, key in OVER.values()} | set(LIMIT_NAMED.values()):
        assert key in fields, key
        assert isinstance(fields[key].default, int)
        assert fields[key].default > 0


# --- orientation without re-serialising EXIF; MPO --------------------------------------------


def test_orientation_is_applied_without_exif_transpose_or_getexif(
        monkeypatch: pytest.MonkeyPatch, classifier: Build) -> None:
    """EXIF orientation 6 on a 40x20 image: 20x40 upright pixels, and neither
    `ImageOps.exif_transpose` (re-serialises EXIF) nor a PNG's `getexif` (decodes first) ran."""
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("must not be called")

    monkeypatch.setattr(ImageOps, "exif_transpose", refuse)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "getexif", refuse)
    exif = costly.exif_amplified(60 * 1024)  # orientation 6 plus 60 KB shared by 4 IFDs
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), craft.GREEN).save(buf, format="PNG")
    data = buf.getvalue()
    data = data[:33] + costly.png_chunk(b"eXIf", exif) + data[33:]
    limits = ImageLimits()
    opened = decode.open_image(data, "PNG", limits)
    assert opened.orientation == 6
    assert opened.size == (20, 40)
    assert decode.decode(opened, None).size == (20, 40)
    assert_class(_between(classifier(), data), "green")


def _mpo(primary: craft.RGB, other: craft.RGB) -> bytes:
    frames = [Image.new("RGB", (64, 48), primary), Image.new("RGB", (64, 48), other)]
    buf = io.BytesIO()
    frames[0].save(buf, format="MPO", save_all=True, append_images=frames[1:])
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    return data


@pytest.mark.parametrize(("primary", "other", "label"), [
    (craft.RED, craft.BLUE, "red"), (craft.BLUE, craft.GREEN, "blue")])
def test_mpo_is_served_as_its_primary_image(classifier: Build, detector: Target,
                                            primary: craft.RGB, other: craft.RGB,
                                            label: str) -> None:
    """A JPEG with an MPF segment (camera preview, gain map) is not an animation."""
    data = _mpo(primary, other)
    assert_class(_between(classifier(), data), label)
    assert _between(detector, data)[0] == 200
