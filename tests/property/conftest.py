"""Hypothesis profiles for the property tests, and the handlers they drive.

Profiles (pick with `SECURE_HANDLER_HYPOTHESIS=<name>`; CI uses the default):

* `secure-handler-ci` (default): 150 examples per test, derandomised (the same examples on
  every run, so CI is reproducible and fast), no example database written to the checkout;
* `secure-handler-long`: 5,000 random examples per test, for a hand-run soak of the decoders.

The profiles are applied per test through `PROFILE` (see `properties.py`), not globally, so
they never change other suites' Hypothesis settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from property.properties import LIMITS, TEXT_LIMITS, Loaded, PeakRss, peak_rss_meter
from support import LABELS, build_tiny_classifier
from support_models import build_text_model, write_text_files

from secure_handler import SecureBaseHandler, SecureImageClassifier, SecureTextClassifier
from secure_handler.testing import make_context

MANIFEST = {"model": {"modelName": "prop", "serializedFile": "model.pt",
                      "handler": "handler.py", "modelVersion": "1.0"}}


def _ready(cls: type[SecureBaseHandler], model_dir: Path, config: dict[str, Any]) -> Loaded:
    ctx = make_context(model_dir, MANIFEST, {"handler": config}, batch_size=4)
    handler = cls()
    handler.initialize(ctx)
    return handler, ctx


@pytest.fixture(scope="session")
def image_handler(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """SecureImageClassifier with the property suite's tighter limits (see LIMITS)."""
    directory = tmp_path_factory.mktemp("prop-image")
    build_tiny_classifier(directory)
    (directory / "index_to_name.json").write_text(json.dumps(LABELS))
    return _ready(SecureImageClassifier, directory, dict(LIMITS))


@pytest.fixture(scope="session")
def text_handler(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """SecureTextClassifier (word vocabulary) with default limits."""
    directory = tmp_path_factory.mktemp("prop-text")
    build_text_model(directory, "ids_mask")
    write_text_files(directory)
    return _ready(SecureTextClassifier, directory, dict(TEXT_LIMITS))


@pytest.fixture
def fresh_peak() -> PeakRss:
    """`reset()`, then `rise()` → bytes the peak RSS rose above the RSS at the reset.

    Linux only: writing 5 to /proc/self/clear_refs resets VmHWM (the peak RSS), so the peak
    of each example can be read without a subprocess.
    """
    meter = peak_rss_meter()
    if meter is None:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    return meter
