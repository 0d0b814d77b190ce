"""Build a shape detector from tensor operations and save it as TorchScript.

    python examples/object_detector/build_model.py --out build/object_detector \
        [--contract tensor|list] [--quick]

The detector has no learned weights: it is a small, exact vision pipeline written in torch ops,
so its boxes are right without training. For each image it

1. takes as background colours the per-channel medians of the image's central half and of
   3 x 3 patches at its four corners (so letterbox padding, which fills corners, counts as
   background too),
2. marks pixels that differ from every background colour by more than `diff_threshold` in
   some channel,
3. labels connected regions by propagating the largest pixel id along horizontal and
   vertical runs until nothing changes (bounded by `max_passes`),
4. boxes each region, drops tiny ones and ones spanning the whole width or height (the padding
   bars of a letterbox), and
5. names the shape by how much of its box it fills: square ~1.0, circle ~pi/4, triangle ~0.5.
   The score falls off with the distance to that class's fill ratio.

Two contracts, chosen with `--contract`:

* `tensor` (default): `forward(images: Tensor[B, 3, 320, 320] float 0..1)` →
  `(boxes [B, N, 4] xyxy in input pixels, scores [B, N], labels [B, N] int64)`, N fixed
  (`--max-detections`, default 16); unused slots have score 0 and a zero box.
* `list` (torchvision style): `forward(images: List[Tensor[3, H, W]] float 0..1)` →
  `(losses: Dict[str, Tensor], detections: List[Dict[str, Tensor]])` with `boxes [K, 4]`,
  `labels [K]` int64 and `scores [K]` per image, in that image's own pixels; losses is empty.

Labels index `index_to_name.json`: 0 circle, 1 square, 2 triangle (no background class).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from secure_handler.serving.loading import save_torchscript

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scenes import (
    CLASSES,
    Box,
    encode,
    make_scene,
    match,
    resize_input,
    sample_sizes,
    to_tensor_input,
)

INPUT_SIDE = 320


def _run_max(ids: Tensor, fg: Tensor) -> Tensor:
    """Replace each foreground id by the largest id in its horizontal run of foreground."""
    rows, cols = fg.shape
    before = torch.zeros_like(fg)
    before[:, 1:] = fg[:, :-1]
    run = torch.cumsum((fg & ~before).to(torch.int64), dim=1)  # 1.. for foreground pixels
    row = torch.arange(rows, device=fg.device).unsqueeze(1)
    key = torch.where(fg, row * (cols + 1) + run, torch.zeros_like(run)).reshape(-1)
    best = torch.zeros(rows * (cols + 1), dtype=torch.int64, device=fg.device)
    best = best.scatter_reduce(0, key, ids.reshape(-1), "amax")
    return torch.where(fg, best[key].reshape(rows, cols), torch.zeros_like(ids))


class ShapeDetector(nn.Module):
    """Background subtraction + connected regions + fill-ratio classes, in torch ops."""

    def __init__(self, max_detections: int = 16, diff_threshold: float = 0.2,
                 min_area: int = 40, max_passes: int = 32) -> None:
        super().__init__()
        self.max_detections = max_detections
        self.diff_threshold = diff_threshold
        self.min_area = min_area
        self.max_passes = max_passes
        # Fill ratio of each class's box: circle pi/4, square 1, triangle 1/2.
        self.fill_ratios = [0.785, 1.0, 0.5]

    def backgrounds(self, image: Tensor) -> list[Tensor]:
        """Candidate background colours [3]: the central half's and each corner's median."""
        _, h, w = image.shape
        patches = [
            image[:, h // 4: h - h // 4, w // 4: w - w // 4],
            image[:, :3, :3], image[:, :3, -3:], image[:, -3:, :3], image[:, -3:, -3:],
        ]
        return [p.reshape(3, -1).median(dim=1).values for p in patches]

    def foreground(self, image: Tensor) -> Tensor:
        """Pixels unlike every background colour; [H, W] bool."""
        fg = torch.ones(image.shape[1:], dtype=torch.bool, device=image.device)
        for colour in self.backgrounds(image):  # one at a time: big list-contract images
            fg &= (image - colour[:, None, None]).abs().amax(dim=0) > self.diff_threshold
        return fg

    def regions(self, fg: Tensor) -> Tensor:
        """Connected-region labels (largest pixel id + 1 in the region; 0 off the foreground)."""
        h, w = fg.shape
        first = torch.arange(1, h * w + 1, device=fg.device).reshape(h, w)
        ids = torch.where(fg, first, torch.zeros_like(first))
        for _ in range(self.max_passes):  # bounded: hostile pixels cannot make it spin
            new = _run_max(ids, fg)
            new = _run_max(new.t().contiguous(), fg.t().contiguous()).t().contiguous()
            if torch.equal(new, ids):
                break
            ids = new
        return ids

    def detect_one(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Boxes [K, 4], scores [K] and labels [K] of one image [3, H, W], largest first."""
        _, h, w = image.shape
        fg = self.foreground(image)
        ids = self.regions(fg)
        pixels = fg.nonzero()
        _, region = torch.unique(ids[fg], return_inverse=True)
        count = int(region.max()) + 1 if region.numel() > 0 else 0
        ys, xs = pixels[:, 0], pixels[:, 1]
        dev = image.device
        x1 = torch.full((count,), w, dtype=torch.int64, device=dev)
        x1 = x1.scatter_reduce(0, region, xs, "amin")
        y1 = torch.full((count,), h, dtype=torch.int64, device=dev)
        y1 = y1.scatter_reduce(0, region, ys, "amin")
        x2 = torch.zeros(count, dtype=torch.int64, device=dev)
        x2 = x2.scatter_reduce(0, region, xs + 1, "amax")
        y2 = torch.zeros(count, dtype=torch.int64, device=dev)
        y2 = y2.scatter_reduce(0, region, ys + 1, "amax")
        area = torch.bincount(region, minlength=count)
        spans = ((x1 == 0) & (x2 == w)) | ((y1 == 0) & (y2 == h))
        keep = (area >= self.min_area) & ~spans
        boxes = torch.stack([x1, y1, x2, y2], dim=1)[keep].to(image.dtype)
        area = area[keep].to(image.dtype)
        fill = area / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        ratios = torch.tensor(self.fill_ratios, dtype=image.dtype, device=image.device)
        distance = (fill.unsqueeze(1) - ratios).abs()
        nearest, labels = distance.min(dim=1)
        scores = (1.0 - nearest / 0.25).clamp(0.05, 1.0)
        order = torch.argsort(area, descending=True)[: self.max_detections]
        return boxes[order], scores[order], labels[order]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b = images.shape[0]
        n = self.max_detections
        boxes = torch.zeros(b, n, 4, dtype=images.dtype, device=images.device)
        scores = torch.zeros(b, n, dtype=images.dtype, device=images.device)
        labels = torch.zeros(b, n, dtype=torch.int64, device=images.device)
        for i in range(b):
            found_boxes, found_scores, found_labels = self.detect_one(images[i])
            k = found_boxes.shape[0]
            boxes[i, :k] = found_boxes
            scores[i, :k] = found_scores
            labels[i, :k] = found_labels
        return boxes, scores, labels


