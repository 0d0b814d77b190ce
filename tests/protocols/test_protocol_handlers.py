"""The three handlers reading KServe v1 and OIP v2 bodies, through TorchServe's real Context:
mixed batches, per-request statuses, instances counted against the batch."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from support import LABELS, build_tiny_classifier, image_bytes
from support_models import (
    build_detector,
    build_text_model,
    scene,
    write_detector_labels,
    write_text_files,
)
from ts.context import RequestProcessor

from secure_handler import SecureImageClassifier, SecureObjectDetector, SecureTextClassifier
from secure_handler.testing import Request, make_context, run_batch

MANIFEST = {"model": {"modelName": "tiny", "serializedFile": "model.pt",
                      "handler": "handler.py", "modelVersion": "2.0"}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v2(data: list[str], **extra: object) -> dict:
    return {"inputs": [{"name": "input-0", "shape": [len(data)], "datatype": "BYTES",
                        "data": data}], **extra}


def as_json(body: dict) -> Request:
    return Request(body, "application/json")


def as_raw(body: dict, content_type: str = "") -> Request:
    """JSON sent without a JSON content type (tritonclient sends none): raw bytes."""
    return Request.as_worker(json.dumps(body).encode(), content_type)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_classifier(path)
    (path / "index_to_name.json").write_text(json.dumps(LABELS))
    return path


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text")
    build_text_model(path, "ids_mask")
    write_text_files(path)
    return path


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("det")
    build_detector(path, "tensor")
    write_detector_labels(path)
    return path


def make_handler(cls: type, model_dir: Path, handler_cfg: dict | None = None,
                 batch_size: int = 8):
    ctx = make_context(model_dir, MANIFEST, {"handler": handler_cfg or {}},
                       batch_size=batch_size, model_name="tiny")
    handler = cls()
    handler.initialize(ctx)
    return handler, ctx


RED, GREEN, BLUE = (b64(image_bytes(c)) for c in ("red", "green", "blue"))


def test_v1_v2_and_plain_requests_share_one_batch(image_dir: Path) -> None:
    handler, ctx = make_handler(SecureImageClassifier, image_dir, {"top_k": 2})
    results = run_batch(handler, ctx, [
        Request(bytearray(image_bytes("red")), "image/jpeg"),
        as_json({"instances": [RED, {"data": GREEN}]}),
        as_raw(v2([BLUE, RED], id="abc")),
        as_json(v2([GREEN], outputs=[{"name": "label"}])),
    ])
    assert [s for s, _ in results] == [200, 200, 200, 200]
    plain, v1, v2_raw, v2_one = (body for _, body in results)
    assert plain["predictions"][0]["label"] == "red"
    # v1: one entry per instance, each exactly what /predictions returns for it
    assert [p["predictions"][0]["label"] for p in v1["predictions"]] == ["red", "green"]
    assert v1["predictions"][0] == plain
    assert v2_raw["id"] == "abc"
    assert (v2_raw["model_name"], v2_raw["model_version"]) == ("tiny", "2.0")
    outputs = {o["name"]: o for o in v2_raw["outputs"]}
    assert {k: (o["shape"], o["datatype"]) for k, o in outputs.items()} == {
        "label": ([2, 2], "BYTES"), "probability": ([2, 2], "FP32"), "class": ([2, 2], "INT64")}
    assert outputs["label"]["data"][::2] == ["blue", "red"]  # top-1 of each instance
    assert outputs["class"]["data"][::2] == [2, 0]
    assert outputs["probability"]["data"][::2] == [1.0, 1.0]
    [only] = v2_one["outputs"]
    assert (only["name"], only["shape"], only["data"][0]) == ("label", [1, 2], "green")


def test_a_bad_instance_refuses_only_its_own_request(image_dir: Path) -> None:
    handler, ctx = make_handler(SecureImageClassifier, image_dir)
    truncated = b64(image_bytes("red")[:200])
    results = run_batch(handler, ctx, [
        as_json({"instances": [RED, truncated]}),
        as_json(v2([GREEN, b64(image_bytes("red", size=(5000, 10), fmt="PNG"))])),
        as_json({"instances": [BLUE]}),
        as_json(v2([b64(b"GIF89a" + b"\x00" * 40)])),
    ])
    assert [s for s, _ in results] == [422, 422, 200, 415]
    assert results[0][1] == {"error": results[0][1]["error"], "code": "invalid_image"}
    assert results[0][1]["error"].startswith("[invalid_image] instance 1: ")
    assert results[1][1]["code"] == "image_too_large"
    assert results[2][1]["predictions"][0]["predictions"][0]["label"] == "blue"
    assert results[3][1]["code"] == "unsupported_media_type"


def test_statuses_and_codes_match_predictions(image_dir: Path) -> None:
    """Each hostile payload gets the same status and code as a v1/v2 instance as it does
    as a /predictions body."""
    handler, ctx = make_handler(SecureImageClassifier, image_dir,
                                {"max_request_bytes": 4096, "max_image_side": 500})
    payloads = [
        b64(image_bytes("red", size=(600, 20))),  # too wide
        b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),  # corrupt
        b64(b"x" * 5000),  # over max_request_bytes once decoded
        "a" * 10,  # bad padding
    ]
    plain = run_batch(handler, ctx, [Request(p, "text/plain") for p in payloads])
    as_v1 = run_batch(handler, ctx, [as_json({"instances": [p]}) for p in payloads])
    as_v2 = run_batch(handler, ctx, [as_raw(v2([p])) for p in payloads])
    expected = [(s, body["error"]["code"]) for s, body in plain]
    assert [(s, b["code"]) for s, b in as_v1] == expected
    assert [(s, b["code"]) for s, b in as_v2] == expected
    assert all(400 <= s < 500 for s, _ in expected)
    assert len({code for _, code in expected}) >= 3


def test_instances_count_against_the_batch(image_dir: Path) -> None:
    handler, ctx = make_handler(SecureImageClassifier, image_dir,
                                {"max_batch_size": 4, "max_instances_per_request": 3},
                                batch_size=4)
    results = run_batch(handler, ctx, [
        as_json({"instances": [RED, GREEN, BLUE]}),  # slots 0-2
        as_json(v2([RED, GREEN])),  # would need slots 3-4: no room
        Request(bytearray(image_bytes("green")), "image/jpeg"),  # slot 3
        as_json({"instances": [RED] * 4}),  # over the per-request cap
    ])
    assert [s for s, _ in results] == [200, 503, 200, 413]
    assert results[1][1]["code"] == "batch_limit_exceeded"
    assert results[3][1]["code"] == "too_many_instances"
    assert results[2][1]["predictions"][0]["label"] == "green"
    labels = [p["predictions"][0]["label"] for p in results[0][1]["predictions"]]
    assert labels == ["red", "green", "blue"]


def test_the_instance_cap_is_never_above_max_batch_size(image_dir: Path) -> None:
    handler, ctx = make_handler(SecureImageClassifier, image_dir,
                                {"max_batch_size": 2, "max_instances_per_request": 8},
                                batch_size=2)
    [(status, body)] = run_batch(handler, ctx, [as_json({"instances": [RED] * 3})])
    assert (status, body["code"]) == (413, "too_many_instances")


def test_protocols_setting_narrows_what_a_model_reads(image_dir: Path) -> None:
    handler, ctx = make_handler(SecureImageClassifier, image_dir, {"protocols": ["oip_v2"]})
    results = run_batch(handler, ctx, [
        Request(bytearray(image_bytes("red")), "image/jpeg"),
        as_json({"instances": [RED]}),
        as_json(v2([RED])),
    ])
    assert [s for s, _ in results] == [400, 400, 200]
    assert "handler.protocols" in results[0][1]["error"]["message"]  # plain: /predictions shape
    assert results[1][1]["code"] == "malformed_request"
    assert "kserve_v1 is off" in results[1][1]["error"]


def test_plain_only_model_treats_protocol_bodies_as_refused(image_dir: Path) -> None:
    handler, ctx = make_handler(SecureImageClassifier, image_dir, {"protocols": ["torchserve"]})
    results = run_batch(handler, ctx, [as_raw(v2([RED])),
                                       Request(bytearray(image_bytes("red")), "image/jpeg")])
    assert [s for s, _ in results] == [400, 200]
    assert "oip_v2 is off" in results[0][1]["error"]


def test_text_classifier_reads_v1_and_v2_text(text_dir: Path) -> None:
    handler, ctx = make_handler(SecureTextClassifier, text_dir, {"top_k": 1})
    results = run_batch(handler, ctx, [
        as_json({"instances": ["good great", {"text": "awful"}, {"data": "meh"}]}),
        as_raw(v2(["bad", "good"])),
        Request("great", "text/plain"),
        as_raw({"instances": ["x" * 20_000]}, "text/plain"),  # over max_text_chars
    ])
    assert [s for s, _ in results] == [200, 200, 200, 422]
    v1 = [p["predictions"][0]["label"] for p in results[0][1]["predictions"]]
    assert v1 == ["positive", "negative", "neutral"]
    labels = {o["name"]: o for o in results[1][1]["outputs"]}["label"]
    assert labels == {"name": "label", "shape": [2, 1], "datatype": "BYTES",
                      "data": ["negative", "positive"]}
    assert results[3][1]["code"] == "text_too_long"


def test_detector_v2_outputs_and_v1_predictions(detector_dir: Path) -> None:
    handler, ctx = make_handler(SecureObjectDetector, detector_dir, {"input_size": 320})
    one = b64(scene((320, 320), {"green": (10, 10, 100, 50)}))
    two = b64(scene((640, 480), {"red": (40, 60, 200, 220), "blue": (400, 300, 600, 460)}))
    results = run_batch(handler, ctx, [as_json(v2([one, two])),
                                       as_json({"instances": [{"data": two}]})])
    assert [s for s, _ in results] == [200, 200]
    outputs = {o["name"]: o for o in results[0][1]["outputs"]}
    assert outputs["count"]["data"] == [1, 2]
    assert outputs["boxes"]["shape"] == [3, 4]
    assert outputs["labels"]["data"][0] == "green"
    assert sorted(outputs["labels"]["data"][1:]) == ["blue", "red"]
    [v1] = results[1][1]["predictions"]
    assert sorted(d["label"] for d in v1["detections"]) == ["blue", "red"]


def test_a_plain_batch_never_takes_the_protocol_path(image_dir: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="secure_handler.serving.protocol_batch")
    handler, ctx = make_handler(SecureImageClassifier, image_dir)
    results = run_batch(handler, ctx, [Request({"data": RED}, "application/json"),
                                       Request(bytearray(b'{"instances": 1'), "")])
    assert results[0][0] == 200
    # Not JSON: not a protocol body; /predictions' own checks refuse it, in their shape.
    status, body = results[1]
    assert 400 <= status < 500
    assert set(body["error"]) == {"code", "message"}
    assert "protocol batch" not in caplog.text


class NaNScores(SecureImageClassifier):
    """A custom handler whose results cannot be JSON (NaN)."""

    def format_outputs(self, outputs, items):
        return [{"score": float("nan")} for _ in items]


def test_a_result_that_cannot_be_answered_fails_only_its_request(image_dir: Path) -> None:
    handler, ctx = make_handler(NaNScores, image_dir)
    protocol, plain = run_batch(handler, ctx, [as_json(v2([RED])),
                                               Request(bytearray(image_bytes("red")), "image/jpeg")])
    assert (protocol[0], protocol[1]["code"]) == (500, "inference_failed")
    assert (plain[0], plain[1]["error"]["code"]) == (500, "inference_failed")


def test_a_row_that_is_not_a_request_beside_a_protocol_body(image_dir: Path) -> None:
    handler, ctx = make_handler(SecureImageClassifier, image_dir)
    ctx.request_processor = [RequestProcessor({"body": {"content-type": "application/json"}}),
                             RequestProcessor({})]
    ctx.request_ids = {0: "a", 1: "b"}
    out = handler.handle([{"body": {"instances": [RED]}}, None], ctx)
    assert len(out) == 2
    assert ctx.get_response_status(0)[0] == 200
    assert ctx.get_response_status(1)[0] == 400
    assert json.loads(out[1])["error"]["code"] == "malformed_request"
