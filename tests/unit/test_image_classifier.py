"""SecureImageClassifier through TorchServe's real Context and RequestProcessor."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from support import LABELS, build_tiny_classifier, image_bytes

from secure_handler import ConfigurationError, SecureImageClassifier, UnsafeModelError
from secure_handler.testing import Request, make_context, run_batch

MANIFEST = {"model": {"modelName": "tiny", "serializedFile": "model.pt",
                      "handler": "handler.py", "modelVersion": "1.0"}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_classifier(path)
    (path / "index_to_name.json").write_text(json.dumps(LABELS))
    return path


def make_handler(model_dir: Path, handler_cfg: dict | None = None, batch_size: int = 8,
                 cls: type = SecureImageClassifier, manifest: dict | None = None):
    ctx = make_context(model_dir, manifest or MANIFEST, {"handler": handler_cfg or {}},
                       batch_size=batch_size)
    handler = cls()
    handler.initialize(ctx)
    return handler, ctx


def top1(body: dict) -> str:
    return body["predictions"][0]["label"]


def test_valid_images_in_every_accepted_form(model_dir: Path) -> None:
    handler, ctx = make_handler(model_dir)
    b64 = base64.b64encode(image_bytes("green", fmt="PNG")).decode()
    requests = [
        Request(bytearray(image_bytes("red")), "image/jpeg"),
        Request(b64, "text/plain"),
        Request({"data": b64}, "application/json"),
        Request({"image": base64.b64encode(image_bytes("blue")).decode()}, "application/json"),
        Request(bytearray(image_bytes("blue")), ""),
    ]
    results = run_batch(handler, ctx, requests)
    assert [status for status, _ in results] == [200] * 5
    assert [top1(body) for _, body in results] == ["red", "green", "green", "blue", "blue"]


def test_output_shape_topk_and_rounding(model_dir: Path) -> None:
    handler, ctx = make_handler(model_dir, {"top_k": 2, "probability_digits": 2})
    [(status, body)] = run_batch(handler, ctx, [Request(bytearray(image_bytes("red")), "image/jpeg")])
    assert status == 200
    preds = body["predictions"]
    assert len(preds) == 2
    assert preds[0] == {"label": "red", "class": 0, "probability": 1.0}
    assert all(round(p["probability"], 2) == p["probability"] for p in preds)


def test_top_k_is_capped_at_the_number_of_classes(model_dir: Path) -> None:
    handler, ctx = make_handler(model_dir, {"top_k": 50})
    [(_, body)] = run_batch(handler, ctx, [Request(bytearray(image_bytes("red")), "image/jpeg")])
    assert len(body["predictions"]) == 4


def test_one_bad_request_does_not_fail_its_batch(model_dir: Path) -> None:
    handler, ctx = make_handler(model_dir)
    requests = [
        Request(bytearray(image_bytes("red")), "image/jpeg"),
        Request(bytearray(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), "image/png"),
        Request(bytearray(image_bytes("blue", fmt="PNG")), "image/png"),
    ]
    results = run_batch(handler, ctx, requests)
    assert [s for s, _ in results] == [200, 422, 200]
    assert results[1][1]["error"]["code"] == "invalid_image"
    assert top1(results[0][1]) == "red"
    assert top1(results[2][1]) == "blue"
    assert ctx.get_response_content_type(1) == "application/json"


@pytest.mark.parametrize(
    ("request_", "status", "code"),
    [
        (Request(bytearray(), "image/jpeg"), 400, "empty_body"),
        (Request([1, 2, 3], "application/json"), 400, "malformed_request"),
        (Request({"data": 5}, "application/json"), 400, "malformed_request"),
        (Request(bytearray(b"{not json"), "application/json"), 400, "malformed_request"),
        (Request(bytearray(b"GIF89a" + b"\x00" * 20), "application/octet-stream"), 415,
         "unsupported_media_type"),
        (Request(bytearray(b"jpeg"), "image/tiff"), 415, "unsupported_media_type"),
        (Request("abc$", "text/plain"), 422, "invalid_base64"),
    ],
)
def test_typed_refusals(model_dir: Path, request_: Request, status: int, code: str) -> None:
    handler, ctx = make_handler(model_dir)
    [(got_status, body)] = run_batch(handler, ctx, [request_])
    assert (got_status, body["error"]["code"]) == (status, code)
    assert body["error"]["message"]


def test_byte_limit_is_413(model_dir: Path) -> None:
    handler, ctx = make_handler(model_dir, {"max_request_bytes": 1000})
    big = image_bytes("red", (400, 400), fmt="PNG", compress_level=0)
    [(status, body)] = run_batch(handler, ctx, [Request(bytearray(big), "image/png")])
    assert (status, body["error"]["code"]) == (413, "payload_too_large")


def test_rows_beyond_max_batch_size_are_refused_not_dropped(model_dir: Path) -> None:
    handler, ctx = make_handler(model_dir, {"max_batch_size": 2}, batch_size=2)
    requests = [Request(bytearray(image_bytes("red")), "image/jpeg")] * 3
    statuses = [s for s, _ in run_batch(handler, ctx, requests)]
    assert statuses == [200, 200, 503]


def test_inference_failure_gives_500_to_valid_rows_and_keeps_4xx(model_dir: Path) -> None:
    class Broken(SecureImageClassifier):
        def infer(self, batch: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("model exploded")

    handler, ctx = make_handler(model_dir, cls=Broken)
    requests = [Request(bytearray(image_bytes("red")), "image/jpeg"), Request(bytearray(), "image/jpeg")]
    results = run_batch(handler, ctx, requests)
    assert [(s, b["error"]["code"]) for s, b in results] == [(500, "inference_failed"), (400, "empty_body")]
    # the handler still works afterwards: nothing was left in a bad state
    assert run_batch(handler, ctx, requests[:1])[0][0] == 500


def test_out_of_memory_is_507(model_dir: Path) -> None:
    class Hungry(SecureImageClassifier):
        def infer(self, batch: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    handler, ctx = make_handler(model_dir, cls=Hungry)
    [(status, body)] = run_batch(handler, ctx, [Request(bytearray(image_bytes("red")), "image/jpeg")])
    assert (status, body["error"]["code"]) == (507, "out_of_memory")


def test_describe_header_cannot_break_the_batch(model_dir: Path) -> None:
    handler, ctx = make_handler(model_dir)
    requests = [Request(bytearray(image_bytes("red")), "image/jpeg", headers={"describe": "True"}),
                Request(bytearray(image_bytes("blue")), "image/jpeg")]
    results = run_batch(handler, ctx, requests)
    assert [top1(b) for _, b in results] == ["red", "blue"]


def test_payload_sent_twice_is_refused(model_dir: Path) -> None:
    handler, ctx = make_handler(model_dir)
    req = Request(bytearray(image_bytes("red")), "image/jpeg", params={"data": bytearray(b"abc")})
    [(status, body)] = run_batch(handler, ctx, [req])
    assert (status, body["error"]["code"]) == (400, "malformed_request")


def test_class_attribute_overrides_and_labels(model_dir: Path) -> None:
    class Small(SecureImageClassifier):
        crop_size = 64
        resize_size = 80
        labels = ("R", "G", "B", "N")

    handler, ctx = make_handler(model_dir, cls=Small)
    assert handler.limits.crop_size == 64
    [(_, body)] = run_batch(handler, ctx, [Request(bytearray(image_bytes("green")), "image/jpeg")])
    assert top1(body) == "G"


def test_warmup_runs_at_initialize(model_dir: Path) -> None:
    calls = []

    class Counting(SecureImageClassifier):
        def infer(self, batch: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(batch.shape))
            return super().infer(batch)

    make_handler(model_dir, {"warmup": True}, cls=Counting)
    assert calls == [(1, 3, 224, 224)]


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        ({"max_bytes": 5}, "unknown key `max_bytes`"),
        ({"max_batch_size": -1}, "`max_batch_size`"),
        ({"allowed_formats": ["JPEG", "EXE"]}, "`allowed_formats.1`"),
        ({"crop_size": 300}, "crop_size 300 is larger than resize_size 256"),
    ],
)
def test_invalid_config_fails_initialize_naming_the_key(model_dir: Path, cfg: dict, needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle.replace("`", ".").replace("(", ".")):
        make_handler(model_dir, cfg)


def test_torchserve_batch_size_over_max_fails_initialize(model_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="batch_size 64 is larger than"):
        make_handler(model_dir, {"max_batch_size": 32}, batch_size=64)


def test_eager_manifest_is_refused(model_dir: Path) -> None:
    manifest = {"model": {**MANIFEST["model"], "modelFile": "model.py"}}
    with pytest.raises(UnsafeModelError, match="modelFile"):
        make_handler(model_dir, manifest=manifest)


def test_model_sha256_pin(model_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not match"):
        make_handler(model_dir, {"model_sha256": "0" * 64})
    from secure_handler.serving.loading import sha256_file

    handler, _ = make_handler(model_dir, {"model_sha256": sha256_file(model_dir / "model.pt")})
    assert handler.initialized


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_decode_on_the_worker_thread_or_a_pool_gives_the_same_answers(model_dir: Path, threads: int) -> None:
    handler, ctx = make_handler(model_dir, {"decode_threads": threads})
    assert (handler._pool is None) == (threads == 0)
    requests = [Request(bytearray(image_bytes(c)), "image/jpeg") for c in ("red", "green", "blue")]
    requests.append(Request(bytearray(b"\xff\xd8\xff\x00"), "image/jpeg"))
    results = run_batch(handler, ctx, requests)
    assert [s for s, _ in results] == [200, 200, 200, 422]
    assert [top1(b) for _, b in results[:3]] == ["red", "green", "blue"]


@pytest.mark.parametrize("resampler", ["pillow", "torch"])
def test_both_resamplers_classify_and_agree(model_dir: Path, resampler: str) -> None:
    handler, ctx = make_handler(model_dir, {"resampler": resampler})
    requests = [Request(bytearray(image_bytes(c, (500, 375))), "image/jpeg") for c in ("red", "green", "blue")]
    assert [top1(b) for _, b in run_batch(handler, ctx, requests)] == ["red", "green", "blue"]
    # On a smooth gradient (not a flat colour) both resamplers give nearly the same pixels.
    import io

    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 640, dtype=np.float32)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:480, None], 128 + 0 * ramp[None, :]), -1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    gradient = [Request(bytearray(buf.getvalue()), "image/png")]
    run_batch(handler, ctx, gradient)
    other, ctx2 = make_handler(model_dir, {"resampler": "torch" if resampler == "pillow" else "pillow"})
    run_batch(other, ctx2, gradient)
    diff = (handler._slots[0].int() - other._slots[0].int()).abs()
    assert diff.float().mean() < 1.0
    assert diff.max() <= 4


def test_batch_is_normalised_exactly_once(model_dir: Path) -> None:
    handler, ctx = make_handler(model_dir)
    run_batch(handler, ctx, [Request(bytearray(image_bytes(c)), "image/jpeg") for c in ("red", "blue")])
    batch = handler.assemble([1, 0])  # out of order: rows are gathered, not assumed contiguous
    u8 = handler._slots[[1, 0]].permute(0, 3, 1, 2).float()
    mean = torch.tensor(handler.limits.mean).view(1, 3, 1, 1)
    std = torch.tensor(handler.limits.std).view(1, 3, 1, 1)
    assert torch.allclose(batch, (u8 / 255.0 - mean) / std, atol=1e-5)
    assert batch.shape == (2, 3, 224, 224)


def test_a_non_finite_result_fails_its_row_not_the_batch(model_dir: Path) -> None:
    class NaNForBlue(SecureImageClassifier):
        def format_outputs(self, outputs, items):
            bodies = super().format_outputs(outputs, items)
            return [{"score": float("nan")} if b["predictions"][0]["label"] == "blue" else b
                    for b in bodies]

    handler, ctx = make_handler(model_dir, cls=NaNForBlue)
    requests = [Request(bytearray(image_bytes(c)), "image/jpeg") for c in ("red", "blue")]
    results = run_batch(handler, ctx, requests)
    assert results[0][0] == 200
    assert (results[1][0], results[1][1]["error"]["code"]) == (500, "inference_failed")