class ListShapeDetector(nn.Module):
    """The torchvision-style contract around the same detector."""

    def __init__(self, detector: ShapeDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: list[Tensor]) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        losses: dict[str, Tensor] = {}
        detections: list[dict[str, Tensor]] = []
        for image in images:
            boxes, scores, labels = self.detector.detect_one(image)
            detections.append({"boxes": boxes, "labels": labels, "scores": scores})
        return losses, detections


def build(contract: str, max_detections: int) -> nn.Module:
    detector = ShapeDetector(max_detections=max_detections)
    model: nn.Module = ListShapeDetector(detector) if contract == "list" else detector
    return model.eval()


@torch.inference_mode()
def evaluate(model: torch.jit.ScriptModule, contract: str, count: int,
             resize: str = "stretch") -> dict[str, float]:
    """Detect shapes in `count` scenes of mixed sizes (PNG and JPEG in turn).

    Returns the share of shapes found with the right class at IoU >= 0.5, the mean IoU and
    the number of detections beyond the shapes drawn.
    """
    ious: list[float] = []
    extra = 0
    for i, (w, h) in enumerate(sample_sizes(count, seed=4242)):
        scene = make_scene(10_000 + i, w, h)
        with Image.open(io.BytesIO(encode(scene.image, "JPEG" if i % 2 else "PNG"))) as img:
            boxes, labels = detect(model, contract, img.convert("RGB"), resize)
        extra += max(0, len(boxes) - len(scene.boxes))
        ious += match(scene, boxes, labels)
    return {"recall_at_iou_0.5": round(float(np.mean([v >= 0.5 for v in ious])), 4),
            "mean_iou": round(float(np.mean(ious)), 4), "false_positives": extra,
            "scenes": count, "shapes": len(ious)}


def detect(model: torch.jit.ScriptModule, contract: str, image: Image.Image,
           resize: str = "stretch", threshold: float = 0.3) -> tuple[list[Box], list[int]]:
    """Boxes (in `image` pixels) and labels scoring over `threshold`, the way the handler
    would feed the model: the image as is (list), or resized to 320 x 320 (tensor)."""
    if contract == "list":
        _, found = model([torch.from_numpy(to_tensor_input(image))])
        keep = found[0]["scores"] > threshold
        return found[0]["boxes"][keep].tolist(), found[0]["labels"][keep].tolist()
    pixels, sx, sy = resize_input(image, INPUT_SIDE, resize)
    boxes, scores, labels = model(torch.from_numpy(pixels)[None])
    keep = scores[0] > threshold
    mapped = [(x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in boxes[0][keep].tolist()]
    return mapped, labels[0][keep].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the shapes detector example.")
    parser.add_argument("--out", type=Path, required=True, help="folder for model.pt")
    parser.add_argument("--contract", choices=("tensor", "list"), default="tensor")
    parser.add_argument("--max-detections", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="fewer evaluation scenes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: faster for a model this small "
                             "and no OpenMP spin-waiting when the cores are shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # this script owns its process
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    scripted = save_torchscript(build(args.contract, args.max_detections), args.out / "model.pt")
    t1 = time.perf_counter()
    count = 10 if args.quick else 100
    if args.contract == "list":
        report = {"list": evaluate(scripted, "list", count)}
    else:
        report = {mode: evaluate(scripted, "tensor", count, mode)
                  for mode in ("stretch", "letterbox")}
    t2 = time.perf_counter()
    print(json.dumps({"contract": args.contract, "classes": list(CLASSES),
                      "input": "List[Tensor[3,H,W]]" if args.contract == "list"
                      else [1, 3, INPUT_SIDE, INPUT_SIDE],
                      "accuracy": report, "build_s": round(t1 - t0, 2),
                      "eval_s": round(t2 - t1, 2), "cpu_s": round(time.process_time(), 2),
                      "model": str(args.out / "model.pt")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
