"""Observability: refusals by error code and per-stage times reach the Prometheus endpoint.

The handlers emit `SecureHandlerRejected` (counter, dimension ErrorCode) and
`SecureHandlerStageTime` (gauge in ms, dimension Stage) through `context.metrics`. Found on
TorchServe 0.12.0: in `metrics_mode=prometheus` the frontend exports only metrics declared in
its metrics config, so both must be declared there (`secure_handler/metrics.yaml`, passed as
`metrics_config`); with TorchServe's default config the worker logs them and the endpoint
silently drops them. Operators see attacks without reading logs (ATLAS AML.T0029 detection).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import LABELS, build_tiny_classifier, classifier_mar, image_bytes, post, running_server

import secure_handler
from secure_handler import SecureImageClassifier
from secure_handler.deploy.tsconfig import ModelSpec
from secure_handler.serving.metrics import REJECTED_METRIC, STAGE_METRIC, STAGES
from secure_handler.testing import Request, make_context, run_batch

METRICS_YAML = Path(secure_handler.__file__).parent / "serving" / "metrics.yaml"
LIMIT = 200_000

#: (body, content type, expected error code) — each refused by a different check.
HOSTILE: list[tuple[bytes, str, str]] = [
    (b"PK\x03\x04" + b"\x00" * 64, "image/jpeg", "unsupported_media_type"),
    (image_bytes("red", fmt="GIF"), "image/gif", "unsupported_media_type"),
    (b"", "image/jpeg", "empty_body"),
    (b"[1, 2, 3]", "application/json", "malformed_request"),
    (b"aGVsbG8*d29ybGQ=", "text/plain", "invalid_base64"),
    (image_bytes("red", (400, 300))[:600], "image/jpeg", "invalid_image"),
    (b"\xff\xd8\xff" + b"\x00" * (LIMIT + 1), "image/jpeg", "payload_too_large"),
]

_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)\{(.*)\}\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """`name{labels} value` samples of the text exposition format (comments skipped)."""
    samples = []
    for line in text.splitlines():
        found = _SAMPLE.match(line.strip())
        if found:
            labels = dict(_LABEL.findall(found.group(2)))
            samples.append((found.group(1), labels, float(found.group(3))))
    return samples


def scrape(metrics_url: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10) as resp:
        assert resp.headers.get_content_type() == "text/plain"
        return parse_prometheus(resp.read().decode("utf-8"))


def rejections(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, float]:
    return {labels["ErrorCode"]: value for name, labels, value in samples
            if name == REJECTED_METRIC and labels.get("ModelName") == "tiny"}


# --- in-process: what the handler hands to TorchServe's metrics cache -----------------------


def test_each_refused_row_is_counted_once_under_its_code(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    build_tiny_classifier(tmp_path)
    (tmp_path / "index_to_name.json").write_text(json.dumps(LABELS))
    manifest = {"model": {"modelName": "tiny", "serializedFile": "model.pt",
                          "handler": "handler.py"}}
    ctx = make_context(tmp_path, manifest, {"handler": {"max_request_bytes": LIMIT}})
    handler = SecureImageClassifier()
    handler.initialize(ctx)
    requests = [Request.as_worker(body, ctype) for body, ctype, _ in HOSTILE]
    requests.append(Request.as_worker(image_bytes("blue"), "image/jpeg"))
    with caplog.at_level(logging.INFO, logger="ts.metrics"):
        results = run_batch(handler, ctx, requests)
    assert [s for s, _ in results][-1] == 200
    lines = [r.getMessage() for r in caplog.records if "[METRICS]" in r.getMessage()]
    counted = Counter(re.search(r"ErrorCode:(\w+)", m).group(1)  # type: ignore[union-attr]
                      for m in lines if f"[METRICS]{REJECTED_METRIC}." in m)
    assert counted == Counter(code for _, _, code in HOSTILE)
    stages = {re.search(r"Stage:(\w+)", m).group(1)  # type: ignore[union-attr]
              for m in lines if f"[METRICS]{STAGE_METRIC}." in m}
    assert stages == set(STAGES)


# --- a real torchserve in prometheus mode --------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("metrics-server")
    store = tmp / "store"
    classifier_mar(tmp, store, "tiny", {"max_request_bytes": LIMIT})
    spec = ModelSpec("tiny", "tiny.mar", batch_size=4, max_batch_delay_ms=20)
    # The hardened config as shipped: prometheus mode with metrics_config → metrics.yaml.
    with running_server(tmp / "work", store, [spec]) as info:
        config = (tmp / "work" / "config.properties").read_text()
        assert "metrics_mode=prometheus" in config
        assert f"metrics_config={METRICS_YAML}" in config
        yield info


def _poll(metrics_url: str, done: Any, timeout: float = 20.0) -> list[Any]:
    """Scrape until `done(samples)`; the frontend applies worker metrics asynchronously."""
    deadline = time.monotonic() + timeout
    samples = scrape(metrics_url)
    while not done(samples) and time.monotonic() < deadline:
        time.sleep(0.25)
        samples = scrape(metrics_url)
    return samples


def test_rejections_appear_by_error_code_on_the_prometheus_endpoint(server: Any) -> None:
    url = f"{server.inference_url}/predictions/tiny"
    token = server.tokens["inference"]
    for body, ctype, code in HOSTILE:
        status, answer = post(url, body, ctype, token)
        assert answer["error"]["code"] == code, answer
        assert 400 <= status < 500
    expected = dict(Counter(code for _, _, code in HOSTILE))
    samples = _poll(server.metrics_url, lambda s: rejections(s) == expected)
    assert rejections(samples) == expected
    # TorchServe's own metrics survive our metrics config.
    fours = [v for name, _, v in samples if name == "Requests4XX"]
    assert fours
    assert fours[0] >= len(HOSTILE)


def test_stage_times_appear_for_every_stage(server: Any) -> None:
    url = f"{server.inference_url}/predictions/tiny"
    token = server.tokens["inference"]
    body = json.dumps({"data": base64.b64encode(image_bytes("green")).decode()}).encode()
    status, answer = post(url, body, "application/json", token)
    assert status == 200, answer

    def stages(samples: list[Any]) -> dict[str, float]:
        return {labels["Stage"]: value for name, labels, value in samples
                if name == STAGE_METRIC and labels.get("ModelName") == "tiny"}

    found = stages(_poll(server.metrics_url, lambda s: set(stages(s)) == set(STAGES)))
    assert set(found) == set(STAGES)
    assert all(value >= 0.0 for value in found.values())
