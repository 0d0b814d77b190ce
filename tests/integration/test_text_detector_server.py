"""A real torchserve on loopback serving the text classifier and both detector contracts.

Valid and hostile requests go concurrently to models with batchSize 8 and a 200 ms
maxBatchDelay, so they share batches. Every answer is checked (status, error code, the right
class, boxes within IoU 0.5 of the drawn shapes), then the workers are shown to be the same
processes that started (no restart).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import archive_mar, image_bytes, post, running_server, write_image_handler
from support_models import (
    build_detector,
    build_text_model,
    iou,
    scene,
    write_detector_labels,
    write_text_files,
)

from secure_handler.deploy.launcher import http_json
from secure_handler.deploy.tsconfig import ModelSpec

MODELS = ("text", "det_tensor", "det_list")

Check = Callable[[Any], None]


def _mars(tmp: Path, store: Path) -> None:
    src = tmp / "text"
    model = build_text_model(src)
    archive_mar(store, "text", model, write_image_handler(src, base="SecureTextClassifier"),
                write_text_files(src),
                {"handler": {"max_batch_size": 8, "max_request_bytes": 4096,
                             "max_text_chars": 1000, "max_tokens": 32, "warmup": True}})
    for name, kind, cfg in (("det_tensor", "tensor", {"input_size": 320}),
                            ("det_list", "list", {"max_model_side": 512})):
        src = tmp / name
        model = build_detector(src, kind)
        handler = write_image_handler(src, base="SecureObjectDetector")
        archive_mar(store, name, model, handler, [write_detector_labels(src)],
                    {"handler": {"max_batch_size": 8, "max_request_bytes": 300_000,
                                 "warmup": True, **cfg}})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("text-detector-server")
    store = tmp / "store"
    _mars(tmp, store)
    specs = [ModelSpec(name, f"{name}.mar", batch_size=8, max_batch_delay_ms=200)
             for name in MODELS]
    with running_server(tmp / "work", store, specs) as info:
        yield info


def _label(expected: str) -> Check:
    def check(body: Any) -> None:
        assert body["predictions"][0]["label"] == expected, body
    return check


def _text_cases() -> list[tuple[str, bytes, str, int, str | Check]]:
    """(name, body, content type, expected status, expected code or check)."""
    return [
        ("plain", b"What a GOOD film", "text/plain", 200, _label("positive")),
        ("bytes", b"awful, just bad", "application/octet-stream", 200,
         _label("negative")),
        ("json", json.dumps({"text": "meh"}).encode(), "application/json", 200,
         _label("neutral")),
        ("fullwidth", "ｇｒｅａｔ".encode(), "text/plain; charset=utf-8", 200,
         _label("positive")),
        ("latin1", "café bad".encode("latin-1"), "text/plain", 422, "invalid_text"),
        ("nul", b"good\x00", "text/plain", 422, "invalid_text"),
        ("bidi", "good\u202edab".encode(), "text/plain", 422, "invalid_text"),
        ("surrogate", b'{"text": "good\\ud800"}', "application/json", 422, "invalid_text"),
        ("long", b"a" * 1001, "text/plain", 422, "text_too_long"),
        ("tokens", b"good " * 33, "text/plain", 422, "too_many_tokens"),
        ("huge", b"good " * 1000, "text/plain", 413, "payload_too_large"),
        ("empty", b"", "text/plain", 400, "empty_body"),
        ("json-list", b'["good"]', "application/json", 400, "malformed_request"),
        ("json-num", b'{"text": 1}', "application/json", 400, "malformed_request"),
        ("json-broken", b'{"text": "good"', "application/json", 400, "malformed_request"),
    ]


SCENES = {
    "wide": ((640, 360), {"red": (40, 60, 240, 200), "blue": (400, 100, 620, 340)}),
    "tall": ((240, 600), {"green": (20, 400, 200, 580)}),
    "small": ((96, 64), {"blue": (10, 8, 60, 50)}),
}


def _boxes(size: tuple[int, int], shapes: dict) -> Check:
    def check(body: Any) -> None:
        found = {d["label"]: d["box"] for d in body["detections"]}
        assert set(found) == set(shapes), body
        for colour, drawn in shapes.items():
            assert iou(found[colour], drawn) >= 0.5, (colour, found[colour], drawn)
            x1, y1, x2, y2 = found[colour]
            assert 0 <= x1 < x2 <= size[0], found
            assert 0 <= y1 < y2 <= size[1], found
    return check


def _detector_cases() -> list[tuple[str, bytes, str, int, str | Check]]:
    cases: list[tuple[str, bytes, str, int, str | Check]] = [
        (name, scene(size, shapes, fmt), f"image/{fmt.lower()}", 200, _boxes(size, shapes))
        for name, (size, shapes) in SCENES.items() for fmt in ("PNG", "JPEG")
    ]
    cases += [
        ("truncated", scene(*SCENES["wide"], fmt="JPEG")[:700], "image/jpeg", 422,
         "invalid_image"),
        ("gif", image_bytes("red", fmt="GIF"), "image/gif", 415, "unsupported_media_type"),
        ("too-big", b"\xff\xd8\xff" + b"\x00" * 400_000, "image/jpeg", 413,
         "payload_too_large"),
        ("empty", b"", "image/png", 400, "empty_body"),
        ("not-base64", b"not base64!", "text/plain", 422, "invalid_base64"),
    ]
    return cases


def _workers(server, name: str) -> list[tuple[str, int, str]]:
    desc = http_json("GET", f"{server.management_url}/models/{name}", server.tokens["management"])
    return [(w["id"], w["pid"], w["startTime"]) for w in desc[0]["workers"]]


@pytest.fixture(scope="module")
def mixed_run(server):
    """Send the mixed jobs once (16 at a time into batches of 8, so valid and hostile rows share
    batches); every test that reads the answers or the batch log depends on this fixture, so
    each passes when run alone."""
    token = server.tokens["inference"]
    jobs = [("text", c) for c in _text_cases()]
    jobs += [(m, c) for m in ("det_tensor", "det_list") for c in _detector_cases()]
    jobs *= 3
    before = {m: _workers(server, m) for m in MODELS}

    def send(job: tuple[str, tuple]) -> tuple[int, Any]:
        model, (_, body, ctype, _, _) = job
        return post(f"{server.inference_url}/predictions/{model}", body, ctype, token)

    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, jobs))
    return jobs, answers, before


def test_mixed_batches_get_per_request_answers(server, mixed_run) -> None:
    jobs, answers, before = mixed_run
    for (model, (name, _, _, status, expected)), (got, body) in zip(jobs, answers, strict=True):
        assert got == status, (model, name, body)
        if callable(expected):
            expected(body)
        else:
            assert body["error"]["code"] == expected, (model, name, body)
    assert {m: _workers(server, m) for m in MODELS} == before, "a worker restarted"
    assert not _handler_tracebacks(server)


def _handler_tracebacks(server) -> list[str]:
    """Tracebacks in the model log, except TorchServe's own warnings about bodies it could not
    decode (the worker logs those with exc_info before handing us the raw bytes)."""
    log = (server.server.workdir / "logs" / "model_log.log").read_text("utf-8", "replace")
    blocks = re.split(r"(?=Traceback \(most recent call last\))", log)[1:]
    return [b[:600] for b in blocks if "otf_message_handler.py" not in b[:400]]


def test_batches_really_were_shared(server, mixed_run) -> None:
    log = (server.server.workdir / "logs" / "model_log.log").read_text("utf-8", "replace")
    batches = [tuple(map(int, m)) for m in
               re.findall(r"batch rows=(\d+) served=(\d+) refused=(\d+)", log)]
    assert any(rows > 1 and served and refused for rows, served, refused in batches), batches


def test_query_parameter_cannot_replace_the_body(server) -> None:
    # Measured on TorchServe 0.12.0: a POST with a body does not forward `?data=` to the
    # worker at all (the in-process unit test covers a row that carries both).
    url = f"{server.inference_url}/predictions/text?data=awful"
    status, body = post(url, b"good", "text/plain", server.tokens["inference"])
    assert status == 200
    assert body["predictions"][0]["label"] == "positive"
