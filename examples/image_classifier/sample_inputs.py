"""Deterministic images of coloured shapes, for training, the demo and the tests.

Every function takes a seed (or a numpy Generator) so the same call gives the same pixels.
`write_samples(DIR)` writes a few PNG and JPEG files named after the shape they show;
`preprocess(image)` is a plain reference of the handler's default transform (short side 256,
center crop 224, ImageNet mean/std) so tests can score the model without the handler.

Run `python examples/image_classifier/sample_inputs.py DIR` to write the samples.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
TRAIN_SIDE = 56  # the model pools any input to this side before its first convolution
DRAW_SCALE = 4  # shapes are drawn at 4x and box-reduced, which gives anti-aliased edges
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# The handler crops 224 out of a short side of 256: only the central 87.5% is ever seen.
CROP_FRACTION = 224 / 256


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` centred on (cx, cy) with outer radius r, rotated by `angle`."""
    if shape == "square":
        radii, count = [r] * 4, 4
    elif shape == "triangle":
        radii, count = [r] * 3, 3
    elif shape == "star":
        radii, count = [r, r * 0.42] * 5, 10
    elif shape == "cross":
        # A plus sign: 12 corners, arms a third of the span wide.
        w = r / 3
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    step = 2 * math.pi / count
    return [(cx + rad * math.cos(angle + i * step), cy + rad * math.sin(angle + i * step))
            for i, rad in enumerate(radii)]


def shape_mask(shape: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """An anti-aliased coverage mask (float32 0..1, side x side) of one random `shape`."""
    big = side * DRAW_SCALE
    r = rng.uniform(0.2, 0.42) * big
    cx, cy = (rng.uniform(r + 1, big - r - 1) for _ in range(2))
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=255)
    return np.asarray(canvas.reduce(DRAW_SCALE), dtype=np.float32) / 255.0


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A background and a foreground colour at least 90/255 apart in some channel."""
    while True:
        bg, fg = rng.uniform(0, 255, size=(2, 3))
        if np.abs(bg - fg).max() >= 90:
            return bg.astype(np.float32), fg.astype(np.float32)


def compose(mask: np.ndarray, rng: np.random.Generator, noise: float = 6.0) -> np.ndarray:
    """Paint `mask` over a random gradient background; uint8 HxWx3."""
    h, w = mask.shape
    bg, fg = _contrasting_colours(rng)
    tilt = rng.uniform(-40, 40, size=(2, 3)).astype(np.float32)
    ys = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None, None]
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :, None]
    background = bg + ys * tilt[0] + xs * tilt[1]
    pixels = background * (1 - mask[..., None]) + fg * mask[..., None]
    pixels += rng.normal(0, noise, size=pixels.shape).astype(np.float32)
    out: np.ndarray = np.clip(pixels, 0, 255).astype(np.uint8)
    return out


def training_set(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` images at TRAIN_SIDE (uint8 N x H x W x 3) and their class indices."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASSES)
    rng.shuffle(labels)
    images = np.empty((count, TRAIN_SIDE, TRAIN_SIDE, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = compose(shape_mask(CLASSES[label], TRAIN_SIDE, rng), rng)
    return images, labels.astype(np.int64)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x 3 → float32 N x 3 x H x W with ImageNet mean/std."""
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    out: np.ndarray = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return out


def render(shape: str, width: int, height: int, seed: int) -> Image.Image:
    """A `width` x `height` RGB image of `shape`, placed where the handler's crop sees it."""
    rng = np.random.default_rng(seed)
    crop = int(min(width, height) * CROP_FRACTION)
    mask = np.zeros((height, width), dtype=np.float32)
    top, left = (height - crop) // 2, (width - crop) // 2
    mask[top:top + crop, left:left + crop] = shape_mask(shape, crop, rng)
    return Image.fromarray(compose(mask, rng))


def encode(image: Image.Image, fmt: str) -> bytes:
    """PNG or JPEG (quality 90) bytes of `image`."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def samples(count: int, seed: int = 1234) -> list[tuple[str, str, bytes]]:
    """`count` (shape, format, bytes) triples of various sizes, PNG and JPEG in turn."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        shape = CLASSES[i % len(CLASSES)]
        width, height = (int(v) for v in rng.integers(160, 640, size=2))
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        out.append((shape, fmt, encode(render(shape, width, height, seed + i), fmt)))
    return out


def preprocess(data: bytes, resize: int = 256, crop: int = 224) -> np.ndarray:
    """Reference of the handler's transform: float32 3 x crop x crop, ImageNet-normalised."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    scale = resize / min(w, h)
    rgb = rgb.resize((max(crop, round(w * scale)), max(crop, round(h * scale))),
                     Image.Resampling.BILINEAR)
    w, h = rgb.size
    left, top = (w - crop) // 2, (h - crop) // 2
    rgb = rgb.crop((left, top, left + crop, top + crop))
    out: np.ndarray = normalize(np.asarray(rgb)[None])[0]
    return out


def write_samples(out_dir: Path, count: int = 10, seed: int = 1234) -> list[Path]:
    """Write `count` sample images named `<index>-<shape>.<png|jpg>` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (shape, fmt, data) in enumerate(samples(count, seed)):
        path = out_dir / f"{i:02d}-{shape}.{'png' if fmt == 'PNG' else 'jpg'}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the sample images")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    for path in write_samples(args.out, args.count, args.seed):
        print(path)


if __name__ == "__main__":
    main()
