"""Cost of the costliest inputs we know, against the per-request budget (README "Cost budget").

    .venv/bin/python benchmarks/cost_budget.py [--only NAME] [--json out.json]

Each input of tests/attacks/costly.py (generated in this run) is read and decoded alone by
the image classifier and by the object detector (list contract, default limits), exactly as
`handle()` does it per row (`decode_rows`). Printed per input and handler: the outcome
(status/code), CPU ms (process time: every thread) and the peak RSS rise in MB (Linux VmHWM,
reset before each input). The last lines give the worst case against the budget:
1 s CPU and 200 MB per request at default limits.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
sys.path.insert(2, str(HERE.parent / "tests"))

from attacks.costly import COSTLY, small_jpeg  # noqa: E402

BUDGET_CPU_MS = 1000.0
BUDGET_MB = 200.0
MANIFEST = {"model": {"modelName": "cost", "serializedFile": "model.pt",
                      "handler": "handler.py", "modelVersion": "1.0"}}


def _trim() -> None:
    """Hand freed heap back to the OS, so the next peak is measured from a true baseline."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _kib(field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(found.group(1)) if found else 0


def _handlers(tmp: Path) -> dict[str, tuple[Any, Any]]:
    from bench_detector import build_model_dir
    from models import TinyModel, save_scripted

    from secure_handler import SecureImageClassifier, SecureObjectDetector
    from secure_handler.testing import make_context

    built: dict[str, tuple[Any, Any]] = {}
    cls_dir = tmp / "classifier"
    cls_dir.mkdir()
    save_scripted(TinyModel(), cls_dir / "model.pt")
    det_dir = build_model_dir(tmp / "detector", "list")
    for name, directory, handler in (("classifier", cls_dir, SecureImageClassifier()),
                                     ("detector", det_dir, SecureObjectDetector())):
        ctx = make_context(directory, MANIFEST, {"handler": {}}, batch_size=8)
        handler.initialize(ctx)
        built[name] = (handler, ctx)
    return built


def measure(handler: Any, ctx: Any, data: bytes) -> dict[str, Any]:
    """One row through `decode_rows`: its outcome, CPU ms and peak RSS rise (MB)."""
    from ts.context import RequestProcessor

    from secure_handler.errors import SecureHandlerError
    from secure_handler.testing import Request

    request = Request(bytearray(data), "application/octet-stream")
    ctx.request_processor = [RequestProcessor(request.header_map())]
    handler.context = ctx
    gc.collect()
    _trim()
    Path("/proc/self/clear_refs").write_text("5")
    base = _kib("VmRSS")
    cpu, wall = time.process_time(), time.perf_counter()
    outcome = handler.decode_rows([request.row()])[0]
    cpu_ms = (time.process_time() - cpu) * 1000.0
    wall_ms = (time.perf_counter() - wall) * 1000.0
    rise_mb = max(0, _kib("VmHWM") - base) / 1024.0
    shown = (f"{outcome.status} {outcome.code}" if isinstance(outcome, SecureHandlerError)
             else "decoded")
    del outcome
    return {"outcome": shown, "cpu_ms": round(cpu_ms, 1), "wall_ms": round(wall_ms, 1),
            "peak_mb": round(rise_mb, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="input names to run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    inputs: dict[str, Callable[[], bytes]] = {
        name: build for name, build in COSTLY.items() if not args.only or name in args.only}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cost-budget-") as tmp:
        handlers = _handlers(Path(tmp))
        for handler, ctx in handlers.values():  # warm: first-call costs are not the input's
            measure(handler, ctx, small_jpeg())
        print(f"{'input':<46}{'KB':>8}  {'handler':<11}{'outcome':<28}{'cpu ms':>9}"
              f"{'wall ms':>9}{'peak MB':>9}")
        for name, build in inputs.items():
            data = build()
            for kind, (handler, ctx) in handlers.items():
                row = {"input": name, "bytes": len(data), "handler": kind,
                       **measure(handler, ctx, data)}
                rows.append(row)
                print(f"{name:<46}{len(data) / 1024:>8.0f}  {kind:<11}{row['outcome']:<28}"
                      f"{row['cpu_ms']:>9.1f}{row['wall_ms']:>9.1f}{row['peak_mb']:>9.1f}",
                      flush=True)
    worst_cpu = max(rows, key=lambda r: r["cpu_ms"])
    worst_mb = max(rows, key=lambda r: r["peak_mb"])
    ok = worst_cpu["cpu_ms"] <= BUDGET_CPU_MS and worst_mb["peak_mb"] <= BUDGET_MB
    print(f"worst CPU: {worst_cpu['cpu_ms']:.1f} ms ({worst_cpu['input']}, "
          f"{worst_cpu['handler']}); budget {BUDGET_CPU_MS:.0f} ms")
    print(f"worst peak: {worst_mb['peak_mb']:.1f} MB ({worst_mb['input']}, "
          f"{worst_mb['handler']}); budget {BUDGET_MB:.0f} MB")
    print("within budget" if ok else "OVER BUDGET")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), "utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
