"""A real torchserve on loopback serving the image classifier: shared batches, typed errors.

Valid and hostile requests are sent concurrently into a model with batchSize 8 and a 200 ms
maxBatchDelay, so they share batches; every answer is checked, then the worker is shown to be
the same process that started (no restart).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import re

import pytest
from PIL import Image
from support import classifier_mar, image_bytes, post, running_server

from secure_handler.deploy.launcher import http_json
from secure_handler.deploy.tsconfig import ModelSpec


def _png_bomb_header(width: int, height: int) -> bytes:
    # A valid PNG whose IHDR is patched to claim a huge canvas (CRC left stale on purpose).
    raw = bytearray(image_bytes("red", (8, 8), fmt="PNG"))
    raw[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(raw)


def _cases() -> list[tuple[str, bytes, str, int, str | None]]:
    """(name, body, content type, expected status, expected code or top-1 label)."""
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    return [
        ("jpeg-red", image_bytes("red"), "image/jpeg", 200, "red"),
        ("png-green", image_bytes("green", fmt="PNG"), "image/png", 200, "green"),
        ("b64-blue", base64.b64encode(image_bytes("blue")), "text/plain", 200, "blue"),
        ("json-red", json.dumps({"data": base64.b64encode(image_bytes("red")).decode()}).encode(),
         "application/json", 200, "red"),
        ("cmyk-red", cmyk.getvalue(), "image/jpeg", 200, "red"),
        ("empty", b"", "image/jpeg", 400, "empty_body"),
        ("json-array", b"[1, 2, 3]", "application/json", 400, "malformed_request"),
        # Exact application/json: the hardened config says decode_input_request=false,
        # so our strict reader, not the worker's json.loads (last key wins), sees the body.
        ("json-duplicate-key", b'{"data": "%s", "data": "x"}' % base64.b64encode(image_bytes("red")),
         "application/json", 400, "malformed_request"),
        ("too-big", b"\xff\xd8\xff" + b"\x00" * 300_000, "image/jpeg", 413, "payload_too_large"),
        ("gif", image_bytes("red", fmt="GIF"), "image/gif", 415, "unsupported_media_type"),
        ("zip-as-jpeg", b"PK\x03\x04" + b"\x00" * 100, "image/jpeg", 415, "unsupported_media_type"),
        ("truncated", image_bytes("red", (400, 300))[:600], "image/jpeg", 422, "invalid_image"),
        ("png-bomb", _png_bomb_header(60_000, 60_000), "image/png", 422, "image_too_large"),
        ("bad-b64", b"aGVsbG8*d29ybGQ=", "text/plain", 422, "invalid_base64"),
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("image-server")
    store = tmp / "store"
    classifier_mar(tmp, store, "tiny", {"max_batch_size": 8, "max_request_bytes": 200_000})
    spec = ModelSpec("tiny", "tiny.mar", batch_size=8, max_batch_delay_ms=200)
    with running_server(tmp / "work", store, [spec]) as info:
        yield info


def _workers(server) -> list[tuple[str, int]]:
    desc = http_json("GET", f"{server.management_url}/models/tiny", server.tokens["management"])
    return [(w["id"], w["pid"]) for w in desc[0]["workers"]]


@pytest.fixture(scope="module")
def mixed_run(server):
    """Send the mixed cases once (16 at a time, so they share batches); answers + workers."""
    url = f"{server.inference_url}/predictions/tiny"
    token = server.tokens["inference"]
    before = _workers(server)
    cases = _cases() * 3  # 39 requests, 16 at a time: batches mix valid and hostile rows
    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda c: post(url, c[1], c[2], token), cases))
    return cases, answers, before


def test_mixed_batches_get_per_request_answers(server, mixed_run) -> None:
    cases, answers, before = mixed_run
    for (name, _, _, status, expected), (got, body) in zip(cases, answers, strict=True):
        assert got == status, (name, body)
        if status == 200:
            assert body["predictions"][0]["label"] == expected, name
        else:
            assert body["error"]["code"] == expected, (name, body)
    assert _workers(server) == before, "a worker restarted"
    log = (server.server.workdir / "logs" / "model_log.log").read_text("utf-8", "replace")
    assert "Traceback" not in log


def test_batches_really_were_shared(server, mixed_run) -> None:
    # The handler logs each batch's make-up; at least one mixed served and refused rows.
    log = (server.server.workdir / "logs" / "model_log.log").read_text("utf-8", "replace")
    batches = [tuple(map(int, m)) for m in
               re.findall(r"batch rows=(\d+) served=(\d+) refused=(\d+)", log)]
    assert batches, "no batch was logged"
    assert any(rows > 1 and served and refused for rows, served, refused in batches), batches


def test_requests_without_token_are_refused(server) -> None:
    status, _ = post(f"{server.inference_url}/predictions/tiny", image_bytes("red"), "image/jpeg")
    assert status == 400  # TorchServe's own token check answers 400


def test_describe_header_on_predictions_is_ignored(server) -> None:
    url = f"{server.inference_url}/predictions/tiny"
    status, body = post(url, image_bytes("blue"), "image/jpeg", server.tokens["inference"],
                        headers={"describe": "True"})
    assert status == 200
    assert body["predictions"][0]["label"] == "blue"
