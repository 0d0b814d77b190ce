"""Image bytes → checked, decoded RGB pixels, with every limit applied before decoding.

Order matters for safety: magic bytes first (Pillow never sees a format we did not allow),
then the header's width, height, pixel count and aspect ratio read by our own small parsers
(so a decompression bomb is refused without allocating, and Pillow's process-global
`MAX_IMAGE_PIXELS` stays a backstop we never change), then `Image.open(formats=[...])`,
frame count, and only then decoding, at reduced scale for big JPEGs.
"""

from __future__ import annotations

import io
import re
import struct

import numpy as np
from PIL import Image, ImageOps

from secure_handler.errors import AnimatedImage, ImageTooLarge, InvalidImage, UnsupportedMediaType
from secure_handler.limits import ImageLimits

__all__ = [
    "ImageSize",
    "check_declared_type",
    "check_format",
    "header_size",
    "load",
    "open_image",
    "sniff_format",
    "to_rgb",
]

ImageSize = tuple[int, int]

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    # Recognised only to name them in the refusal; never decoded.
    (b"8BPS", "PSD"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"PK\x03\x04", "ZIP"),
    (b"%PDF", "PDF"),
    (b"<?xml", "SVG"),
    (b"<svg", "SVG"),
)

# Content types that name an image format; a declared type outside the allowlist is a 415.
_DECLARED = {
    "image/png": "PNG", "image/apng": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG",
    "image/pjpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP", "image/bmp": "BMP",
    "image/x-ms-bmp": "BMP", "image/tiff": "TIFF", "image/x-icon": "ICO",
    "image/vnd.microsoft.icon": "ICO", "image/vnd.adobe.photoshop": "PSD",
    "application/postscript": "EPS", "image/svg+xml": "SVG", "image/heic": "HEIC",
    "image/avif": "AVIF",
}

# Everything Pillow may raise on hostile bytes; mapped to InvalidImage at this one boundary.
# `Warning` too: Pillow warns before failing on some files ("Invalid APNG"), and a worker run
# with warnings as errors (PYTHONWARNINGS=error) must still answer with the same typed 422.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error,
                 Image.DecompressionBombError, Warning, MemoryError,
                 TypeError, KeyError, ZeroDivisionError)


def reason(exc: BaseException) -> str:
    """A decoder's complaint, safe to show a client (no object reprs or addresses)."""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip()
    return (text or type(exc).__name__)[:200]


def sniff_format(data: bytes | bytearray | memoryview) -> str | None:
    """The format named by the magic bytes, or None."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


def check_declared_type(content_type: str, allowed: tuple[str, ...]) -> None:
    """Refuse a declared image type outside the allowlist (415)."""
    fmt = _DECLARED.get(content_type)
    if content_type.startswith("image/") and fmt not in allowed:
        raise UnsupportedMediaType(
            f"content type {content_type!r} is not allowed; allowed formats: {', '.join(allowed)}"
        )


def check_format(data: bytes | bytearray, allowed: tuple[str, ...]) -> str:
    """The allowed format named by the magic bytes, or UnsupportedMediaType."""
    fmt = sniff_format(data)
    if fmt is None or fmt not in allowed:
        found = fmt or "unrecognised bytes"
        raise UnsupportedMediaType(
            f"image format {found} is not allowed; allowed formats: {', '.join(allowed)}"
        )
    return fmt


# --- header parsers: dimensions without decoding -------------------------------------------

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes | bytearray) -> ImageSize | None:
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF and pos + 9 <= end:
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return width, height
        if marker == 0xDA or length < 2:  # start of scan before any SOF: broken
            return None
        pos += 2 + length
    return None


def _simple_size(fmt: str, data: bytes | bytearray) -> ImageSize | None:
    if fmt == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack_from(">II", data, 16)
        return width, height
    if fmt == "GIF" and len(data) >= 10:
        width, height = struct.unpack_from("<HH", data, 6)
        return width, height
    if fmt == "BMP" and len(data) >= 26:
        width, height = struct.unpack_from("<ii", data, 18)
        return abs(width), abs(height)
    return None


def _webp_size(data: bytes | bytearray) -> ImageSize | None:
    chunk = bytes(data[12:16])
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        return width, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def header_size(fmt: str, data: bytes | bytearray) -> ImageSize | None:
    """Width and height from the header, for the formats we parse ourselves; else None."""
    if fmt == "JPEG":
        return _jpeg_size(data)
    if fmt == "WEBP":
        return _webp_size(data)
    return _simple_size(fmt, data)


def check_size(size: ImageSize, limits: ImageLimits) -> None:
    """Refuse dimensions, pixel count or aspect ratio over the limits (422)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image header declares an empty size {width}x{height}")
    side = max(width, height)
    if side > limits.max_image_side:
        raise ImageTooLarge(
            f"image is {width}x{height}; the longest side may be {limits.max_image_side} px"
        )
    if width * height > limits.max_image_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_image_pixels}"
        )
    if side / min(width, height) > limits.max_aspect_ratio:
        raise ImageTooLarge(
            f"image is {width}x{height}; the aspect ratio may be at most "
            f"{limits.max_aspect_ratio:g}:1"
        )


