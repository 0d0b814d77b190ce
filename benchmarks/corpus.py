"""Deterministic, photo-like benchmark images (no downloads, no data files).

A flat or purely random image is a poor stand-in for a photo: the first compresses to almost
nothing and the second to almost nothing less than raw, and both decode at unrealistic speeds.
These images layer what a camera frame has, so JPEG at quality 90 lands in the usual
bytes-per-pixel range of real photos:

* a smooth low-frequency colour field (sky, walls, lighting gradients),
* a mid-frequency layer (texture, foliage-like variation),
* soft-edged shapes (objects), some sharp ones (edges, text-like detail),
* per-pixel Gaussian grain (sensor noise).

The same `(kind, index)` always gives the same bytes on the same Pillow/libjpeg build.
This module runs under both the project venv and the stock venv (Pillow + numpy only).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["KINDS", "MIX_WEIGHTS", "Kind", "make_corpus", "make_image", "mixed"]


@dataclass(frozen=True)
class Kind:
    """One corpus kind: container format and pixel size."""

    name: str
    fmt: str  # Pillow format name: "JPEG" or "PNG"
    width: int
    height: int


KINDS: tuple[Kind, ...] = (
    Kind("jpeg_500x375", "JPEG", 500, 375),
    Kind("jpeg_1280x960", "JPEG", 1280, 960),
    Kind("jpeg_4032x3024", "JPEG", 4032, 3024),
    Kind("png_256x256", "PNG", 256, 256),
)

#: Share of each kind in the "mixed" corpus. Equal counts: every kind contributes
#: `n_per_kind` images, so the mixed rate is the harmonic mean of the per-kind rates.
MIX_WEIGHTS: Mapping[str, int] = {k.name: 1 for k in KINDS}

JPEG_QUALITY = 90
_SEED = 20240917


def _smooth_field(rng: np.random.Generator, w: int, h: int, cells: int, amp: float) -> np.ndarray:
    """A random `cells`-wide colour grid upsampled bicubically: smooth gradients, float32."""
    gw = max(2, cells)
    gh = max(2, round(cells * h / w))
    grid = rng.uniform(-amp, amp, size=(gh, gw, 3)).astype(np.float32)
    # Pillow's "F" mode resizes one float channel at a time, with true bicubic filtering.
    planes = [
        np.asarray(Image.fromarray(grid[:, :, c], "F").resize((w, h), Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return np.stack(planes, axis=2)


def _random_shape(rng: np.random.Generator, draw: ImageDraw.ImageDraw, w: int, h: int,
                  alpha: int) -> None:
    x0, y0 = rng.uniform(-0.1, 0.95) * w, rng.uniform(-0.1, 0.95) * h
    x1, y1 = x0 + rng.uniform(0.05, 0.4) * w, y0 + rng.uniform(0.05, 0.4) * h
    fill = (*(int(c) for c in rng.integers(0, 256, size=3)), alpha)
    shape = int(rng.integers(0, 3))
    if shape == 0:
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == 1:
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(rng.uniform(0, 1) * w, rng.uniform(0, 1) * h) for _ in range(4)], fill=fill)


def _draw_shapes(rng: np.random.Generator, img: Image.Image, count: int) -> Image.Image:
    """Objects: blurred translucent shapes (soft edges), then a few sharp ones (fine detail)."""
    w, h = img.size
    soft = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(soft)
    for _ in range(count):
        _random_shape(rng, draw, w, h, alpha=int(rng.integers(120, 256)))
    soft = soft.filter(ImageFilter.GaussianBlur(max(1.0, w / 300)))
    out = Image.alpha_composite(img.convert("RGBA"), soft)
    draw = ImageDraw.Draw(out)
    for _ in range(max(2, count // 3)):
        _random_shape(rng, draw, w, h, alpha=255)
    return out.convert("RGB")


def _pixels(kind: Kind, index: int) -> Image.Image:
    rng = np.random.default_rng([_SEED, KINDS.index(kind), index])
    w, h = kind.width, kind.height
    base = rng.uniform(60, 190, size=3).astype(np.float32)
    field = base + _smooth_field(rng, w, h, 3, 70.0) + _smooth_field(rng, w, h, 40, 18.0)
    img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8), "RGB")
    img = _draw_shapes(rng, img, count=12)
    arr = np.asarray(img, dtype=np.int16)
    grain = rng.normal(0.0, 5.0, size=(h, w, 1)).astype(np.int16)  # luma-ish grain
    chroma = rng.normal(0.0, 2.0, size=(h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr + grain + chroma, 0, 255).astype(np.uint8), "RGB")


def make_image(kind: Kind, index: int) -> bytes:
    """The encoded bytes of image `index` of `kind` (JPEG q90 or PNG), deterministic."""
    img = _pixels(kind, index)
    buf = io.BytesIO()
    if kind.fmt == "JPEG":
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, kind.fmt)
    return buf.getvalue()


def make_corpus(
    n_per_kind: int | Mapping[str, int], kinds: Sequence[Kind] = KINDS
) -> dict[str, list[bytes]]:
    """`{kind name: [encoded image, ...]}` with `n_per_kind` images of each kind.

    `n_per_kind` may be a mapping to give the big kinds fewer distinct images (they are
    repeated by the benchmarks anyway; distinct images only defeat caches).
    """
    counts = n_per_kind if isinstance(n_per_kind, Mapping) else {k.name: n_per_kind for k in kinds}
    return {k.name: [make_image(k, i) for i in range(counts[k.name])] for k in kinds}


def mixed(corpus: Mapping[str, Sequence[bytes]], n_per_kind: int) -> list[bytes]:
    """The mixed corpus: `n_per_kind * MIX_WEIGHTS[kind]` images of each kind, interleaved.

    Interleaving puts every kind into every batch of 8, as a real mixed stream would.
    """
    queues = {
        name: [imgs[i % len(imgs)] for i in range(n_per_kind * MIX_WEIGHTS.get(name, 1))]
        for name, imgs in corpus.items()
    }
    out: list[bytes] = []
    while any(queues.values()):
        for q in queues.values():
            if q:
                out.append(q.pop(0))
    return out
