"""The object detector: one decode path with the classifier, and per-image output checks.

CWE-20 (improper validation: a corrupt PNG served with half-decoded pixels), CWE-390/CWE-755
(a decode error swallowed), CWE-681 (class ids through float32), CWE-703 (one image's bad
output failing its whole batch); ATLAS AML.T0029.

* The detector refuses exactly what the classifier refuses (status and code), because both
  decode through `serving/image/decode.py`; a PNG whose eXIf comes after garbage IDAT used to
  be served by the detector (reading EXIF ran a first `load()` whose error was swallowed).
* A model whose output for one image is malformed fails that row only (500
  `inference_failed`); labels that are not finite integers in `[0, 2**31)` drop their
  detection; ids are exact (2**24 + 1 survives, which float32 would round).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from attacks import costly, craft
from attacks.harness import MANIFEST, Build, Target, assert_class, assert_refused
from support import script_and_save
from torch import Tensor

from secure_handler import SecureObjectDetector
from secure_handler.testing import Request, make_context

LABELS = {str(i): f"class-{i}" for i in range(10)}


class ColourKeyedDetector(torch.nn.Module):
    """Per image, by its dominant channel (inputs are 0..1 with mean 0, std 1):

    red → malformed boxes [1, 5]; green → float labels (+inf, NaN, 2.5, -1, 1e30, 3);
    blue → int64 labels (2**40, 2**24 + 1, 7); anything else → one box of class 1.
    """

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        out: list[dict[str, Tensor]] = []
        for img in images:
            means = img.mean(dim=(1, 2))
            box = torch.tensor([[1.0, 1.0, 8.0, 8.0]])
            if bool(means[0] > means[1] + 0.2) and bool(means[0] > means[2] + 0.2):
                out.append({"boxes": torch.zeros(1, 5), "scores": torch.ones(1),
                            "labels": torch.ones(1, dtype=torch.int64)})
            elif bool(means[1] > means[0] + 0.2) and bool(means[1] > means[2] + 0.2):
                labels = torch.tensor([float("inf"), float("nan"), 2.5, -1.0, 1e30, 3.0])
                out.append({"boxes": box.repeat(6, 1), "scores": torch.full([6], 0.9),
                            "labels": labels})
            elif bool(means[2] > means[0] + 0.2) and bool(means[2] > means[1] + 0.2):
                labels = torch.tensor([1099511627776, 16777217, 7], dtype=torch.int64)  # 2**40, 2**24+1
                out.append({"boxes": box.repeat(3, 1), "scores": torch.tensor([0.9, 0.8, 0.7]),
                            "labels": labels})
            else:
                out.append({"boxes": box, "scores": torch.full([1], 0.9),
                            "labels": torch.ones(1, dtype=torch.int64)})
        return out


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Target:
    directory: Path = tmp_path_factory.mktemp("keyed-detector")
    script_and_save(ColourKeyedDetector().eval(), directory / "model.pt")
    (directory / "index_to_name.json").write_text(json.dumps(LABELS))
    ctx = make_context(directory, MANIFEST, {"handler": {"model_contract": "list"}},
                       batch_size=8)
    handler = SecureObjectDetector()
    handler.initialize(ctx)
    return Target(handler, ctx)


def _img(colour: craft.RGB) -> Request:
    return Request(bytearray(craft.solid(colour, (32, 32), "PNG")), "image/png")


GREY = (128, 128, 128)


def _classes(result: tuple[int, Any]) -> list[int]:
    status, body = result
    assert status == 200, body
    return [d["class"] for d in body["detections"]]


def test_malformed_output_fails_its_row_only(keyed: Target) -> None:
    """CWE-703: boxes [1, 5] for the red image → 500 for it; grey neighbours served."""
    first, bad, last = keyed.send(_img(GREY), _img(craft.RED), _img(GREY))
    assert_refused(bad, 500, "inference_failed")
    assert _classes(first) == [1]
    assert _classes(last) == [1]


def test_labels_must_be_finite_integers_in_range(keyed: Target) -> None:
    """CWE-681: +inf, NaN, 2.5, -1 and 1e30 are dropped (inf used to answer
    -9223372036854775808); only the integral 3.0 is kept, as the int 3."""
    _, green, _ = keyed.send(_img(GREY), _img(craft.GREEN), _img(GREY))
    assert _classes(green) == [3]
    assert green[1]["detections"][0]["label"] == "class-3"


def test_integer_ids_never_pass_through_float32(keyed: Target) -> None:
    """CWE-681: 2**24 + 1 stays exact (float32 makes it 2**24); 2**40 is out of range."""
    _, blue, _ = keyed.send(_img(GREY), _img(craft.BLUE), _img(GREY))
    assert _classes(blue) == [2**24 + 1, 7]
    assert blue[1]["detections"][0]["label"] == str(2**24 + 1)


def test_every_row_of_a_mixed_batch_gets_its_own_outcome(keyed: Target) -> None:
    """A batch of every case at once: each row answers for its own image only."""
    results = keyed.send(_img(craft.RED), _img(craft.GREEN), _img(craft.BLUE), _img(GREY),
                         _img(craft.RED))
    assert [r[0] for r in results] == [500, 200, 200, 200, 500]
    assert _classes(results[1]) == [3]
    assert _classes(results[2]) == [2**24 + 1, 7]


# --- one decode path: the detector refuses exactly what the classifier refuses -----------


def _png_exif_after_garbage_idat() -> bytes:
    """Garbage IDAT, then an eXIf chunk: Pillow's PNG getexif() loads the image to reach it."""
    exif = costly.exif_amplified(1024, 3, 1)
    return (craft.PNG_SIGNATURE + craft.ihdr(16, 16)
            + craft.png_chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 64)
            + craft.png_chunk(b"eXIf", exif) + craft.png_chunk(b"IEND", b""))


