"""secure_handler.serving.text.batching: padding, bags, length buckets, answers in row order.

The end-to-end checks run a small Transformer encoder and a bag-of-words model (random
weights, vocabulary 500) through `SecureTextClassifier` and compare every row's logits in a
batch of mixed lengths with the logits the same row gets alone, for every padding layout.
"""

from __future__ import annotations

import itertools
import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secure_handler import SecureTextClassifier
from secure_handler.serving.loading import save_torchscript
from secure_handler.serving.text import batching as B
from secure_handler.testing import Request, make_context, run_batch

MANIFEST = {"model": {"modelName": "text", "serializedFile": "model.pt",
                      "handler": "handler.py", "modelVersion": "1.0"}}
VOCAB_SIZE = 500


def flat(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.int64)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.int64)


def reference_pad(seqs: list[list[int]], pad: int, width: int) -> tuple[list, list]:
    ids = [s + [pad] * (width - len(s)) for s in seqs]
    mask = [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
    return ids, mask


# --- padding and bags -------------------------------------------------------------------------


def test_pad_batch_pads_to_the_longest_row() -> None:
    seqs = [[5, 6, 7], [8], [9, 10]]
    ids, mask = B.pad_batch(*flat(seqs), pad_id=0)
    assert ids.dtype == mask.dtype == torch.int64
    assert (ids.tolist(), mask.tolist()) == reference_pad(seqs, 0, 3)


def test_pad_batch_to_a_fixed_length() -> None:
    ids, mask = B.pad_batch(*flat([[1, 2], [3]]), pad_id=9, width=5)
    assert (ids.tolist(), mask.tolist()) == reference_pad([[1, 2], [3]], 9, 5)
    with pytest.raises(ValueError, match="longer than the padded length"):
        B.pad_batch(*flat([[1, 2, 3]]), pad_id=0, width=2)


@given(st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=20), min_size=1,
                max_size=16), st.integers(0, 5))
def test_pad_batch_matches_the_per_row_reference(seqs: list[list[int]], pad: int) -> None:
    ids, mask = B.pad_batch(*flat(seqs), pad_id=pad)
    assert (ids.tolist(), mask.tolist()) == reference_pad(seqs, pad, max(map(len, seqs)))


def test_bag_batch_concatenates_with_offsets() -> None:
    ids, offsets = B.bag_batch(*flat([[5, 6, 7], [8], [9, 10]]))
    assert ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert offsets.tolist() == [0, 3, 4]
    assert ids.dtype == offsets.dtype == torch.int64


# --- the bucket plan --------------------------------------------------------------------------


def plan_cost(lengths: list[int], groups: list[list[int]], split: int) -> int:
    return sum(split + len(g) * max(lengths[i] for i in g) for g in groups)


def brute_force_cost(lengths: list[int], split: int) -> int:
    """The cheapest cut of the sorted rows, by trying every set of cut points."""
    ordered = sorted(lengths)
    best = None
    for cuts in itertools.product([False, True], repeat=len(ordered) - 1):
        cost, start = 0, 0
        for end, cut in enumerate([*cuts, True], start=1):
            if cut:
                cost += split + (end - start) * ordered[end - 1]
                start = end
        best = cost if best is None else min(best, cost)
    assert best is not None
    return best


@given(st.lists(st.integers(1, 300), min_size=1, max_size=10), st.integers(0, 400))
def test_plan_is_a_partition_and_as_cheap_as_any_cut(lengths: list[int], split: int) -> None:
    groups = B.plan_buckets(lengths, split)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(groups)
    assert plan_cost(lengths, groups, split) == brute_force_cost(lengths, split)


def test_plan_keeps_similar_lengths_together() -> None:
    lengths = [30, 250, 28, 31, 240, 29]
    groups = B.plan_buckets(lengths, 64)
    assert [sorted(g) for g in groups] == [[0, 2, 3, 5], [1, 4]]
    # A split worth less than one more forward is not made.
    assert B.plan_buckets([30, 31, 32], 64) == [[0, 1, 2]]


def quadratic_cuts(lengths: list[int], split: int) -> int:
    """The cheapest plan's cost by the plain O(n^2) dynamic programme."""
    ordered = sorted(lengths)
    best = [0] * (len(ordered) + 1)
    for end in range(1, len(ordered) + 1):
        best[end] = min(best[s] + split + (end - s) * ordered[end - 1] for s in range(end))
    return best[-1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 512), min_size=1, max_size=80), st.integers(0, 5000))
def test_plan_costs_what_the_quadratic_programme_finds(lengths: list[int], split: int) -> None:
    groups = B.plan_buckets(lengths, split)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert plan_cost(lengths, groups, split) == quadratic_cuts(lengths, split)


