"""Fixtures for the attack suite: handlers built on TorchServe's real `Context`.

`classifier(**handler_config)` returns a ready `Target` (see harness.py); handlers are cached
per config, since each costs a TorchScript load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from attacks.harness import MANIFEST, Target
from support import LABELS, build_tiny_classifier
from support_models import build_detector, build_text_model, write_detector_labels, write_text_files

from secure_handler import SecureImageClassifier, SecureObjectDetector, SecureTextClassifier
from secure_handler.testing import make_context


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive: the tiny TorchScript classifier and its labels."""
    directory = tmp_path_factory.mktemp("tiny-model")
    build_tiny_classifier(directory)
    (directory / "index_to_name.json").write_text(json.dumps(LABELS))
    return directory


@pytest.fixture(scope="session")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Target:
    """The shape detector (list contract, default image limits) on a real Context."""
    directory = tmp_path_factory.mktemp("shape-detector")
    build_detector(directory, "list")
    write_detector_labels(directory)
    ctx = make_context(directory, MANIFEST, {"handler": {"model_contract": "list"}},
                       batch_size=8)
    handler = SecureObjectDetector()
    handler.initialize(ctx)
    return Target(handler, ctx)


@pytest.fixture(scope="session")
def classifier(model_dir: Path) -> Iterator[Callable[..., Target]]:
    """`classifier(**handler_config)` → a ready `Target` (cached per config)."""
    cache: dict[str, Target] = {}

    def build(batch_size: int = 8, **config: Any) -> Target:
        key = json.dumps([batch_size, config], sort_keys=True)
        if key not in cache:
            ctx = make_context(model_dir, MANIFEST, {"handler": config}, batch_size=batch_size)
            handler = SecureImageClassifier()
            handler.initialize(ctx)
            cache[key] = Target(handler, ctx)
        return cache[key]

    yield build
    cache.clear()


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The keyword text model (ids + mask), its JSON vocabulary and labels."""
    directory = tmp_path_factory.mktemp("text-model")
    build_text_model(directory, "ids_mask")
    write_text_files(directory)
    return directory


@pytest.fixture(scope="session")
def text_classifier(text_model_dir: Path) -> Iterator[Callable[..., Target]]:
    """`text_classifier(**handler_config)` → a ready `Target` running SecureTextClassifier."""
    cache: dict[str, Target] = {}

    def build(batch_size: int = 8, **config: Any) -> Target:
        key = json.dumps([batch_size, config], sort_keys=True)
        if key not in cache:
            ctx = make_context(text_model_dir, MANIFEST, {"handler": config},
                                batch_size=batch_size)
            handler = SecureTextClassifier()
            handler.initialize(ctx)
            cache[key] = Target(handler, ctx)
        return cache[key]

    yield build
    cache.clear()


@pytest.fixture
def target(classifier: Callable[..., Target]) -> Target:
    """The handler with its default limits (PNG and JPEG, 4096 px, 10 MiB, no animation)."""
    return classifier()
