"""`outputs.TopKJson`: the plain path's JSON text is exactly what encoding `top_k` gives."""

from __future__ import annotations

import json
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_handler.errors import InferenceFailed
from secure_handler.serving.outputs import JsonText, TopKJson, dumps, top_k

# Labels a JSON encoder must escape: quotes, backslashes, controls, non-ASCII, astral.
LABELS = st.dictionaries(st.integers(0, 11), st.text(max_size=12), max_size=12)
LOGITS = st.floats(-60, 60, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 14), st.integers(0, 8), LABELS,
       st.data())
def test_json_text_is_byte_for_byte_the_encoded_objects(rows: int, classes: int, k: int,
                                                          digits: int, labels: dict[int, str],
                                                          data: st.DataObject) -> None:
    values = data.draw(st.lists(LOGITS, min_size=rows * classes, max_size=rows * classes))
    logits = torch.tensor(values, dtype=torch.float32).view(rows, classes)
    expected = [dumps(body) for body in top_k(logits, k, digits, labels)]
    got = TopKJson()(logits, labels, k, digits)
    assert got == expected
    assert all(type(text) is JsonText for text in got)


def test_a_non_finite_row_is_refused_alone() -> None:
    logits = torch.tensor([[1.0, 2.0], [math.nan, 0.0], [math.inf, 0.0], [3.0, -math.inf]])
    got = TopKJson()(logits, {0: "a", 1: "b"}, 2, 4)
    assert isinstance(got[1], InferenceFailed)
    assert isinstance(got[2], InferenceFailed)
    assert json.loads(got[0]) == top_k(logits[:1], 2, 4, {0: "a", 1: "b"})[0]
    # -inf is a probability of exactly 0, which is JSON: that row is served.
    assert json.loads(got[3])["predictions"][1] == {"label": "b", "class": 1, "probability": 0.0}


def test_a_new_label_map_is_noticed() -> None:
    answers = TopKJson()
    logits = torch.tensor([[0.0, 5.0]])
    assert json.loads(answers(logits, {1: "old"}, 1, 2)[0])["predictions"][0]["label"] == "old"
    assert json.loads(answers(logits, {1: "new"}, 1, 2)[0])["predictions"][0]["label"] == "new"


def test_a_label_that_is_not_json_fails_only_the_rows_that_predict_it() -> None:
    # Labels set in code are not validated; dumps() refused such a row alone, and so does
    # the one-pass writer.
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    got = TopKJson()(logits, {0: "fine", 1: float("nan")}, 1, 2)  # type: ignore[dict-item]
    assert isinstance(got[0], InferenceFailed)
    assert json.loads(got[1])["predictions"][0]["label"] == "fine"
