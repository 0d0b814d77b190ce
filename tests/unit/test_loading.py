"""TorchScript-only loading: what is refused before torch.jit.load, and the pins."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from support import build_tiny_classifier

from secure_handler import ConfigurationError, IntegrityError, UnsafeModelError
from secure_handler.serving.loading import (
    DIGESTS_MEMBER,
    TRUST_STORE_ENV,
    check_manifest,
    check_torchscript_archive,
    choose_device,
    load_torchscript,
    sha256_file,
    verify_embedded_digests,
)
from secure_handler.serving.pin import verify_trust_store


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return build_tiny_classifier(tmp_path)


def test_torchscript_archive_passes_and_loads(model: Path) -> None:
    check_torchscript_archive(model)
    module = load_torchscript(model, torch.device("cpu"))
    assert not module.training


def test_torch_save_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(UnsafeModelError, match="torch.save checkpoint"):
        check_torchscript_archive(path)


def test_raw_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    with pytest.raises(UnsafeModelError, match="raw pickle"):
        check_torchscript_archive(path)


def test_zip_with_escaping_names_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/code/__torch__.py", "")
        zf.writestr("m/constants.pkl", "")
        zf.writestr("m/data.pkl", "")
        zf.writestr("../evil.py", "")
    with pytest.raises(UnsafeModelError, match="not under one folder"):
        check_torchscript_archive(path)


def test_manifest_with_model_file_is_refused() -> None:
    with pytest.raises(UnsafeModelError, match="modelFile='model.py'"):
        check_manifest({"model": {"serializedFile": "m.pt", "modelFile": "model.py"}})


def test_manifest_without_serialized_file_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="no serializedFile"):
        check_manifest({"model": {"handler": "h.py"}})


def test_device_choice_honours_config() -> None:
    assert choose_device({"gpu_id": None}, "auto").type == "cpu"
    assert choose_device({"gpu_id": 0}, "cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="CUDA is not available"):
            choose_device({"gpu_id": 0}, "cuda")


def _write_digests(model_dir: Path, files: dict[str, str]) -> None:
    target = model_dir / DIGESTS_MEMBER
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"format": "secure-handler-digests/1", "files": files}))


def test_embedded_digests_detect_a_swapped_member(model: Path) -> None:
    _write_digests(model.parent, {"model.pt": sha256_file(model)})
    assert verify_embedded_digests(model.parent) == sha256_file(model.parent / DIGESTS_MEMBER)
    _write_digests(model.parent, {"model.pt": "0" * 64})
    with pytest.raises(IntegrityError, match="does not match"):
        verify_embedded_digests(model.parent)


def test_embedded_digests_cannot_point_outside(model: Path) -> None:
    _write_digests(model.parent, {"../../etc/passwd": "0" * 64})
    with pytest.raises(IntegrityError, match="missing"):
        verify_embedded_digests(model.parent)


def _store(tmp_path: Path, **entry: object) -> Path:
    path = tmp_path / "models.lock"
    path.write_text(json.dumps({"format": "secure-handler-lock/1", "models": [entry]}))
    return path


def test_trust_store_pin(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _store(tmp_path, name="tiny", version="1.0", serialized_sha256=sha256_file(model))
    monkeypatch.setenv(TRUST_STORE_ENV, str(good))
    assert verify_trust_store("tiny", model, None)
    bad = _store(tmp_path, name="tiny", version="1.0", serialized_sha256="1" * 64)
    monkeypatch.setenv(TRUST_STORE_ENV, str(bad))
    with pytest.raises(IntegrityError, match="does not match any of its 1 entries"):
        verify_trust_store("tiny", model, None)


def test_trust_store_required_but_missing(model: Path, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="not set"):
        verify_trust_store("tiny", model, None, required=True)
    assert not verify_trust_store("tiny", model, None, required=False)
    # With a store set, a missing entry refuses whatever the handler config says.
    monkeypatch.setenv(TRUST_STORE_ENV, str(_store(tmp_path, name="other", version="1.0")))
    with pytest.raises(IntegrityError, match="no entry for model 'tiny'"):
        verify_trust_store("tiny", model, None, required=False)
