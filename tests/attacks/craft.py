"""Hostile inputs, built byte by byte in the test run (nothing is checked in as a blob).

Each builder returns the raw bytes a client would send. Builders that need a real encoder use
Pillow; the malformed parts (lying headers, bombs, truncation) are written by hand so the test
controls exactly which field lies.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]
RED: RGB = (230, 20, 20)
GREEN: RGB = (20, 230, 20)
BLUE: RGB = (20, 20, 230)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: A zero-argument builder of hostile bytes (for parametrised tests).
Builder = Callable[[], bytes]


def encode(img: Image.Image, fmt: str, **save: Any) -> bytes:
    """`img` encoded by Pillow as `fmt`."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def solid(colour: RGB = RED, size: tuple[int, int] = (64, 48), fmt: str = "JPEG",
          **save: Any) -> bytes:
    """A valid solid-colour image; the tiny test classifier answers its dominant channel."""
    return encode(Image.new("RGB", size, colour), fmt, **save)


# --- PNG, by hand -------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    """One PNG chunk; `crc` overrides the correct checksum (to forge a broken one)."""
    real = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", real if crc is None
                                                                     else crc)


def ihdr(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type,
                                          0, 0, 0))


def png_declaring(width: int, height: int, before_ihdr: bytes = b"") -> bytes:
    """A ~100-byte PNG whose IHDR declares `width` x `height` RGB (a decompression bomb).

    The IDAT holds a few KB of zeros compressed: a decoder that trusts the header allocates
    width * height * 3 bytes before it notices the data is short.
    """
    idat = zlib.compress(b"\x00" * 4096, 9)
    return (PNG_SIGNATURE + before_ihdr + ihdr(width, height) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def png_zero_filled(width: int, height: int) -> bytes:
    """A complete, valid black RGB PNG: zlib squeezes w*h*3 zero bytes about 1000:1."""
    raw = zlib.compress(b"\x00" * (height * (1 + 3 * width)), 9)
    return (PNG_SIGNATURE + ihdr(width, height) + png_chunk(b"IDAT", raw)
            + png_chunk(b"IEND", b""))


def png_rgb16(colour: RGB, size: tuple[int, int] = (32, 24)) -> bytes:
    """A valid 48-bit (16 bits per channel) RGB PNG; Pillow cannot write these itself."""
    width, height = size
    pixel = np.array([c * 257 for c in colour], dtype=">u2")
    rows = np.broadcast_to(pixel, (height, width, 3)).reshape(height, width * 3)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    return (PNG_SIGNATURE + ihdr(width, height, bit_depth=16, colour_type=2)
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def png_gray16(value: int, size: tuple[int, int] = (32, 24)) -> bytes:
    """A valid 16-bit greyscale PNG (Pillow mode I;16) filled with `value` (0..65535)."""
    arr = np.full((size[1], size[0]), value, dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16", img.mode
    return encode(img, "PNG")


def png_with_ztxt_bomb(megabytes: int = 64) -> bytes:
    """A small valid PNG whose zTXt chunk inflates to `megabytes` MB (CWE-409)."""
    base = solid(RED, (8, 8), "PNG")
    bomb = b"Comment\x00\x00" + zlib.compress(b"\x00" * (megabytes << 20), 9)
    return base[:33] + png_chunk(b"zTXt", bomb) + base[33:]  # after signature + IHDR


def png_bad_ihdr_crc() -> bytes:
    good = solid(RED, (8, 8), "PNG")
    return good[:8] + png_chunk(b"IHDR", good[16:29], crc=0xDEADBEEF) + good[33:]


def png_corrupt_idat() -> bytes:
    """Signature and IHDR intact; the IDAT's zlib stream is garbage (valid CRC)."""
    return (PNG_SIGNATURE + ihdr(16, 16) + png_chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 64)
            + png_chunk(b"IEND", b""))


def apng(colours: Sequence[RGB], size: tuple[int, int] = (32, 32),
         declared_frames: int | None = None) -> bytes:
    """An animated PNG; `declared_frames` rewrites acTL's frame count (a lying header)."""
    frames = [Image.new("RGB", size, c) for c in colours]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=10,
                  default_image=False)
    if declared_frames is None:
        return data
    pos = data.index(b"acTL") - 4
    body = struct.pack(">II", declared_frames, 0)
    return data[:pos] + png_chunk(b"acTL", body) + data[pos + 20:]


def apng_cut_in_actl() -> bytes:
    """IHDR, then an acTL chunk (0 frames, 2 plays) cut off before its CRC; nothing after.

    Found by the property suite: Pillow warns ("Invalid APNG") before it gives up, so the
    outcome depends on the process's warning filter unless the handler pins it.
    """
    actl = png_chunk(b"acTL", struct.pack(">II", 0, 2))
    return PNG_SIGNATURE + ihdr(8, 8) + actl[:-4]


# --- JPEG ------------------------------------------------------------------------------------


def _sof_offset(data: bytes) -> int:
    """Offset of the first SOF0/SOF2 marker of a Pillow-written JPEG."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        pos = data.find(marker)
        if pos > 0:
            return pos
    raise ValueError("no SOF marker")


def jpeg_declaring(width: int, height: int, progressive: bool = False) -> bytes:
    """A real 16x16 JPEG whose SOF is patched to declare `width` x `height`."""
    data = bytearray(solid(RED, (16, 16), "JPEG", progressive=progressive))
    pos = _sof_offset(bytes(data))
    struct.pack_into(">HH", data, pos + 5, height, width)
    return bytes(data)


def jpeg_double_sof(width: int, height: int) -> bytes:
    """A 16x16 JPEG with a second SOF declaring `width` x `height` right after the first.

    Header parsers that stop at the first SOF see 16x16; a decoder that keeps the last one
    sees the big size.
    """
    data = solid(RED, (16, 16), "JPEG")
    pos = _sof_offset(data)
    (length,) = struct.unpack_from(">H", data, pos + 2)
    sof = bytearray(data[pos:pos + 2 + length])
    struct.pack_into(">HH", sof, 5, height, width)
    end = pos + 2 + length
    return data[:end] + bytes(sof) + data[end:]


def jpeg_bad_sof_components() -> bytes:
    """SOF declares 0 colour components: no decoder can make pixels of that."""
    data = bytearray(solid(RED, (16, 16), "JPEG"))
    data[_sof_offset(bytes(data)) + 9] = 0
    return bytes(data)


def jpeg_without_scan() -> bytes:
    """Every header segment, then EOI where the entropy-coded scan should be."""
    data = solid(RED, (16, 16), "JPEG")
    return data[:data.index(b"\xff\xda")] + b"\xff\xd9"


def jpeg_with_comment(text: bytes) -> bytes:
    """A valid red JPEG carrying `text` in a COM segment (HTML/PHP polyglots)."""
    data = solid(RED, (32, 32), "JPEG")
    return data[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + data[2:]


# --- other containers -----------------------------------------------------------------------


def gif_frames(count: int, size: tuple[int, int] = (4, 4), screen: tuple[int, int] | None = None
               ) -> bytes:
    """An animated GIF of `count` frames (alternating colours so none are merged)."""
    frames = [Image.new("P", size, i % 2) for i in range(count)]
    palette = [*RED, *BLUE] + [0] * (256 * 3 - 6)
    for frame in frames:
        frame.putpalette(palette)
    data = bytearray(encode(frames[0], "GIF", save_all=True, append_images=frames[1:],
                            duration=10, optimize=False))
    if screen is not None:  # the logical screen size in the header
        struct.pack_into("<HH", data, 6, *screen)
    return bytes(data)


def psd_header() -> bytes:
    """The 26-byte Photoshop file header (version 1, 3 channels, 64x64, 8-bit RGB)."""
    return b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 64, 64, 8, 3) + b"\x00" * 64


def zip_archive(members: dict[str, bytes]) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def truncate(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def noisy(colour: RGB, size: tuple[int, int] = (96, 96), seed: int = 0) -> Image.Image:
    """A solid colour plus noise, so compressed data is long enough to cut in the middle."""
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.int16)
    arr = base + rng.integers(-15, 16, size=(size[1], size[0], 3), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")
