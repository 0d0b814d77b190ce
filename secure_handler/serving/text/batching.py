"""Token rows → the model's input tensors, and the model's answers back in row order.

Three layouts of the same rows (`handler.padding`):

* `bucketed` (default): the rows sorted by length and cut into sub-batches of similar length,
  one forward each. A cut is made where it saves more padded positions than
  `bucket_split_tokens`, the price of one more forward (a dynamic-programming split of the
  sorted lengths). With `auto` that price is measured once at start
  (`measure_split_tokens`): a Transformer's forward is worth about ten positions, a
  bag-of-words model's over a thousand. After that, the plan depends only on the lengths;
* `longest`: one batch padded to its longest row (dynamic padding);
* `max_tokens`: one batch padded to `max_tokens` (for models traced at a fixed length).

A `bag` model (`nn.EmbeddingBag`) has no padding: one flat id tensor and the row offsets.

Padding is built in one step per sub-batch (one comparison for the mask, one masked write for
the ids), never by a loop over rows; `scatter_logits()` puts each sub-batch's logits back in
its rows' places, so every answer matches what the row gets when sent alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["Part", "TextBatch", "bag_batch", "build_batch", "measure_split_tokens", "pad_batch",
           "plan_buckets", "run_parts"]

Ids = npt.NDArray[np.int64]

# The most rows one sub-batch may take in the split search: bounds its cost at
# O(rows x 64) for TorchServe's largest batches; sorted rows make longer groups rare anyway.
_MAX_GROUP_ROWS = 64


@dataclass(frozen=True, slots=True)
class Part:
    """One forward: its input tensors and the batch rows they answer (None: all, in order)."""

    rows: torch.Tensor | None
    inputs: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class TextBatch:
    """All valid rows of a TorchServe batch, as one or more forwards."""

    size: int
    parts: tuple[Part, ...]


def _flat(items: Sequence[Sequence[int] | Ids]) -> tuple[Ids, Ids]:
    arrays = [np.asarray(item, dtype=np.int64) for item in items]
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    return np.concatenate(arrays), lengths


def pad_batch(flat: Ids | torch.Tensor, lengths: Ids | torch.Tensor, pad_id: int,
              width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)`, both int64 `[B, T]`, from the rows' concatenated ids.

    T is the longest row (dynamic padding) unless `width` fixes it. The mask is one
    comparison and the ids one masked write, whose row-major order is exactly the
    concatenation order: no per-row loop. Built in numpy, whose calls on small arrays cost
    a fraction of torch's, then shared with torch without a copy.
    """
    flat, lengths = np.asarray(flat), np.asarray(lengths)
    longest = int(lengths.max())
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"a sequence is longer than the padded length {width}")
    mask = np.arange(width) < lengths[:, None]
    ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    ids[mask] = flat
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def bag_batch(flat: Ids | torch.Tensor,
              lengths: Ids | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, offsets)` for an `nn.EmbeddingBag`: all ids in one 1-D tensor, no padding."""
    lengths = np.asarray(lengths)
    offsets = np.zeros_like(lengths)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return torch.from_numpy(np.asarray(flat)), torch.from_numpy(offsets)


def plan_buckets(lengths: Sequence[int], split_tokens: int) -> list[list[int]]:
    """Row indices grouped into sub-batches of similar length, shortest first.

    Minimises `padded positions + split_tokens x sub-batches` over every way of cutting the
    rows sorted by length (dynamic programming, O(rows x 64)).
    """
    if not lengths or len(lengths) * max(lengths) - sum(lengths) <= split_tokens:
        # Splitting cannot pay: it saves at most this much padding, and costs split_tokens.
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = [lengths[i] for i in order]
    best = [0] * (len(ordered) + 1)  # best[j]: cost of the first j sorted rows
    cut = [0] * (len(ordered) + 1)
    for end in range(1, len(ordered) + 1):
        width = ordered[end - 1]  # the longest row of any group ending here
        best[end], cut[end] = min(
            (best[start] + split_tokens + (end - start) * width, start)
            for start in range(max(0, end - _MAX_GROUP_ROWS), end)
        )
    groups: list[list[int]] = []
    end = len(ordered)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def build_batch(items: Sequence[Sequence[int] | Ids], layout: str, pad_id: int,
                max_tokens: int, split_tokens: int) -> TextBatch:
    """The valid rows → the forwards of `layout` (bag, longest, max_tokens or bucketed)."""
    flat, lengths = _flat(items)
    size = len(items)
    if layout == "bag":
        return TextBatch(size, (Part(None, bag_batch(flat, lengths)),))
    if layout != "bucketed" or size == 1:
        width = max_tokens if layout == "max_tokens" else None
        return TextBatch(size, (Part(None, pad_batch(flat, lengths, pad_id, width)),))
    groups = plan_buckets(lengths.tolist(), split_tokens)
    if len(groups) == 1:
        return TextBatch(size, (Part(None, pad_batch(flat, lengths, pad_id)),))
    starts = np.cumsum(lengths) - lengths
    parts = []
    for group in groups:
        rows = np.asarray(group, dtype=np.int64)
        sub_lengths = lengths[rows]
        # Where each id of these rows sits in `flat`, in this group's row order: the row's
        # start plus 0..len-1, for all rows in three vectorised steps.
        first = np.cumsum(sub_lengths) - sub_lengths
        positions = np.arange(int(sub_lengths.sum())) + np.repeat(starts[rows] - first,
                                                                   sub_lengths)
        parts.append(Part(torch.from_numpy(rows),
                          pad_batch(flat[positions], sub_lengths, pad_id)))
    return TextBatch(size, tuple(parts))


Forward = Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]

# What `auto` may measure: a forward is worth 8 to 4,096 padded positions.
SPLIT_TOKENS_RANGE = (8, 4096)


def measure_split_tokens(forward: Forward, max_id: int) -> int:
    """The price of one more forward, in padded positions, measured once at start.

    A forward is timed at 16 x 8 and at 16 x 128 tokens (the fastest of three calls each,
    after one that may compile), with ids spread over the vocabulary as real text's are: a
    constant id would keep the embedding rows in cache and make positions look free. The
    difference is the cost of 1,920 positions; the narrow call less its positions is the
    fixed cost of a call. Their ratio, within `SPLIT_TOKENS_RANGE`, is the price. Only the
    plan depends on it, never an answer.
    """
    generator = torch.Generator().manual_seed(0)  # the process's own random state is untouched

    def fastest(rows: int, width: int) -> float:
        ids = torch.randint(0, max_id + 1, (rows, width), generator=generator)
        mask = torch.ones_like(ids)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            forward((ids, mask))
            times.append(time.perf_counter() - start)
        return min(times[1:])

    rows, narrow, wide = 16, 8, 128
    narrow_time, wide_time = fastest(rows, narrow), fastest(rows, wide)
    per_position = max(wide_time - narrow_time, 1e-9) / (rows * (wide - narrow))
    fixed = max(narrow_time - per_position * rows * narrow, 0.0)
    low, high = SPLIT_TOKENS_RANGE
    return int(min(high, max(low, fixed / per_position)))


def run_parts(batch: TextBatch,
              forward: Forward) -> torch.Tensor:
    """`forward` each part, then the logits `[B, classes]` in the batch's row order.

    Raises:
        TypeError: a part's output is not `[rows of the part, classes]`, or parts disagree.
    """
    answers = [_checked(forward(part.inputs), part) for part in batch.parts]
    if len(answers) == 1 and batch.parts[0].rows is None:
        return answers[0]
    classes = {logits.shape[1] for logits in answers}
    if len(classes) != 1:
        raise TypeError("text classifier model returned a different class count per call")
    out = answers[0].new_empty((batch.size, classes.pop()))
    rows = torch.cat([part.rows if part.rows is not None else torch.arange(batch.size)
                      for part in batch.parts])
    out[rows] = torch.cat(answers)  # one scatter for all parts
    return out


def _checked(logits: object, part: Part) -> torch.Tensor:
    rows = len(part.rows) if part.rows is not None else len(part.inputs[1])
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != rows:
        raise TypeError("text classifier model must return logits [batch, classes]")
    return logits
