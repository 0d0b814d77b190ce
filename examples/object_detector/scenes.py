"""Deterministic scenes of coloured shapes on a plain background, with their true boxes.

`make_scene(seed, width, height)` returns the image and the ground truth: one box
`[x1, y1, x2, y2]` (pixel edges, so a shape covering columns 10..19 has x1 = 10, x2 = 20) and
one class index per shape. Half the shapes are stretched by up to 1.3x along one axis (a
"square" may be a rectangle, a "circle" an ellipse, a triangle is always isosceles with its
base down). Shapes never overlap and keep a margin from the border; together they cover at
most 40% of the image's central half, where the detector reads the background.

`resize_input(image, side, mode)` is a plain reference of the handler's resize (stretch, or
letterbox at the top left), and `iou(a, b)` scores boxes; tests use both to check the detector.

Run `python examples/object_detector/scenes.py DIR` to write a few sample scenes and their
ground truth (`truth.json`).
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
Box = tuple[float, float, float, float]
LETTERBOX_FILL = 114  # SecureObjectDetector's default `letterbox_fill`


@dataclass(frozen=True)
class Scene:
    """An RGB image and what was drawn on it."""

    image: Image.Image
    boxes: list[Box]
    labels: list[int]


def _colours(rng: np.random.Generator, count: int) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """A background colour and `count` shape colours at least 100/255 away from it.

    Shapes also keep 100/255 away from LETTERBOX_FILL grey, which a letterbox pads with.
    """
    bg = rng.integers(0, 256, size=3)
    shapes: list[tuple[int, ...]] = []
    while len(shapes) < count:
        fg = rng.integers(0, 256, size=3)
        if np.abs(fg - bg).max() >= 100 and np.abs(fg - LETTERBOX_FILL).max() >= 100:
            shapes.append(tuple(int(v) for v in fg))
    return tuple(int(v) for v in bg), shapes


def _place(rng: np.random.Generator, width: int, height: int, count: int) -> list[tuple[int, ...]]:
    """Up to `count` non-overlapping integer boxes (inclusive corners) with gaps and margins."""
    short = min(width, height)
    margin, gap = max(3, int(0.04 * short)), max(4, int(0.05 * short))
    placed: list[tuple[int, ...]] = []
    for _ in range(count * 30):
        if len(placed) == count:
            break
        w = int(rng.uniform(0.12, 0.3) * short)
        h = w if rng.random() < 0.5 else int(w * rng.uniform(0.7, 1.3))
        x0 = int(rng.integers(margin, width - margin - w))
        y0 = int(rng.integers(margin, height - margin - h))
        box = (x0, y0, x0 + w - 1, y0 + h - 1)
        if all(_apart(box, other, gap) for other in placed):
            placed.append(box)
    return placed


def _apart(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def _draw(draw: ImageDraw.ImageDraw, label: int, box: tuple[int, ...],
          colour: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box
    if CLASSES[label] == "circle":
        draw.ellipse(box, fill=colour)
    elif CLASSES[label] == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=colour)


def _central_coverage(boxes: list[tuple[int, ...]], width: int, height: int) -> float:
    """Upper bound of the fraction of the central half the shapes' boxes cover."""
    cx0, cy0, cx1, cy1 = width // 4, height // 4, width - width // 4, height - height // 4
    covered = sum(max(0, min(b[2] + 1, cx1) - max(b[0], cx0))
                  * max(0, min(b[3] + 1, cy1) - max(b[1], cy0)) for b in boxes)
    return covered / ((cx1 - cx0) * (cy1 - cy0))


def make_scene(seed: int, width: int = 320, height: int = 320, max_shapes: int = 4) -> Scene:
    """A `width` x `height` scene of 1..max_shapes shapes; the same seed gives the same scene."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, max_shapes + 1))
    boxes = _place(rng, width, height, count)
    while _central_coverage(boxes, width, height) > 0.4:
        boxes.pop()
    labels = [int(v) for v in rng.integers(0, len(CLASSES), size=len(boxes))]
    bg, colours = _colours(rng, len(boxes))
    image = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(image)
    for label, box, colour in zip(labels, boxes, colours, strict=True):
        _draw(draw, label, box, colour)
    truth = [(float(b[0]), float(b[1]), float(b[2] + 1), float(b[3] + 1)) for b in boxes]
    return Scene(image, truth, labels)


def resize_input(image: Image.Image, side: int = 320, mode: str = "stretch",
                 fill: int = LETTERBOX_FILL) -> tuple[np.ndarray, float, float]:
    """A plain reference of `SecureObjectDetector`'s resize into a side x side model input.

    `stretch` resizes to side x side; `letterbox` keeps the aspect ratio, puts the image at the
    top left and pads the rest with `fill`. Returns float32 3 x side x side in 0..1 and the
    original pixels per input pixel along x and y (multiply a box by them to map it back).
    """
    w, h = image.size
    if mode == "stretch":
        target = (side, side)
    else:
        scale = side / max(w, h)
        target = (max(1, min(side, round(w * scale))), max(1, min(side, round(h * scale))))
    canvas = Image.new("RGB", (side, side), (fill, fill, fill))
    canvas.paste(image.convert("RGB").resize(target, Image.Resampling.BILINEAR), (0, 0))
    pixels = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray(pixels), w / target[0], h / target[1]


def to_tensor_input(image: Image.Image) -> np.ndarray:
    """float32 3 x H x W in 0..1, at the image's own size (the list contract's input)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray(pixels)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(truth: Scene, boxes: list[Box], labels: list[int]) -> list[float]:
    """For each true shape, the best IoU among detections of the same class (0 if none)."""
    found = list(zip(boxes, labels, strict=True))
    return [max((iou(t, b) for b, lab in found if lab == want), default=0.0)
            for t, want in zip(truth.boxes, truth.labels, strict=True)]


def encode(image: Image.Image, fmt: str) -> bytes:
    """PNG or JPEG (quality 90) bytes of `image`."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def sample_sizes(count: int, seed: int = 7) -> list[tuple[int, int]]:
    """`count` (width, height) pairs of mixed sizes, aspect ratio at most 2:1."""
    rng = np.random.default_rng(seed)
    sizes = []
    for _ in range(count):
        w = int(rng.integers(200, 800))
        h = int(np.clip(w * rng.uniform(0.5, 2.0), 200, 800))
        sizes.append((w, h))
    return sizes


def write_samples(out_dir: Path, count: int = 6, seed: int = 500) -> Path:
    """Write `count` scenes (PNG and JPEG in turn) and `truth.json`; returns truth.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i, (w, h) in enumerate(sample_sizes(count, seed)):
        scene = make_scene(seed + i, w, h)
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        name = f"scene-{i:02d}.{'png' if fmt == 'PNG' else 'jpg'}"
        (out_dir / name).write_bytes(encode(scene.image, fmt))
        truth[name] = [{"label": CLASSES[lab], "class": lab, "box": list(box)}
                       for lab, box in zip(scene.labels, scene.boxes, strict=True)]
    path = out_dir / "truth.json"
    path.write_text(json.dumps(truth, indent=2) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the scenes and truth.json")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--seed", type=int, default=500)
    args = parser.parse_args()
    print(write_samples(args.out, args.count, args.seed))


if __name__ == "__main__":
    main()
