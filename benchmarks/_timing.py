"""Throughput timing shared by every benchmark script (stdlib only: it also runs in the stock venv).

One "pass" feeds a fixed list of prepared batches through a function once; a measurement is
`repeats` passes after `warmup` untimed ones. We report the MEDIAN pass (robust to a noisy,
shared CPU) and keep the best pass alongside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

__all__ = ["Rate", "batched", "measure"]

T = TypeVar("T")


@dataclass(frozen=True)
class Rate:
    """Images (or requests) per second over `repeats` timed passes of `items` items each."""

    median: float
    best: float
    items: int
    repeats: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def batched(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive batches of `size` (the last one may be short), as TorchServe would form them."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def measure(
    fn: Callable[[T], object],
    batches: Sequence[T],
    items: int,
    repeats: int = 5,
    warmup: int = 1,
) -> Rate:
    """Time `fn(batch)` over all `batches` per pass; `items` is how many images one pass holds."""
    for _ in range(warmup):
        for b in batches:
            fn(b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            fn(b)
        times.append(time.perf_counter() - start)
    return Rate(
        median=items / statistics.median(times), best=items / min(times),
        items=items, repeats=repeats,
    )