SAME = {
    "png-garbage-idat": craft.png_corrupt_idat,
    "png-exif-after-garbage-idat": _png_exif_after_garbage_idat,
    "png-truncated-half": lambda: craft.truncate(
        craft.encode(craft.noisy(craft.RED), "PNG"), 0.5),
    "jpeg-truncated-half": lambda: craft.truncate(
        craft.encode(craft.noisy(craft.RED), "JPEG"), 0.5),
    "jpeg-no-scan": craft.jpeg_without_scan,
    "jpeg-bad-sof-components": craft.jpeg_bad_sof_components,
    "png-bad-ihdr-crc": craft.png_bad_ihdr_crc,
    "png-bomb-header": lambda: craft.png_declaring(65535, 65535),
    "jpeg-second-sof": lambda: craft.jpeg_double_sof(16, 16),
    "jpeg-33-scans": lambda: costly.jpeg_with_scans(33, 256),
    "png-rgba16-4096": lambda: costly.png_zeros(depth=16, colour=6),
    "jpeg-exif-malformed-ifd": lambda: costly.jpeg_with_exif(
        b"II*\x00" + b"\xff\xff\x00\x00"),
}


@pytest.mark.parametrize("name", list(SAME))
def test_detector_refuses_exactly_what_the_classifier_refuses(
        classifier: Build, detector: Target, name: str) -> None:
    """CWE-390: the same bytes, between two valid rows, get the same 4xx from both."""
    data = SAME[name]()
    outcomes = []
    for target in (classifier(), detector):
        first, middle, last = target.send(_img(craft.RED), Request(bytearray(data)),
                                          _img(craft.BLUE))
        assert first[0] == 200
        assert last[0] == 200
        assert 400 <= middle[0] < 500, middle
        outcomes.append((middle[0], middle[1]["error"]["code"]))
    assert outcomes[0] == outcomes[1], outcomes


def test_corrupt_png_with_exif_is_refused_not_served_half_decoded(detector: Target) -> None:
    """The review's case: 200 with cut detections before; now 422 invalid_image."""
    assert_refused(detector.one(_png_exif_after_garbage_idat(), "image/png"), 422,
                   "invalid_image")


def test_classifier_control(classifier: Build) -> None:
    """Control: the neighbours used above are served by the classifier as their colour."""
    assert_class(classifier().send(_img(craft.RED))[0], "red")
