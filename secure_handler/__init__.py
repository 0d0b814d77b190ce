"""secure_handler: hardened, fast TorchServe handlers and the tooling around them.

Subclass a handler in your `handler.py` and archive that file::

    from secure_handler import SecureImageClassifier

    class MyHandler(SecureImageClassifier):
        pass
"""

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AnimatedImage,
    BatchError,
    BatchLimitExceeded,
    ConfigurationError,
    EmptyBody,
    ImageTooLarge,
    InferenceFailed,
    IntegrityError,
    InvalidBase64,
    InvalidContent,
    InvalidImage,
    InvalidText,
    MalformedRequest,
    OutOfMemory,
    PayloadTooLarge,
    RequestError,
    SecureHandlerError,
    TextTooLong,
    TooManyTokens,
    UnsafeModelError,
    UnsupportedMediaType,
    error_body,
)
from .limits import (
    BaseLimits,
    ImageClassifierLimits,
    ImageLimits,
    ObjectDetectorLimits,
    TextClassifierLimits,
    TextLimits,
)

if TYPE_CHECKING:
    from .handler import SecureBaseHandler
    from .image_classifier import SecureImageClassifier
    from .object_detector import SecureObjectDetector
    from .text_classifier import SecureTextClassifier

__version__ = "0.1.0"

# The handlers import torch and TorchServe (seconds, and log lines on stderr); load them on
# first use so the CLI, the client and the gateway start fast.
_LAZY = {
    "SecureBaseHandler": ".handler",
    "SecureImageClassifier": ".image_classifier",
    "SecureObjectDetector": ".object_detector",
    "SecureTextClassifier": ".text_classifier",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'secure_handler' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "AnimatedImage",
    "BaseLimits",
    "BatchError",
    "BatchLimitExceeded",
    "ConfigurationError",
    "EmptyBody",
    "ImageClassifierLimits",
    "ImageLimits",
    "ImageTooLarge",
    "InferenceFailed",
    "IntegrityError",
    "InvalidBase64",
    "InvalidContent",
    "InvalidImage",
    "InvalidText",
    "MalformedRequest",
    "ObjectDetectorLimits",
    "OutOfMemory",
    "PayloadTooLarge",
    "RequestError",
    "SecureBaseHandler",
    "SecureHandlerError",
    "SecureImageClassifier",
    "SecureObjectDetector",
    "SecureTextClassifier",
    "TextClassifierLimits",
    "TextLimits",
    "TextTooLong",
    "TooManyTokens",
    "UnsafeModelError",
    "UnsupportedMediaType",
    "__version__",
    "error_body",
]
