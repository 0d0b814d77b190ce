"""The in-worker pin trusts nothing from the archive (CWE-494).

The identity is the model name TorchServe registered (the operator's `load_models=NAME=FILE`),
checked against the lock named by `$SECURE_HANDLER_TRUST_STORE`; the archive's manifest version
and its model-config `require_pin` play no part. Each test builds the swapped or altered
archive itself: a different model with a bumped version and `require_pin` dropped, the locked
archive under a name the lock does not know, a file added beside the pinned ones. The last test
serves the swapped archive with the real torchserve and shows the worker refuses it.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support import (
    LABELS,
    build_tiny_classifier,
    image_bytes,
    post,
    running_server,
    script_and_save,
)
from support_models import AlwaysThree

from secure_handler import SecureImageClassifier
from secure_handler.cli import main
from secure_handler.deploy.launcher import http_json, java_problem
from secure_handler.deploy.tsconfig import ModelSpec
from secure_handler.errors import IntegrityError
from secure_handler.serving.loading import TRUST_STORE_ENV
from secure_handler.testing import make_context


@dataclass
class Archives:
    store: Path  # holds tiny.mar, version 1.0, `require_pin: true`
    lock: Path
    swapped: Path  # another model, version 2.0, no `require_pin`


def _archive(src: Path, model: Path, export: Path, version: str, config: str,
             name: str = "tiny") -> Path:
    (src / "model-config.yaml").write_text(config)
    argv = [
        "archive", "--model-name", name, "--version", version, "--serialized-file",
        str(model), "--handler", "image", "--extra-files", str(src / "index_to_name.json"),
        "--config-file", str(src / "model-config.yaml"), "--export-path", str(export),
    ]  # fmt: skip
    assert main(argv) == 0
    return export / f"{name}.mar"


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Archives:
    tmp = tmp_path_factory.mktemp("pin-identity")
    src = tmp / "src"
    model = build_tiny_classifier(src)
    (src / "index_to_name.json").write_text(json.dumps(LABELS))
    store, lock = tmp / "store", tmp / "models.lock"
    _archive(src, model, store, "1.0", "handler:\n  require_pin: true\n  top_k: 1\n")
    assert main(["lock", str(store), "-o", str(lock)]) == 0
    other = script_and_save(AlwaysThree(), tmp / "model-three.pt")
    swapped = _archive(src, other, tmp / "swapped", "2.0", "handler:\n  top_k: 1\n")
    assert main(["verify", str(swapped)]) == 0  # a well-formed archive in its own right
    return Archives(store, lock, swapped)


def load(mar: Path, workdir: Path, name: str = "tiny") -> SecureImageClassifier:
    """What a TorchServe worker does with `mar` registered as `name` (real Context)."""
    model_dir = workdir / "model"
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
    handler = SecureImageClassifier()
    handler.initialize(make_context(model_dir, manifest, config, model_name=name))
    return handler


def test_the_locked_archive_loads_under_its_registered_name(
    archives: Archives, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TRUST_STORE_ENV, str(archives.lock))
    assert load(archives.store / "tiny.mar", tmp_path).initialized


def test_a_swap_with_a_new_version_and_no_require_pin_is_refused(
    archives: Archives, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old pin looked up (name, manifest version) and read `require_pin` from the
    archive: version 2.0 had no entry and nothing required one, so this loaded."""
    monkeypatch.setenv(TRUST_STORE_ENV, str(archives.lock))
    with pytest.raises(IntegrityError, match="'tiny' does not match any of its 1 entries"):
        load(archives.swapped, tmp_path)


def test_the_locked_archive_under_an_unlocked_name_is_refused(
    archives: Archives, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TRUST_STORE_ENV, str(archives.lock))
    with pytest.raises(IntegrityError, match="no entry for model 'shadow'"):
        load(archives.store / "tiny.mar", tmp_path, name="shadow")


