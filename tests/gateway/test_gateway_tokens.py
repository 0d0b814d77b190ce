"""TorchServe's tokens behind a real gateway process and a real TorchServe (issue 14, finding 2).

Only TorchServe's own answer on a handlerless call decides that it refused the gateway's
token; a prediction's body never does. A confirmed refusal renews the token, never resends a
prediction, and several gateway processes rotate at most once per interval between them.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_support import KeySet, MakeConfig, Upstream, gateway_process, write_config
from support import LABELS, archive_mar, build_tiny_classifier, image_bytes

from secure_handler.deploy.launcher import free_port
from secure_handler.gateway.tokens import TokenSource

pytestmark = pytest.mark.integration

JPEG = {"Content-Type": "image/jpeg"}
REFUSAL_MESSAGE = ("Token Authorization failed. Token either incorrect, expired, or not "
                   "provided correctly")

FORGER = f'''"""Answers every row exactly as TorchServe answers a refused token."""

from secure_handler import SecureImageClassifier

REFUSAL = {{"code": 400, "type": "InvalidKeyException", "message": {REFUSAL_MESSAGE!r}}}


class TestHandler(SecureImageClassifier):
    """A handler whose 400 looks like TorchServe's own token refusal."""

    def handle(self, data, context):
        for index in range(len(data)):
            context.set_response_status(400, "Bad Request", index)
        return [REFUSAL for _ in data]
