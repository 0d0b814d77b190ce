"""`config` → `audit-config` → `serve` → `client` → `stop`, against a real torchserve.

The store holds the tiny classifier archived with the real torch-model-archiver, with embedded
digests and a lock file from `secure_handler.supply.verify`. Every server is stopped at the end, even
when a test fails.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import classifier_mar, image_bytes

from secure_handler import errors
from secure_handler.cli import main
from secure_handler.client import Client, Unauthorized
from secure_handler.deploy.launcher import group_alive as _group_alive
from secure_handler.deploy.launcher import java_problem
from secure_handler.deploy.serve import ServeState, stop_server
from secure_handler.supply.verify import embed_digests, lock_store, render_lock

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(java_problem() is not None, reason=str(java_problem())),
]

HANDLER = {"max_request_bytes": 200_000, "max_batch_size": 4}


@dataclass
class Store:
    root: Path
    store: Path
    lock: Path


def _mar(tmp: Path, store: Path, name: str = "tiny", **handler: int) -> Path:
    mar: Path = classifier_mar(tmp, store, name, handler_config={**HANDLER, **handler})
    embed_digests(mar)
    return mar


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("deploy")
    store = root / "store"
    _mar(root, store)
    result = lock_store(store)
    assert result.ok
    lock = root / "models.lock"
    lock.write_text(render_lock(result.lock))
    return Store(root, store, lock)


def _copy_store(locked: Store, dest: Path) -> Path:
    store = dest / "store"
    shutil.copytree(locked.store, store)
    return store


@pytest.fixture(scope="module")
def served(locked: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeState]:
    """`config` writes the config, `audit-config` passes it, `serve` starts it detached."""
    work = tmp_path_factory.mktemp("served")
    config, state_file = work / "config.properties", work / "serve.json"
    assert main(["config", "--model-store", str(locked.store), "--free-ports",
                 "--out", str(config)]) == 0
    command = ["torchserve", "--start", "--ncs", "--ts-config", str(config),
               "--model-store", str(locked.store)]
    assert main(["audit-config", str(config), "--cmdline", shlex.join(command)]) == 0
    code = main(["serve", "--model-store", str(locked.store), "--lock", str(locked.lock),
                 "--config", str(config), "--state", str(state_file),
                 "--workdir", str(work / "run")])
    state = ServeState.load(state_file)
    try:
        assert code == 0
        assert state is not None
        yield state
    finally:
        if state is not None and _group_alive(state.pgid):
            stop_server(state)


def _access_log(state: ServeState) -> list[str]:
    """TorchServe's access log: one line per request the frontend received."""
    log = Path(state.workdir) / "logs" / "access_log.log"
    return log.read_text().splitlines() if log.exists() else []


def test_serve_prints_endpoints_and_token_file(served: ServeState) -> None:
    assert Path(served.key_file).is_file()
    assert Path(served.key_file).parent == Path(served.workdir)
    assert served.models == ["tiny"]
    assert served.inference_url.startswith("http://127.0.0.1:")


def test_calls_without_a_token_are_refused(served: ServeState) -> None:
    for url, data in ((served.inference_url + "/ping", None),
                      (served.inference_url + "/predictions/tiny", image_bytes("red")),
                      (served.management_url + "/models", None)):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30)
        info.value.close()  # the HTTPError holds the response's socket
        assert info.value.code == 400  # TorchServe's InvalidKeyException
    with Client(served.inference_url, token="not-the-token") as client, \
            pytest.raises(Unauthorized):
        client.health()


def test_client_with_key_file_token_predicts(served: ServeState) -> None:
    with Client(served.inference_url, management_url=served.management_url,
                key_file=served.key_file) as client:
        assert client.health() == {"status": "Healthy"}
        for colour in ("red", "green", "blue"):
            result = client.predict("tiny", image_bytes(colour), content_type="image/jpeg")
            assert result["predictions"][0]["label"] == colour
        [described] = client.describe("tiny")
        assert described["modelName"] == "tiny"


