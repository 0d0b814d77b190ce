"""SecureObjectDetector through TorchServe's real Context: both contracts, mixed sizes, boxes."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps
from support import build_tiny_classifier, image_bytes
from support_models import build_detector, iou, scene, write_detector_labels

from secure_handler import ConfigurationError, SecureImageClassifier, SecureObjectDetector
from secure_handler.errors import InferenceFailed
from secure_handler.serving.image.detector import detect_contract, split_detections
from secure_handler.testing import Request, make_context, run_batch

MANIFEST = {"model": {"modelName": "det", "serializedFile": "model.pt",
                      "handler": "handler.py", "modelVersion": "1.0"}}
TENSOR_CFG = {"input_size": 320}

# (image size, shapes drawn) → what every detection must match within IoU 0.5.
SCENES = [
    ((640, 480), {"red": (40, 60, 200, 220), "blue": (400, 300, 600, 460)}),
    ((320, 320), {"green": (10, 10, 100, 50)}),
    ((200, 500), {"red": (20, 300, 180, 480), "green": (50, 20, 150, 120)}),
    ((1000, 240), {"blue": (700, 40, 980, 200)}),
]


@pytest.fixture(scope="module", params=["tensor", "list", "list_only"])
def detector(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(f"det-{request.param}")
    build_detector(path, request.param)
    write_detector_labels(path)
    return request.param, path


def make_handler(model_dir: Path, handler_cfg: dict | None = None, batch_size: int = 8,
                 cls: type = SecureObjectDetector):
    ctx = make_context(model_dir, MANIFEST, {"handler": handler_cfg or {}},
                       batch_size=batch_size)
    handler = cls()
    handler.initialize(ctx)
    return handler, ctx


def config_for(kind: str, **extra: object) -> dict:
    return {**(TENSOR_CFG if kind == "tensor" else {}), **extra}


def assert_matches(body: dict, shapes: dict, size: tuple[int, int]) -> None:
    found = {d["label"]: d for d in body["detections"]}
    assert set(found) == set(shapes), body
    for colour, drawn in shapes.items():
        det = found[colour]
        assert iou(det["box"], drawn) >= 0.5, (colour, det, drawn)
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 < x2 <= size[0]
        assert 0 <= y1 < y2 <= size[1]
        assert det["score"] == 0.9
        assert det["class"] == ["red", "green", "blue"].index(colour)


def test_mixed_sizes_in_one_batch_map_back_to_original_pixels(detector) -> None:
    kind, path = detector
    handler, ctx = make_handler(path, config_for(kind))
    assert handler.contract == ("tensor" if kind == "tensor" else "list")
    requests = [Request(bytearray(scene(size, shapes)), "image/png") for size, shapes in SCENES]
    results = run_batch(handler, ctx, requests)
    assert [s for s, _ in results] == [200] * len(SCENES)
    for (_, body), (size, shapes) in zip(results, SCENES, strict=True):
        assert_matches(body, shapes, size)


def test_list_contract_boxes_are_exact_at_native_size(tmp_path: Path) -> None:
    build_detector(tmp_path, "list")
    write_detector_labels(tmp_path)
    handler, ctx = make_handler(tmp_path)
    [(_, body)] = run_batch(handler, ctx, [Request(bytearray(scene(*SCENES[0])), "image/png")])
    boxes = {d["label"]: d["box"] for d in body["detections"]}
    assert boxes == {"red": [40.0, 60.0, 200.0, 220.0], "blue": [400.0, 300.0, 600.0, 460.0]}


def test_list_contract_downscales_big_images_and_maps_back(tmp_path: Path) -> None:
    build_detector(tmp_path, "list")
    write_detector_labels(tmp_path)
    handler, ctx = make_handler(tmp_path, {"max_model_side": 256})
    size, shapes = SCENES[0]
    [(_, body)] = run_batch(handler, ctx, [Request(bytearray(scene(size, shapes)), "image/png")])
    assert_matches(body, shapes, size)


def test_letterbox_keeps_the_aspect_ratio(tmp_path: Path) -> None:
    build_detector(tmp_path, "tensor")
    write_detector_labels(tmp_path)
    handler, ctx = make_handler(tmp_path, {"input_size": [256, 320], "resize": "letterbox"})
    requests = [Request(bytearray(scene(size, shapes)), "image/png") for size, shapes in SCENES]
    for (_, body), (size, shapes) in zip(run_batch(handler, ctx, requests), SCENES, strict=True):
        assert_matches(body, shapes, size)


def test_score_threshold_max_detections_and_rounding(detector) -> None:
    kind, path = detector
    size, shapes = SCENES[0]
    req = [Request(bytearray(scene(size, shapes)), "image/png")]
    handler, ctx = make_handler(path, config_for(kind, max_detections=1, box_digits=0,
                                                 score_digits=1))
    [(_, body)] = run_batch(handler, ctx, req)
    assert len(body["detections"]) == 1
    assert all(v == int(v) for v in body["detections"][0]["box"])
    handler, ctx = make_handler(path, config_for(kind, score_threshold=0.95))
    [(_, body)] = run_batch(handler, ctx, req)
    assert body == {"detections": []}  # the 0.99 box lies outside the image and is dropped


def test_an_image_with_nothing_in_it(detector) -> None:
    kind, path = detector
    handler, ctx = make_handler(path, config_for(kind))
    [(status, body)] = run_batch(handler, ctx, [Request(bytearray(scene((64, 64), {})),
                                                        "image/png")])
    assert (status, body) == (200, {"detections": []})


def hostile_requests() -> list[Request]:
    good = scene(*SCENES[1])
    return [
        Request(bytearray(good), "image/png"),
        Request(bytearray(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), "image/png"),
        Request(bytearray(image_bytes("red", fmt="GIF")), "image/gif"),
        Request(bytearray(b""), "image/png"),
        Request(bytearray(b"\xff\xd8\xff" + b"\x00" * 200_000), "image/jpeg"),
        Request([1, 2], "application/json"),
        Request({"data": base64.b64encode(good).decode()}, "application/json"),
        Request.as_worker(b"aGVsbG8*d29ybGQ=", "text/plain"),
        Request(bytearray(image_bytes("red", (400, 300))[:600]), "image/jpeg"),
        Request(bytearray(image_bytes("red", (5000, 10))), "image/png"),
        Request(bytearray(b"PK\x03\x04" + b"\x00" * 100), "image/jpeg"),
    ]


EXPECTED = [(200, None), (422, "invalid_image"), (415, "unsupported_media_type"),
            (400, "empty_body"), (413, "payload_too_large"), (400, "malformed_request"),
            (200, None), (422, "invalid_base64"), (422, "invalid_image"),
            (422, "image_too_large"), (415, "unsupported_media_type")]


def codes(results: list) -> list:
    return [(s, b["error"]["code"] if s != 200 else None) for s, b in results]


def test_validation_is_the_image_classifiers(detector, tmp_path: Path) -> None:
    kind, path = detector
    handler, ctx = make_handler(path, config_for(kind, max_request_bytes=100_000))
    results = run_batch(handler, ctx, hostile_requests())
    assert codes(results) == EXPECTED
    assert [len(b["detections"]) for s, b in results if s == 200] == [1, 1]
    # The same requests through the image classifier give the same statuses and codes.
    build_tiny_classifier(tmp_path)
    clf, clf_ctx = make_handler(tmp_path, {"max_request_bytes": 100_000},
                                cls=SecureImageClassifier)
    assert codes(run_batch(clf, clf_ctx, hostile_requests())) == EXPECTED


def test_refused_rows_leave_gaps_in_the_slots(tmp_path: Path) -> None:
    # Valid rows 0 and 2 around a refused row 1: the batch uses slots 0 and 2, not 0 and 1.
    build_detector(tmp_path, "tensor")
    write_detector_labels(tmp_path)
    handler, ctx = make_handler(tmp_path, TENSOR_CFG)
    requests = [Request(bytearray(scene(*SCENES[0])), "image/png"),
                Request(bytearray(b"junk"), "image/png"),
                Request(bytearray(scene(*SCENES[2])), "image/png")]
    results = run_batch(handler, ctx, requests)
    assert [s for s, _ in results] == [200, 415, 200]
    assert_matches(results[0][1], SCENES[0][1], SCENES[0][0])
    assert_matches(results[2][1], SCENES[2][1], SCENES[2][0])


def test_warmup_runs_for_both_contracts(detector) -> None:
    kind, path = detector
    handler, ctx = make_handler(path, config_for(kind, warmup=True))
    assert run_batch(handler, ctx, [Request(bytearray(scene(*SCENES[1])), "image/png")])[0][0] == 200


def test_contract_detection(detector) -> None:
    kind, path = detector
    handler, _ = make_handler(path, config_for(kind))
    assert detect_contract(handler.model) == ("tensor" if kind == "tensor" else "list")


def test_tensor_contract_needs_input_size(tmp_path: Path) -> None:
    build_detector(tmp_path, "tensor")
    with pytest.raises(ConfigurationError, match="needs handler.input_size"):
        make_handler(tmp_path)


def test_configured_contract_must_match_the_model(tmp_path: Path) -> None:
    build_detector(tmp_path, "tensor")
    with pytest.raises(ConfigurationError, match="model_contract is 'list' but .* a Tensor"):
        make_handler(tmp_path, {"model_contract": "list"})


def test_unknown_signature_fails_with_a_clear_error(tmp_path: Path) -> None:
    # The image classifier's model takes a Tensor: fine. A two-tensor text model is not.
    from support_models import build_text_model

    build_text_model(tmp_path)
    with pytest.raises(ConfigurationError, match="cannot tell the detector contract"):
        make_handler(tmp_path)


@pytest.mark.parametrize(("cfg", "key"), [
    ({"input_size": 0}, "input_size"),
    ({"input_size": [100, 5000]}, "input_size"),
    ({"score_threshold": 1.5}, "score_threshold"),
    ({"model_contract": "dict"}, "model_contract"),
    ({"std": [1, 0, 1]}, "std"),
])
def test_bad_config_fails_initialize(tmp_path: Path, cfg: dict, key: str) -> None:
    build_detector(tmp_path, "tensor")
    with pytest.raises(ConfigurationError, match=key):
        make_handler(tmp_path, cfg)


# --- output parsing ---------------------------------------------------------------------------


def _triple(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros(n, 4), torch.zeros(n), torch.zeros(n, dtype=torch.int64)


def test_split_detections_accepts_every_documented_shape() -> None:
    b, s, lab = _triple(3)
    one = {"boxes": b, "scores": s, "labels": lab}
    batched = (b.expand(2, 3, 4), s.expand(2, 3), lab.expand(2, 3))
    for out in ([one, one], ({}, [one, one]), batched,
                {"boxes": batched[0], "scores": batched[1], "labels": batched[2]}):
        parts = split_detections(out, 2)
        assert len(parts) == 2
        assert all(p[0].shape == (3, 4) for p in parts)


@pytest.mark.parametrize("out", [
    torch.zeros(2, 4),
    (torch.zeros(3, 1, 4), torch.zeros(3, 1), torch.zeros(3, 1)),
    [{"boxes": torch.zeros(1, 4), "scores": torch.zeros(1), "labels": torch.zeros(1)}],
    ("a", "b", "c"),
])
def test_split_detections_refuses_other_shapes(out: object) -> None:
    """Outputs that cannot be split into the batch's images fail the whole batch."""
    with pytest.raises(TypeError):
        split_detections(out, 2)


