"""An archive's model-config.yaml must not steer TorchServe (CWE-15) or its readers (CWE-20).

TorchServe's frontend reads the top-level keys to decide how to launch the model's workers;
`verify` allows only the ordinary worker and batching keys, within bounds, and a `handler:`
section one of the limits models accepts. Each hostile config is written here into an archive
built by the real torch-model-archiver and must be refused with the exact rule and member,
and nothing else; `archive` refuses the same config before building.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ts
import yaml
from support import LABELS, archive_mar, build_tiny_classifier, write_image_handler

from secure_handler.cli import main
from secure_handler.deploy.launcher import java_problem
from secure_handler.supply.modelconfig import check_model_config, read_model_config

CONFIG = "plain-model-config.yaml"  # the name archive_mar gives the config member
GOOD = "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 8\nmaxBatchDelay: 5\nhandler:\n  top_k: 1\n"

LAUNCH = {
    "parallel-type": "parallelType: pp\n",
    "parallel-level": "parallelLevel: 2\n",
    "torchrun-rendezvous-elsewhere": (
        "torchrun:\n  nproc-per-node: 2\n  rdzv-backend: c10d\n"
        "  rdzv-endpoint: attacker.example:29500\n"),
    "device-type": "deviceType: gpu\n",
    "device-ids": "deviceIds: [0, 1]\n",
    "per-model-venv": "useVenv: true\n",
    "continuous-batching": "continuousBatching: true\n",
    "async-communication": "asyncCommunication: true\n",
    "sequence-batching": "sequenceBatching: true\n",
    "unknown-section": "deepspeed:\n  config: ds-config.json\n",
    "url-under-an-unknown-key": "hub: https://attacker.example/model\n",
}  # fmt: skip

INVALID = {
    "alias-expansion": "a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n",
    "explicit-tag": "batchSize: !!python/object/apply:os.system ['id']\n",
    "binary-tag": "handler: !!binary aGVsbG8=\n",
    "duplicate-key": "batchSize: 1\nbatchSize: 64\n",
    "oversized": "batchSize: 1\n" + "# padding\n" * 7000,
    "deep-nesting": "handler:\n  top_k: " + "[" * 20 + "1" + "]" * 20 + "\n",
    "not-a-mapping": "- batchSize\n- 8\n",
    "unicode-line-separator": "batchSize: 1 # note\u2028parallelType: pp\n",
    "latin-1-next-line-in-a-comment": "# \u00c5parallelType: pp\nbatchSize: 1\n",
    "byte-order-mark": "\ufeffbatchSize: 1\n",
    "batch-size-out-of-bounds": "batchSize: 100000\n",
    "job-queue-out-of-bounds": "jobQueueSize: 1000000000\n",
    "string-where-java-wants-an-int": "batchSize: '8'\n",
    "handler-unknown-limit": "handler:\n  topk: 2\n",
    "handler-pin-as-string": "handler:\n  require_pin: 'yes please'\n",
}  # fmt: skip


@pytest.fixture(scope="module")
def plain_mar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-model-archiver's own MAR (no embedded digests) with a good config."""
    src = tmp_path_factory.mktemp("config-src")
    labels = src / "index_to_name.json"
    labels.write_text(json.dumps(LABELS))
    mar = archive_mar(src / "store", "plain", build_tiny_classifier(src),
                      write_image_handler(src), [labels], yaml.safe_load(GOOD))
    with zipfile.ZipFile(mar) as zf:
        assert CONFIG in zf.namelist()
    return mar


def with_config(mar: Path, out: Path, config: str) -> Path:
    """A copy of `mar` whose model-config member holds `config` (zipfile: canonical form)."""
    with zipfile.ZipFile(mar) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info, config.encode() if info.filename == CONFIG else zin.read(info))
    return out


def verify(mar: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[tuple[str, str]]]:
    capsys.readouterr()
    code = main(["verify", "--json", "--allow-missing-digests", str(mar)])
    report: Any = json.loads(capsys.readouterr().out)
    return code, [(f["rule"], f["location"]) for f in report["findings"]]


