"""Limits and settings: one pydantic model per handler kind.

Values come from three places, later ones winning: the model's safe defaults, class attributes
of the user's handler subclass with the same name, and the `handler:` section of the MAR's
`model-config.yaml`. Unknown keys and invalid values fail `initialize`, naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from secure_handler.errors import ConfigurationError, MalformedRequest, PayloadTooLarge

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "MAX_JSON_INT_DIGITS",
    "MAX_JSON_ITEMS",
    "BaseLimits",
    "ImageClassifierLimits",
    "ImageFormat",
    "ImageLimits",
    "ObjectDetectorLimits",
    "RequestProtocol",
    "TextClassifierLimits",
    "TextLimits",
    "bounded_json_int",
    "build_limits",
    "check_json_items",
    "json_items",
]

MiB = 1024 * 1024

#: Defaults that tools outside the handlers read (config sizing, client, gateway): defined here,
#: once, and used by the limits models below.
DEFAULT_MAX_REQUEST_BYTES = 10 * MiB
DEFAULT_MAX_BATCH_SIZE = 32
#: The largest answer a client or the gateway reads back (a detector's JSON stays far below).
DEFAULT_MAX_RESPONSE_BYTES = 16 * MiB
#: The most objects, arrays and elements (counted as `{`, `[` and `,`, inside strings too) a
#: JSON request body may hold before anything parses it, in the worker and in the gateway:
#: it bounds the parser's work and memory (a 14 MB body of `{}` is 4.7 million dicts: 3 s
#: and 350 MB with a duplicate-key hook), far above what a few fields or instances need.
MAX_JSON_ITEMS = 65_536
#: Digits a JSON integer may have there (Python converts up to 4,300 digits in quadratic
#: time: 2,430 of them held the gateway's event loop for 350 ms).
MAX_JSON_INT_DIGITS = 64

ImageFormat = Literal["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]
#: Request protocols a handler can read (see `secure_handler.serving.protocols`).
RequestProtocol = Literal["torchserve", "kserve_v1", "oip_v2"]

# Keys TorchServe itself or other tools put in the `handler:` section; they are not limits
# but must not fail validation either.
PASSTHROUGH_KEYS = frozenset({"profile"})


class BaseLimits(BaseModel):
    """Settings every handler kind shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_request_bytes: int = Field(DEFAULT_MAX_REQUEST_BYTES, gt=0, le=1024 * MiB)
    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, gt=0, le=4096)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    require_pin: bool = False
    warmup: bool = False
    # What a model reads: TorchServe routes /predictions, KServe v1 and OIP v2 bodies to the
    # worker anyway; a body in a protocol that is off gets 400 naming this setting.
    protocols: tuple[RequestProtocol, ...] = Field(
        ("torchserve", "kserve_v1", "oip_v2"), min_length=1)
    # Instances in one v1/v2 request; each takes a batch slot, so the cap in force is never
    # above max_batch_size.
    max_instances_per_request: int = Field(8, gt=0, le=4096)


class _OutputLimits(BaseModel):
    top_k: int = Field(5, gt=0, le=1000)
    probability_digits: int = Field(4, ge=0, le=10)


class _Normalization(BaseModel):
    """Per-channel `(x - mean) / std` after scaling pixels to 0..1."""

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v <= 0 for v in value):
            raise ValueError("every std must be > 0")
        return value


class ImageLimits(BaseLimits):
    """Checks on every image, read from the header before any pixel is decoded."""

    max_image_side: int = Field(4096, gt=0, le=65535)
    # Capped at Pillow's default MAX_IMAGE_PIXELS, which we never change: our header check
    # then always refuses first, and Pillow's own bomb check stays a silent backstop.
    max_image_pixels: int = Field(4096 * 4096, gt=0, le=89_478_485)
    max_aspect_ratio: float = Field(20.0, ge=1.0)
    allowed_formats: tuple[ImageFormat, ...] = ("PNG", "JPEG")
    animated: Literal["reject", "first_frame"] = "reject"
    max_frames: int = Field(100, gt=0, le=100_000)
    # Rows of a batch decode in parallel (Pillow and torch release the GIL): measured 1.4x
    # end to end on 2 cores with the tiny model; 0 decodes on the worker's thread.
    decode_threads: int = Field(2, ge=0, le=64)
    # Structural caps, checked before Pillow reads the file (README "Cost budget"): each
    # bounds work that grows with a count rather than with pixels. Over one: 422
    # image_too_complex. The defaults are well above what cameras and encoders write.
    max_jpeg_scans: int = Field(32, gt=0, le=1000)  # progressive JPEGs use about 10
    max_jpeg_markers: int = Field(256, gt=0, le=100_000)
    max_jpeg_metadata_segments: int = Field(64, gt=0, le=10_000)  # APPn and COM
    max_jpeg_fill_bytes: int = Field(1024, ge=0, le=10 * MiB)
    # DQT tables and Photoshop APP13 resources: the JPEG header bytes Pillow parses in Python.
    max_jpeg_parsed_bytes: int = Field(256 * 1024, ge=0, le=10 * MiB)
    max_png_chunks: int = Field(4096, gt=0, le=1_000_000)  # libpng writes 8 KiB IDATs
    max_png_ancillary_chunks: int = Field(32, ge=0, le=100_000)
    max_png_ancillary_bytes: int = Field(2 * MiB, ge=0, le=1024 * MiB)
    max_exif_bytes: int = Field(64 * 1024, ge=0, le=16 * MiB)  # one JPEG APP1 segment
    max_exif_ifds: int = Field(8, gt=0, le=1000)
    max_exif_entries: int = Field(1024, gt=0, le=100_000)
    # Peak memory of one image's full-size decode and RGB conversion, estimated from its
    # header before decoding (decode.estimate).
    max_decode_memory: int = Field(176 * MiB, gt=0, le=64 * 1024 * MiB)

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


