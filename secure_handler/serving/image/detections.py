"""Detector outputs → one JSON-able result per image, each image checked on its own.

A model's output is split per image first (`split_detections`); only a structure that cannot
be attributed to images (no per-image split, the wrong image count) fails the whole batch.
Each image's tensors are then checked alone (`format_detections`): boxes `[N, 4]`, scores
and labels `[N]`; a malformed one fails that row only (500 `inference_failed`), its
neighbours are served. Labels are class ids: they never pass through float32 (integer
dtypes stay int64; float dtypes are read as float64), and a label that is not a finite
integer in `[0, 2**31)` drops its detection, as a non-finite score or box does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from secure_handler.errors import InferenceFailed

__all__ = ["Frame", "Triple", "format_detections", "label_ids", "split_detections"]

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_KEYS = ("boxes", "scores", "labels")
_MAX_LABEL = 2**31  # JSON-safe everywhere, and wider than any real class count


@dataclass(frozen=True, slots=True)
class Frame:
    """How one image's model-input pixels map back to the original (shown) image."""

    width: int
    height: int
    scale_x: float  # original pixels per model-input pixel
    scale_y: float


def _failed(why: str) -> InferenceFailed:
    return InferenceFailed(f"the model's detections for this image are malformed: {why}")


def _from_dict(entry: Any) -> Triple | InferenceFailed:
    if not isinstance(entry, dict):
        return _failed(f"expected a dict of {', '.join(_KEYS)}; got {type(entry).__name__}")
    missing = [k for k in _KEYS if k not in entry]
    if missing:
        return _failed(f"the dict has no {missing[0]!r}")
    boxes, scores, labels = (entry[k] for k in _KEYS)
    if not all(isinstance(t, torch.Tensor) for t in (boxes, scores, labels)):
        return _failed("boxes, scores and labels must be tensors")
    return boxes, scores, labels


def split_detections(outputs: Any, count: int) -> list[Triple | InferenceFailed]:
    """Any supported detector output → per image, its `(boxes, scores, labels)` or its error.

    Raises:
        TypeError: the output cannot be split into `count` images at all.
    """
    if isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[1], list):
        outputs = outputs[1]  # scripted torchvision: (losses, detections)
    if isinstance(outputs, list) or (
            isinstance(outputs, tuple) and outputs and isinstance(outputs[0], dict)):
        if len(outputs) != count:
            raise TypeError(f"detector returned {len(outputs)} results for {count} images")
        return [_from_dict(d) for d in outputs]
    if isinstance(outputs, dict):
        outputs = tuple(outputs.get(k) for k in _KEYS)
    if not (isinstance(outputs, tuple) and len(outputs) == 3
            and all(isinstance(t, torch.Tensor) for t in outputs)):
        raise TypeError("detector must return (boxes, scores, labels), a dict of them, "
                        "List[Dict] or (losses, List[Dict])")
    boxes, scores, labels = outputs
    if any(t.dim() == 0 or t.shape[0] != count for t in outputs):
        raise TypeError(f"batched outputs must have {count} images in dim 0; got "
                        f"{[list(t.shape) for t in outputs]}")
    return [(boxes[i], scores[i], labels[i]) for i in range(count)]


def label_ids(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels → (int64 ids, valid mask); float labels are read in float64, never float32.

    Raises:
        TypeError: a dtype that cannot hold class ids (bool, complex).
    """
    if labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be integers; got dtype {labels.dtype}")
    if labels.is_floating_point():
        wide = labels.double()
        valid = torch.isfinite(wide) & (wide == wide.floor()) & (wide >= 0) & (wide < _MAX_LABEL)
        return torch.where(valid, wide, 0.0).long(), valid
    ids = labels.long()
    return ids, (ids >= 0) & (ids < _MAX_LABEL)


def format_detections(found: Triple, frame: Frame, limits: Any,
                      label_map: Mapping[int, str]) -> dict[str, Any] | InferenceFailed:
    """One image's detections: thresholded, mapped to original pixels, best first."""
    boxes, scores, labels = (t.detach().cpu() for t in found)
    count = boxes.shape[0] if boxes.dim() == 2 else -1
    if boxes.dim() != 2 or boxes.shape[1] != 4 or not scores.shape == labels.shape == (count,):
        return _failed(f"expected boxes [N, 4], scores [N], labels [N]; got "
                       f"{list(boxes.shape)}, {list(scores.shape)}, {list(labels.shape)}")
    if not (boxes.is_floating_point() or boxes.dtype in _INTS) or not (
            scores.is_floating_point() or scores.dtype in _INTS):
        return _failed(f"boxes and scores must be numbers; got {boxes.dtype}, {scores.dtype}")
    try:
        ids, keep = label_ids(labels)
    except TypeError as exc:
        return _failed(str(exc))
    boxes, scores = boxes.float(), scores.float()  # coordinates and scores only
    keep &= (scores >= limits.score_threshold) & torch.isfinite(scores)
    keep &= torch.isfinite(boxes).all(dim=1)
    boxes = boxes * torch.tensor([frame.scale_x, frame.scale_y] * 2)
    bound = torch.tensor([frame.width, frame.height] * 2, dtype=torch.float32)
    boxes = boxes.clamp(min=0).minimum(bound)
    keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # still visible
    order = keep.nonzero().squeeze(1)
    order = order[scores[order].argsort(descending=True)][: limits.max_detections]
    return {"detections": [
        {"label": label_map.get(c, str(c)), "class": c,
         "score": round(s, limits.score_digits),
         "box": [round(v, limits.box_digits) for v in b]}
        for b, s, c in zip(boxes[order].tolist(), scores[order].tolist(),
                           ids[order].tolist(), strict=True)
    ]}


_INTS = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