def _check_frames(img: Image.Image, limits: ImageLimits) -> None:
    if not getattr(img, "is_animated", False):
        return
    if limits.animated == "reject":
        raise AnimatedImage("animated images are not accepted; send a single frame")
    frames = int(getattr(img, "n_frames", 1))
    if frames > limits.max_frames:
        raise AnimatedImage(f"image has {frames} frames; the limit is {limits.max_frames}")
    img.seek(0)


def open_image(data: bytes | bytearray, fmt: str, limits: ImageLimits) -> Image.Image:
    """Open lazily with only `fmt` allowed, after the header checks; nothing is decoded yet.

    Our own header parsers refuse anything over `max_image_pixels` (capped at Pillow's default
    `MAX_IMAGE_PIXELS`) before Pillow runs, so Pillow's bomb check stays a silent backstop and
    no process-global warning filter has to be touched (this runs on decode threads).
    """
    size = header_size(fmt, data)
    if size is not None:
        check_size(size, limits)
    try:
        img = Image.open(io.BytesIO(data), formats=(fmt,))
        check_size(img.size, limits)  # the authoritative size, for every format
        _check_frames(img, limits)
    except (ImageTooLarge, AnimatedImage):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image is over Pillow's pixel limit: {reason(exc)}") from exc
    except DECODE_ERRORS as exc:
        raise InvalidImage(f"cannot read the {fmt} image: {reason(exc)}") from exc
    return img


# --- decoding -------------------------------------------------------------------------------

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    # Pillow's own I;16 → L conversion clips at 255 (a 16-bit image turns white); scale instead.
    arr = np.asarray(img).astype(np.uint32) >> 8
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB; transparent areas are composited onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _sixteen_bit_to_l(img if mode != "F" else img.convert("I")).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF Orientation tag (cheap no-op when absent or 1)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except DECODE_ERRORS:
        return img
    if orientation in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def load(img: Image.Image, fmt: str, draft_to: ImageSize | None = None) -> Image.Image:
    """Decode the pixels (at reduced JPEG scale when `draft_to` is given) and apply EXIF.

    `draft_to` is the smallest size the caller still needs; JPEG's DCT scaling then decodes at
    1/2, 1/4 or 1/8 without going below it. Truncated files are refused: we never set
    `LOAD_TRUNCATED_IMAGES`.
    """
    try:
        if fmt == "JPEG" and draft_to is not None:
            img.draft("RGB", draft_to)
        img.load()
        return apply_exif_orientation(img)
    except DECODE_ERRORS as exc:
        raise InvalidImage(f"cannot decode the {fmt} image: {reason(exc)}") from exc
