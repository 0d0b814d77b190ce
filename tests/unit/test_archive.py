"""`secure-handler archive / verify / lock / sign` on real archives from the real archiver."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import pickle
import shutil
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import LABELS, archive_mar, build_tiny_classifier, write_image_handler

import secure_handler
from secure_handler.cli import main
from secure_handler.serving.loading import (
    DIGESTS_MEMBER,
    TRUST_STORE_ENV,
    sha256_file,
    verify_embedded_digests,
)
from secure_handler.serving.pin import verify_trust_store
from secure_handler.supply.findings import RULES
from secure_handler.supply.templates import HANDLER_KINDS, write_handler
from secure_handler.supply.verify import MANIFEST_MEMBER, verify_mar, verify_store


@dataclass
class Inputs:
    model: Path
    labels: Path
    config: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    src = tmp_path_factory.mktemp("inputs")
    labels = src / "index_to_name.json"
    labels.write_text(json.dumps(LABELS))
    config = src / "model-config.yaml"
    config.write_text("minWorkers: 1\nmaxWorkers: 1\nhandler:\n  top_k: 2\n")
    return Inputs(build_tiny_classifier(src), labels, config)


def archive_args(inputs: Inputs, export: Path, name: str = "tiny", *extra: str) -> list[str]:
    return [
        "archive", "--model-name", name, "--version", "1.0",
        "--serialized-file", str(inputs.model), "--handler", "image",
        "--extra-files", str(inputs.labels), "--config-file", str(inputs.config),
        "--export-path", str(export), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def clean_mar(tmp_path_factory: pytest.TempPathFactory, inputs: Inputs) -> Path:
    export = tmp_path_factory.mktemp("export")
    assert main(archive_args(inputs, export)) == 0
    return export / "tiny.mar"


def member_hashes(mar: Path) -> dict[str, str]:
    with zipfile.ZipFile(mar) as zf:
        return {n: hashlib.sha256(zf.read(n)).hexdigest() for n in zf.namelist()}


def test_archive_writes_mar_sidecar_and_member_digests(clean_mar: Path) -> None:
    sidecar = clean_mar.with_name("tiny.mar.sha256").read_text()
    assert sidecar == f"{sha256_file(clean_mar)}  tiny.mar\n"  # sha256sum -c format
    hashes = member_hashes(clean_mar)
    with zipfile.ZipFile(clean_mar) as zf:
        digests = json.loads(zf.read(DIGESTS_MEMBER))
        manifest = json.loads(zf.read(MANIFEST_MEMBER))
    assert digests["algorithm"] == "sha256"
    assert digests["files"] == {n: h for n, h in hashes.items() if n != DIGESTS_MEMBER}
    assert set(digests["files"]) == {
        "model.pt", "secure_handler_image.py", "index_to_name.json", "model-config.yaml",
        MANIFEST_MEMBER,
    }  # fmt: skip
    assert "modelFile" not in manifest["model"]
    assert manifest["model"]["handler"] == "secure_handler_image.py"


def test_verify_accepts_the_clean_archive(
    clean_mar: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["verify", "--json", str(clean_mar)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert report["findings"] == []
    assert (report["name"], report["version"]) == ("tiny", "1.0")
    assert report["serialized_sha256"] == member_hashes(clean_mar)["model.pt"]


def test_verify_checks_the_whole_file_pin(
    clean_mar: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = sha256_file(clean_mar)
    assert main(["verify", "--sha256", good, str(clean_mar)]) == 0
    assert main(["verify", "--sha256", str(clean_mar) + ".sha256", str(clean_mar)]) == 0
    capsys.readouterr()
    assert main(["verify", "--sha256", "0" * 64, str(clean_mar)]) == 1
    out = capsys.readouterr().out
    assert "SH506 sha256-mismatch [CWE-494]" in out
    assert main(["verify", "--sha256", "not-hex-and-not-a-file", str(clean_mar)]) == 2


def test_a_plain_archiver_mar_lacks_digests(
    tmp_path: Path, inputs: Inputs, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = write_image_handler(tmp_path / "src")
    mar = archive_mar(tmp_path / "store", "plain", inputs.model, handler, [inputs.labels])
    assert main(["verify", str(mar)]) == 1
    assert f"plain.mar: SH501 digests-missing [CWE-345] no {DIGESTS_MEMBER}" in (
        capsys.readouterr().out
    )
    pin = sha256_file(mar)
    assert main(["verify", "--allow-missing-digests", "--sha256", pin, str(mar)]) == 0


def test_lock_pins_the_store_and_the_worker_accepts_it(
    tmp_path: Path,
    clean_mar: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(clean_mar, store / "tiny.mar")
    lock = tmp_path / "models.lock"
    capsys.readouterr()
    assert main(["lock", str(store)]) == 0
    stdout_lock = json.loads(capsys.readouterr().out)  # `lock STORE > models.lock`
    assert main(["lock", str(store), "-o", str(lock)]) == 0
    data = json.loads(lock.read_text())
    assert data == stdout_lock
    [entry] = data["models"]
    assert data["format"] == "secure-handler-lock/1"
    assert entry["sha256"] == sha256_file(clean_mar)
    assert (entry["name"], entry["version"], entry["mar"]) == ("tiny", "1.0", "tiny.mar")

    # The worker's side of the contract: the same file is its trust store.
    model_dir = tmp_path / "extracted"
    with zipfile.ZipFile(clean_mar) as zf:
        zf.extractall(model_dir)
    monkeypatch.setenv(TRUST_STORE_ENV, str(lock))
    digests = verify_embedded_digests(model_dir)
    assert digests == entry["digests_sha256"]
    assert verify_trust_store("tiny", model_dir / "model.pt", digests, True, model_dir)

    assert main(["verify", "--lock", str(lock), str(store)]) == 0
    assert main(["verify", "--lock", str(lock), str(store / "tiny.mar")]) == 0
    assert verify_store(store, lock) == []


def test_store_verification_refuses_unlisted_missing_and_stray_entries(
    tmp_path: Path, clean_mar: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(clean_mar, store / "tiny.mar")
    lock = tmp_path / "models.lock"
    assert main(["lock", str(store), "-o", str(lock)]) == 0

    shutil.copy(clean_mar, store / "other.mar")
    (store / "extracted_model").mkdir()  # TorchServe would serve a directory unverified
    (store / "tiny.mar").unlink()
    found = {(f.rule, Path(f.location).name) for f in verify_store(store, lock)}
    assert found == {
        ("SH508", "other.mar"),
        ("SH508", "extracted_model"),
        ("SH509", "tiny.mar"),
    }
    assert main(["verify", "--lock", str(lock), str(store)]) == 1


def test_lock_refuses_a_store_with_an_unverified_archive(
    tmp_path: Path, inputs: Inputs, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = write_image_handler(tmp_path / "src")
    store = tmp_path / "store"
    archive_mar(store, "plain", inputs.model, handler)
    capsys.readouterr()
    assert main(["lock", str(store)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing that could be redirected into a lock file
    assert "SH501" in captured.err


def test_archive_keeps_directory_layout_and_reports_allowed_pickles(
    tmp_path: Path, inputs: Inputs, capsys: pytest.CaptureFixture[str]
) -> None:
    assets = tmp_path / "assets"
    (assets / "vocab").mkdir(parents=True)
    (assets / "vocab" / "tokens.txt").write_text("a\nb\n")
    (assets / "notes.yaml").write_text("k: v\n")
    table = tmp_path / "table.bin"  # a pickle whatever its name; built, never loaded
    table.write_bytes(pickle.dumps(OrderedDict(a=1), protocol=4))
    export = tmp_path / "export"
    args = archive_args(inputs, export, "withassets", "--json")
    args[args.index("--extra-files") + 1] += f",{assets},{table}"
    capsys.readouterr()
    assert main(args) == 1  # pickles are refused by default
    refusal = json.loads(capsys.readouterr().out)
    assert [(f["rule"], f["location"]) for f in refusal["findings"]] == [
        ("SH409", "withassets.mar!table.bin")
    ]
    assert "collections.OrderedDict" in refusal["findings"][0]["message"]
    assert not (export / "withassets.mar").exists()

    assert main([*args, "--allow-pickle"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert any("table.bin" in n and "collections.OrderedDict" in n for n in result["notes"])
    with zipfile.ZipFile(export / "withassets.mar") as zf:
        names = set(zf.namelist())
    assert {"vocab/tokens.txt", "notes.yaml", "table.bin"} <= names


def test_archive_usage_errors_exit_2(
    tmp_path: Path, clean_mar: Path, inputs: Inputs, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(archive_args(inputs, clean_mar.parent)) == 2  # exists, no -f
    assert "exists" in capsys.readouterr().err
    assert main(archive_args(inputs, tmp_path, "bad name!")) == 2
    missing = archive_args(inputs, tmp_path, "m")
    missing[missing.index("--serialized-file") + 1] = str(tmp_path / "nope.pt")
    assert main(missing) == 2
    assert main(["verify", str(tmp_path / "nope.mar")]) == 2


@pytest.mark.parametrize("kind", sorted(HANDLER_KINDS))
def test_generated_handler_defines_exactly_one_class_of_ours(kind: str, tmp_path: Path) -> None:
    path = write_handler(kind, tmp_path)
    tree = ast.parse(path.read_text())
    assert [n.name for n in tree.body if isinstance(n, ast.ClassDef)] == ["Handler"]
    spec = importlib.util.spec_from_file_location(f"gen_{kind}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    defined = [c for c in vars(module).values() if isinstance(c, type)
               and c.__module__ == module.__name__]  # fmt: skip
    assert defined == [module.Handler]
    assert issubclass(module.Handler, getattr(secure_handler, HANDLER_KINDS[kind]))


def _ec_keypair(directory: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / "key.pem", directory / "key.pub"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))  # fmt: skip
    return private, public


def test_key_signing_round_trip_offline(
    tmp_path: Path, clean_mar: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("model_signing", reason="the `sign` extra is not installed")
    mar = tmp_path / "tiny.mar"
    shutil.copy(clean_mar, mar)
    private, public = _ec_keypair(tmp_path)
    assert main(["sign", str(mar), "--private-key", str(private)]) == 0
    sig = tmp_path / "tiny.mar.sig"
    assert sig.is_file()
    assert main(["verify", str(mar), "--signature", str(sig), "--public-key", str(public)]) == 0

    (tmp_path / "other").mkdir()
    _, other_public = _ec_keypair(tmp_path / "other")
    capsys.readouterr()
    args = ["verify", str(mar), "--signature", str(sig), "--public-key", str(other_public)]
    assert main(args) == 1
    assert "SH510 signature-invalid [CWE-347]" in capsys.readouterr().out

    with zipfile.ZipFile(mar, "a") as zf:  # any change to the file breaks the signature
        zf.writestr("zz.txt", "added")
    args = ["verify", "--allow-missing-digests", str(mar), "--signature", str(sig),
            "--public-key", str(public)]  # fmt: skip
    assert main(args) == 1
    assert "SH510" in capsys.readouterr().out


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_corruption_is_refused_or_leaves_content_intact(
    clean_mar: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """Fuzz `verify`: a damaged MAR never crashes it, and never passes with changed content."""
    raw = bytearray(clean_mar.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del raw[pos:]
    else:
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
    mar = tmp_path_factory.mktemp("fuzz") / "tiny.mar"
    mar.write_bytes(bytes(raw))
    report = verify_mar(mar)  # must return, whatever the bytes
    if report.ok:
        assert member_hashes(mar) == member_hashes(clean_mar)
    else:
        assert all(f.rule in RULES for f in report.findings)
