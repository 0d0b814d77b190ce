"""Image headers read without decoding: format, declared type, size, and structural caps.

Everything here runs before Pillow sees the bytes, so its cost is bounded by our caps, not by
the file: Pillow's JPEG and PNG openers walk markers and chunks in Python (a file of fill
bytes or empty segments costs it seconds), and libjpeg decodes every scan it is given. The
JPEG walk finds markers with `re`/`bytes.find` (no Python loop per byte) and stops at a cap,
or at a sequential scan of every component (libjpeg decodes no scan after it, so most photos
are walked only up to their first scan); the PNG walk visits at most `max_png_chunks` chunks.
Over a cap: 422 `image_too_complex`. Structurally broken files (no frame header, a chunk
past the end of the file): 422 `invalid_image`. The EXIF blob is taken out here, bounded,
for `exif.py` to read. Format sniffing and declared types live in formats.py.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from secure_handler.errors import (
    ImageTooComplex,
    ImageTooLarge,
    InvalidImage,
    UnsupportedMediaType,
)
from secure_handler.limits import ImageLimits

__all__ = ["Header", "ImageSize", "check_size", "read_header"]

ImageSize = tuple[int, int]

@dataclass(frozen=True, slots=True)
class Header:
    """What the structural walk learned; `size` is None for formats we do not parse."""

    format: str
    size: ImageSize | None = None
    exif: bytes | None = None  # a TIFF structure ("II*\0..." / "MM\0*..."), bounded
    # JPEG: sampling factors (h, v) per component, and whether libjpeg must buffer the
    # coefficients of the whole image (progressive, or more than one scan).
    components: tuple[tuple[int, int], ...] = ()
    buffered: bool = False
    # PNG: bytes of the inflated sample stream the decoder must unfilter (width × height ×
    # channels × bytes per sample, plus a filter byte per row; 5/4 of that when interlaced).
    stream: int = 0


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


def read_header(data: bytes | bytearray, fmt: str, limits: ImageLimits) -> Header:
    """Walk the file's structure within the caps; sizes are checked as soon as they are read."""
    if fmt == "JPEG":
        return _JpegWalk(data, limits).run()
    if fmt == "PNG":
        return _PngWalk(data, limits).run()
    if fmt == "WEBP":
        return Header(fmt, _webp_size(data), _webp_exif(data))
    if fmt == "TIFF":
        return Header(fmt, None, bytes(data))  # the file is itself the EXIF-style structure
    return Header(fmt, _simple_size(fmt, data))


def _over(what: str, count: int, limit: int, key: str) -> ImageTooComplex:
    return ImageTooComplex(
        f"image has {what} {count}; the limit is {limit} (handler.{key}). Re-encode the image "
        "(e.g. save it again with a standard encoder) to drop the excess"
    )


# --- JPEG -----------------------------------------------------------------------------------

# A marker that ends entropy-coded data: 0xFF then anything but a stuffed 0x00, fill 0xFF
# or a restart marker (RST0-7 belong to the scan).
_SCAN_END = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
_FILL = re.compile(rb"\xff+")
# Huffman baseline, extended and progressive; arithmetic sequential and progressive.
# Lossless and hierarchical processes are refused (libjpeg decodes neither through Pillow).
_SOF_ALLOWED = {0xC0: False, 0xC1: False, 0xC2: True, 0xC9: False, 0xCA: True}
_SOF_ANY = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
_EXIF_ID = b"Exif\x00\x00"
_PHOTOSHOP_ID = b"Photoshop 3.0\x00"