def test_plan_of_a_huge_batch_stays_a_partition() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(1, 512) for _ in range(4096)]
    groups = B.plan_buckets(lengths, 256)
    assert sorted(i for g in groups for i in g) == list(range(4096))
    some = lengths[:600]
    assert plan_cost(some, B.plan_buckets(some, 256), 256) == quadratic_cuts(some, 256)


# --- parts and scatter ------------------------------------------------------------------------


def test_bucketed_batch_covers_every_row_with_its_own_ids() -> None:
    seqs = [[1] * 3, [2] * 200, [3] * 4, [4] * 190, [5] * 2]
    batch = B.build_batch(seqs, "bucketed", pad_id=0, max_tokens=256, split_tokens=16)
    assert batch.size == 5
    assert len(batch.parts) == 2
    seen = {}
    for part in batch.parts:
        assert part.rows is not None
        ids, mask = part.inputs
        assert ids.shape[1] == max(len(seqs[r]) for r in part.rows.tolist())
        for row, row_ids, row_mask in zip(part.rows.tolist(), ids.tolist(), mask.tolist(),
                                          strict=True):
            seen[row] = [i for i, m in zip(row_ids, row_mask, strict=True) if m]
    assert seen == dict(enumerate(seqs))


def test_run_parts_puts_every_answer_in_its_row() -> None:
    seqs = [[7] * 3, [8] * 200, [9] * 4, [10] * 190]
    batch = B.build_batch(seqs, "bucketed", pad_id=0, max_tokens=256, split_tokens=16)
    assert len(batch.parts) == 2

    def first_id_and_length(inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, mask = inputs
        return torch.stack([ids[:, 0], mask.sum(1)], dim=1).float()

    out = B.run_parts(batch, first_id_and_length)
    assert out.tolist() == [[7, 3], [8, 200], [9, 4], [10, 190]]


def test_run_parts_refuses_outputs_of_the_wrong_shape() -> None:
    batch = B.build_batch([[1], [2] * 300], "bucketed", pad_id=0, max_tokens=512,
                          split_tokens=0)
    with pytest.raises(TypeError, match=r"logits \[batch, classes\]"):
        B.run_parts(batch, lambda inputs: torch.zeros(3, 2))
    sizes = iter([2, 3])
    with pytest.raises(TypeError, match="different class count"):
        B.run_parts(batch, lambda inputs: torch.zeros(len(inputs[0]), next(sizes)))


# --- the handler: the same answers in a batch as alone -------------------------------------------


class TinyEncoder(nn.Module):
    """`(input_ids [B, T], attention_mask [B, T]) -> logits [B, 3]`: 1-layer Transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, 32, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(256, 32) * 0.02)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).to(x.dtype)
        return self.head((x * mask).sum(1) / mask.sum(1).clamp(min=1.0))


class BagOfWords(nn.Module):
    """`(input_ids [B, T], attention_mask [B, T]) -> logits [B, 3]`: masked mean + MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, 16, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.mlp(pooled)


WORDS = [f"w{i}" for i in range(VOCAB_SIZE - 2)]


def model_dir(root: Path, module: nn.Module) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "index_to_name.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    with warnings.catch_warnings():
        # nn.TransformerEncoder notes that nested tensors are off for this layer layout.
        warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
        save_torchscript(module, root / "model.pt")
    return root


@pytest.fixture(scope="module", params=["transformer", "bag-of-words"])
def text_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    module = TinyEncoder() if request.param == "transformer" else BagOfWords()
    return model_dir(tmp_path_factory.mktemp(request.param), module)


def texts_of_mixed_length() -> list[str]:
    rng = random.Random(5)
    lengths = [3, 180, 7, 25, 2, 160, 40, 9, 33, 120, 5, 64, 1, 90, 17, 250]
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]


def handler_for(directory: Path, padding: str, batch_size: int,
                split: int | str = 32) -> tuple[SecureTextClassifier, object]:
    config = {"padding": padding, "max_tokens": 256, "bucket_split_tokens": split}
    ctx = make_context(directory, MANIFEST, {"handler": config}, batch_size=batch_size)
    handler = SecureTextClassifier()
    handler.initialize(ctx)
    return handler, ctx


def logits_of(handler: SecureTextClassifier, texts: list[str]) -> torch.Tensor:
    items = [handler.tokenizer.encode(handler.decode(t, i), 256) for i, t in enumerate(texts)]
    return handler.infer(handler.assemble(items))