def test_hostile_requests_become_typed_exceptions(served: ServeState) -> None:
    png = image_bytes("red", fmt="PNG")
    with Client(served.inference_url, key_file=served.key_file) as client:
        with pytest.raises(errors.InvalidImage) as truncated:
            client.predict("tiny", png[: len(png) // 2], content_type="image/png")
        assert truncated.value.code == "invalid_image"
        assert truncated.value.http_status == 422  # type: ignore[attr-defined]
        with pytest.raises(errors.UnsupportedMediaType) as gif:
            client.predict("tiny", image_bytes("red", fmt="GIF"), content_type="image/gif")
        assert gif.value.code == "unsupported_media_type"


def test_too_large_request_is_refused_before_sending(served: ServeState) -> None:
    before = _access_log(served)
    big = image_bytes("red", size=(16, 16)) + b"\0" * HANDLER["max_request_bytes"]
    with Client(served.inference_url, key_file=served.key_file,
                max_request_bytes=HANDLER["max_request_bytes"]) as client:
        with pytest.raises(errors.PayloadTooLarge, match="not sent"):
            client.predict("tiny", big, content_type="image/jpeg")
        client.health()  # a request that does reach the server, as a marker in the log
    deadline = time.monotonic() + 30
    while not any("/ping" in line for line in _access_log(served)[len(before):]):
        assert time.monotonic() < deadline, "the /ping request never reached the access log"
        time.sleep(0.2)
    assert not [line for line in _access_log(served)[len(before):] if "/predictions" in line]


def test_stop_ends_the_detached_server(served: ServeState, tmp_path: Path) -> None:
    state_file = Path(served.workdir).parent / "serve.json"
    assert _group_alive(served.pgid)
    assert main(["stop", "--state", str(state_file)]) == 0
    assert not _group_alive(served.pgid)
    assert not state_file.exists()
    assert main(["stop", "--state", str(state_file)]) == 0  # idempotent


# --- refusals ------------------------------------------------------------------------------


def test_serve_refuses_a_swapped_archive(locked: Store, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    store = _copy_store(locked, tmp_path)
    other = _mar(tmp_path / "other", tmp_path / "other-store", top_k=2)
    shutil.copy(other, store / "tiny.mar")  # same name, different bytes
    state_file = tmp_path / "serve.json"
    assert main(["serve", "--model-store", str(store), "--lock", str(locked.lock),
                 "--state", str(state_file)]) == 1
    assert "SH507" in capsys.readouterr().err
    assert not state_file.exists()


def test_serve_refuses_an_unlisted_archive(locked: Store, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    store = _copy_store(locked, tmp_path)
    _mar(tmp_path, store, name="extra")
    assert main(["serve", "--model-store", str(store), "--lock", str(locked.lock),
                 "--state", str(tmp_path / "serve.json")]) == 1
    err = capsys.readouterr().err
    assert "SH508" in err
    assert "extra.mar" in err


def test_serve_refuses_a_config_with_high_findings(locked: Store, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.properties"
    assert main(["config", "--model-store", str(locked.store), "--out", str(config)]) == 0
    config.write_text(config.read_text() + "enable_model_api=true\n")
    state_file = tmp_path / "serve.json"
    assert main(["serve", "--model-store", str(locked.store), "--lock", str(locked.lock),
                 "--config", str(config), "--state", str(state_file)]) == 1
    assert "enable_model_api" in capsys.readouterr().err
    assert not state_file.exists()


# --- foreground ----------------------------------------------------------------------------


def test_foreground_serve_stops_on_sigterm(locked: Store, tmp_path: Path) -> None:
    state_file = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "secure_handler.cli", "serve", "--foreground", "--free-ports",
           "--model-store", str(locked.store), "--lock", str(locked.lock),
           "--state", str(state_file), "--workdir", str(tmp_path / "run")]
    log = tmp_path / "serve.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    state: ServeState | None = None
    try:
        deadline = time.monotonic() + 240
        while b"READY" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        state = ServeState.load(state_file)
        assert state is not None
        assert state.foreground
        with Client(state.inference_url, key_file=state.key_file) as client:
            assert client.health() == {"status": "Healthy"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not _group_alive(state.pgid)
        assert not state_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if state is not None and _group_alive(state.pgid):
            stop_server(state)
