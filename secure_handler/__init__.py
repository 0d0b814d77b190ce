"""secure_handler: hardened, fast TorchServe handlers and the tooling around them.

Subclass a handler in your `handler.py` and archive that file::

    from secure_handler import SecureImageClassifier

    class MyHandler(SecureImageClassifier):
        pass
"""

import importlib
from typing import TYPE_CHECKING, Any

from secure_handler.errors import (
    AnimatedImage,
    BatchError,
    BatchLimitExceeded,
    ClientError,
    ConfigurationError,
    ConnectionFailed,
    ConnectionLost,
    EmptyBody,
    Forbidden,
    ForbiddenModelSource,
    FormEncodedBody,
    HeaderFieldsTooLarge,
    ImageTooComplex,
    ImageTooLarge,
    InferenceFailed,
    IntegrityError,
    InvalidBase64,
    InvalidContent,
    InvalidImage,
    InvalidText,
    MalformedRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    OutOfMemory,
    PayloadTooLarge,
    RateLimited,
    RateLimiterUnavailable,
    RequestError,
    RequestTimedOut,
    RequestTimeout,
    ResponseTooLarge,
    SecureHandlerError,
    ServiceUnavailable,
    TextTooLong,
    TooManyInstances,
    TooManyTokens,
    Unauthorized,
    UnavailableError,
    UnexpectedResponse,
    UnsafeModelError,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
)
from secure_handler.limits import (
    BaseLimits,
    ImageClassifierLimits,
    ImageLimits,
    ObjectDetectorLimits,
    TextClassifierLimits,
    TextLimits,
)

if TYPE_CHECKING:
    from secure_handler.serving.base import SecureBaseHandler
    from secure_handler.serving.image.classifier import SecureImageClassifier
    from secure_handler.serving.image.detector import SecureObjectDetector
    from secure_handler.serving.text.classifier import SecureTextClassifier

__version__ = "0.1.0"

# The handlers import torch and TorchServe (seconds, and log lines on stderr); load them on
# first use so the CLI, the client and the gateway start fast.
_LAZY = {
    "SecureBaseHandler": ".serving.base",
    "SecureImageClassifier": ".serving.image.classifier",
    "SecureObjectDetector": ".serving.image.detector",
    "SecureTextClassifier": ".serving.text.classifier",
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
    "ClientError",
    "ConfigurationError",
    "ConnectionFailed",
    "ConnectionLost",
    "EmptyBody",
    "Forbidden",
    "ForbiddenModelSource",
    "FormEncodedBody",
    "HeaderFieldsTooLarge",
    "ImageClassifierLimits",
    "ImageLimits",
    "ImageTooComplex",
    "ImageTooLarge",
    "InferenceFailed",
    "IntegrityError",
    "InvalidBase64",
    "InvalidContent",
    "InvalidImage",
    "InvalidText",
    "MalformedRequest",
    "MethodNotAllowed",
    "ModelNotFound",
    "NotFound",
    "ObjectDetectorLimits",
    "OutOfMemory",
    "PayloadTooLarge",
    "RateLimited",
    "RateLimiterUnavailable",
    "RequestError",
    "RequestTimedOut",
    "RequestTimeout",
    "ResponseTooLarge",
    "SecureBaseHandler",
    "SecureHandlerError",
    "SecureImageClassifier",
    "SecureObjectDetector",
    "SecureTextClassifier",
    "ServiceUnavailable",
    "TextClassifierLimits",
    "TextLimits",
    "TextTooLong",
    "TooManyInstances",
    "TooManyTokens",
    "Unauthorized",
    "UnavailableError",
    "UnexpectedResponse",
    "UnsafeModelError",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_body",
    "__version__",
]
