"""secure_handler: hardened, fast TorchServe handlers and the tooling around them.

Subclass a handler in your `handler.py` and archive that file::

    from secure_handler import SecureImageClassifier

    class MyHandler(SecureImageClassifier):
        pass
"""

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
from .handler import SecureBaseHandler
from .image_classifier import SecureImageClassifier
from .limits import (
    BaseLimits,
    ImageClassifierLimits,
    ImageLimits,
    ObjectDetectorLimits,
    TextClassifierLimits,
    TextLimits,
)
from .object_detector import SecureObjectDetector
from .text_classifier import SecureTextClassifier

__version__ = "0.1.0"

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
