"""Image bytes → checked, upright RGB pixels: the one decode path of every image handler.

Order matters for safety and cost:

1. header.py walks the structure within the caps (markers, scans, chunks, fill, EXIF size)
   and checks the declared size, before Pillow reads anything;
2. `Image.open(formats=[fmt])` reads the header again (now bounded); size and frames;
3. exif.py reads the orientation from the bounded EXIF blob (never Pillow's `getexif`);
4. the decode memory, estimated from the header at full size (pixels × bytes per pixel,
   or the PNG sample stream: width × height × channels × bytes per sample, ×5/4 when
   interlaced, whichever is larger; libjpeg's coefficient buffer when scans are buffered;
   the buffers RGB conversion needs), is checked against `max_decode_memory`;
5. only then are pixels decoded (at reduced DCT scale for big JPEGs), converted to RGB,
   shrunk by an integer factor when still twice the size needed or more, turned upright.

Every decoder failure is `invalid_image` here, at this one boundary; nothing is swallowed.
"""

from __future__ import annotations

import io
import math
import re
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from secure_handler.errors import AnimatedImage, ImageTooComplex, ImageTooLarge, InvalidImage
from secure_handler.limits import ImageLimits
from secure_handler.serving.image import exif
from secure_handler.serving.image.header import Header, ImageSize, check_size, read_header

__all__ = ["DECODE_ERRORS", "Opened", "decode", "flatten", "open_image", "reason", "to_rgb"]

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


@dataclass(slots=True)
class Opened:
    """An image whose header passed every check; pixels not decoded yet."""

    image: Image.Image
    header: Header
    orientation: int  # EXIF 1..8

    @property
    def format(self) -> str:
        return self.header.format

    @property
    def size(self) -> ImageSize:
        """Width and height as shown, after the EXIF orientation."""
        width, height = self.image.size
        return (height, width) if self.orientation in exif.TRANSPOSED else (width, height)

    def stored(self, size: ImageSize) -> ImageSize:
        """A shown size in stored (pre-rotation) pixels, as the decoder scales them."""
        return (size[1], size[0]) if self.orientation in exif.TRANSPOSED else size


def open_image(data: bytes | bytearray, fmt: str, limits: ImageLimits) -> Opened:
    """Structural walk, then a lazy open with only `fmt` allowed; nothing is decoded yet."""
    try:
        header = read_header(data, fmt, limits)
        orientation = exif.orientation(header.exif, limits)
    except (struct.error, IndexError) as exc:  # a structure that ends before its fields do
        raise InvalidImage(f"the {fmt} image's structure is cut short: {exc}") from exc
    if header.size is not None:
        check_size(header.size, limits)
    try:
        img = Image.open(io.BytesIO(data), formats=(fmt,))
        check_size(img.size, limits)  # the authoritative size, for every format
        _check_frames(img, limits)
        _check_memory(img, header, limits)
    except (ImageTooLarge, AnimatedImage, ImageTooComplex):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image is over Pillow's pixel limit: {reason(exc)}") from exc
    except DECODE_ERRORS as exc:
        raise InvalidImage(f"cannot read the {fmt} image: {reason(exc)}") from exc
    return Opened(img, header, orientation)


def _check_frames(img: Image.Image, limits: ImageLimits) -> None:
    if img.format == "MPO":
        # A JPEG with an MPF segment (camera previews, phone gain maps): frame 0 is the
        # primary image, the others are alternative renderings, not an animation.
        img.seek(0)
        return
    if not getattr(img, "is_animated", False):
        return
    if limits.animated == "reject":
        raise AnimatedImage("animated images are not accepted; send a single frame")
    frames = int(getattr(img, "n_frames", 1))
    if frames > limits.max_frames:
        raise AnimatedImage(f"image has {frames} frames; the limit is {limits.max_frames}")
    img.seek(0)


# --- the memory estimate --------------------------------------------------------------------

_NARROW = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def _conversions(img: Image.Image) -> int:
    """Full-size 4-byte buffers `to_rgb` holds besides the decoded image."""
    if img.mode == "RGB":
        return 0
    if img.mode == "PA" or (img.mode == "P" and "transparency" in img.info):
        return 2  # RGBA, then the RGB it is pasted onto
    return 2 if img.mode in ("I", "F") or img.mode.startswith("I;16") else 1


