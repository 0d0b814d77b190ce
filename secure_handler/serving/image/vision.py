"""What the image classifier and the object detector share: reading and checking an image.

Validation here is the same for both, so both return the same statuses and codes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image

from secure_handler.errors import InvalidImage, MalformedRequest
from secure_handler.limits import ImageLimits
from secure_handler.serving import envelope as payload
from secure_handler.serving.base import SecureBaseHandler
from secure_handler.serving.image import decode as images

__all__ = ["OpenedImage", "SecureVisionHandler"]

_BASE64_BYTES = re.compile(rb"\s*[A-Za-z0-9+/]+={0,2}\s*")


@dataclass(slots=True)
class OpenedImage:
    """An image whose header passed every check; pixels not decoded yet."""

    image: Image.Image
    format: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


class SecureVisionHandler(SecureBaseHandler):
    """Shared image input: raw bytes, base64 text, or JSON `{"data"|"image": base64}`."""

    limits_model: ClassVar[type[ImageLimits]] = ImageLimits
    json_fields: ClassVar[tuple[str, ...]] = ("data", "image")

    def read_payload(self, row: Mapping[str, Any], idx: int) -> bytes | bytearray:
        """The image bytes of one request, within `max_request_bytes`."""
        limits: ImageLimits = self.limits
        headers = self.context.get_all_request_header(idx)
        found = payload.extract(row, headers)
        value = found.value
        if isinstance(value, (bytes, bytearray)):
            if found.content_type == "application/json":
                raise MalformedRequest("the body is declared as JSON but is not valid JSON")
            images.check_declared_type(found.content_type, limits.allowed_formats)
            payload.check_size(len(value), limits.max_request_bytes)
            if images.sniff_format(value) is None and _BASE64_BYTES.fullmatch(value):
                return payload.decode_base64(value, limits.max_request_bytes)
            return value
        if isinstance(value, str):
            return payload.decode_base64(value, limits.max_request_bytes)
        field = payload.json_field(value, self.json_fields)
        if not isinstance(field, str):
            raise MalformedRequest(
                f"JSON field must be a base64 string; got {type(field).__name__}"
            )
        return payload.decode_base64(field, limits.max_request_bytes)

    def open_image(self, data: bytes | bytearray) -> OpenedImage:
        """Magic bytes against the allowlist, then header limits; no pixel decoded yet."""
        limits: ImageLimits = self.limits
        fmt = images.check_format(data, limits.allowed_formats)
        return OpenedImage(images.open_image(data, fmt, limits), fmt)

    @staticmethod
    def pixels(opened: OpenedImage, draft_to: tuple[int, int] | None) -> Image.Image:
        """Decode, orient and convert to RGB; any decoder failure is `invalid_image`."""
        img = images.load(opened.image, opened.format, draft_to)
        try:
            return images.to_rgb(img)
        except images.DECODE_ERRORS as exc:
            raise InvalidImage(
                f"cannot convert the {img.mode} image to RGB: {images.reason(exc)}"
            ) from exc
