"""Time TorchServe's STOCK `ImageClassifier.preprocess`. Runs INSIDE the stock venv.

Usage (bench_preprocess.py does this for you):
    benchmarks/.venv-stock/bin/python benchmarks/_stock_preprocess.py JOB.json

JOB.json: {"mode": "preprocess" | "handle", "model": null | "model.pt", "repeats": 5,
           "warmup": 1, "torch_threads": null | N,
           "runs": [{"name": str, "batch": 8, "paths": [image file, ...]}, ...]}
Prints one JSON object on stdout: {"versions": {...}, "rates": {name: Rate}}.

mode "preprocess" times `preprocess(rows)` only; "handle" times `handle(rows, ctx)` (preprocess,
inference, postprocess), with `model` (a TorchScript file) instead of the built-in tiny one.

The handler is initialised as the worker does it: a real `ts.context.Context` with the
worker's metrics cache, a manifest whose serializedFile is a TorchScript `model.pt`, then
`initialize(ctx)`. Each set is split into batches of `batch` rows `{"body": bytearray}`, the
exact row shape TorchServe hands over for a binary content type. Only `preprocess` is timed
(it includes TorchServe's `torch.stack(...).to(device)`, as ours includes its assembly).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import batched, measure

Rows = list[dict[str, bytearray]]


class TinyModel(torch.nn.Module):
    """Logits = per-channel means (argmax is the dominant colour); only here to be loadable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3))
        return torch.cat([means, means.sum(dim=1, keepdim=True) * 0.0], dim=1)


def _model_dir(root: Path, model: str | None) -> tuple[Path, dict[str, Any]]:
    """A worker-style model dir: the given TorchScript file, or a scripted TinyModel."""
    if model:
        shutil.copyfile(model, root / "model.pt")
    else:
        with warnings.catch_warnings():
            # torch 2.14 deprecates TorchScript (FutureWarning); stock loads it or pickles.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
            scripted = torch.jit.script(TinyModel())
        scripted.save(str(root / "model.pt"))  # type: ignore[no-untyped-call]
    manifest = {
        "createdOn": "01/01/2025 00:00:00", "runtime": "python", "archiverVersion": "0.12.0",
        "model": {"modelName": "stock", "serializedFile": "model.pt",
                  "handler": "image_classifier", "modelVersion": "1.0"},
    }
    return root, manifest


def _handler(model_dir: Path, manifest: dict[str, Any], batch: int) -> tuple[Any, Any]:
    import ts
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.torch_handler.image_classifier import ImageClassifier

    metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs"
                                                         / "metrics.yaml"))
    metrics.initialize_cache()
    ctx = Context("stock", str(model_dir), manifest, batch, None, "0.12.0",
                  limit_max_image_pixels=True, metrics=metrics, model_yaml_config={})
    handler = ImageClassifier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
        handler.initialize(ctx)
    handler.context = ctx  # what BaseHandler.handle() sets before calling preprocess
    return handler, ctx


def _handle_fn(handler: Any, ctx: Any) -> Callable[[Rows], object]:
    """`handler.handle(rows, ctx)` with the per-batch request state the worker sets up."""
    from ts.context import RequestProcessor

    def run(rows: Rows) -> object:
        ctx.request_processor = [RequestProcessor({"body": {"content-type": "image/jpeg"}})
                                 for _ in rows]
        ctx.request_ids = {i: f"req-{i}" for i in range(len(rows))}
        ctx.metrics.set_request_ids(",".join(ctx.request_ids.values()))
        out = handler.handle(rows, ctx)
        if not isinstance(out, list) or len(out) != len(rows):
            raise RuntimeError("stock handle() returned the wrong number of results")
        return out

    return run


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    job = json.loads(Path(argv[1]).read_text("utf-8"))
    repeats, warmup = int(job["repeats"]), int(job.get("warmup", 1))
    mode = job.get("mode", "preprocess")
    if job.get("torch_threads"):
        torch.set_num_threads(int(job["torch_threads"]))  # same setting as the parent's run
    import torchvision

    out: dict[str, Any] = {"versions": {"torch": torch.__version__,
                                        "torchvision": torchvision.__version__,
                                        "torch_threads": torch.get_num_threads()},
                           "rates": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, manifest = _model_dir(Path(tmp), job.get("model"))
        for run in job["runs"]:
            batch = int(run["batch"])
            handler, ctx = _handler(model_dir, manifest, batch)
            fn = handler.preprocess if mode == "preprocess" else _handle_fn(handler, ctx)
            images = [Path(p).read_bytes() for p in run["paths"]]
            batches: list[Rows] = [[{"body": bytearray(b)} for b in chunk]
                                   for chunk in batched(images, batch)]
            rate = measure(fn, batches, len(images), repeats, warmup)
            out["rates"][run["name"]] = rate.to_json()
            print(f"stock {mode} {run['name']}: {rate.median:.1f} img/s", file=sys.stderr)
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
