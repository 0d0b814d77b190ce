"""Object detector throughput: preprocess + inference at batch 1 and 8, mixed image sizes.

    /tmp/venv/bin/python benchmarks/bench_detector.py [--quick] [--json out.json]

Images: the mixed corpus of corpus.py (JPEG 500x375, 1280x960 and 4032x3024, PNG 256x256,
interleaved so every batch of 8 holds every size). Each goes through
`SecureObjectDetector.handle()` with TorchServe's real `Context`, as the worker calls it.

Two contracts, two TorchScript models with the same random-weight backbone (four stride-2
3x3 convolutions 3→16→32→64→64, a 1x1 head per 16x16 cell: box, score, 3 classes):

* `tensor`: fixed [B, 3, 320, 320] (every image resized, stretched, into a batch slot) →
  the 100 best cells as (boxes [B,100,4], scores [B,100], labels [B,100]);
* `list`: torchvision style, List[Tensor[3, H, W]] at each image's own size, downscaled to a
  longer side of `--max-side` (640) → (losses, List[Dict]).

Figures are images/s, median (and best) of `--repeats` interleaved passes after a warm-up:
`preprocess` is reading, checking, decoding and resizing into the model input (the handler's
`read_payload` + `decode` + `assemble`); `total` adds inference and the JSON answer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from _timing import Rate, batched  # noqa: E402
from corpus import make_corpus, mixed  # noqa: E402
from ts.context import RequestProcessor  # noqa: E402

from secure_handler import SecureObjectDetector  # noqa: E402
from secure_handler.serving.loading import save_torchscript  # noqa: E402
from secure_handler.testing import Request, make_context, run_batch  # noqa: E402

BATCH_SIZES = (1, 8)
TOP = 100
MANIFEST = {"model": {"modelName": "bench-det", "serializedFile": "model.pt",
                      "handler": "handler.py", "modelVersion": "1.0"}}
Key = tuple[str, str, int]


class Backbone(nn.Module):
    """[B, 3, H, W] → per-cell [B, 8, H/16, W/16]: 4 box values, 1 score, 3 class logits."""

    def __init__(self) -> None:
        super().__init__()
        chans = (3, 16, 32, 64, 64)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans, chans[1:], strict=False):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(64, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def decode_cells(cells: torch.Tensor, height: int, width: int, top: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's cells [8, h, w] → the `top` best boxes (xyxy input pixels), scores, labels."""
    h, w = cells.shape[1], cells.shape[2]
    flat = cells.flatten(1)
    scores = torch.sigmoid(flat[4])
    k = min(top, scores.shape[0])
    best, idx = scores.topk(k)
    ys = torch.div(idx, w, rounding_mode="floor").to(torch.float32)
    xs = (idx % w).to(torch.float32)
    cx = (xs + torch.sigmoid(flat[0, idx])) * (width / w)
    cy = (ys + torch.sigmoid(flat[1, idx])) * (height / h)
    bw = torch.sigmoid(flat[2, idx]) * width / 4
    bh = torch.sigmoid(flat[3, idx]) * height / 4
    boxes = torch.stack([cx - bw, cy - bh, cx + bw, cy + bh], dim=1)
    return boxes, best, flat[5:8, idx].argmax(dim=0)


class TensorDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.top = TOP

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cells = self.backbone(x)
        boxes, scores, labels = [], [], []
        for i in range(x.shape[0]):
            b, s, lab = decode_cells(cells[i], x.shape[2], x.shape[3], self.top)
            boxes.append(b)
            scores.append(s)
            labels.append(lab)
        return torch.stack(boxes), torch.stack(scores), torch.stack(labels)


class ListDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.top = TOP

    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        out: list[dict[str, torch.Tensor]] = []
        for img in images:
            cells = self.backbone(img.unsqueeze(0))[0]
            b, s, lab = decode_cells(cells, img.shape[1], img.shape[2], self.top)
            out.append({"boxes": b, "scores": s, "labels": lab})
        losses: dict[str, torch.Tensor] = {}
        return losses, out


