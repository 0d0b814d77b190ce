"""Limits and settings: one pydantic model per handler kind.

Values come from three places, later ones winning: the model's safe defaults, class attributes
of the user's handler subclass with the same name, and the `handler:` section of the MAR's
`model-config.yaml`. Unknown keys and invalid values fail `initialize`, naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigurationError

__all__ = [
    "BaseLimits",
    "ImageClassifierLimits",
    "ImageFormat",
    "ImageLimits",
    "build_limits",
]

MiB = 1024 * 1024

ImageFormat = Literal["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]

# Keys TorchServe itself or other tools put in the `handler:` section; they are not limits
# but must not fail validation either.
PASSTHROUGH_KEYS = frozenset({"profile"})


class BaseLimits(BaseModel):
    """Settings every handler kind shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_request_bytes: int = Field(10 * MiB, gt=0, le=1024 * MiB)
    max_batch_size: int = Field(32, gt=0, le=4096)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    require_pin: bool = False
    warmup: bool = False


class _OutputLimits(BaseModel):
    top_k: int = Field(5, gt=0, le=1000)
    probability_digits: int = Field(4, ge=0, le=10)


class ImageLimits(BaseLimits):
    """Checks on every image, read from the header before any pixel is decoded."""

    max_image_side: int = Field(4096, gt=0, le=65535)
    max_image_pixels: int = Field(4096 * 4096, gt=0, le=1 << 31)
    max_aspect_ratio: float = Field(20.0, ge=1.0)
    allowed_formats: tuple[ImageFormat, ...] = ("PNG", "JPEG")
    animated: Literal["reject", "first_frame"] = "reject"
    max_frames: int = Field(100, gt=0, le=100_000)
    decode_threads: int = Field(0, ge=0, le=64)

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _upper_formats(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return tuple(v.upper() if isinstance(v, str) else v for v in value)
        return value

    @field_validator("allowed_formats")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name at least one format")
        return tuple(dict.fromkeys(value))


class ImageClassifierLimits(ImageLimits, _OutputLimits):
    """Limits and transform of `SecureImageClassifier` (defaults: ImageNet, 256 → 224)."""

    resize_size: int = Field(256, gt=0, le=4096)
    crop_size: int = Field(224, gt=0, le=4096)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v <= 0 for v in value):
            raise ValueError("every std must be > 0")
        return value


LimitsT = TypeVar("LimitsT", bound=BaseLimits)


def build_limits(
    model: type[LimitsT],
    config: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None = None,
) -> LimitsT:
    """Validate `config` (the `handler:` section) over `overrides` into `model`.

    Raises:
        ConfigurationError: naming every unknown or invalid key and how to fix it.
    """
    if config is not None and not isinstance(config, Mapping):
        raise ConfigurationError(
            "model-config.yaml `handler:` must be a mapping of limit names to values; "
            f"got {type(config).__name__}"
        )
    values: dict[str, Any] = dict(overrides or {})
    values.update({k: v for k, v in (config or {}).items() if k not in PASSTHROUGH_KEYS})
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigurationError(_describe(model, exc)) from exc


def _describe(model: type[BaseModel], exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key `{key}`")
        else:
            problems.append(f"`{key}`: {err['msg']} (got {err.get('input')!r})")
    known = ", ".join(sorted(model.model_fields))
    return (
        f"invalid handler config for {model.__name__}: " + "; ".join(problems)
        + f". Fix model-config.yaml `handler:`; known keys: {known}"
    )
