"""Output helpers shared by every handler: labels from `index_to_name.json`, softmax top-k,
and the one JSON encoder of every answer.

Kept apart from the image code so the text classifier and the detector do not import the image
classifier to format their answers. `top_k` works on the whole batch at once: softmax, top-k and
rounding are tensor operations, and one `tolist()` per batch hands Python its numbers.
`TopKJson` goes one step further for the plain path: it writes each row's JSON text directly
(the same bytes `dumps(top_k(...)[i])` gives), without building a dict per prediction and
walking it again in the encoder; that was about a fifth of a text row's cost at batch 16.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from secure_handler.errors import ConfigurationError, InferenceFailed

__all__ = ["MAX_LABELS", "NOT_JSON", "JsonText", "TopKJson", "dumps", "load_labels", "top_k",
           "top_k_json"]

MAX_LABELS = 100_000
#: The message of a result that cannot be sent as JSON (its row alone gets 500).
NOT_JSON = "the model's output is not JSON"

#: The encoder of every answer: compact, ASCII, and NaN/Infinity refused (they are not JSON).
#: One instance: `json.dumps` with options builds a new encoder per call.
dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


class JsonText(str):
    """A result already written as JSON text: the base handler sends it unchanged."""

    __slots__ = ()


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
    values, classes = _top(logits, k, digits)
    return [
        {"predictions": [{"label": labels.get(c, str(c)), "class": c, "probability": p}
                         for p, c in zip(row_p, row_c, strict=True)]}
        for row_p, row_c in zip(values.tolist(), classes.tolist(), strict=True)
    ]


def _top(logits: torch.Tensor, k: int, digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.detach().to(torch.float64).cpu(), dim=1)
    values, classes = probs.topk(min(k, probs.shape[1]), dim=1)
    # Rounded in float64 for the whole batch: k / 10**digits lands on the double that
    # Python's round() gives, whose repr is the short decimal a JSON encoder writes.
    return torch.round(values, decimals=digits), classes


class _Heads(dict[int, str]):
    """class → the JSON text of a prediction up to its probability, made on first use (so a
    100,000-label file costs nothing until its classes are predicted)."""

    __slots__ = ("labels",)

    def __init__(self, labels: dict[int, str]) -> None:
        super().__init__()
        self.labels = labels

    def __missing__(self, c: int) -> str:
        head = f'{{"label":{dumps(self.labels.get(c, str(c)))},"class":{c},"probability":'
        self[c] = head
        return head


class TopKJson:
    """`top_k` as JSON text, one row per result, in one pass over the batch.

    Each row is exactly `dumps(top_k(...)[i])`: the same keys in the same order, labels
    escaped by the same encoder, and probabilities written by `float.__repr__`, which is what
    the encoder writes for a float. A row that `dumps` would refuse (a non-finite probability
    from NaN or infinite logits, or a label that is not JSON) is an `InferenceFailed` for
    that row alone. A label's JSON is kept from its first use while the label map is the same
    object: a handler that changes labels while serving assigns a new map.
    """

    __slots__ = ("_heads",)

    def __init__(self) -> None:
        self._heads = _Heads({})

    def __call__(self, logits: torch.Tensor, labels: dict[int, str], k: int,
                 digits: int) -> list[JsonText | InferenceFailed]:
        if labels is not self._heads.labels:
            self._heads = _Heads(labels)
        heads = self._heads
        values, classes = _top(logits, k, digits)
        rows: list[JsonText | InferenceFailed] = []
        for row_p, row_c in zip(values.tolist(), classes.tolist(), strict=True):
            # Probabilities lie in [0, 1], so their sum cannot overflow: it is finite exactly
            # when every one is (a NaN or infinity carries through the sum).
            try:
                if not math.isfinite(sum(row_p)):
                    raise ValueError("non-finite probability")
                items = [heads[c] + repr(p) + "}" for p, c in zip(row_p, row_c, strict=True)]
            except (TypeError, ValueError):  # as dumps() refusing this row's answer
                rows.append(InferenceFailed(NOT_JSON))
                continue
            rows.append(JsonText('{"predictions":[' + ",".join(items) + "]}"))
        return rows


def top_k_json(handler: Any, logits: torch.Tensor) -> list[JsonText | InferenceFailed]:
    """A classifier's `top_k` answers as JSON text: its `label_map`, `limits.top_k` and
    `limits.probability_digits` as they are now; its `TopKJson` is made on first use (so a
    subclass whose `setup()` does not call the library's still gets one)."""
    answers = vars(handler).get("_top_k_json")
    if not isinstance(answers, TopKJson):
        answers = handler._top_k_json = TopKJson()
    limits = handler.limits
    return answers(logits, handler.label_map, limits.top_k, limits.probability_digits)
