"""Tiny TorchScript text and detector models whose right answers the tests know.

`torch.jit.script` needs the source in a file, hence this module. Nothing is trained: the
weights are set by hand so a prediction follows a rule a test can state.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from support import script_and_save

# --- text -------------------------------------------------------------------------------------

VOCAB = {"<pad>": 0, "<unk>": 1, "good": 2, "great": 3, "bad": 4, "awful": 5, "meh": 6,
         "don't": 7}
TEXT_LABELS = {"0": "positive", "1": "negative", "2": "neutral"}


def keyword_weights() -> torch.Tensor:
    """[V, 3]: positive words → class 0, negative → 1, "meh" and unknown → 2.

    `<pad>` votes heavily for class 2, so a handler that lets padding through (a wrong
    attention mask, or offsets that overlap) gets a visibly wrong answer.
    """
    w = torch.zeros(len(VOCAB), 3)
    w[VOCAB["<pad>"], 2] = 100.0
    w[VOCAB["<unk>"], 2] = 0.5
    for word, cls in (("good", 0), ("great", 0), ("bad", 1), ("awful", 1), ("meh", 2),
                      ("don't", 1)):
        w[VOCAB[word], cls] = 3.0
    return w


class KeywordTextModel(torch.nn.Module):
    """`(input_ids [B, T], attention_mask [B, T]) -> logits [B, C]`: masked sum of rows."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = self.weights[input_ids]
        return (rows * attention_mask.unsqueeze(-1).to(rows.dtype)).sum(dim=1)


class KeywordBagModel(torch.nn.Module):
    """`(ids [N], offsets [B]) -> logits [B, C]`: the EmbeddingBag contract, same rule."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.bag = torch.nn.EmbeddingBag.from_pretrained(weights, freeze=True, mode="sum")

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.bag(ids, offsets)


def byte_weights() -> torch.Tensor:
    """[257, 2] for byte-level ids: class 1 when the text holds more 'x' than other bytes."""
    w = torch.zeros(257, 2)
    w[1:, 0] = 1.0
    w[ord("x") + 1] = torch.tensor([0.0, 5.0])
    w[0] = torch.tensor([0.0, 1000.0])  # padding must never count
    return w


def build_text_model(out_dir: Path, kind: str = "ids_mask", byte_level: bool = False) -> Path:
    """Script one of the text models into `out_dir/model.pt`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = byte_weights() if byte_level else keyword_weights()
    module = KeywordBagModel(weights) if kind == "bag" else KeywordTextModel(weights)
    return script_and_save(module.eval(), out_dir / "model.pt")


def write_text_files(out_dir: Path) -> list[Path]:
    """`vocab.json` and `index_to_name.json` for the keyword models."""
    vocab = out_dir / "vocab.json"
    vocab.write_text(json.dumps(VOCAB))
    labels = out_dir / "index_to_name.json"
    labels.write_text(json.dumps(TEXT_LABELS))
    return [vocab, labels]


# --- detection --------------------------------------------------------------------------------

SHAPE_LABELS = {"0": "red", "1": "green", "2": "blue"}
SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def colour_box(img: torch.Tensor, channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding box (xyxy, pixel edges) of the pixels where `channel` dominates, and a score."""
    others = torch.cat([img[:channel], img[channel + 1:]], dim=0)
    mask = (img[channel] > 0.6) & (others < 0.4).all(dim=0)
    if not bool(mask.any()):
        return torch.zeros(4), torch.zeros(())
    ys = mask.any(dim=1).nonzero().squeeze(1)
    xs = mask.any(dim=0).nonzero().squeeze(1)
    box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).to(torch.float32)
    return box, torch.tensor(0.9)


def _image_detections(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    boxes = []
    scores = []
    for channel in range(3):
        box, score = colour_box(img, channel)
        boxes.append(box)
        scores.append(score)
    # A fourth, confident "detection" entirely outside the image: the handler must drop it
    # when clipping, as real detectors do emit such boxes near borders.
    boxes.append(torch.tensor([-50.0, -50.0, -10.0, -10.0]))
    scores.append(torch.tensor(0.99))
    labels = torch.tensor([0, 1, 2, 0], dtype=torch.int64)
    return torch.stack(boxes), torch.stack(scores), labels


class TensorShapeDetector(torch.nn.Module):
    """Contract (b): `x [B, 3, H, W]` 0..1 → `(boxes [B, 4, 4], scores [B, 4], labels [B, 4])`."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes = []
        scores = []
        labels = []
        for i in range(x.shape[0]):
            b, s, lab = _image_detections(x[i])
            boxes.append(b)
            scores.append(s)
            labels.append(lab)
        return torch.stack(boxes), torch.stack(scores), torch.stack(labels)


class ListShapeDetector(torch.nn.Module):
    """Contract (a), torchvision style: `List[Tensor[3, H, W]]` → `(losses, List[Dict])`."""

    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        out: list[dict[str, torch.Tensor]] = []
        for img in images:
            b, s, lab = _image_detections(img)
            out.append({"boxes": b, "scores": s, "labels": lab})
        losses: dict[str, torch.Tensor] = {}
        return losses, out


class ListOnlyShapeDetector(torch.nn.Module):
    """Contract (a) returning `List[Dict]` without the losses."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out: list[dict[str, torch.Tensor]] = []
        for img in images:
            b, s, lab = _image_detections(img)
            out.append({"boxes": b, "scores": s, "labels": lab})
        return out


DETECTORS = {"tensor": TensorShapeDetector, "list": ListShapeDetector,
             "list_only": ListOnlyShapeDetector}


def build_detector(out_dir: Path, kind: str = "tensor") -> Path:
    """Script one of the shape detectors into `out_dir/model.pt`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return script_and_save(DETECTORS[kind]().eval(), out_dir / "model.pt")


def write_detector_labels(out_dir: Path) -> Path:
    path = out_dir / "index_to_name.json"
    path.write_text(json.dumps(SHAPE_LABELS))
    return path


Box = tuple[int, int, int, int]


def scene(size: tuple[int, int], shapes: dict[str, Box], fmt: str = "PNG") -> bytes:
    """A grey image with solid rectangles `{colour: (x1, y1, x2, y2)}` (x2, y2 exclusive)."""
    img = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(img)
    for colour, (x1, y1, x2, y2) in shapes.items():
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=SHAPE_COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def iou(a: list[float], b: Box) -> float:
    """Intersection over union of two xyxy boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class AlwaysThree(torch.nn.Module):
    """The swapped-in model: always answers class 3 ("none")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 4)
        out[:, 3] = 1.0
        return out
