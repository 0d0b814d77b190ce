"""Token rows → the model's input tensors, and the model's answers back in row order.

Three layouts of the same rows (`handler.padding`):

* `bucketed` (default): the rows sorted by length and cut into sub-batches of similar length,
  one forward each. A cut is made where it saves more padded positions than
  `bucket_split_tokens`, the price of one more forward (a dynamic-programming split of the
  sorted lengths, O(rows)). With `auto` that price is measured once at start on the real
  path (`measure_split_tokens`): a small Transformer's forward is worth about 25 positions,
  a bag-of-words model's 2,000 to the 4,096 cap, so bag-of-words batches are rarely cut.
  After that, the plan depends only on the lengths;
* `longest`: one batch padded to its longest row (dynamic padding);
* `max_tokens`: one batch padded to `max_tokens` (for models traced at a fixed length).

A `bag` model (`nn.EmbeddingBag`) has no padding: one flat id tensor and the row offsets.

Padding is built in one step per sub-batch (one comparison for the mask, one masked write for
the ids), never by a loop over rows; `run_parts()` puts each sub-batch's logits back in
its rows' places, so every answer matches what the row gets when sent alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["Part", "TextBatch", "bag_batch", "build_batch", "measure_split_tokens", "pad_batch",
           "plan_buckets", "run_parts"]

Ids = npt.NDArray[np.int64]

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
    rows sorted by length: a dynamic programme whose inner minimum is kept on a convex hull
    of lines, so a batch costs O(rows), not O(rows^2) (32 rows went from ~110 us to ~20).
    """
    if not lengths:
        return []
    if len(lengths) * max(lengths) - sum(lengths) <= split_tokens:
        # Splitting cannot pay: it saves at most this much padding, and costs split_tokens.
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = [lengths[i] for i in order]
    cut = _cheapest_cuts(ordered, split_tokens)
    groups: list[list[int]] = []
    end = len(ordered)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def _cheapest_cuts(ordered: list[int], split_tokens: int) -> list[int]:
    """`cut[end]`: where the last group of the cheapest plan for the first `end` rows starts.

    The last group of rows start..end-1 is padded to `ordered[end - 1]` (the rows are
    sorted), so `best[end] = split + end x width + min over start of (best[start] -
    start x width)`: the minimum at x = width over lines of slope -start and intercept
    `best[start]`. Slopes fall and widths never do, so a line that stops being the lowest
    never is again: the hull is a deque, each line pushed and popped once. Exact integers.
    """
    best = [0] * (len(ordered) + 1)
    cut = [0] * (len(ordered) + 1)
    hull: deque[int] = deque()  # starts whose lines form the lower envelope, in order
    for end in range(1, len(ordered) + 1):
        _push_line(hull, best, end - 1)
        width = ordered[end - 1]
        # Strictly lower only: of equal costs the earlier start (the longer group) is kept.
        while len(hull) > 1 and (best[hull[1]] - hull[1] * width
                                 < best[hull[0]] - hull[0] * width):
            hull.popleft()
        start = hull[0]
        best[end] = best[start] - start * width + end * width + split_tokens
        cut[end] = start
    return cut


def _push_line(hull: deque[int], best: list[int], new: int) -> None:
    """Add the line of start `new` (slope -new, intercept best[new]), dropping the lines it
    makes useless: the last one is useless when the new line meets the one before it no
    later than the last line does."""
    while len(hull) > 1:
        first, last = hull[-2], hull[-1]
        # x where `new` meets `first` <= x where `last` meets `first`, cross-multiplied
        # (slope differences new - first and last - first are positive).
        if (best[new] - best[first]) * (last - first) <= (best[last] - best[first]) * (new - first):
            hull.pop()
        else:
            break
    hull.append(new)


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


def measure_split_tokens(forward: Forward, max_id: int, pad_id: int,
                         max_tokens: int = 128) -> int:
    """The price of one more forward, in padded positions, measured once at start.

    Three batches of 16 rows go through the real path (`build_batch` and `run_parts`):
    one part of 16 x N tokens, the same rows cut into two parts, and one part of 16 x W,
    where W is 128 (or `max_tokens`, if smaller) and N = W / 16. The second less the first
    is the price of a part (the forward's fixed cost and the padding, scatter and dispatch
    around it); the third less the first is the cost of 16 x (W - N) positions. The ids are
    spread over the vocabulary as real text's are (a constant id keeps one embedding row in
    cache and makes positions look free). The three are timed in turn, up to eight times (at
    least three; no more once a second has passed, for a large model), and the fastest time
    of each counts: a machine that slows for a moment slows all three alike. The ratio,
    within `SPLIT_TOKENS_RANGE`, is the price. Only the plan depends on it, never an answer.
    """
    low, high = SPLIT_TOKENS_RANGE
    wide = min(128, max_tokens)
    narrow = max(1, wide // 16)
    if wide <= narrow:
        return high  # rows of a token or two: there is no padding to save
    generator = torch.Generator().manual_seed(0)  # the process's own random state is untouched

    def rows(count: int, width: int) -> list[Ids]:
        return list(torch.randint(0, max_id + 1, (count, width), generator=generator).numpy())

    short, long = rows(16, narrow), rows(16, wide)
    cut = short[:8] + [np.append(row, row[:1]) for row in short[8:]]  # 8 x N and 8 x N+1
    batches = {  # price 0 makes the one cut that saves positions: 8 x N and 8 x N+1
        "one": (short, "longest"), "two": (cut, "bucketed"), "wide": (long, "longest")}
    fastest = dict.fromkeys(batches, float("inf"))
    began = time.perf_counter()
    for turn in range(8):
        for name, (items, layout) in batches.items():
            start = time.perf_counter()
            run_parts(build_batch(items, layout, pad_id, wide, 0), forward)
            fastest[name] = min(fastest[name], time.perf_counter() - start)
        if turn >= 2 and time.perf_counter() - began > 1.0:
            break
    per_position = max(fastest["wide"] - fastest["one"], 1e-9) / (16 * (wide - narrow))
    price = max(fastest["two"] - fastest["one"], 0.0) / per_position
    return int(min(high, max(low, price)))


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