def test_another_locked_model_under_this_name_is_refused(
    archives: Archives, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both archives are in the lock; the one locked as `other`, registered as `tiny`,
    matches no entry of `tiny`."""
    store, lock = tmp_path / "store", tmp_path / "both.lock"
    shutil.copytree(archives.store, store)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(archives.store.parent / "src" / "index_to_name.json", src)
    other = _archive(src, script_and_save(AlwaysThree(), tmp_path / "three.pt"), store, "1.0",
                     "handler:\n  top_k: 1\n", name="other")
    assert main(["lock", str(store), "-o", str(lock)]) == 0
    monkeypatch.setenv(TRUST_STORE_ENV, str(lock))
    assert load(other, tmp_path / "a", name="other").initialized
    with pytest.raises(IntegrityError, match="'tiny' does not match any of its 1 entries"):
        load(other, tmp_path / "b", name="tiny")


def test_the_lock_can_waive_the_pin_for_models_it_does_not_list(
    archives: Archives, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = json.loads(archives.lock.read_text())
    waived = tmp_path / "waived.lock"
    waived.write_text(json.dumps({**lock, "require_pin": False}))
    monkeypatch.setenv(TRUST_STORE_ENV, str(waived))
    assert load(archives.swapped, tmp_path / "a", name="shadow").initialized
    with pytest.raises(IntegrityError, match="does not match"):  # a listed name stays pinned
        load(archives.swapped, tmp_path / "b")


def test_a_file_added_beside_the_pinned_members_is_refused(
    archives: Archives, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module the handler imports lazily could be shadowed by an added file."""
    mar = tmp_path / "tiny.mar"
    shutil.copy(archives.store / "tiny.mar", mar)
    with zipfile.ZipFile(mar, "a") as zf:
        zf.writestr("PIL.py", "import os\nos.system('id')\n")
    monkeypatch.setenv(TRUST_STORE_ENV, str(archives.lock))
    with pytest.raises(IntegrityError, match="PIL.py is in the model directory but not in"):
        load(mar, tmp_path)


def test_without_a_trust_store_the_archive_can_only_add_strictness(
    archives: Archives, tmp_path: Path
) -> None:
    with pytest.raises(IntegrityError, match="is not set"):
        load(archives.store / "tiny.mar", tmp_path / "a")  # its config says require_pin
    assert load(archives.swapped, tmp_path / "b").initialized  # no operator pin, no check


# --- the real server ---------------------------------------------------------------------


def _model_log_says(workdir: Path, text: str, timeout: float = 180.0) -> bool:
    """Wait (bounded) until the worker log holds `text`; the frontend retries the worker."""
    log = workdir / "logs" / "model_log.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


def _prediction_status(url: str, token: str) -> int | None:
    """One prediction's status; None while it stays queued (no worker ever takes it)."""
    try:
        status, _ = post(f"{url}/predictions/tiny", image_bytes("red"), "image/jpeg", token,
                         timeout=5)
    except OSError:
        return None
    return int(status)


@pytest.mark.skipif(java_problem() is not None, reason=str(java_problem()))
def test_torchserve_worker_refuses_the_swapped_archive(archives: Archives, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(archives.swapped, store / "tiny.mar")  # swapped after `lock`, serve skipped
    env = {TRUST_STORE_ENV: str(archives.lock)}
    workdir = tmp_path / "work"
    spec = ModelSpec("tiny", "tiny.mar", batch_size=1)  # load_models=tiny=tiny.mar
    with running_server(workdir, store, [spec], env=env, wait=False) as server:
        refused = _model_log_says(workdir, "'tiny' does not match any of its 1 entries")
        desc = http_json("GET", f"{server.management_url}/models/tiny",
                         server.tokens["management"])
        status = _prediction_status(server.inference_url, server.tokens["inference"])
    assert refused
    assert "secure_handler.errors.IntegrityError" in (
        (workdir / "logs" / "model_log.log").read_text(errors="replace"))
    assert desc[0]["modelVersion"] == "2.0"  # TorchServe registered the archive's version
    assert "READY" not in [w["status"] for w in desc[0]["workers"]]
    assert status != 200
