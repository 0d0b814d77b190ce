"""The hardened config, its rendering, MAR limits, and the `config` command."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from secure_handler.cli import main
from secure_handler.deploy.audit import audit_file
from secure_handler.deploy.javaprops import load
from secure_handler.deploy.tsconfig import (
    HandlerLimits,
    ModelSpec,
    Ports,
    Tls,
    hardened_properties,
    is_loopback,
    read_mar_info,
    render_properties,
    store_allowed_urls,
)


def write_mar(path: Path, name: str, handler: dict[str, Any] | None = None,
              version: str = "1.0") -> Path:
    """A MAR's manifest and model-config.yaml (what config/audit read; nothing is run)."""
    model: dict[str, Any] = {"modelName": name, "modelVersion": version,
                             "serializedFile": "model.pt", "handler": "handler.py"}
    if handler is not None:
        model["configFile"] = "model-config.yaml"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": model}))
        if handler is not None:
            archive.writestr("model-config.yaml", yaml.safe_dump({"handler": handler}))
    return path


def test_hardened_properties_are_loopback_and_locked_down(tmp_path: Path) -> None:
    props = hardened_properties(tmp_path, Ports(), (ModelSpec("m", "m.mar", batch_size=4),),
                                max_request_bytes=1000)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    assert props["install_py_dep_per_model"] == props["enable_envvars_config"] == "false"
    assert props["max_request_size"] == str(66870)  # ceil(1000 * 4 / 3) + 64 KiB: room for base64
    assert json.loads(props["models"])["m"]["1.0"]["batchSize"] == 4
    assert props["load_models"] == "m=m.mar"


def test_allowed_urls_admit_only_archives_in_the_store(tmp_path: Path) -> None:
    store = (tmp_path / "st-ore (1)").resolve()
    pattern = re.compile(store_allowed_urls(store), re.IGNORECASE)  # as TorchServe compiles it
    assert pattern.fullmatch(f"file://{store}/m.mar")
    for url in (f"file://{store}/../m.mar", f"file://{store}/sub/m.mar", "file:///etc/passwd",
                "http://example.com/m.mar", f"file://{store}x/m.mar"):
        assert not pattern.fullmatch(url), url