class ImageClassifierLimits(ImageLimits, _OutputLimits, _Normalization):
    """Limits and transform of `SecureImageClassifier` (defaults: ImageNet, 256 → 224)."""

    resize_size: int = Field(256, gt=0, le=4096)
    crop_size: int = Field(224, gt=0, le=4096)
    # Who resamples the crop box: torch's antialiased uint8 kernel (SIMD; measured 0.8 vs
    # 1.9 ms per 500x375 JPEG here) or Pillow's bilinear.
    resampler: Literal["pillow", "torch"] = "torch"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)



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


# --- text -----------------------------------------------------------------------------------

_PLAIN_FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class TextLimits(BaseLimits):
    """Checks on every text, and the tokenizer that turns it into ids (see `text.py`)."""

    # Upper bounds keep every setting within the per-request budget (README, "Cost budget"):
    # 1,000,000 characters of the costliest text measured about 0.6 s CPU and 30 MB here.
    max_request_bytes: int = Field(64 * 1024, gt=0, le=16 * MiB)
    max_text_chars: int = Field(10_000, gt=0, le=1_000_000)
    max_tokens: int = Field(512, gt=0, le=1_000_000)
    truncate: bool = False
    normalize: Literal["NFC", "NFKC"] = "NFKC"
    # Invisible (default-ignorable) characters: removed, so the model reads what a person
    # reads, or refused with 422 invalid_text.
    ignorables: Literal["remove", "reject"] = "remove"
    # Non-starters in a row, checked before normalisation (whose reordering is quadratic in
    # a run); 30 is Unicode's stream-safe limit (UAX #15).
    max_combining_marks: int = Field(30, gt=0, le=255)
    reject_control_chars: bool = True
    reject_bidi_controls: bool = True
    tokenizer: Literal["auto", "word", "byte"] = "auto"
    vocab_file: str = Field("vocab.json", pattern=_PLAIN_FILE_NAME)
    max_vocab_entries: int = Field(1_000_000, gt=0, le=50_000_000)
    unk_token: str = Field("<unk>", min_length=1)
    pad_token: str = Field("<pad>", min_length=1)
    lowercase: bool = True
    token_pattern: str = r"[a-z0-9']+"

    @field_validator("token_pattern")
    @classmethod
    def _usable_pattern(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from exc
        if compiled.fullmatch(""):
            raise ValueError("must not match the empty string (every position would be a token)")
        if compiled.groups:
            raise ValueError("must not have capturing groups; write (?:...) instead")
        return value


class TextClassifierLimits(TextLimits, _OutputLimits):
    """Limits and model input of `SecureTextClassifier`."""

    model_input: Literal["ids_mask", "bag"] = "ids_mask"
    # bucketed: rows sorted by length, cut into sub-batches where a cut saves more padded
    # positions than bucket_split_tokens (the price of one more forward; auto: measured once
    # at start); longest: one batch padded to its longest row; max_tokens: padded to
    # max_tokens (fixed-shape models).
    padding: Literal["bucketed", "longest", "max_tokens"] = "bucketed"
    bucket_split_tokens: int | Literal["auto"] = Field("auto", union_mode="left_to_right")

    @field_validator("bucket_split_tokens")
    @classmethod
    def _split_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 1_000_000:
            raise ValueError("must be auto or between 0 and 1,000,000 positions")
        return value


# --- object detection -------------------------------------------------------------------------


class ObjectDetectorLimits(ImageLimits, _Normalization):
    """Model contract, resize and output settings of `SecureObjectDetector`."""

    model_contract: Literal["auto", "list", "tensor"] = "auto"
    input_size: tuple[int, int] | None = None  # (height, width) of a `tensor` model's input
    resize: Literal["stretch", "letterbox"] = "stretch"
    letterbox_fill: int = Field(114, ge=0, le=255)
    max_model_side: int = Field(1333, gt=0, le=8192)
    score_threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_detections: int = Field(100, gt=0, le=10_000)
    box_digits: int = Field(1, ge=0, le=6)
    score_digits: int = Field(4, ge=0, le=10)

    @field_validator("input_size", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("input_size")
    @classmethod
    def _side_range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not all(0 < side <= 2048 for side in value):
            raise ValueError("each side must be between 1 and 2048 pixels")
        return value


def json_items(body: str | bytes | bytearray) -> int:
    """An upper bound on the containers and values `body` parses into (three C scans)."""
    if isinstance(body, str):
        return body.count("{") + body.count("[") + body.count(",")
    return body.count(b"{") + body.count(b"[") + body.count(b",")


def check_json_items(body: str | bytes | bytearray) -> None:
    """Raise PayloadTooLarge when a request body may parse into more than `MAX_JSON_ITEMS`
    items (the worker's JSON reader and the gateway's envelope check both call this)."""
    items = json_items(body)
    if items > MAX_JSON_ITEMS:
        raise PayloadTooLarge(
            f"the JSON body holds about {items} objects, arrays and elements; the limit is "
            f"{MAX_JSON_ITEMS}: send fewer or smaller fields or instances")


def bounded_json_int(digits: str) -> int:
    """`parse_int` for request JSON: at most `MAX_JSON_INT_DIGITS` digits, else a 400."""
    if len(digits) > MAX_JSON_INT_DIGITS + 1:  # a sign counts as one
        raise MalformedRequest(
            f"the JSON body holds an integer of {len(digits)} characters; at most "
            f"{MAX_JSON_INT_DIGITS} digits are read")
    return int(digits)