'''


def _tokens(torchserve: Upstream) -> dict[str, str]:
    data = json.loads(torchserve.key_file.read_text())
    return {kind: str(entry["key"]) for kind, entry in data.items()}


def _management(torchserve: Upstream, method: str, path: str) -> int:
    req = urllib.request.Request(torchserve.info.management_url + path, method=method,
                                 headers={"Authorization": f"Bearer {_tokens(torchserve)['management']}"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return int(resp.status)


def _rotate(torchserve: Upstream, kind: str) -> None:
    req = urllib.request.Request(f"{torchserve.info.management_url}/token?type={kind}",
                                 headers={"Authorization": f"Bearer {_tokens(torchserve)['API']}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


def _wait_rotation_allowed(torchserve: Upstream) -> None:
    """Rotation is allowed once per interval, counted from the key file's last change."""
    while time.time() - torchserve.key_file.stat().st_mtime < TokenSource.MIN_ROTATION_INTERVAL_S:
        time.sleep(0.2)


def _access_count(torchserve: Upstream, needle: str, at_least: int = 0) -> int:
    deadline = time.monotonic() + 10  # TorchServe writes its access log asynchronously
    while torchserve.requests_matching(needle) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return torchserve.requests_matching(needle)


@pytest.fixture(scope="module")
def forger(torchserve: Upstream, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`forger` registered on TorchServe by its operator (not through the gateway)."""
    src = tmp_path_factory.mktemp("forger")
    labels = src / "index_to_name.json"
    labels.write_text(json.dumps(LABELS))
    handler = src / "handler.py"
    handler.write_text(FORGER)
    archive_mar(torchserve.store, "forger", build_tiny_classifier(src), handler, [labels],
                {"handler": {}})
    status = _management(torchserve, "POST",
                         "/models?url=forger.mar&initial_workers=1&synchronous=true")
    assert status == 200
    return "forger"


@pytest.fixture
def keys() -> KeySet:
    ks = KeySet()
    ks.add("infer", ["inference"], ["tiny", "forger"])
    return ks


def _config_path(make_config: MakeConfig, keys: KeySet, tmp_path: Path, **extra: object) -> Path:
    models = {"tiny": {"content_types": ["image/jpeg"]},
              "forger": {"content_types": ["image/jpeg"]}}
    config = make_config(keys, models=models, **extra)
    return write_config(config, tmp_path / "gateway.yaml")


@pytest.fixture
def gateway_url(make_config: MakeConfig, keys: KeySet, tmp_path: Path,
                torchserve: Upstream) -> Iterator[str]:
    port = free_port()
    with gateway_process(_config_path(make_config, keys, tmp_path), port, tmp_path / "gw.log"):
        yield f"http://127.0.0.1:{port}"


def test_a_forged_refusal_in_a_prediction_neither_rotates_nor_resends(
    gateway_url: str, keys: KeySet, torchserve: Upstream, forger: str,
) -> None:
    before_tokens = _tokens(torchserve)
    before_predictions = _access_count(torchserve, '"POST /predictions/forger')
    before_rotations = _access_count(torchserve, "/token?type=")
    headers = {"Authorization": f"Bearer {keys.plain['infer']}", **JPEG}
    answers = [httpx.post(f"{gateway_url}/predictions/{forger}", content=image_bytes("red"),
                          headers=headers, timeout=60) for _ in range(5)]
    # The handler's own answer passes through unchanged: it is the handler's 400.
    assert [a.status_code for a in answers] == [400] * 5
    assert all(a.json()["type"] == "InvalidKeyException" for a in answers)
    # Each prediction was sent exactly once, and no token was rotated.
    assert _access_count(torchserve, '"POST /predictions/forger', before_predictions + 5) == (
        before_predictions + 5)
    assert _access_count(torchserve, "/token?type=") == before_rotations
    assert _tokens(torchserve) == before_tokens
    # The gateway's own token still works.
    ok = httpx.post(f"{gateway_url}/predictions/tiny", content=image_bytes("red"),
                    headers=headers, timeout=60)
    assert ok.status_code == 200


def test_a_confirmed_refusal_renews_the_token_and_never_resends_the_prediction(
    make_config: MakeConfig, keys: KeySet, tmp_path: Path, torchserve: Upstream,
) -> None:
    # A restored backup of key_file.json: the file names a token TorchServe no longer takes.
    stale = torchserve.key_file.read_text()
    _rotate(torchserve, "inference")
    torchserve.key_file.write_text(stale)
    old = time.time() - 3600
    os.utime(torchserve.key_file, (old, old))
    stale_token = json.loads(stale)["inference"]["key"]
    port = free_port()
    with gateway_process(_config_path(make_config, keys, tmp_path), port, tmp_path / "gw.log"):
        url = f"http://127.0.0.1:{port}/predictions/tiny"
        headers = {"Authorization": f"Bearer {keys.plain['infer']}", **JPEG}
        sent_before = _access_count(torchserve, '"POST /predictions/tiny')
        refused = httpx.post(url, content=image_bytes("red"), headers=headers, timeout=60)
        sent_after = _access_count(torchserve, '"POST /predictions/tiny', sent_before + 1)
        retried = httpx.post(url, content=image_bytes("red"), headers=headers, timeout=60)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert refused.headers["retry-after"] == "1"
    # TorchServe saw the refused prediction once; the gateway did not send it again.
    assert sent_after == sent_before + 1
    renewed = _tokens(torchserve)["inference"]
    assert renewed != stale_token
    assert retried.status_code == 200


def test_gateway_processes_sharing_a_key_file_rotate_once_per_interval(
    make_config: MakeConfig, keys: KeySet, tmp_path: Path, torchserve: Upstream,
) -> None:
    # A margin longer than the token's life: every process sees every token as expiring.
    upstream = {"inference_url": torchserve.info.inference_url,
                "management_url": torchserve.info.management_url,
                "key_file": str(torchserve.key_file), "token_refresh_margin_s": 10 ** 7}
    path = _config_path(make_config, keys, tmp_path, upstream=upstream)
    ports = [free_port(), free_port(), free_port()]
    _wait_rotation_allowed(torchserve)
    rotations_before = _access_count(torchserve, "/token?type=inference")
    headers = {"Authorization": f"Bearer {keys.plain['infer']}", **JPEG}
    with gateway_process(path, ports[0], tmp_path / "a.log"), \
            gateway_process(path, ports[1], tmp_path / "b.log"), \
            gateway_process(path, ports[2], tmp_path / "c.log"):
        started = time.monotonic()
        statuses = [httpx.post(f"http://127.0.0.1:{port}/predictions/tiny",
                               content=image_bytes("red"), headers=headers,
                               timeout=60).status_code
                    for _ in range(3) for port in ports]
        elapsed = time.monotonic() - started
    rotations = _access_count(torchserve, "/token?type=inference") - rotations_before
    assert statuses == [200] * 9  # no process invalidated another's token mid-request
    intervals = int(elapsed // TokenSource.MIN_ROTATION_INTERVAL_S) + 1
    assert 1 <= rotations <= intervals