def test_public_bind_needs_tls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        hardened_properties(tmp_path, bind="0.0.0.0")
    props = hardened_properties(tmp_path, bind="0.0.0.0", tls=Tls(Path("c.pem"), Path("k.pem")))
    assert props["inference_address"].startswith("https://0.0.0.0:")
    assert props["management_address"].startswith("https://127.0.0.1:")
    assert Path(props["certificate_file"]).is_absolute()


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.1", True), ("localhost", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False),
    ("example.com", False), ("", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_render_round_trips_through_the_java_reader(tmp_path: Path) -> None:
    store = tmp_path / "mødels"  # non-ASCII: Java reads the file as ISO-8859-1
    store.mkdir()
    props = hardened_properties(store)
    path = tmp_path / "config.properties"
    path.write_text(render_properties(props, "header\nlines"), "ascii")
    assert load(path) == props


def test_read_mar_info(tmp_path: Path) -> None:
    mar = write_mar(tmp_path / "a.mar", "alpha", {"max_request_bytes": 2048, "top_k": 3})
    info = read_mar_info(mar)
    assert (info.name, info.limits) == ("alpha", HandlerLimits(2048, HandlerLimits().max_batch_size))
    beta = read_mar_info(write_mar(tmp_path / "b.mar", "beta"))
    assert (beta.name, beta.limits) == ("beta", HandlerLimits())
    # The bounds are BaseLimits' own (one source per limit), not a second copy.
    with pytest.raises(ValueError, match="greater than 0"):
        read_mar_info(write_mar(tmp_path / "c.mar", "c", {"max_batch_size": -1}))
    with pytest.raises(ValueError, match="less than or equal"):
        read_mar_info(write_mar(tmp_path / "e.mar", "e", {"max_batch_size": 10**6}))
    with pytest.raises(ValueError, match="positive integer"):
        read_mar_info(write_mar(tmp_path / "f.mar", "f", {"max_batch_size": True}))
    (tmp_path / "d.mar").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        read_mar_info(tmp_path / "d.mar")


def test_read_mar_info_refuses_a_config_that_inflates_past_its_cap(tmp_path: Path) -> None:
    import zipfile

    mar = tmp_path / "big.mar"
    manifest = {"model": {"modelName": "big", "modelVersion": "2.0"}, "configFile": "c.yaml"}
    with zipfile.ZipFile(mar, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("MAR-INF/MANIFEST.json", __import__("json").dumps(manifest))
        archive.writestr("c.yaml", "#" * (2 * 1024 * 1024))
    with pytest.raises(ValueError, match="refusing"):
        read_mar_info(mar)


def test_combined_limits_take_the_largest() -> None:
    combined = HandlerLimits.combined([HandlerLimits(10, 2), HandlerLimits(5, 9)])
    assert combined == HandlerLimits(10, 9)
    assert HandlerLimits.combined([]) == HandlerLimits()


# --- the `config` command -----------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    path.chmod(0o755)
    write_mar(path / "small.mar", "small", {"max_request_bytes": 100_000, "max_batch_size": 4})
    write_mar(path / "big.mar", "big", {"max_request_bytes": 2_000_000}, version="2.1")
    return path


def test_config_command_writes_a_config_that_audits_clean(
        store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "config.properties"
    assert main(["config", "--model-store", str(store), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["findings"] == []
    command = report["command"]
    assert "--ncs" in command
    assert command[command.index("--ts-config") + 1] == str(out.resolve())
    props = load(out)
    assert props["max_request_size"] == str(2732203)  # ceil(2_000_000 * 4 / 3) + 64 KiB: room for base64
    models = json.loads(props["models"])
    assert models["small"]["1.0"]["batchSize"] == 4  # capped at the handler's max_batch_size
    assert models["big"]["2.1"]["batchSize"] == 8
    assert not [f for f in audit_file(out, cmdline=command, environ={}, model_store=store)
                if f.severity != "low"]


def test_config_command_selected_models_and_human_output(
        store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.properties"
    assert main(["config", "--model-store", str(store), "--model", "tiny=small.mar",
                 "--out", str(out), "--free-ports", "--handler-limits",
                 "max_request_bytes=5000"]) == 0
    text = capsys.readouterr().out
    assert "torchserve --start --ncs --ts-config" in text
    props = load(out)
    assert props["load_models"] == "tiny=small.mar"
    assert props["max_request_size"] == str(72203)  # ceil(5000 * 4 / 3) + 64 KiB: room for base64
    assert props["inference_address"] != "http://127.0.0.1:8080"


def test_config_command_refuses_bad_input(store: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "c.properties")
    assert main(["config", "--model-store", str(store), "--model", "x=../x.mar",
                 "--out", out]) == 2
    assert main(["config", "--model-store", str(store), "--model", "x=missing.mar",
                 "--out", out]) == 2
    assert main(["config", "--model-store", str(store), "--bind", "0.0.0.0", "--out", out]) == 2
    assert main(["config", "--model-store", str(tmp_path / "nope"), "--out", out]) == 2
    err = capsys.readouterr().err
    for message in ("expected NAME=FILE.mar", "no such archive", "--tls-cert", "not a directory"):
        assert message in err
    assert not Path(out).exists()


def test_config_command_public_bind_with_tls(store: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("cert")
    key.write_text("key")
    key.chmod(0o600)
    out = tmp_path / "c.properties"
    args = ["config", "--model-store", str(store), "--bind", "0.0.0.0",
            "--tls-cert", str(cert), "--tls-key", str(key), "--out", str(out)]
    assert main(args) == 0
    assert load(out)["inference_address"].startswith("https://0.0.0.0:")
    found = {(f.key, f.severity) for f in audit_file(out, environ={}, model_store=store)}
    assert ("inference_address", "low") in found  # public, so: put a gateway in front
    assert not [f for f in found if f[1] != "low"]
    key.chmod(0o644)
    found = {(f.key, f.severity) for f in audit_file(out, environ={}, model_store=store)}
    assert ("private_key_file", "medium") in found


def test_config_command_reads_handler_limits_from_a_file(store: Path, tmp_path: Path) -> None:
    limits = tmp_path / "model-config.yaml"
    limits.write_text(yaml.safe_dump({"handler": {"max_request_bytes": 7000,
                                                  "max_batch_size": 2}}))
    out = tmp_path / "c.properties"
    assert main(["config", "--model-store", str(store), "--handler-limits", str(limits),
                 "--out", str(out)]) == 0
    props = load(out)
    assert props["max_request_size"] == str(74870)  # ceil(7000 * 4 / 3) + 64 KiB: room for base64
    assert {v["batchSize"] for m in json.loads(props["models"]).values()
            for v in m.values()} == {2}
