"""Where the worker's pin comes from (CWE-494, CWE-15): only the operator can name the lock.

The worker pin reads the lock named by `$SECURE_HANDLER_TRUST_STORE`. The worker runs in the
extracted archive, so a relative name (or a path into the model directory) would read a lock
the archive brought with it; an empty value would switch the pin off. And TorchServe hides
from the workers every variable that `blacklist_env_vars` fully matches: a pattern matching
the trust-store variable turns every worker's pin off without a word. Each test builds the
hostile setting and shows the worker refuses to load, or `serve` refuses to start.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support import classifier_mar

from secure_handler import SecureImageClassifier
from secure_handler.cli import main
from secure_handler.deploy.serve import trust_store_hidden
from secure_handler.errors import IntegrityError
from secure_handler.serving.loading import TRUST_STORE_ENV
from secure_handler.supply.verify import embed_digests, lock_store, render_lock
from secure_handler.testing import make_context


@dataclass
class Locked:
    store: Path
    lock: Path
    other: Path  # a well-formed archive the lock does not pin (same name)


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Locked:
    root = tmp_path_factory.mktemp("pin-sources")
    store = root / "store"
    embed_digests(classifier_mar(root, store, "tiny", handler_config={"top_k": 1}))
    result = lock_store(store)
    assert result.ok
    lock = root / "models.lock"
    lock.write_text(render_lock(result.lock))
    other = classifier_mar(root / "o", root / "other", "tiny", handler_config={"top_k": 2})
    embed_digests(other)
    return Locked(store, lock, other)


def _extract(mar: Path, model_dir: Path) -> Path:
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(model_dir)
    return model_dir


def _initialize(model_dir: Path) -> SecureImageClassifier:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
    handler = SecureImageClassifier()
    handler.initialize(make_context(model_dir, manifest, config, model_name="tiny"))
    return handler


def _own_lock(model_dir: Path, name: str = "lock.json") -> Path:
    """A lock shipped inside the archive: it lists nothing and waives the pin."""
    path = model_dir / name
    path.write_text(json.dumps({"format": "secure-handler-lock/1", "models": [],
                                "require_pin": False}))
    return path


@pytest.fixture
def unpinned(locked: Locked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The unpinned archive extracted as a worker sees it, the worker's cwd."""
    model_dir = _extract(locked.other, tmp_path / "model")
    monkeypatch.chdir(model_dir)  # TorchServe's worker runs in the model directory
    return model_dir


def test_the_operator_lock_refuses_the_unpinned_archive(
    locked: Locked, unpinned: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TRUST_STORE_ENV, str(locked.lock))
    with pytest.raises(IntegrityError, match="does not match any of its 1 entries"):
        _initialize(unpinned)


def test_a_relative_store_path_cannot_read_a_lock_the_archive_brought(
    unpinned: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _own_lock(unpinned)
    monkeypatch.setenv(TRUST_STORE_ENV, "lock.json")  # resolved in the worker's cwd
    with pytest.raises(IntegrityError, match="is not an absolute path"):
        _initialize(unpinned)


def test_an_absolute_path_into_the_model_directory_is_refused(
    unpinned: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    inside = _own_lock(unpinned)
    link = tmp_path / "operator-looking.lock"
    link.symlink_to(inside)  # looks like the operator's, resolves into the archive
    for value in (str(inside), str(link), f"{unpinned}/MAR-INF/../lock.json"):
        monkeypatch.setenv(TRUST_STORE_ENV, value)
        with pytest.raises(IntegrityError, match="inside the model directory"):
            _initialize(unpinned)


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_store_value_refuses_instead_of_switching_the_pin_off(
    value: str, unpinned: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TRUST_STORE_ENV, value)
    with pytest.raises(IntegrityError, match="is not an absolute path"):
        _initialize(unpinned)


@pytest.mark.parametrize("kind", ["missing", "directory", "unreadable", "not-json", "fifo",
                                  "device"])
def test_a_store_that_cannot_be_read_refuses(
    kind: str, unpinned: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = tmp_path / "ops" / "models.lock"
    store.parent.mkdir()
    if kind == "directory":
        store.mkdir()
    elif kind == "unreadable":
        store.write_text("{}")  # root still reads it: then it is refused as not a lock
        store.chmod(0)
    elif kind == "not-json":
        store.write_text("models: []\n")
    elif kind == "fifo":  # opening it would block the worker until someone writes
        os.mkfifo(store)
    elif kind == "device":  # an endless read
        store = Path("/dev/zero")
    monkeypatch.setenv(TRUST_STORE_ENV, str(store))
    with pytest.raises(IntegrityError, match="cannot read trust store|is not a lock file"):
        _initialize(unpinned)


# --- blacklist_env_vars hides the variable from the workers -------------------------------

_HIDING = [
    ".*(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|AUTH|STORE).*|AWS_.*",
    "SECURE_.*|.*(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|AUTH).*",
    ".*",
    "(?i).*trust.*",  # outside what the audit can read as Java does: refused, not guessed
]


def _config(locked: Locked, tmp_path: Path, pattern: str | None) -> Path:
    config = tmp_path / "config.properties"
    assert main(["config", "--model-store", str(locked.store), "--out", str(config)]) == 0
    text = re.sub(r"(?m)^blacklist_env_vars=.*$", "", config.read_text())
    if pattern is not None:
        text += f"blacklist_env_vars={pattern}\n"
    config.write_text(text)
    return config


@pytest.mark.parametrize("pattern", _HIDING)
def test_serve_refuses_a_blacklist_that_hides_the_trust_store(
    pattern: str, locked: Locked, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(locked, tmp_path, pattern)
    state_file = tmp_path / "serve.json"
    code = main(["serve", "--model-store", str(locked.store), "--lock", str(locked.lock),
                 "--config", str(config), "--state", str(state_file)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert TRUST_STORE_ENV in err
    assert "blacklist_env_vars" in err
    assert not state_file.exists()


def test_the_blacklist_set_through_the_environment_counts_too(
    locked: Locked, tmp_path: Path
) -> None:
    config = _config(locked, tmp_path, None)
    config.write_text(config.read_text() + "enable_envvars_config=true\n")
    environ = {"TS_BLACKLIST_ENV_VARS": ".*_STORE", TRUST_STORE_ENV: str(locked.lock)}
    why = trust_store_hidden(config, ["torchserve"], environ)
    assert why is not None
    assert f"matches {TRUST_STORE_ENV}" in why


def test_the_generated_blacklist_keeps_the_trust_store_visible(
    locked: Locked, tmp_path: Path
) -> None:
    config = tmp_path / "config.properties"
    assert main(["config", "--model-store", str(locked.store), "--out", str(config)]) == 0
    assert "blacklist_env_vars=" in config.read_text()
    assert trust_store_hidden(config, ["torchserve"], {}) is None