class _JpegWalk:
    """One pass over the markers of a JPEG up to its first EOI, counting against the caps."""

    def __init__(self, data: bytes | bytearray, limits: ImageLimits) -> None:
        self.data, self.limits = data, limits
        self.markers = self.scans = self.metadata = self.fill = self.parsed_bytes = 0
        self.size: ImageSize | None = None
        self.components: tuple[tuple[int, int], ...] = ()
        self.progressive = False
        self.exif: list[bytes] = []
        self.exif_bytes = 0

    def run(self) -> Header:
        data, end, pos = self.data, len(self.data), 2
        self._no_long_fill()
        while pos < end:
            pos = self._skip_fill(pos)
            if pos + 1 >= end:
                break
            marker = data[pos + 1]
            self._count("markers", self.limits.max_jpeg_markers, "max_jpeg_markers")
            if marker == 0xD9:  # EOI: what follows (MPO frames, riders) is never decoded
                break
            if marker in _STANDALONE:
                pos += 2
                continue
            if marker < 0xC0 or marker == 0xFF:
                raise InvalidImage(f"JPEG has an invalid marker 0xFF{marker:02X} at {pos}")
            if pos + 4 > end:
                break
            (length,) = struct.unpack_from(">H", data, pos + 2)
            if length < 2:
                raise InvalidImage(f"JPEG segment 0xFF{marker:02X} has length {length}")
            body, pos = pos + 4, pos + 2 + length
            if pos > end:
                break  # cut inside a segment: the decoder reports it as truncated
            self._segment(marker, body, pos)
            if marker == 0xDA:
                if not self.progressive and data[body] == len(self.components):
                    # A sequential scan of every component is the whole image: libjpeg
                    # refuses any scan after it ("Didn't expect more than one scan"), so
                    # its entropy data need not be walked (most photos end here).
                    break
                found = _SCAN_END.search(data, pos)
                if found is None:
                    break
                pos = found.start()
        return self._header()

    def _no_long_fill(self) -> None:
        """No run of 0xFF longer than the fill cap anywhere, scan data included: entropy data
        never holds two 0xFF in a row (each is followed by a stuffed 0x00), and libjpeg does
        not consume a run while it skips it, so Pillow feeds it the growing buffer again and
        again (a 10 MB run: 160 decoder calls re-reading 844 MB, about 1 s). One C search."""
        limit = self.limits.max_jpeg_fill_bytes
        found = self.data.find(b"\xff" * (limit + 2), 2)
        if found >= 0:
            raise _over(f"a run of more than {limit + 1} 0xFF fill bytes at {found}:",
                        limit + 2, limit, "max_jpeg_fill_bytes")

    def _skip_fill(self, pos: int) -> int:
        """Move past fill bytes (and junk bytes, which Pillow skips one by one) to a marker."""
        start = pos
        if self.data[pos] != 0xFF:
            pos = self.data.find(b"\xff", pos)
            if pos < 0:
                pos = len(self.data)
        run = _FILL.match(self.data, pos)
        if run is not None:
            pos = run.end() - 1
        self.fill += pos - start
        if self.fill > self.limits.max_jpeg_fill_bytes:
            raise _over("fill or junk bytes between segments:", self.fill,
                        self.limits.max_jpeg_fill_bytes, "max_jpeg_fill_bytes")
        return pos

    def _count(self, name: str, limit: int, key: str) -> None:
        value = getattr(self, name) + 1
        setattr(self, name, value)
        if value > limit:
            raise _over(f"more {name.replace('_', ' ')} than allowed:", value, limit, key)

    def _segment(self, marker: int, body: int, end: int) -> None:
        data = self.data
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            self._count("metadata", self.limits.max_jpeg_metadata_segments,
                        "max_jpeg_metadata_segments")
            if marker == 0xE1 and data[body:body + 6] == _EXIF_ID:
                self._add_exif(body + 6, end)
            elif marker == 0xED and data[body:body + 14] == _PHOTOSHOP_ID:
                self._parsed(end - body)  # Pillow walks its resources in Python
        elif marker in _SOF_ANY:
            self._frame(marker, body, end)
        elif marker == 0xDB:  # DQT: Pillow reads every table in Python
            self._parsed(end - body)
        elif marker == 0xDA:
            if self.size is None:
                raise InvalidImage("JPEG has a scan before its frame header (SOF)")
            self._count("scans", self.limits.max_jpeg_scans, "max_jpeg_scans")

    def _frame(self, marker: int, body: int, end: int) -> None:
        if end - body < 6:
            raise InvalidImage("JPEG frame header (SOF) is cut short")
        height, width, count = struct.unpack_from(">HHB", self.data, body + 1)
        check_size((width, height), self.limits)  # every SOF, so a lying second one is caught
        if self.size is not None:
            raise InvalidImage("JPEG has two frame headers (SOF); a decoder may use either")
        if marker not in _SOF_ALLOWED:
            raise UnsupportedMediaType(
                f"JPEG coding process SOF{marker - 0xC0} (lossless or hierarchical) is not "
                "supported; re-encode as a baseline or progressive JPEG"
            )
        if count == 0 or end - body < 6 + 3 * count:
            raise InvalidImage(f"JPEG frame header declares {count} components it does not hold")
        sampling = self.data[body + 6 + 1:body + 6 + 3 * count:3]
        self.components = tuple((max(1, s >> 4), max(1, s & 15)) for s in sampling)
        self.size, self.progressive = (width, height), _SOF_ALLOWED[marker]

    def _parsed(self, size: int) -> None:
        self.parsed_bytes += size
        if self.parsed_bytes > self.limits.max_jpeg_parsed_bytes:
            raise _over("bytes of DQT tables and Photoshop resources:", self.parsed_bytes,
                        self.limits.max_jpeg_parsed_bytes, "max_jpeg_parsed_bytes")

    def _add_exif(self, start: int, end: int) -> None:
        self.exif_bytes += end - start
        if self.exif_bytes > self.limits.max_exif_bytes:
            raise _over("EXIF bytes:", self.exif_bytes, self.limits.max_exif_bytes,
                        "max_exif_bytes")
        self.exif.append(bytes(self.data[start:end]))

    def _header(self) -> Header:
        if self.size is None:
            raise InvalidImage("JPEG has no frame header (SOF) before its end")
        if self.scans == 0:
            raise InvalidImage("JPEG has no scan (SOS): there are no pixels to decode")
        # Pillow joins the payloads of several APP1 Exif segments the same way.
        exif = b"".join(self.exif) if self.exif else None
        return Header("JPEG", self.size, exif, self.components,
                      self.progressive or self.scans > 1)