def test_split_detections_fails_only_the_malformed_image() -> None:
    """A dict without labels fails its own image; the other image is split as usual."""
    b, s, lab = _triple(1)
    parts = split_detections([{"boxes": b, "scores": s}, {"boxes": b, "scores": s,
                                                         "labels": lab}], 2)
    assert isinstance(parts[0], InferenceFailed)
    assert "labels" in parts[0].message
    assert isinstance(parts[1], tuple)
    assert parts[1][2] is lab


def test_non_finite_and_negative_label_detections_are_dropped(tmp_path: Path) -> None:
    build_detector(tmp_path, "tensor")
    write_detector_labels(tmp_path)
    handler, _ = make_handler(tmp_path, TENSOR_CFG)
    placed = handler.warmup_items()[0]
    boxes = torch.tensor([[0, 0, 10, 10], [float("nan"), 0, 5, 5], [0, 0, float("inf"), 9],
                          [1, 1, 4, 4], [2, 2, 8, 8]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.9, 0.9, 0.9, float("nan")])
    labels = torch.tensor([1, 1, 1, -1, 1])
    [body] = handler.format_outputs((boxes[None], scores[None], labels[None]), [placed])
    assert body == {"detections": [
        {"label": "green", "class": 1, "score": 0.9, "box": [0.0, 0.0, 10.0, 10.0]}]}


def _exif_rotated(size: tuple[int, int], shapes: dict, orientation: int) -> bytes:
    """A JPEG whose stored pixels, turned by its EXIF `orientation`, show `scene(size, shapes)`."""
    shown = Image.open(io.BytesIO(scene(size, shapes)))
    undo = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270,
            3: Image.Transpose.ROTATE_180}[orientation]
    stored = shown.transpose(undo)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).size == size
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_boxes_follow_the_exif_orientation(detector, orientation: int) -> None:
    # A phone photo stored sideways: boxes are in the pixels the client sees, not the stored ones.
    kind, path = detector
    handler, ctx = make_handler(path, config_for(kind))
    size, shapes = SCENES[0]
    [(status, body)] = run_batch(handler, ctx, [
        Request(bytearray(_exif_rotated(size, shapes, orientation)), "image/jpeg")])
    assert status == 200
    assert_matches(body, shapes, size)
