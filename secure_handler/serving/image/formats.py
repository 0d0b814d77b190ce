"""Which image format a payload is: magic bytes, and the declared content type, both against
the allowlist (415 `unsupported_media_type` otherwise), before anything else reads the bytes.
"""

from __future__ import annotations

from secure_handler.errors import UnsupportedMediaType

__all__ = ["check_declared_type", "check_format", "sniff_format"]

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
