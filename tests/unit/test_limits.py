"""Limits models: safe defaults, strict keys, overrides."""

from __future__ import annotations

import pytest

from secure_handler import ConfigurationError, ImageClassifierLimits
from secure_handler.limits import build_limits


def test_safe_defaults_are_the_seed_values() -> None:
    limits = build_limits(ImageClassifierLimits, None)
    assert limits.max_request_bytes == 10 * 1024 * 1024
    assert limits.max_batch_size == 32
    assert limits.max_image_side == 4096
    assert limits.allowed_formats == ("PNG", "JPEG")
    assert (limits.top_k, limits.probability_digits) == (5, 4)


def test_yaml_wins_over_class_overrides_and_formats_are_normalised() -> None:
    limits = build_limits(ImageClassifierLimits, {"allowed_formats": ["jpeg", "webp"]},
                          {"allowed_formats": ("PNG",), "top_k": 2})
    assert limits.allowed_formats == ("JPEG", "WEBP")
    assert limits.top_k == 2


def test_profile_key_from_torchserve_is_tolerated() -> None:
    assert build_limits(ImageClassifierLimits, {"profile": True}).top_k == 5


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"max_image_sides": 5}, "unknown key `max_image_sides`"),
        ({"max_request_bytes": 0}, "`max_request_bytes`"),
        ({"allowed_formats": []}, "at least one format"),
        ({"std": [0.1, 0, 0.1]}, "every std must be > 0"),
        ({"model_sha256": "abc"}, "`model_sha256`"),
    ],
)
def test_bad_keys_are_named(config: dict, needle: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build_limits(ImageClassifierLimits, config)
    assert needle in str(info.value)


def test_handler_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigurationError, match="must be a mapping"):
        build_limits(ImageClassifierLimits, ["max_request_bytes"])  # type: ignore[arg-type]