@pytest.mark.parametrize("padding", ["bucketed", "longest", "max_tokens"])
def test_batched_logits_match_each_row_alone(text_model: Path, padding: str) -> None:
    texts = texts_of_mixed_length()
    alone_handler, _ = handler_for(text_model, "longest", 1)
    alone = torch.cat([logits_of(alone_handler, [t]) for t in texts])
    handler, _ = handler_for(text_model, padding, 16)
    batch = handler.assemble([handler.tokenizer.encode(t, 256) for t in texts])
    if padding == "bucketed":
        assert len(batch.parts) > 1  # the mixed lengths really are split
    together = handler.infer(batch)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_bucketed_answers_equal_batch_one_through_handle(text_model: Path) -> None:
    texts = texts_of_mixed_length()
    requests = [Request.as_worker(t.encode(), "text/plain") for t in texts]
    # A refused row between the others: its neighbours keep their answers.
    requests.insert(4, Request.as_worker("w1\u202ew2".encode(), "text/plain"))
    handler, ctx = handler_for(text_model, "bucketed", 32)
    together = run_batch(handler, ctx, requests)
    alone_handler, alone_ctx = handler_for(text_model, "longest", 1)
    alone = [run_batch(alone_handler, alone_ctx, [r])[0] for r in requests]
    assert together[4][0] == 422
    assert [s for s, _ in together] == [s for s, _ in alone]
    for (_, got), (_, want) in zip(together, alone, strict=True):
        if "predictions" in want:
            assert [p["class"] for p in got["predictions"]] == [
                p["class"] for p in want["predictions"]]
            for g, w in zip(got["predictions"], want["predictions"], strict=True):
                assert g["probability"] == pytest.approx(w["probability"], abs=2e-4)


# --- bucket_split_tokens: auto ------------------------------------------------------------------


def test_auto_split_is_measured_within_its_range(text_model: Path) -> None:
    handler, _ = handler_for(text_model, "bucketed", 16, split="auto")
    low, high = B.SPLIT_TOKENS_RANGE
    assert low <= handler.split_tokens <= high
    fixed, _ = handler_for(text_model, "bucketed", 16, split=100)
    assert fixed.split_tokens == 100
    unused, _ = handler_for(text_model, "longest", 16, split="auto")
    assert unused.split_tokens == 0


def test_auto_split_measures_the_real_path_with_ids_spread_over_the_vocabulary() -> None:
    # A constant id keeps one embedding row in cache and makes positions look free (a
    # bag-of-words model then measured 715..4096 from run to run). The price of a part is
    # measured on the real path: the same 16 rows as one part and as two. The process's
    # random state is left as it was.
    seen: list[torch.Tensor] = []

    def forward(inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen.append(inputs[0])
        return torch.zeros(len(inputs[0]), 2)

    state = torch.random.get_rng_state()
    split = B.measure_split_tokens(forward, max_id=999, pad_id=0, max_tokens=512)
    assert torch.equal(torch.random.get_rng_state(), state)
    low, high = B.SPLIT_TOKENS_RANGE
    assert low <= split <= high
    ids = torch.cat([t[t != 0] for t in seen])
    assert int(ids.min()) >= 1
    assert int(ids.max()) <= 999
    assert len(torch.unique(ids)) > 500
    assert {tuple(t.shape) for t in seen} == {(16, 8), (8, 8), (8, 9), (16, 128)}


def test_auto_split_probes_no_wider_than_max_tokens() -> None:
    # A model with 64 positions (max_tokens 64) must be measured, not fail on 128 tokens.
    widths: list[int] = []

    def forward(inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        widths.append(inputs[0].shape[1])
        return torch.zeros(len(inputs[0]), 2)

    B.measure_split_tokens(forward, max_id=99, pad_id=0, max_tokens=64)
    assert set(widths) == {4, 5, 64}
    low, high = B.SPLIT_TOKENS_RANGE
    assert B.measure_split_tokens(forward, max_id=99, pad_id=0, max_tokens=1) == high


def test_auto_split_falls_back_when_the_model_cannot_run(tmp_path: Path) -> None:
    # An EmbeddingBag model called with (ids, mask): every forward fails, so does the
    # measurement; the worker still starts (its batches get 500, as without buckets).
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(VOCAB_SIZE, 3, mode="sum")

        def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            return self.bag(ids, offsets)

    handler, _ = handler_for(model_dir(tmp_path, Bag()), "bucketed", 4, split="auto")
    assert handler.split_tokens == 256


@pytest.mark.parametrize("value", [-1, 1_000_001, "fast", 2.5])
def test_split_setting_must_be_auto_or_a_count(value: object) -> None:
    from secure_handler import ConfigurationError, TextClassifierLimits
    from secure_handler.limits import build_limits

    with pytest.raises(ConfigurationError, match="bucket_split_tokens"):
        build_limits(TextClassifierLimits, {"bucket_split_tokens": value})


def test_a_split_that_cannot_pay_is_not_searched() -> None:
    # All the padding of one group (3 x 40 - 90 = 30 positions) is less than the price of a
    # forward: one group, in request order, without the search.
    assert B.plan_buckets([10, 40, 40], 30) == [[0, 1, 2]]
    assert B.plan_buckets([10, 40, 40], 29) == [[0], [1, 2]]