def test_the_ordinary_config_passes(plain_mar: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify(plain_mar, capsys) == (0, [])


@pytest.mark.parametrize("case", sorted(LAUNCH))
def test_a_launch_setting_is_refused(
    case: str, plain_mar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mar = with_config(plain_mar, tmp_path / "plain.mar", LAUNCH[case])
    assert verify(mar, capsys) == (1, [("SH414", f"plain.mar!{CONFIG}")])


@pytest.mark.parametrize("case", sorted(INVALID))
def test_a_config_the_bounded_reader_refuses(
    case: str, plain_mar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mar = with_config(plain_mar, tmp_path / "plain.mar", INVALID[case])
    assert verify(mar, capsys) == (1, [("SH411", f"plain.mar!{CONFIG}")])


def test_the_refusal_names_the_key_and_the_fix() -> None:
    text = LAUNCH["torchrun-rendezvous-elsewhere"].encode()
    [(rule, message)] = check_model_config(read_model_config(text))
    assert rule == "SH414"
    assert "`torchrun`" in message
    assert "rendezvous" in message
    assert "remove it from model-config.yaml" in message


def test_archive_refuses_the_config_before_building(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    model = build_tiny_classifier(src)
    config = src / "model-config.yaml"
    config.write_text(LAUNCH["torchrun-rendezvous-elsewhere"])
    argv = ["archive", "--model-name", "tiny", "--version", "1.0", "--serialized-file",
            str(model), "--handler", "image", "--config-file", str(config),
            "--export-path", str(tmp_path / "out"), "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 1
    found = [(f["rule"], f["location"]) for f in json.loads(capsys.readouterr().out)["findings"]]
    assert [rule for rule, _ in found] == ["SH414"]
    assert not (tmp_path / "out" / "tiny.mar").exists()


@pytest.mark.parametrize("example", ["image_classifier", "text_classifier", "object_detector"])
def test_the_shipped_example_configs_pass(example: str) -> None:
    path = Path(__file__).parents[2] / "examples" / example / "model-config.yaml"
    assert list(check_model_config(read_model_config(path.read_bytes()))) == []


# --- the parser that acts: TorchServe's own reader of model-config.yaml (SnakeYAML) --------

JAVA_READER = """
import java.io.File;
import java.util.Map;
import java.util.TreeSet;
import org.pytorch.serve.archive.utils.ArchiveUtils;

public final class ReadModelConfig {
    public static void main(String[] args) {
        for (String path : args) {
            try {
                Map<String, Object> config = ArchiveUtils.readYamlFile(new File(path));
                TreeSet<String> keys = new TreeSet<>();
                for (Object key : config.keySet()) {
                    keys.add(String.valueOf(key));
                }
                System.out.println("KEYS " + String.join(",", keys));
            } catch (Exception e) {
                System.out.println("ERR " + e.getClass().getName());
            }
        }
    }
}
"""

#: Spellings two YAML readers might split differently; each must be refused or read alike.
DIFFERENTIAL = {
    "merge-key": "batchSize: 1\n<<: {parallelType: pp}\n",
    "crlf": "batchSize: 1\r\nparallelType: pp\r\n",
    "bare-cr": "batchSize: 1\rparallelType: pp\n",
    "tab-after-colon": "batchSize:\t1\n",
    "quoted-key": "'parallelType': pp\n",
    "escaped-key": '"parallel\\x54ype": pp\n',
    "explicit-key": "? parallelType\n: pp\n",
    "flow-mapping": "{batchSize: 1, parallelType: pp}\n",
    "document-markers": "---\nbatchSize: 1\n...\n",
    "directive": "%YAML 1.1\n---\nbatchSize: 1\n",
    "comment-after-value": "batchSize: 1 # parallelType: pp\n",
    "key-with-trailing-space": "parallelType : pp\n",
    "unicode-escape-in-key": '"parallel\\u0054ype": pp\n',
}  # fmt: skip


@pytest.fixture(scope="module")
def java_reader(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[Path]], list[str]]:
    """ArchiveUtils.readYamlFile from the installed model-server.jar, the frontend's reader."""
    if java_problem() is not None or shutil.which("javac") is None:
        pytest.skip(f"needs a JDK 17 (javac): {java_problem()}")
    work = tmp_path_factory.mktemp("java-yaml")
    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    (work / "ReadModelConfig.java").write_text(JAVA_READER)
    subprocess.run([str(shutil.which("javac")), "-cp", str(jar), "-d", str(work),
                    str(work / "ReadModelConfig.java")], check=True, capture_output=True)

    def read(paths: list[Path]) -> list[str]:
        done = subprocess.run(
            [str(shutil.which("java")), "-cp", f"{jar}:{work}", "ReadModelConfig",
             *map(str, paths)], check=True, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        return done.stdout.splitlines()

    return read


def test_what_verify_accepts_torchserve_reads_with_the_same_keys(
    java_reader: Callable[[list[Path]], list[str]], tmp_path: Path
) -> None:
    """Every config verify's reader accepts has the same top-level keys in SnakeYAML; the
    launch settings refused above are real (the frontend reads each of them)."""
    cases = {**{f"diff-{k}": v for k, v in DIFFERENTIAL.items()},
             **{f"launch-{k}": v for k, v in LAUNCH.items()}, "good": GOOD}
    paths = []
    for name, text in cases.items():
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_bytes(text.encode())
    java = dict(zip(cases, java_reader(paths), strict=True))
    accepted = 0
    for name, text in cases.items():
        try:
            data = read_model_config(text.encode())
        except ValueError:
            continue  # refused (SH411) before any reader could disagree
        accepted += 1
        keys = ",".join(sorted(str(k) for k in (data or {})))
        assert java[name] == f"KEYS {keys}", name
        if name.startswith("launch-"):
            assert [r for r, _ in check_model_config(data)] == ["SH414"], name
    assert accepted > len(LAUNCH)