def _coefficients(header: Header) -> int:
    """Bytes libjpeg holds for a buffered (progressive or multi-scan) JPEG: every block."""
    if not (header.buffered and header.components and header.size):
        return 0
    width, height = header.size
    h_max = max(h for h, _ in header.components)
    v_max = max(v for _, v in header.components)
    return sum(math.ceil(math.ceil(width * h / h_max) / 8)
               * math.ceil(math.ceil(height * v / v_max) / 8) * 128
               for h, v in header.components)


def estimate(img: Image.Image, header: Header) -> int:
    """Peak bytes a full-size decode and RGB conversion of `img` needs, from headers only.

    Deliberately the same for every handler (no reduced JPEG scale, no shrink): the
    classifier and the detector accept and refuse exactly the same images.
    """
    pixels = img.size[0] * img.size[1]
    decoded = max(pixels * _NARROW.get(img.mode, 4), header.stream)
    return decoded + _coefficients(header) + pixels * 4 * _conversions(img)


def _check_memory(img: Image.Image, header: Header, limits: ImageLimits) -> None:
    needed = estimate(img, header)
    if needed > limits.max_decode_memory:
        raise ImageTooComplex(
            f"decoding this {img.size[0]}x{img.size[1]} {img.mode} image needs about "
            f"{needed >> 20} MiB; the limit is {limits.max_decode_memory >> 20} MiB "
            "(handler.max_decode_memory). Send a smaller image or one with fewer channels"
        )


# --- decoding -------------------------------------------------------------------------------


def decode(opened: Opened, need: ImageSize | None) -> Image.Image:
    """Upright RGB pixels, at least `need` (shown width, height) when given.

    Raises:
        InvalidImage: the decoder failed (truncated, corrupt); nothing is swallowed.
    """
    img, fmt = opened.image, opened.format
    stored = opened.stored(need) if need is not None else None
    try:
        if fmt == "JPEG" and stored is not None:
            img.draft("RGB", stored)
        img.load()
        img = flatten(img)  # grey stays 1 byte a pixel until it is reduced
        # The caller's handle on the decoded image is the only other reference: dropping it
        # frees a transparent image's RGBA buffer before anything else is allocated.
        opened.image = img
        factor = _factor(img.size, stored)
        if factor > 1:  # box-average down to at most twice the need: less to copy and resize
            img = img.reduce(factor)
        img = exif.orient(img, opened.orientation)
        return img if img.mode == "RGB" else img.convert("RGB")
    except DECODE_ERRORS as exc:
        raise InvalidImage(f"cannot decode the {fmt} image: {reason(exc)}") from exc


def _factor(size: ImageSize, need: ImageSize | None) -> int:
    """The integer shrink that keeps at least `need`; 1 below twice the need."""
    if need is None:
        return 1
    return max(1, min(size[0] // max(1, need[0]), size[1] // max(1, need[1])))


def _to_l(img: Image.Image) -> Image.Image:
    """16/32-bit grey → 8-bit L, scaled (Pillow's own conversion clips at 255: white)."""
    if img.mode.startswith("I;16"):
        return img.point(lambda value: value * (1 / 256)).convert("L")
    arr = np.asarray(img if img.mode != "F" else img.convert("I")).astype(np.uint32) >> 8
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def flatten(img: Image.Image) -> Image.Image:
    """Any decoded mode → "RGB", or "L" for grey ones; transparency composited onto white."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _to_l(img)
    if mode == "1":
        return img.convert("L")
    if mode in ("LA", "La"):
        # Grey over white in one L buffer (pasting into RGB made an RGBA copy first).
        out = Image.new("L", img.size, 255)
        out.paste(img.convert("L"), (0, 0), img.getchannel("A"))
        return out
    if mode == "PA" or (mode == "P" and "transparency" in img.info):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "RGBa"):
        # Pasting with the image's own alpha as the mask composites onto white in one
        # buffer (alpha_composite needed three more full-size RGBA copies).
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(img, (0, 0), img)
        return out
    return img.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB; transparent areas are composited onto white."""
    flat = flatten(img)
    return flat if flat.mode == "RGB" else flat.convert("RGB")
