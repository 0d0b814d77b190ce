"""Time TorchServe's STOCK `ImageClassifier.preprocess`. Runs INSIDE the stock venv.

Usage (bench_preprocess.py does this for you):
    benchmarks/.venv-stock/bin/python benchmarks/_stock_preprocess.py JOB.json

JOB.json: {"batch": 8, "repeats": 5, "warmup": 1, "sets": {name: [image file, ...], ...}}.
Prints one JSON object on stdout: {"versions": {...}, "rates": {name: Rate}}.

The handler is initialised as the worker does it: a real `ts.context.Context` with the
worker's metrics cache, a manifest whose serializedFile is a TorchScript `model.pt`, then
`initialize(ctx)`. Each set is split into batches of `batch` rows `{"body": bytearray}`, the
exact row shape TorchServe hands over for a binary content type. Only `preprocess` is timed
(it includes TorchServe's `torch.stack(...).to(device)`, as ours includes its assembly).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import warnings
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


def _model_dir(root: Path) -> tuple[Path, dict[str, Any]]:
    with warnings.catch_warnings():
        # torch 2.14 deprecates TorchScript (FutureWarning); stock loads TorchScript or pickles.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
        torch.jit.script(TinyModel()).save(str(root / "model.pt"))  # type: ignore[no-untyped-call]
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


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    job = json.loads(Path(argv[1]).read_text("utf-8"))
    batch, repeats, warmup = int(job["batch"]), int(job["repeats"]), int(job.get("warmup", 1))
    if job.get("torch_threads"):
        torch.set_num_threads(int(job["torch_threads"]))  # same setting as the parent's run
    import torchvision

    out: dict[str, Any] = {"versions": {"torch": torch.__version__,
                                        "torchvision": torchvision.__version__,
                                        "torch_threads": torch.get_num_threads()},
                           "rates": {}}
    with tempfile.TemporaryDirectory() as tmp:
        handler, _ = _handler(*_model_dir(Path(tmp)), batch)
        for name, paths in job["sets"].items():
            images = [Path(p).read_bytes() for p in paths]
            batches: list[Rows] = [[{"body": bytearray(b)} for b in chunk]
                                   for chunk in batched(images, batch)]
            rate = measure(handler.preprocess, batches, len(images), repeats, warmup)
            out["rates"][name] = rate.to_json()
            print(f"stock {name}: {rate.median:.1f} img/s", file=sys.stderr)
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
