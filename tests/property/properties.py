"""Shared pieces of the property suite: profiles, strategies, the outcome oracle, a peak meter.

The property under test, for every handler: whatever arrives, `read_payload` + `decode`
either produce a valid item or raise one of our typed `RequestError`s with a known code —
nothing else escapes — and the memory one request can make the worker touch is bounded by
the limits, not by what the request claims.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attacks import craft
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from ts.context import RequestProcessor

from secure_handler import RequestError, SecureBaseHandler, SecureHandlerError
from secure_handler.testing import Request

KiB, MiB = 1024, 1024 * 1024

# --- profiles ---------------------------------------------------------------------------------

_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("secure-handler-ci", max_examples=150, deadline=None,
                          derandomize=True, database=None, suppress_health_check=_CHECKS)
settings.register_profile("secure-handler-long", max_examples=5000, deadline=None,
                          database=None, suppress_health_check=_CHECKS)
#: Decorate each property test with this (not `load_profile`, which is process-global).
PROFILE = settings.get_profile(os.environ.get("SECURE_HANDLER_HYPOTHESIS", "secure-handler-ci"))

# --- limits and the oracle ----------------------------------------------------------------------

#: Tighter than the defaults so the memory bound below is tight too.
LIMITS: dict[str, Any] = {"max_request_bytes": 256 * KiB, "max_image_side": 1024,
                          "max_image_pixels": 1024 * 1024, "max_batch_size": 4,
                          "allowed_formats": ["PNG", "JPEG", "GIF"]}
TEXT_LIMITS: dict[str, Any] = {"max_batch_size": 4}

#: Peak RSS one image request may add: the largest allowed image decoded as RGBA (4 MiB),
#: its RGB conversion, the draft/resize copies and allocator slack. A 65535² bomb that got
#: through would need 12 GiB; a 1024² one decoded in full about 10 MiB.
IMAGE_PEAK_BOUND = 64 * MiB
TEXT_PEAK_BOUND = 32 * MiB

IMAGE_CODES = {"malformed_request", "empty_body", "payload_too_large", "unsupported_media_type",
               "invalid_base64", "invalid_image", "image_too_large", "animated_image"}
TEXT_CODES = {"malformed_request", "empty_body", "payload_too_large", "invalid_text",
              "text_too_long", "too_many_tokens"}
STATUS = {"malformed_request": 400, "empty_body": 400, "payload_too_large": 413,
          "unsupported_media_type": 415}


def expected_status(code: str) -> int:
    return STATUS.get(code, 422)


def outcome(handler: SecureBaseHandler, ctx: Any, request: Request) -> tuple[str, Any]:
    """`("ok", item)` or `(code, None)` for one request; any other exception propagates."""
    ctx.request_processor = [RequestProcessor(request.header_map())]
    # decode_rows is the whole per-request half of handle(), as the worker runs it (the text
    # handler tokenizes a batch's texts together there, after decode() checked each one).
    item = handler.decode_rows([request.row()])[0]
    if not isinstance(item, SecureHandlerError):
        return "ok", item
    assert isinstance(item, RequestError), item  # never internal_error
    refused = item
    assert refused.status == expected_status(refused.code), (refused.code, refused.status)
    assert refused.message
    return refused.code, None


# --- peak memory -------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if found is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(found.group(1))


@dataclass
class PeakRss:
    """Peak RSS rise since `reset()`, from VmHWM (reset by writing 5 to clear_refs)."""

    base_kib: int = 0

    def reset(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        self.base_kib = _status_kib("VmRSS")

    def rise(self) -> int:
        return max(0, _status_kib("VmHWM") - self.base_kib) * KiB


def peak_rss_meter() -> PeakRss | None:
    meter = PeakRss()
    try:
        meter.reset()
    except OSError:
        return None
    return meter


# --- strategies: bytes --------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **save: Any) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _seed_images() -> list[bytes]:
    """Small valid images of every mode the decoder handles: mutation starting points."""
    rgb = Image.new("RGB", (24, 16), (200, 30, 30))
    rgb.paste((20, 20, 200), (0, 0, 12, 8))
    pal = rgb.convert("P")
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    return [
        _encode(rgb, "JPEG"),
        _encode(rgb, "JPEG", progressive=True),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb.convert("L"), "JPEG"),
        _encode(rgb, "PNG"),
        _encode(pal, "PNG", transparency=0),
        _encode(rgb.convert("LA"), "PNG"),
        _encode(rgb.convert("I;16"), "PNG"),
        _encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        _encode(pal, "GIF"),
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
    ]


SEEDS = _seed_images()
INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid seed image with up to five edits: bit flips, cuts, inserts, header integers."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 5))):
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        op = draw(st.sampled_from(["flip", "cut", "insert", "u16", "u32", "delete", "dup"]))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op in ("u16", "u32") and pos + 4 <= len(data):
            value = draw(st.sampled_from(INTERESTING))
            fmt = ">H" if op == "u16" else ">I"
            struct.pack_into(fmt, data, pos, value & (0xFFFF if op == "u16" else 0xFFFFFFFF))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 32))]
        elif op == "dup":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 256))] * draw(st.integers(1, 8))
    return bytes(data)


IMAGE_TYPES = ["application/octet-stream", "image/jpeg", "image/png", "image/gif",
               "image/webp", "image/x-anything", "text/plain", "application/json", ""]

sides = st.one_of(st.integers(0, 2048), st.integers(0, 65_535))
#: Tiny files whose headers declare any size: the decoder allocates for what the header says.
declared_sizes = st.one_of(
    st.builds(craft.png_declaring, sides, sides),
    st.builds(lambda w, h, p: craft.jpeg_declaring(w, h, progressive=p), sides, sides,
              st.booleans()),
    st.builds(lambda w, h: craft.gif_frames(1, screen=(w, h)), st.integers(0, 65535),
              st.integers(0, 65535)),
    # Real, fully decodable compression bombs around the limit (1024 px): these are what
    # actually touch memory, so they set the peak the bound below is checked against.
    st.builds(craft.png_zero_filled, st.integers(1, 1100), st.integers(1, 1100)),
)

any_bytes = st.one_of(st.binary(max_size=2048), mutated_images(), st.sampled_from(SEEDS),
                      declared_sizes)


@st.composite
def image_requests(draw: st.DrawFn) -> Request:
    """A request as the worker delivers it: raw, base64 text, or a JSON envelope."""
    data = draw(any_bytes)
    shape = draw(st.sampled_from(["raw", "b64-text", "b64-json", "b64-raw"]))
    if shape == "raw":
        return Request.as_worker(data, draw(st.sampled_from(IMAGE_TYPES)))
    text = base64.b64encode(data).decode()
    if draw(st.booleans()):  # sometimes corrupt the base64 itself
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.text(max_size=4)) + text[pos:]
    if shape == "b64-text":
        return Request.as_worker(text.encode("utf-8", "surrogatepass"), "text/plain")
    if shape == "b64-raw":
        return Request.as_worker(text.encode("utf-8", "surrogatepass"),
                                 "application/octet-stream")
    key = draw(st.sampled_from(["data", "image", "text", "other"]))
    return Request({key: text}, "application/json")


# --- strategies: JSON and text ------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                         st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=6),
                               st.dictionaries(st.sampled_from(["data", "image", "text", "x"])
                                               | st.text(max_size=8), children, max_size=4)),
    max_leaves=30,
)


def json_request(value: Any) -> Request:
    """`value` serialised and handed over as the worker would (parsed when it parses)."""
    raw = json.dumps(value).encode()
    return Request.as_worker(raw, "application/json")


#: Text with the characters attacks use, weighted in: controls, bidi, surrogates, NFKC bombs.
SPECIAL = "\x00\x07\x1b\x7f\x85\x9b\u202e\u2066\u2069\ufeff\ufdfa\uff21\u0301\t\r\n"
texts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.sampled_from(list(SPECIAL) + list("good bad awful meh ")),
            max_size=200),
    st.builds(lambda word, n: word * n, st.sampled_from(["good ", "a ", "\ufdfa", "x"]),
              st.integers(0, 12_000)),
)


def text_request(text: str, content_type: str) -> Request:
    raw = text.encode("utf-8", "surrogatepass")
    if content_type == "application/json":
        raw = json.dumps({"text": text}).encode()
    return Request.as_worker(raw, content_type)


#: A session fixture's ready handler and the real Context it was initialised with.
Loaded = tuple[SecureBaseHandler, Any]
