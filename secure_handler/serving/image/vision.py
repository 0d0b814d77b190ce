"""What the image classifier and the object detector share: reading and checking an image.

Both go through `read_payload` (the one envelope reader), `open_image` (structural caps,
header limits, EXIF orientation) and `pixels` (the one decode path, decode.py), so both
refuse exactly the same inputs with the same statuses and codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from PIL import Image

from secure_handler.limits import ImageLimits
from secure_handler.serving import envelope
from secure_handler.serving.base import SecureBaseHandler
from secure_handler.serving.image import decode as images
from secure_handler.serving.image import formats

__all__ = ["OpenedImage", "SecureVisionHandler"]

#: An image whose header passed every check; pixels not decoded yet.
OpenedImage = images.Opened

# Room for the JSON envelope around a base64 field.
_JSON_SLACK = 4096


class SecureVisionHandler(SecureBaseHandler):
    """Shared image input: raw bytes, base64 text, or JSON `{"data"|"image": base64}`."""

    limits_model: ClassVar[type[ImageLimits]] = ImageLimits
    json_fields: ClassVar[tuple[str, ...]] = ("data", "image")

    def read_payload(self, row: Mapping[str, Any], idx: int) -> bytes | bytearray:
        """The image bytes of one request, within `max_request_bytes` (decoded size)."""
        limits: ImageLimits = self.limits
        json_limit = envelope.b64_limit(limits.max_request_bytes) + _JSON_SLACK
        found = envelope.read(row, self.context.get_all_request_header(idx), json_limit,
                              "image/jpeg` or `application/octet-stream")
        if not found.is_json:
            formats.check_declared_type(found.content_type, limits.allowed_formats)
        return envelope.binary_payload(found, limits.max_request_bytes, self.json_fields,
                                       lambda value: formats.sniff_format(value) is not None)

    def open_image(self, data: bytes | bytearray) -> OpenedImage:
        """Magic bytes against the allowlist, then the structural and header checks."""
        limits: ImageLimits = self.limits
        fmt = formats.check_format(data, limits.allowed_formats)
        return images.open_image(data, fmt, limits)

    def pixels(self, opened: OpenedImage, need: tuple[int, int] | None) -> Image.Image:
        """Decode (at least `need`, shown pixels), orient and convert to RGB."""
        return images.decode(opened, need)
