"""The supply chain end to end, under a real torchserve on loopback.

1. A clean archive goes `archive` → `verify` → `lock` → `verify --lock` → served, with the
   lock as the worker's trust store and `require_pin: true`.
2. The MAR in the store is swapped after locking for a well-formed archive of another model
   (its own embedded digests are valid, so only the out-of-archive pin can tell). The worker
   refuses to load it: the model never becomes READY, predictions fail, and the log names the
   mismatch.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import (
    LABELS,
    ServerInfo,
    build_tiny_classifier,
    image_bytes,
    post,
    running_server,
    script_and_save,
)
from support_models import AlwaysThree

from secure_handler.cli import main
from secure_handler.deploy.launcher import http_json
from secure_handler.deploy.tsconfig import ModelSpec
from secure_handler.serving.loading import TRUST_STORE_ENV

SPEC = ModelSpec("tiny", "tiny.mar", batch_size=1)


@dataclass
class Pinned:
    store: Path
    lock: Path
    swapped_mar: Path


def _archive(src: Path, model: Path, export: Path) -> Path:
    argv = [
        "archive", "--model-name", "tiny", "--version", "1.0", "--serialized-file", str(model),
        "--handler", "image", "--extra-files", str(src / "index_to_name.json"),
        "--config-file", str(src / "model-config.yaml"), "--export-path", str(export),
    ]  # fmt: skip
    assert main(argv) == 0
    return export / "tiny.mar"


@pytest.fixture(scope="module")
def pinned(tmp_path_factory: pytest.TempPathFactory) -> Pinned:
    tmp = tmp_path_factory.mktemp("supply-server")
    src = tmp / "src"
    model = build_tiny_classifier(src)
    (src / "index_to_name.json").write_text(json.dumps(LABELS))
    (src / "model-config.yaml").write_text("handler:\n  require_pin: true\n  top_k: 1\n")
    store, lock = tmp / "store", tmp / "models.lock"
    mar = _archive(src, model, store)
    assert main(["verify", str(mar)]) == 0
    assert main(["lock", str(store), "-o", str(lock)]) == 0
    assert main(["verify", "--lock", str(lock), str(store)]) == 0

    (tmp / "swap").mkdir()
    swapped = script_and_save(AlwaysThree(), tmp / "swap" / "model.pt")
    swapped_mar = _archive(src, swapped, tmp / "swapped")
    assert main(["verify", str(swapped_mar)]) == 0  # a well-formed archive in its own right
    return Pinned(store, lock, swapped_mar)


def test_clean_archive_is_served_under_its_pin(pinned: Pinned, tmp_path: Path) -> None:
    env = {TRUST_STORE_ENV: str(pinned.lock)}
    with running_server(tmp_path / "work", pinned.store, [SPEC], env=env) as server:
        url = f"{server.inference_url}/predictions/tiny"
        status, body = post(url, image_bytes("red"), "image/jpeg", server.tokens["inference"])
    assert status == 200, body
    assert body["predictions"][0]["label"] == "red"


def _worker_states(server: ServerInfo, timeout: float) -> list[str]:
    """Worker statuses after `timeout` seconds of letting the frontend retry."""
    deadline = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < deadline:
        try:
            desc = http_json(
                "GET", f"{server.management_url}/models/tiny", server.tokens["management"]
            )
            states = [w["status"] for w in desc[0]["workers"]]
        except OSError:  # the frontend is still starting (or the model not yet registered)
            pass
        if "READY" in states:
            break
        time.sleep(0.5)
    return states


def _prediction_status(server: ServerInfo) -> int | None:
    """The status of one prediction, or None when it is still queued (no worker took it)."""
    url = f"{server.inference_url}/predictions/tiny"
    try:
        status, _ = post(
            url, image_bytes("red"), "image/jpeg", server.tokens["inference"], timeout=5
        )
    except OSError:
        return None
    return int(status)


def test_worker_with_a_wrong_pin_refuses_to_load(pinned: Pinned, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(pinned.swapped_mar, store / "tiny.mar")  # swapped after `lock`
    assert main(["verify", "--lock", str(pinned.lock), str(store)]) == 1  # serve's gate

    # Suppose the gate was skipped: the worker itself must refuse the swapped model.
    env = {TRUST_STORE_ENV: str(pinned.lock)}
    workdir = tmp_path / "work"
    log = workdir / "logs" / "model_log.log"
    with running_server(workdir, store, [SPEC], env=env, wait=False) as server:
        # Wait for the worker's refusal itself (bounded), not a fixed time: on a loaded
        # machine the first worker may take longer than any fixed window to start.
        refused = _log_says(log, "secure_handler.errors.IntegrityError", timeout=180)
        states = _worker_states(server, timeout=5)
        prediction = _prediction_status(server)
    assert refused
    assert states, "the model was never registered"
    assert "READY" not in states
    assert prediction != 200  # the swapped model never answers
    assert "does not match" in log.read_text(errors="replace")


def _log_says(log: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False
