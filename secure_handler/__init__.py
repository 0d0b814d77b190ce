"""secure_handler: hardened, fast TorchServe handlers and the tooling around them."""

from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .limits import BaseLimits, ImageClassifierLimits, ImageLimits

__version__ = "0.1.0"

__all__ = sorted([*_errors_all, "BaseLimits", "ImageClassifierLimits", "ImageLimits"])
