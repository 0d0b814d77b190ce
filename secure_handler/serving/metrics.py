"""TorchServe custom metrics: rejections by error code and time per stage.

Emitted through `context.metrics`, so they reach the metrics endpoint (Prometheus format with
`metrics_mode=prometheus`) like TorchServe's own. A metrics failure never fails a request.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, TextIO

from ts.metrics.dimension import Dimension

__all__ = [
    "REJECTED_METRIC", "STAGE_METRIC", "STAGES", "StageTimer", "count_rejection",
    "escape_warnings",
]

logger = logging.getLogger(__name__)

REJECTED_METRIC = "SecureHandlerRejected"
STAGE_METRIC = "SecureHandlerStageTime"
STAGES = ("payload", "decode", "assemble", "inference", "postprocess")


def count_rejection(context: Any, code: str) -> None:
    """Count one refused request under its stable error code."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    try:
        metrics.add_counter(REJECTED_METRIC, 1, None, [Dimension("ErrorCode", code)])
    except Exception:  # metrics must never fail a request
        logger.debug("could not record %s", REJECTED_METRIC, exc_info=True)


class StageTimer:
    """Wall time per stage over one batch.

    Per-row stages (`payload`, `decode`) are summed with `add()`; they may run on decode
    threads, so their sum can exceed the wall time. Batch stages are laps: `mark(stage)`
    closes the lap that started at the previous `mark()` or `lap()`.
    """

    def __init__(self, context: Any) -> None:
        self._context = context
        self._last = time.perf_counter()
        # (stage, ms) as recorded, summed when read: list.append is atomic under the GIL, so
        # adding needs no lock (decode_rows sums its rows' times once per batch anyway).
        self._laps: list[tuple[str, float]] = []

    def add(self, stage: str, ms: float) -> None:
        self._laps.append((stage, ms))

    @property
    def totals(self) -> dict[str, float]:
        """Milliseconds per stage so far."""
        totals: dict[str, float] = {}
        for stage, ms in list(self._laps):
            totals[stage] = totals.get(stage, 0.0) + ms
        return totals

    def lap(self) -> None:
        """Start a new lap without recording the time since the last one."""
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.add(stage, (now - self._last) * 1000.0)
        self._last = now

    def emit(self) -> None:
        metrics = getattr(self._context, "metrics", None)
        if metrics is None:
            return
        try:
            for stage, ms in self.totals.items():
                metrics.add_time(STAGE_METRIC, round(ms, 3), None, "ms",
                                 [Dimension("Stage", stage)])
        except Exception:
            logger.debug("could not record %s", STAGE_METRIC, exc_info=True)


_warnings_logger = logging.getLogger("py.warnings")


def _show_escaped(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """`warnings.showwarning` for the worker: one log line, the text escaped by repr."""
    text = f"{filename}:{lineno}: {category.__name__}: {message}"
    _warnings_logger.warning("%r", text[:4096])


def escape_warnings() -> None:
    """Show Python warnings as one escaped log line each, in this worker.

    TorchServe reads `[METRICS]` and `[PID]` lines from the worker's stdout and stderr, and a
    model's warning text (TorchScript's `aten::warn`, surfaced as a Python warning during
    `forward`) is chosen by whoever built the model: printed as-is, a newline in it would forge
    such a line. Called from `initialize` (the worker is this handler's process), never at import.
    """
    warnings.showwarning = _show_escaped
