"""Register through the gateway (issue 14, findings 1 and 10), against real TorchServe.

* A name registers only its own archive: `url=` naming another model's archive, or a name
  whose archive is a symlink, is refused (403) and audited with both names.
* The documented path works end to end: `config --enable-model-api --gateway-config`, then
  `serve --config --gateway-config` (the audit passes only behind that gateway), then the
  gateway, then register and predict through it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_support import REPO, KeySet, MakeConfig, Upstream, gateway_process, write_config
from support import classifier_mar, image_bytes

from secure_handler.deploy.javaprops import load as load_properties
from secure_handler.deploy.launcher import free_port
from secure_handler.supply.verify import embed_digests

pytestmark = pytest.mark.integration

IMAGE = {"content_types": ["image/jpeg", "image/png"]}


def _audit(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def ops(make_config: MakeConfig, tmp_path: Path, torchserve: Upstream) -> Iterator[tuple[str, str, Path]]:
    """A gateway process; key `ops` may manage `spare` and `alias` only."""
    ks = KeySet()
    key = ks.add("ops", ["management"], ["spare", "alias"])
    config = make_config(ks, models={"tiny": IMAGE, "spare": IMAGE, "alias": IMAGE})
    port = free_port()
    with gateway_process(write_config(config, tmp_path / "gateway.yaml"), port,
                         tmp_path / "gw.log"):
        yield f"http://127.0.0.1:{port}", key, config.audit_log


def test_a_granted_name_cannot_register_another_models_archive(
    ops: tuple[str, str, Path], torchserve: Upstream,
) -> None:
    url, key, audit = ops
    before = torchserve.requests_matching('"POST /models')
    refused = httpx.post(url + "/models", headers={"Authorization": f"Bearer {key}"},
                         params={"model_name": "spare", "url": "tiny.mar"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden_model_source"
    [line] = [a for a in _audit(audit) if a["request_id"] == refused.headers["x-request-id"]]
    assert (line["model"], line["archive"], line["outcome"]) == ("spare", "tiny.mar", "denied")
    # Nothing reached TorchServe: a describe afterwards shows up, the register never did.
    described = httpx.get(url + "/models/spare", headers={"Authorization": f"Bearer {key}"})
    assert described.status_code in (200, 404)
    deadline = time.monotonic() + 10
    while torchserve.requests_matching('"GET /models/spare') == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert torchserve.requests_matching('"POST /models') == before


def test_a_name_whose_archive_is_a_symlink_to_another_is_refused(
    ops: tuple[str, str, Path], torchserve: Upstream,
) -> None:
    url, key, audit = ops
    link = torchserve.store / "alias.mar"
    link.symlink_to(torchserve.store / "tiny.mar")
    try:
        refused = httpx.post(url + "/models", headers={"Authorization": f"Bearer {key}"},
                             params={"model_name": "alias"})
    finally:
        link.unlink()
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden_model_source"
    [line] = [a for a in _audit(audit) if a["request_id"] == refused.headers["x-request-id"]]
    assert (line["model"], line["outcome"]) == ("alias", "denied")


# --- the documented register path, end to end -------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "secure_handler.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _gateway_yaml(path: Path, props: dict[str, str], keys: KeySet, store: Path,
                  workdir: Path) -> Path:
    data = {
        "listen_host": "127.0.0.1",
        "upstream": {"inference_url": props["inference_address"],
                     "management_url": props["management_address"],
                     "key_file": str(workdir / "key_file.json")},
        "model_store": str(store),
        "models": {"tiny": IMAGE, "spare": IMAGE},
        "keys": [k.model_dump(mode="json") for k in keys.entries],
        "audit_log": str(path.parent / "audit.jsonl"),
    }
    path.write_text(json.dumps(data))
    return path


def test_the_documented_register_path_works_end_to_end(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for name in ("tiny", "spare"):  # embedded digests: what `lock` and the worker pin check
        embed_digests(classifier_mar(tmp_path, store, name))
    lock = tmp_path / "models.lock"
    assert _cli("lock", str(store), "-o", str(lock), cwd=tmp_path).returncode == 0
    keys = KeySet()
    ops = keys.add("ops", ["management"], ["spare"])
    infer = keys.add("infer", ["inference"], ["spare"])
    gateway = tmp_path / "gateway.yaml"
    workdir = tmp_path / "run"
    # 1. The config, with the model API on for the gateway's register path.
    config = tmp_path / "config.properties"
    made = _cli("config", "--model-store", str(store), "--model", "tiny=tiny.mar",
                "--free-ports", "--enable-model-api", "--gateway-config", str(gateway),
                "--out", str(config), cwd=tmp_path)
    assert config.exists(), made.stderr
    props = load_properties(config)
    assert props["enable_model_api"] == "true"
    # 2. The gateway in front of exactly this server; now the audit passes.
    _gateway_yaml(gateway, props, keys, store, workdir)
    state = tmp_path / "serve.json"
    served = _cli("serve", "--model-store", str(store), "--lock", str(lock), "--config",
                  str(config), "--gateway-config", str(gateway), "--workdir", str(workdir),
                  "--state", str(state), "--json", cwd=tmp_path)
    try:
        assert served.returncode == 0, served.stderr[-3000:]
        port = free_port()
        with gateway_process(gateway, port, tmp_path / "gw.log"):
            url = f"http://127.0.0.1:{port}"
            registered = httpx.post(url + "/models", timeout=300,
                                    headers={"Authorization": f"Bearer {ops}"},
                                    params={"model_name": "spare", "initial_workers": "1",
                                            "synchronous": "true"})
            predicted = httpx.post(url + "/predictions/spare", content=image_bytes("green"),
                                   timeout=60, headers={"Authorization": f"Bearer {infer}",
                                                        "Content-Type": "image/jpeg"})
    finally:
        _cli("stop", "--state", str(state), cwd=tmp_path)
    assert registered.status_code == 200, registered.text
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["predictions"][0]["label"] == "green"
    lines = [(a["action"], a["outcome"]) for a in _audit(tmp_path / "audit.jsonl")]
    assert lines == [("management.register", "attempted"), ("management.register", "allowed")]
