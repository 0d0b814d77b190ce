"""Shared fixtures. Tests under tests/integration (and any that start servers) are marked."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from secure_handler.serving.loading import TRUST_STORE_ENV


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees a trust store or weights-only override from the developer's shell."""
    for name in (TRUST_STORE_ENV, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        monkeypatch.delenv(name, raising=False)
    os.environ.setdefault("TS_DECODE_INPUT_REQUEST", "true")