def build_model_dir(root: Path, contract: str) -> Path:
    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    module = TensorDetector() if contract == "tensor" else ListDetector()
    save_torchscript(module, root / "model.pt")
    (root / "index_to_name.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    return root


def make_handler(model_dir: Path, contract: str, batch: int, max_side: int) -> tuple[Any, Any]:
    cfg: dict[str, Any] = {"max_batch_size": 8, "warmup": True, "score_threshold": 0.3}
    cfg.update({"input_size": 320} if contract == "tensor" else {"max_model_side": max_side})
    ctx = make_context(model_dir, MANIFEST, {"handler": cfg}, batch_size=batch)
    handler = SecureObjectDetector()
    handler.initialize(ctx)
    return handler, ctx


Pass = Callable[[], None]


def passes_for(model_dir: Path, contract: str, batch: int, requests: list[Request],
               max_side: int) -> dict[str, Pass]:
    handler, ctx = make_handler(model_dir, contract, batch, max_side)
    [(status, body)] = run_batch(handler, ctx, requests[:1])
    if status != 200 or "detections" not in body:
        raise AssertionError(f"the benchmark request failed: {status} {body}")
    batches = batched(requests, batch)

    def prepare(rows: list[Request]) -> list[dict[str, Any]]:
        ctx.request_processor = [RequestProcessor(r.header_map()) for r in rows]
        handler.context = ctx
        return [r.row() for r in rows]

    def preprocess() -> None:
        for rows in batches:
            data = prepare(rows)
            items = [handler.decode(handler.read_payload(row, i), i) for i, row in enumerate(data)]
            handler.assemble(items)

    def total() -> None:
        for rows in batches:
            handler.handle(prepare(rows), ctx)
            if any(ctx.get_response_status(i)[0] != 200 for i in range(len(rows))):
                raise AssertionError("a benchmark request failed")

    return {"preprocess": preprocess, "total": total}


def interleaved(passes: dict[Key, Pass], items: int, repeats: int) -> dict[Key, Rate]:
    """Round-robin timing, so load from other processes falls on every configuration alike."""
    times: dict[Key, list[float]] = {key: [] for key in passes}
    for fn in passes.values():
        fn()
    keys = list(passes)
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            start = time.perf_counter()
            passes[key]()
            times[key].append(time.perf_counter() - start)
    return {key: Rate(median=items / statistics.median(t), best=items / min(t), items=items,
                      repeats=repeats) for key, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--max-side", type=int, default=640, help="list contract max_model_side")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    per_kind, repeats = (2, 3) if args.quick else (4, args.repeats)
    corpus = make_corpus({"jpeg_500x375": 4, "jpeg_1280x960": 4, "jpeg_4032x3024": 2,
                          "png_256x256": 4})
    images = mixed(corpus, per_kind)
    requests = [Request(bytearray(b), "image/png" if b[:4] == b"\x89PNG" else "image/jpeg")
                for b in images]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(images)} mixed "
          f"images (500x375, 1280x960, 4032x3024 JPEG; 256x256 PNG); images/s: median (best) "
          f"of {repeats} interleaved passes")
    passes: dict[Key, Pass] = {}
    with tempfile.TemporaryDirectory(prefix="bench-det-") as tmp:
        for contract in ("tensor", "list"):
            model_dir = build_model_dir(Path(tmp) / contract, contract)
            for batch in BATCH_SIZES:
                for stage, fn in passes_for(model_dir, contract, batch, requests,
                                            args.max_side).items():
                    passes[contract, stage, batch] = fn
        rates = interleaved(passes, len(requests), repeats)
    report(rates)
    if args.json:
        args.json.write_text(json.dumps(
            {"/".join(map(str, k)): r.to_json() for k, r in rates.items()}, indent=2))
    return 0


def report(rates: dict[Key, Rate]) -> None:
    print("contract | batch | preprocess (best) |   total (best) | total vs batch 1")
    for contract in ("tensor", "list"):
        for b in BATCH_SIZES:
            pre, tot = rates[contract, "preprocess", b], rates[contract, "total", b]
            base = rates[contract, "total", BATCH_SIZES[0]].median
            print(f"{contract:>8} | {b:>5} | {pre.median:>8.1f} ({pre.best:>5.1f}) | "
                  f"{tot.median:>6.1f} ({tot.best:>5.1f}) | {tot.median / base:>15.2f}x")


if __name__ == "__main__":
    sys.exit(main())
