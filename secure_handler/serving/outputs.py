"""Output helpers shared by every handler: labels from `index_to_name.json`, softmax top-k.

Kept apart from the image code so the text classifier and the detector do not import the image
classifier to format their answers. `top_k` works on the whole batch at once: softmax, top-k and
rounding are tensor operations, and one `tolist()` per batch hands Python its numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from secure_handler.errors import ConfigurationError

__all__ = ["MAX_LABELS", "load_labels", "top_k"]

MAX_LABELS = 100_000


def load_labels(path: Path) -> dict[int, str]:
    """Read `index_to_name.json`: JSON only, `{"0": "cat", ...}`; validated, never unpickled."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or len(raw) > MAX_LABELS:
        raise ConfigurationError(f"{path.name} must be an object mapping class index to label")
    labels: dict[int, str] = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isdigit()) or not isinstance(value, str):
            raise ConfigurationError(
                f"{path.name}: entry {key!r}: {value!r} must map a class index like \"0\" to a "
                "label string"
            )
        labels[int(key)] = value
    return labels


def top_k(
    logits: torch.Tensor, k: int, digits: int, labels: dict[int, str]
) -> list[dict[str, Any]]:
    """Softmax top-k per row → `{"predictions": [{"label", "class", "probability"}]}`.

    A row with non-finite logits keeps its NaN probabilities: the base handler refuses that
    row alone (its answer is not JSON), and its neighbours are served.
    """
    probs = torch.softmax(logits.detach().to(torch.float64).cpu(), dim=1)
    values, classes = probs.topk(min(k, probs.shape[1]), dim=1)
    # Rounded in float64 for the whole batch: k / 10**digits lands on the double that
    # Python's round() gives, whose repr is the short decimal a JSON encoder writes.
    values = torch.round(values, decimals=digits)
    return [
        {"predictions": [{"label": labels.get(c, str(c)), "class": c, "probability": p}
                         for p, c in zip(row_p, row_c, strict=True)]}
        for row_p, row_c in zip(values.tolist(), classes.tolist(), strict=True)
    ]
