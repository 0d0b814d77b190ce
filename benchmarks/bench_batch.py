"""Preprocess + inference per batch size: ours vs stock `handle()`, in-process.

    /tmp/venv/bin/python benchmarks/bench_batch.py [--model resnet18|tiny] [--quick]

Both handlers are initialised through TorchServe's real `Context` with the same TorchScript
model and driven through their `handle(rows, ctx)` (preprocess, inference, postprocess), on
500x375 JPEGs (quality 90) in batches of 1, 8 and 32 rows `{"body": bytearray}`. Figures are
images/s, the MEDIAN of `--repeats` passes after one warm-up pass. Stock runs in its own venv
(benchmarks/.venv-stock); no server, no HTTP: this isolates the worker's share of the cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from _timing import Rate, batched, measure  # noqa: E402
from bench_preprocess import DEFAULT_STOCK_VENV, run_stock_job  # noqa: E402
from corpus import KINDS, make_image  # noqa: E402
from models import TinyModel, resnet18, save_scripted  # noqa: E402

BATCH_SIZES = (1, 8, 32)


def ours_handle(model: Path, sets: dict[str, list[bytes]], repeats: int) -> dict[str, Rate]:
    """Our `handle()` rates per set (set name `bN` = batch size N)."""
    from ts.context import RequestProcessor

    from secure_handler.serving.image.classifier import SecureImageClassifier
    from secure_handler.testing import Request, make_context

    manifest = {"runtime": "python", "model": {
        "modelName": "ours", "serializedFile": model.name, "handler": "handler.py",
        "modelVersion": "1.0"}}
    ctx = make_context(model.parent, manifest=manifest, model_yaml_config={"handler": {}},
                       batch_size=max(BATCH_SIZES), model_name="ours")
    handler = SecureImageClassifier()
    handler.initialize(ctx)
    rates = {}
    for name, imgs in sets.items():
        prepared: list[tuple[list[Mapping[str, Any]], list[Any]]] = []
        for chunk in batched(imgs, int(name[1:])):
            reqs = [Request(bytearray(d), "image/jpeg") for d in chunk]
            prepared.append(([dict(r.row()) for r in reqs],
                             [RequestProcessor(r.header_map()) for r in reqs]))

        def run(b: tuple[list[Mapping[str, Any]], list[Any]]) -> object:
            ctx.request_processor = b[1]
            ctx.request_ids = {i: f"req-{i}" for i in range(len(b[0]))}
            return handler.handle(b[0], ctx)

        rates[name] = measure(run, prepared, len(imgs), repeats)
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet18", "tiny"], default="resnet18")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stock-venv", type=Path, default=DEFAULT_STOCK_VENV)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    images = [make_image(KINDS[0], i) for i in range(8)]
    per_pass = 32 if args.quick else 64
    sets = {f"b{b}": [images[i % len(images)] for i in range(max(per_pass, b))]
            for b in BATCH_SIZES}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        module = resnet18() if args.model == "resnet18" else TinyModel()
        model = save_scripted(module, Path(tmp, "model.pt"))
        print(f"ours ({args.model}) ...", flush=True)
        ours = ours_handle(model, sets, args.repeats)
        print("stock ...", flush=True)
        job = {"mode": "handle", "model": str(model), "repeats": args.repeats, "warmup": 1}
        stock = run_stock_job(args.stock_venv, job, sets, lambda name: int(name[1:]))
    print(f"\n{args.model}: handle() images/s (median of {args.repeats})")
    print(f"{'batch':>5}{'ours':>9}{'stock':>9}{'ours/stock':>12}")
    for name in sets:
        s = None if isinstance(stock, str) else stock[0][name].median
        ratio = f"{ours[name].median / s:12.2f}" if s else f"{'-':>12}"
        print(f"{name[1:]:>5}{ours[name].median:9.1f}{s or 0:9.1f}{ratio}")
    if isinstance(stock, str):
        print(f"note: {stock}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": args.model, "ours": {k: v.to_json() for k, v in ours.items()},
            "stock": stock if isinstance(stock, str)
            else {k: v.to_json() for k, v in stock[0].items()},
        }, indent=2), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
