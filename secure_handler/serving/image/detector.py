"""`SecureObjectDetector`: checked images → detector → thresholded boxes in original pixels.

Image reading and validation are `SecureVisionHandler`'s, so the detector refuses exactly what
the image classifier refuses, with the same statuses and codes.

Two model contracts (TorchScript), `handler.model_contract: auto | list | tensor`:

* `list`, torchvision style: `forward(images: List[Tensor[3, H, W]] float 0..1, ...)` →
  `(losses, List[Dict[str, Tensor]])` (what scripted torchvision detectors return) or
  `List[Dict[str, Tensor]]`, each dict with `boxes` [N, 4] xyxy in that image's pixels,
  `scores` [N] and `labels` [N]. Each image keeps its own size (downscaled only when its
  longer side is over `max_model_side`), so mixed sizes are never stacked.
* `tensor`, fixed size: `forward(x: Tensor[B, 3, H, W] float 0..1)` with (H, W) =
  `input_size` → `(boxes [B, N, 4] xyxy in input pixels, scores [B, N], labels [B, N])` or
  a dict of those. Every image is resized (`stretch`, or `letterbox` keeping the aspect
  ratio, image at the top-left) into one preallocated uint8 batch slot, so mixed sizes
  become one stack of equal shapes by construction.

`auto` reads the first argument type of the loaded `forward` (`List[Tensor]` or `Tensor`);
anything else fails `initialize` with a message naming `model_contract`.

Outputs are checked per image (detections.py): a malformed result fails its own row with 500
`inference_failed`, its neighbours are served; labels are validated class ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from secure_handler.errors import ConfigurationError
from secure_handler.limits import ObjectDetectorLimits
from secure_handler.serving.image.detections import Frame, format_detections, split_detections
from secure_handler.serving.image.vision import OpenedImage, SecureVisionHandler
from secure_handler.serving.outputs import load_labels

__all__ = ["SecureObjectDetector", "detect_contract", "split_detections"]


def detect_contract(model: Any) -> str:
    """`list` or `tensor`, read from the first argument of the scripted `forward`.

    Raises:
        ConfigurationError: the signature is neither contract.
    """
    try:
        args = list(model.forward.schema.arguments)[1:]  # [0] is self
    except (AttributeError, RuntimeError) as exc:
        raise ConfigurationError(
            "cannot read the model's forward signature; set handler.model_contract to "
            "'list' or 'tensor'"
        ) from exc
    required = [a for a in args if not a.has_default_value()]
    kinds = {"List[Tensor]": "list", "Tensor": "tensor"}
    if len(required) == 1 and str(required[0].type) in kinds:
        return kinds[str(required[0].type)]
    shown = ", ".join(f"{a.name}: {a.type}" for a in args)
    raise ConfigurationError(
        f"cannot tell the detector contract from forward({shown}); expected one required "
        "argument `List[Tensor]` (list) or `Tensor` (tensor). Set handler.model_contract"
    )


def _pixels(placed: Placed) -> torch.Tensor:
    if placed.pixels is None:
        raise TypeError("list-contract item without pixels")
    return placed.pixels


@dataclass(slots=True)
class Placed:
    """One decoded image and how model-input pixels map back to the original."""

    slot: int
    width: int  # original pixels
    height: int
    scale_x: float  # original pixels per model-input pixel
    scale_y: float
    pixels: torch.Tensor | None = None  # uint8 [H, W, 3]; list contract only


class SecureObjectDetector(SecureVisionHandler):
    """Hardened, batched object detector for TorchScript models (see the module docstring).

    Per request: `{"detections": [{"label", "class", "score", "box": [x1, y1, x2, y2]}]}`,
    best first, boxes in the original image's pixels and clipped to it.
    """

    limits_model: ClassVar[type[ObjectDetectorLimits]] = ObjectDetectorLimits
    #: Optional labels in code; `index_to_name.json` in the archive is used otherwise.
    labels: ClassVar[Sequence[str] | None] = None

    def setup(self) -> None:
        limits: ObjectDetectorLimits = self.limits
        self.contract = self._resolve_contract()
        model_dir = Path(self.context.system_properties.get("model_dir") or ".")
        if self.labels is not None:
            self.label_map = dict(enumerate(self.labels))
        else:
            self.label_map = load_labels(model_dir / "index_to_name.json")
        mean = torch.tensor(limits.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(limits.std, dtype=torch.float32).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = mean / std
        if self.contract == "tensor":
            assert limits.input_size is not None  # checked by _resolve_contract
            height, width = limits.input_size
            # One uint8 buffer for the largest batch, reused: a worker runs one batch at a time.
            self._slots = torch.empty((limits.max_batch_size, height, width, 3), dtype=torch.uint8)
            self._slots_np = self._slots.numpy()

    def _resolve_contract(self) -> str:
        limits: ObjectDetectorLimits = self.limits
        configured = limits.model_contract
        try:
            found: str | None = detect_contract(self.model)
        except ConfigurationError:
            if configured == "auto":
                raise
            found = None  # an unusual signature; trust the configured contract
        if configured != "auto" and found not in (None, configured):
            raise ConfigurationError(
                f"handler.model_contract is {configured!r} but the model's forward takes "
                f"{'List[Tensor]' if found == 'list' else 'a Tensor'} (contract {found!r})"
            )
        contract = found if configured == "auto" and found else configured
        if contract == "tensor" and limits.input_size is None:
            raise ConfigurationError(
                "a 'tensor' detector needs handler.input_size (the model's input height and "
                "width, e.g. `input_size: 320` or `input_size: [240, 320]`)"
            )
        return contract

    # --- per request ---------------------------------------------------------------------

    def decode(self, payload: Any, idx: int) -> Placed:
        """Check and decode one image; tensor contract: resize it into batch slot `idx`."""
        opened = self.open_image(payload)
        if self.contract == "list":
            return self._keep_size(opened, idx)
        limits: ObjectDetectorLimits = self.limits
        assert limits.input_size is not None
        in_h, in_w = limits.input_size
        width, height = opened.size  # as shown, after the EXIF orientation
        if limits.resize == "stretch":
            target = (in_w, in_h)
        else:
            scale = min(in_w / width, in_h / height)
            target = (max(1, min(in_w, round(width * scale))),
                      max(1, min(in_h, round(height * scale))))
        img = self.pixels(opened, target)
        img = img.resize(target, Image.Resampling.BILINEAR)
        slot = self._slots_np[idx]
        if target != (in_w, in_h):
            slot.fill(limits.letterbox_fill)
        slot[: target[1], : target[0]] = np.asarray(img)
        return Placed(idx, width, height, width / target[0], height / target[1])

    def _keep_size(self, opened: OpenedImage, idx: int) -> Placed:
        limits: ObjectDetectorLimits = self.limits
        width, height = opened.size
        scale = min(1.0, limits.max_model_side / max(width, height))
        target = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
        img = self.pixels(opened, target if scale < 1.0 else None)
        if img.size != target:
            img = img.resize(target, Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(img))  # a copy: np.asarray of an image is read-only
        return Placed(idx, width, height, width / target[0], height / target[1], pixels)

    # --- per batch ----------------------------------------------------------------------

    def _normalise(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 [..., H, W, 3] → float [..., 3, H, W] in 0..1, then (x - mean) / std."""
        x = u8.movedim(-1, -3).float()
        return x.mul_(self._scale).sub_(self._shift).contiguous()

    def assemble(self, items: Sequence[Placed]) -> torch.Tensor | list[torch.Tensor]:
        """Tensor contract: the used slots as one batch; list contract: one tensor per image."""
        if self.contract == "list":
            return [self._normalise(_pixels(p)) for p in items]
        slots = [p.slot for p in items]
        n = len(slots)
        u8 = self._slots[:n] if slots == list(range(n)) else self._slots[torch.tensor(slots)]
        return self._normalise(u8)

    def infer(self, batch: torch.Tensor | list[torch.Tensor]) -> Any:
        if isinstance(batch, torch.Tensor):
            return super().infer(batch)
        with torch.inference_mode():
            return self.model([self.to_device(t) for t in batch])

    def format_outputs(self, outputs: Any, items: Sequence[Placed]) -> list[Any]:
        """One result per image; a malformed output fails its own row only (500)."""
        per_image = split_detections(outputs, len(items))
        return [found if not isinstance(found, tuple) else format_detections(
                    found, Frame(p.width, p.height, p.scale_x, p.scale_y), self.limits,
                    self.label_map)
                for found, p in zip(per_image, items, strict=True)]

    def warmup_items(self) -> list[Placed]:
        limits: ObjectDetectorLimits = self.limits
        if self.contract == "list":
            grey = torch.full((64, 64, 3), 128, dtype=torch.uint8)
            return [Placed(0, 64, 64, 1.0, 1.0, grey)]
        assert limits.input_size is not None
        self._slots[:1].fill_(128)
        height, width = limits.input_size
        return [Placed(0, width, height, 1.0, 1.0)]