# --- PNG ------------------------------------------------------------------------------------

_CHUNK_TYPE = re.compile(rb"[A-Za-z]{4}")
# Image data of the default image and of APNG frames: bounded by the chunk count, and not
# metadata, so not counted as ancillary bytes.
_PIXEL_CHUNKS = {b"IDAT", b"fdAT", b"fcTL", b"acTL"}


class _PngWalk:
    """One pass over the chunks of a PNG up to IEND, counting against the caps."""

    def __init__(self, data: bytes | bytearray, limits: ImageLimits) -> None:
        self.data, self.limits = data, limits
        self.chunks = self.ancillary = self.ancillary_bytes = self.stream = self.idat = 0
        self.size: ImageSize | None = None
        self.exif: bytes | None = None

    def run(self) -> Header:
        data, limits, pos, end = self.data, self.limits, 8, len(self.data)
        while pos + 8 <= end:
            length, kind = struct.unpack_from(">I4s", data, pos)
            self.chunks += 1
            if self.chunks > limits.max_png_chunks:
                raise _over("more chunks than allowed:", self.chunks, limits.max_png_chunks,
                            "max_png_chunks")
            if not _CHUNK_TYPE.fullmatch(kind) or length > 0x7FFFFFFF:
                raise InvalidImage(f"PNG chunk at offset {pos} is broken (type {kind!r})")
            body, pos = pos + 8, pos + 12 + length
            if pos > end:
                break  # cut inside a chunk: the decoder reports it as truncated
            if kind == b"IEND":
                break  # what follows IEND is never decoded
            if kind == b"IHDR":
                self._ihdr(body, length)
            elif kind == b"IDAT":
                self.idat += length
            elif kind[0] & 0x20 and kind not in _PIXEL_CHUNKS:  # lower-case first letter
                self._ancillary(kind, body, length)
        if self.size is None:
            raise InvalidImage("PNG has no image header (IHDR)")
        self._idat_fits()
        return Header("PNG", self.size, self.exif, stream=self.stream)

    def _idat_fits(self) -> None:
        """Image data no larger than its pixels could need: deflate adds at most 5 bytes per
        65,535 stored, so more is padding, such as empty dynamic-Huffman blocks for which
        zlib rebuilds its tables every 11 bytes (10 MB on a 64x48 image: 1.5 s to inflate).
        Padding within this bound on a large image remains: see the README's cost notes."""
        bound = self.stream + self.stream // 64 + 4096
        if self.idat > bound:
            raise ImageTooComplex(
                f"image has {self.idat} bytes of image data (IDAT) for {self.stream} bytes of "
                f"pixels; at most {bound} can be needed. Re-encode the image (e.g. save it "
                "again with a standard encoder) to drop the padding")

    def _ihdr(self, body: int, length: int) -> None:
        # Pillow decodes by the LAST IHDR it reads; the checks here must see the same one.
        if self.size is not None:
            raise InvalidImage("PNG has two image headers (IHDR); a decoder may use either")
        if length != 13:
            raise InvalidImage(f"PNG image header (IHDR) is {length} bytes, not 13")
        width, height, depth, colour = struct.unpack_from(">IIBB", self.data, body)
        self.size = (width, height)
        check_size(self.size, self.limits)
        interlaced = length >= 13 and self.data[body + 12] == 1
        self.stream = _png_stream(width, height, depth, colour, interlaced)

    def _ancillary(self, kind: bytes, body: int, length: int) -> None:
        limits = self.limits
        self.ancillary += 1
        self.ancillary_bytes += length
        if self.ancillary > limits.max_png_ancillary_chunks:
            raise _over("more ancillary chunks than allowed:", self.ancillary,
                        limits.max_png_ancillary_chunks, "max_png_ancillary_chunks")
        if self.ancillary_bytes > limits.max_png_ancillary_bytes:
            raise _over("ancillary chunk bytes:", self.ancillary_bytes,
                        limits.max_png_ancillary_bytes, "max_png_ancillary_bytes")
        if kind == b"eXIf":
            if self.exif is not None:
                raise InvalidImage("PNG has two eXIf chunks; a decoder may use either")
            if length > limits.max_exif_bytes:
                raise _over("EXIF bytes:", length, limits.max_exif_bytes, "max_exif_bytes")
            self.exif = bytes(self.data[body:body + length])


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_stream(width: int, height: int, depth: int, colour: int, interlaced: bool) -> int:
    row = 1 + (width * _PNG_CHANNELS.get(colour, 4) * max(1, depth) + 7) // 8
    # Adam7 unfilters seven passes of partial rows and scatters them: counted as 5/4.
    return row * height * (5 if interlaced else 4) // 4


# --- other formats: size only (and WebP's EXIF chunk) ---------------------------------------


def _simple_size(fmt: str, data: bytes | bytearray) -> ImageSize | None:
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


_WEBP_MAX_CHUNKS = 64  # VP8X files hold a handful (ICCP, ANIM, frames, EXIF, XMP)


def _webp_exif(data: bytes | bytearray) -> bytes | None:
    pos = 12
    for _ in range(_WEBP_MAX_CHUNKS):
        if pos + 8 > len(data):
            return None
        kind, length = struct.unpack_from("<4sI", data, pos)
        if kind == b"EXIF":
            blob = bytes(data[pos + 8:pos + 8 + length])
            return blob[6:] if blob.startswith(_EXIF_ID) else blob
        pos += 8 + length + (length & 1)
    return None
