"""The public surface: sorted, complete, importable; every error code unique and typed."""

from __future__ import annotations

import inspect

import secure_handler
from secure_handler import errors


def test_all_is_sorted_and_importable() -> None:
    names = [n for n in secure_handler.__all__ if n != "__version__"]
    assert names == sorted(names)
    for name in secure_handler.__all__:
        assert hasattr(secure_handler, name), name


def test_every_error_class_is_exported_with_a_unique_code() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, errors.SecureHandlerError)]
    exported = {getattr(secure_handler, n) for n in secure_handler.__all__}
    assert set(classes) <= exported
    # A code has one class in the table; a subclass may only narrow its parent's code.
    for cls in classes:
        owner = errors.ERROR_TABLE[cls.code].cls
        assert owner is cls or issubclass(owner, cls), cls
    for cls in classes:
        assert 400 <= cls.status < 600
        assert cls.code.islower()
        assert " " not in cls.code


def test_error_body_shape() -> None:
    body = errors.ImageTooLarge("too big").to_body()
    assert body == {"error": {"code": "image_too_large", "message": "too big"}}
