"""The EXIF Orientation tag, read by our own bounded parser; orientation applied by transpose.

Pillow's `ImageOps.exif_transpose` re-serialises every EXIF value after rotating (seconds and
hundreds of MB for a 1 MB EXIF of RATIONALs or SHORTs shared by several IFDs), and a PNG's
`getexif()` decodes the whole image first. Here the blob (already capped at
`max_exif_bytes` by header.py) is walked IFD by IFD, at most `max_exif_ifds` IFDs and
`max_exif_entries` entries in all, and only IFD0's Orientation is read. The XMP
`tiff:Orientation` is not used (browsers ignore it too).
"""

from __future__ import annotations

import struct

from PIL import Image

from secure_handler.errors import ImageTooComplex, InvalidImage
from secure_handler.limits import ImageLimits

__all__ = ["TRANSPOSED", "orient", "orientation"]

_ORIENTATION = 0x0112
# Pointers to sub-IFDs (ExifIFD, GPS, Interoperability) that a full EXIF reader follows;
# walked here only to count them, so a crafted blob cannot make any reader loop.
_SUB_IFDS = {0x8769, 0x8825, 0xA005}
_SHORT, _LONG, _IFD = 3, 4, 13

#: Orientations that turn the stored pixels by 90 degrees: width and height swap.
TRANSPOSED = frozenset({5, 6, 7, 8})
_METHOD = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(blob: bytes | None, limits: ImageLimits) -> int:
    """EXIF orientation 1..8 (1 when absent or out of range, as browsers treat it).

    Raises:
        ImageTooComplex: more IFDs or entries than the caps allow (cycles included).
        InvalidImage: the blob is not a TIFF structure, or an IFD lies outside it.
    """
    if not blob:
        return 1
    if len(blob) > limits.max_exif_bytes:
        raise _too_complex("EXIF bytes", len(blob), limits.max_exif_bytes, "max_exif_bytes")
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(blob[:4])
    if order is None:
        raise InvalidImage("EXIF metadata is not a TIFF structure; " + _FIX)
    (first,) = struct.unpack_from(order + "I", blob, 4)
    queue, visited, entries, found = [first], 0, 0, 1
    while queue:
        visited += 1
        if visited > limits.max_exif_ifds:
            raise _too_complex("EXIF IFDs", visited, limits.max_exif_ifds, "max_exif_ifds")
        table, following = _ifd(blob, order, queue.pop(0))
        entries += len(table) // 12
        if entries > limits.max_exif_entries:
            raise _too_complex("EXIF entries", entries, limits.max_exif_entries,
                               "max_exif_entries")
        for tag, kind, n, value in struct.iter_unpack(order + "HHI4s", table):
            if tag == _ORIENTATION and visited == 1 and n == 1 and kind in (_SHORT, _LONG):
                found = struct.unpack_from(order + ("H" if kind == _SHORT else "I"), value)[0]
            elif tag in _SUB_IFDS and n == 1 and kind in (_LONG, _IFD):
                queue.append(struct.unpack_from(order + "I", value)[0])
        if following:
            queue.append(following)
    return found if found in _METHOD else 1


def _ifd(blob: bytes, order: str, offset: int) -> tuple[bytes, int]:
    """One IFD's entry table (12 bytes an entry) and the offset of the IFD after it."""
    if offset + 2 > len(blob):
        raise InvalidImage(f"EXIF IFD at {offset} lies outside the EXIF data; " + _FIX)
    (count,) = struct.unpack_from(order + "H", blob, offset)
    table_end = offset + 2 + 12 * count
    if table_end + 4 > len(blob):
        raise InvalidImage(f"EXIF IFD at {offset} runs past the EXIF data; " + _FIX)
    (following,) = struct.unpack_from(order + "I", blob, table_end)
    return blob[offset + 2:table_end], following


def orient(img: Image.Image, value: int) -> Image.Image:
    """The image turned upright for EXIF orientation `value` (the same object for 1)."""
    method = _METHOD.get(value)
    return img if method is None else img.transpose(method)


_FIX = "remove the metadata (e.g. `exiftool -all= FILE`) or save the image again"


def _too_complex(what: str, count: int, limit: int, key: str) -> ImageTooComplex:
    return ImageTooComplex(
        f"image has {count} {what}; the limit is {limit} (handler.{key}); " + _FIX
    )
