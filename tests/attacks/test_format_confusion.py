"""Formats off the allowlist, magic bytes that lie, and polyglots.

CWE-434 (dangerous file type), CWE-20, CWE-436 (interpretation conflict); ATLAS AML.T0074
(Masquerading). The format is decided by magic bytes only; the declared Content-Type can
narrow it (a declared disallowed type is refused) but never widen it.
"""

from __future__ import annotations

from typing import Any

import pytest
from attacks import craft
from attacks.harness import Target, assert_class, assert_refused
from PIL import Image

from secure_handler.testing import Request


def _pillow(fmt: str, **save: object) -> craft.Builder:
    return lambda: craft.encode(Image.new("RGB", (16, 16), craft.RED), fmt, **save)


DISALLOWED = [
    pytest.param(_pillow("TIFF"), "image/tiff", id="CWE-434-tiff"),
    pytest.param(_pillow("TIFF", compression="tiff_lzw"), "image/tiff", id="CWE-434-tiff-lzw"),
    pytest.param(_pillow("BMP"), "image/bmp", id="CWE-434-bmp"),
    pytest.param(_pillow("WEBP"), "image/webp", id="CWE-434-webp"),
    pytest.param(_pillow("EPS"), "application/postscript", id="CWE-434-eps-ghostscript"),
    pytest.param(craft.psd_header, "image/vnd.adobe.photoshop", id="CWE-434-psd"),
    pytest.param(_pillow("ICO"), "image/x-icon", id="CWE-434-ico"),
    pytest.param(lambda: craft.gif_frames(1), "image/gif", id="CWE-434-gif-off-by-default"),
    pytest.param(lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
                 "application/pdf", id="CWE-434-pdf"),
    pytest.param(lambda: b'<svg xmlns="http://www.w3.org/2000/svg"><script>1</script></svg>',
                 "image/svg+xml", id="CWE-434-svg-script"),
]


@pytest.mark.parametrize(("build", "content_type"), DISALLOWED)
def test_disallowed_format_is_refused(target: Target, build: craft.Builder,
                                      content_type: str) -> None:
    """CWE-434: refused by magic bytes, under its own content type."""
    assert_refused(target.one(build(), content_type), 415, "unsupported_media_type")


@pytest.mark.parametrize(("build", "content_type"), DISALLOWED)
def test_disallowed_format_declared_as_jpeg_is_refused(target: Target, build: craft.Builder,
                                                       content_type: str) -> None:
    """AML.T0074: the same files sent as `image/jpeg`; the bytes decide, not the label."""
    del content_type
    assert_refused(target.one(build(), "image/jpeg"), 415, "unsupported_media_type")


@pytest.mark.parametrize("content_type", ["image/webp", "image/tiff", "image/heic",
                                          "image/svg+xml", "image/x-unknown"])
def test_valid_jpeg_declared_as_disallowed_type_is_refused(target: Target,
                                                          content_type: str) -> None:
    """CWE-436: the client says a disallowed type; we don't second-guess it into JPEG."""
    assert_refused(target.one(craft.solid(), content_type), 415, "unsupported_media_type")


def test_png_signature_followed_by_garbage_is_refused(target: Target) -> None:
    """CWE-20 / AML.T0074: the 8-byte PNG signature, then random bytes."""
    data = craft.PNG_SIGNATURE + bytes(range(256)) * 8
    assert_refused(target.one(data, "image/png"), 422, "invalid_image")


def test_jpeg_soi_followed_by_garbage_is_refused(target: Target) -> None:
    """CWE-20 / AML.T0074: `FF D8 FF` and then text."""
    data = b"\xff\xd8\xff" + b"<?php system($_GET['c']); ?>" * 20
    assert_refused(target.one(data, "image/jpeg"), 422, "invalid_image")


def test_zip_named_jpg_is_refused(target: Target) -> None:
    """CWE-434 / AML.T0074: a ZIP (e.g. a TorchScript archive) uploaded as `x.jpg`."""
    data = craft.zip_archive({"archive/code/__torch__.py": b"def f(): pass\n",
                              "archive/data.pkl": b"\x80\x02}q\x00."})
    assert_refused(target.one(data, "image/jpeg"), 415, "unsupported_media_type")


def test_zip_as_multipart_file_field_is_refused(target: Target) -> None:
    """CWE-434: the same ZIP as a form field named `data` with a `.jpg` filename's type."""
    data = craft.zip_archive({"payload.py": b"import os\n"})
    # The worker keys a form field's content type by the field name.
    field_headers: dict[str, Any] = {"data": {"content-type": "image/jpeg"}}
    request = Request(None, params={"data": bytearray(data)}, headers=field_headers)
    assert_refused(target.send(request)[0], 415, "unsupported_media_type")


def test_png_prefixed_zip_polyglot_is_refused(target: Target) -> None:
    """AML.T0074: PNG signature glued onto a ZIP (readable by zip tools from the end)."""
    data = craft.PNG_SIGNATURE + craft.zip_archive({"x.py": b"print(1)\n"})
    assert_refused(target.one(data, "image/png"), 422, "invalid_image")


@pytest.mark.parametrize(("data", "content_type", "label"), [
    pytest.param(lambda: craft.solid(craft.RED, fmt="JPEG")
                 + craft.zip_archive({"x.py": b"import os\n"}), "image/jpeg", "red",
                 id="AML.T0074-jpeg-plus-zip"),
    pytest.param(lambda: craft.solid(craft.GREEN, fmt="PNG") + b"<script>alert(1)</script>",
                 "image/png", "green", id="AML.T0074-png-plus-html"),
    pytest.param(lambda: craft.jpeg_with_comment(b"<?php echo 1; ?><script>x()</script>"),
                 "image/jpeg", "red", id="AML.T0074-jpeg-com-php-html"),
])
def test_polyglot_with_a_valid_image_is_served_as_pixels_only(
        target: Target, data: craft.Builder, content_type: str, label: str) -> None:
    """AML.T0074 / CWE-434: a genuinely valid image carrying a second file.

    The handler only ever uses decoded pixels, so the rider is inert: the request is
    classified by its picture, and nothing of the payload is reflected in the response.
    """
    result = target.one(data(), content_type)
    assert_class(result, label)
    assert "script" not in str(result[1])
    assert "php" not in str(result[1])
