"""Create-and-flag tests for `audit-config`, second review: what the readers of the config do.

Each test builds a dangerous configuration or environment, shows with the reader that acts
(TorchServe's Python launcher, its Java `ConfigManager` from the installed `model-server.jar`,
torch's CPU launcher, the JVM's process launcher, CPython) that the danger is real, and asserts
the audit rates it high. Families: the store the launcher hands to Java, encodings the launcher
may decode the file in, the CPU launcher's arguments, and the environment (loader paths that
are relative or writable by others, TS_MODEL_SERVER_HOME, variables the audit does not know).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from functools import partial
from pathlib import Path

import pytest
import ts
from attacks.audit_support import (
    JAR,
    JAVA,
    findings,
    hardened,
    launcher_java_args,
    make_world,
    needs_java,
)
from ts import model_server

from secure_handler.deploy.audit.context import ENV_OVERRIDES

# TorchServe's ConfigManager, initialised from the exact arguments the launcher passes, once per
# `;`-separated argument list; it prints the store, the server home and the inference socket
# each one ends up with.
EFFECTIVE = r"""
import java.util.*;
import org.apache.commons.cli.*;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.ConnectorType;

public class Effective {
    public static void main(String[] argv) throws Exception {
        for (String group : String.join("\u0000", argv).split(";")) {
            String[] args = Arrays.stream(group.split("\u0000")).filter(s -> !s.isEmpty())
                .toArray(String[]::new);
            CommandLine cmd = new DefaultParser().parse(ConfigManager.Arguments.getOptions(), args);
            ConfigManager.init(new ConfigManager.Arguments(cmd));
            ConfigManager c = ConfigManager.getInstance();
            System.out.println("= " + c.getModelStore() + " " + c.getModelServerHome() + " "
                + c.getListener(ConnectorType.INFERENCE_CONNECTOR).getSocketAddress());
        }
    }
}
"""



@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("readers"))


# --- the store: the launcher's `-s` wins over Java's reading, TS_MODEL_STORE over both -------


def _split_store_config(world: dict[str, Path]) -> Path:
    # Java: model_store=s1 and cors_allowed_methods="GETmodel_store=.../s2" (a continuation);
    # the launcher: model_store=s2, which it passes to Java as `-s`.
    config = world["root"] / "split.properties"
    config.write_text(hardened(world["s1"]) + f"cors_allowed_methods=GET\\\nmodel_store="
                      f"{world['s2']}\n")
    return config


def _env_store_config(world: dict[str, Path]) -> Path:
    config = world["root"] / "envstore.properties"
    config.write_text(hardened(world["s1"], {"enable_envvars_config": "true"}))
    return config


# `$$NAME$$` is replaced through Matcher.appendReplacement: `\:` is `:` to Java.
ESCAPED_ADDRESS = "http\\://0.0.0.0:8080"


def _env_ref_config(world: dict[str, Path]) -> Path:
    config = world["root"] / "envref.properties"
    config.write_text(hardened(world["s1"], {"inference_address": "$$INFERENCE_ADDR$$"}))
    return config


@pytest.fixture(scope="module")
def effective(world: dict[str, Path]) -> list[str]:
    """ConfigManager's store and home for both configs, in one JVM run whose environment sets
    TS_MODEL_SERVER_HOME and TS_MODEL_STORE, and whose PATH starts with an empty entry."""
    if JAVA is None:
        pytest.skip("Java is not installed")
    source = world["root"] / "Effective.java"
    source.write_text(EFFECTIVE)
    split = launcher_java_args(_split_store_config(world))
    by_env = launcher_java_args(_env_store_config(world), "--model-store", str(world["s1"]))
    by_ref = launcher_java_args(_env_ref_config(world), "--model-store", str(world["s1"]))
    # ConfigManager runs `nvidia-smi` to count GPUs: with an empty PATH entry, the one here.
    fake = world["root"] / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\ntouch {world['root']}/ran-from-cwd\necho index\n")
    fake.chmod(0o755)
    env = {"PATH": ":/usr/bin:/bin", "TS_MODEL_SERVER_HOME": str(world["shared"]),
           "TS_MODEL_STORE": str(world["s3"]), "HOME": str(world["root"]),
           "INFERENCE_ADDR": ESCAPED_ADDRESS}
    run = subprocess.run([str(JAVA), "-cp", str(JAR), str(source), *split, ";", *by_env, ";",
                          *by_ref],
                         env=env, cwd=world["root"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [line[2:] for line in run.stdout.splitlines() if line.startswith("= ")]


@needs_java
def test_store_from_the_launchers_reading_is_high(world: dict[str, Path],
                                                  effective: list[str]) -> None:
    assert effective[0].split()[0] == str(world["s2"])  # not Java's own s1
    config = world["root"] / "split.properties"
    # Without --model-store: the launcher's reading is the store, and it disagrees with Java's.
    found = findings(config, cmdline=f"torchserve --start --ncs --ts-config {config}")
    assert ("model_store", "high") in found
    # The store the caller audits (Java's reading, as `audit-config` took it) is not the one.
    found = findings(config, cmdline=f"torchserve --start --ncs --ts-config {config}",
                      store=world["s1"])
    assert ("model_store", "high") in found


@needs_java
def test_store_from_the_environment_wins_over_the_command_line(world: dict[str, Path],
                                                               effective: list[str]) -> None:
    assert effective[1].split()[0] == str(world["s3"])  # TS_MODEL_STORE beat `-s s1`
    config = world["root"] / "envstore.properties"
    found = findings(config, cmdline=f"torchserve --start --ncs --ts-config {config} "
                      f"--model-store {world['s1']}", env={"TS_MODEL_STORE": str(world["s3"])},
                      store=world["s1"])
    assert ("model_store", "high") in found


@needs_java
def test_model_server_home_from_the_environment_is_high(world: dict[str, Path],
                                                        effective: list[str],
                                                        tmp_path: Path) -> None:
    # Workers run `<home>/ts/model_service_worker.py`: the folder anyone can write.
    assert {line.split()[1] for line in effective} == {str(world["shared"])}
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"]))
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    env = {"TS_MODEL_SERVER_HOME": str(world["shared"])}
    assert ("TS_MODEL_SERVER_HOME", "high") in findings(config, cmdline=command, env=env)
    installed = str(Path(ts.__file__).resolve().parent.parent)
    assert findings(config, cmdline=command, env={"TS_MODEL_SERVER_HOME": installed}) == []


@needs_java
def test_empty_path_entry_runs_programs_from_the_working_directory(
        world: dict[str, Path], effective: list[str], tmp_path: Path) -> None:
    assert (world["root"] / "ran-from-cwd").exists()  # TorchServe's own GPU probe ran it
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"]))
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    for name, value in [("PATH", ":/usr/bin"), ("PATH", "/usr/bin:bin"),
                        ("LD_LIBRARY_PATH", "/usr/lib::"), ("LD_PRELOAD", "./lib.so"),
                        ("PYTHONHOME", "venv"), ("PYTHONPYCACHEPREFIX", "cache"),
                        ("JAVA_HOME", "jdk"), ("PYTHONUSERBASE", "")]:
        if value:
            assert (name, "high") in findings(config, cmdline=command, env={name: value}), name


def test_loader_paths_writable_by_others_are_high(world: dict[str, Path],
                                                  tmp_path: Path) -> None:
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"]))
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    jdk = tmp_path / "jdk"  # root-owned-looking JDK whose bin/ anyone can write
    (jdk / "bin").mkdir(parents=True)
    jdk.chmod(0o755)
    (jdk / "bin").chmod(0o777)
    shared = str(world["shared"])
    for name, value in [("PATH", f"/usr/bin:{shared}"), ("PYTHONUSERBASE", shared),
                        ("PYTHONPYCACHEPREFIX", f"{shared}/cache"), ("JAVA_HOME", str(jdk))]:
        assert (name, "high") in findings(config, cmdline=command, env={name: value}), name
    assert findings(config, cmdline=command, env={"PATH": "/usr/bin:/bin"}) == []


@needs_java
def test_env_reference_read_as_a_replacement_template_is_high(world: dict[str, Path],
                                                              effective: list[str]) -> None:
    assert effective[2].split()[2] == "/0.0.0.0:8080"  # plain HTTP on every interface
    config = world["root"] / "envref.properties"
    found = findings(config, cmdline=f"torchserve --start --ncs --ts-config {config} "
                      f"--model-store {world['s1']}", env={"INFERENCE_ADDR": ESCAPED_ADDRESS},
                      store=world["s1"])
    assert ("inference_address", "high") in found
    for broken in ("http://127.0.0.1:8080\\", "http://127.0.0.1:$", "http://${x}"):
        found = findings(config, cmdline=f"torchserve --start --ncs --ts-config {config} "
                          f"--model-store {world['s1']}", env={"INFERENCE_ADDR": broken},
                          store=world["s1"])
        assert ("INFERENCE_ADDR", "medium") in found, broken


# --- variables the audit does not know, in the namespaces the readers use ---------------------


def test_pythonwarnings_imports_a_module_and_is_high(world: dict[str, Path],
                                                     tmp_path: Path) -> None:
    (tmp_path / "planted.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n"
                                         "class W(Warning): pass\n")
    env = {"PYTHONWARNINGS": "ignore::planted.W", "PYTHONPATH": str(tmp_path)}
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=60)
    assert (tmp_path / "imported").exists()  # the interpreter imported it at start-up
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"]))
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    for name in ("PYTHONWARNINGS", "PYTHONSTARTUP", "LD_DEBUG_OUTPUT", "JAVA_TOOL_OPTION",
                 "TS_UNKNOWN", "JDK_JAVA_OPTIONS_X", "IBM_JAVA_OPTIONS2"):
        assert (name, "high") in findings(config, cmdline=command, env={name: "x"}), name
    known = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "JAVA_VERSION": "17",
             "TS_DECODE_INPUT_REQUEST": "true", "LANG": "C.UTF-8", "PYTHON_VERSION": "3.11.7",
             "PYTHON_PIP_VERSION": "24.0", "PYENV_ROOT": "/opt/pyenv"}
    assert findings(config, cmdline=command, env=known) == []


# --- encodings: the launcher decodes the file in the locale's encoding ------------------------

# U+3000 (a space to str.strip()) in each multi-byte encoding a locale may use.
IDEOGRAPHIC_SPACE = {"gb18030": b"\xa1\xa1", "shift_jis": b"\x81\x40", "big5": b"\xa1\x40",
                     "euc_jp": b"\xa1\xa1", "euc_kr": b"\xa1\xa1"}


@pytest.mark.parametrize("encoding", sorted(IDEOGRAPHIC_SPACE))
def test_vmargs_behind_a_locale_space_is_high(encoding: str, world: dict[str, Path],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.properties"
    text = hardened(world["s1"])
    config.write_bytes(text.encode("ascii") + IDEOGRAPHIC_SPACE[encoding]
                       + b"vmargs=-javaagent:/tmp/evil.jar\n")
    # Not UTF-8, and no JVM-visible `vmargs`: only a launcher in that locale sees the agent.
    monkeypatch.setattr(model_server, "open", partial(open, encoding=encoding), raising=False)
    assert model_server.load_properties(str(config))["vmargs"] == "-javaagent:/tmp/evil.jar"
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    found = findings(config, cmdline=command)
    line = f"config line {len(text.splitlines()) + 1}"
    assert [f for f in found if f[0].startswith("config line")] == [(line, "high")]


def test_non_ascii_comments_are_not_flagged(world: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "c.properties"
    config.write_bytes(b"# mod\xc3\xa8le \xa1\xa1\n  # \x81\x40\n" + hardened(world["s1"])
                       .encode("ascii"))
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    assert findings(config, cmdline=command) == []


# --- the CPU launcher: run_cpu's arguments, by an allowlist -----------------------------------


def test_cpu_launcher_args_run_a_program(world: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    program = tmp_path / "evil.sh"
    program.write_text(f"#!/bin/sh\ntouch {marker}\n")
    program.chmod(0o755)
    # The frontend's probe (`WorkerLifeCycle.isLauncherAvailable`), with an abbreviation of
    # --no_python that argparse accepts.
    args = f"--no-py {program}"
    subprocess.run([sys.executable, "-m", "torch.backends.xeon.run_cpu", *args.split(" "),
                    "--no_python", "hostname"], capture_output=True, timeout=120, check=False)
    assert marker.exists()
    config = tmp_path / "c.properties"
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    for hostile in (args, f"--no_python {program}", "-m evil", "--log_path /tmp/x",
                    "--enable_jemalloc", "--ninstances 1  --rank 0", "--ncores_per_instance\t2"):
        config.write_text(hardened(world["s1"], {"cpu_launcher_enable": "true",
                                                  "cpu_launcher_args": hostile}))
        assert ("cpu_launcher_args", "high") in findings(config, cmdline=command), hostile
    config.write_text(hardened(world["s1"], {
        "cpu_launcher_enable": "true",
        "cpu_launcher_args": "--use_logical_core --ncores-per-instance 4 --node_id=0 --disable-iomp"}))
    assert findings(config, cmdline=command) == [("cpu_launcher_enable", "medium")]


# --- the `models` JSON: whatever it holds, the audit answers ----------------------------------


@pytest.mark.parametrize("models", ['{"m": {"1.0": {"batchSize": 1e400}}}',
                                    "[" * 50_000 + "]" * 50_000])
def test_models_json_the_audit_cannot_read_is_flagged_not_fatal(
        models: str, world: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"], {"models": models}))
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    assert findings(config, cmdline=command) == [("models", "medium")]


# --- no false alarm: the generated config, in a plain server environment ------------------------


def test_generated_config_is_clean_in_a_server_environment(world: dict[str, Path],
                                                           tmp_path: Path) -> None:
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"]))
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": str(tmp_path), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(tmp_path), "LOG_LOCATION": str(tmp_path)}
    if JAVA is not None:
        env["JAVA_HOME"] = str(Path(JAVA).resolve().parent.parent)
    for command in (f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}",
                    f"torchserve --start --ncs --ts-config {config}"):
        assert findings(config, cmdline=command, env=env) == [], command


def test_extraction_folder_others_can_write_is_high(world: dict[str, Path],
                                                    tmp_path: Path) -> None:
    # ZipUtils.unzip: FileUtils.getTempDirectory()/models/<uuid>, the worker's directory.
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"]))
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    temp = tmp_path / "temp"
    (temp / "models").mkdir(parents=True)
    temp.chmod(0o755)
    (temp / "models").chmod(0o777)
    assert ("TEMP", "high") in findings(config, cmdline=command, env={"TEMP": str(temp)})
    (temp / "models").chmod(0o755)
    temp.chmod(0o777)  # not sticky: anyone can rename `models` away and put theirs
    assert ("TEMP", "high") in findings(config, cmdline=command, env={"TEMP": str(temp)})
    temp.chmod(0o755)
    assert findings(config, cmdline=command, env={"TEMP": str(temp)}) == []


@pytest.mark.skipif(shutil.which("javap") is None, reason="javap is not installed")
def test_environment_overrides_are_exactly_the_frontends_ts_fields(tmp_path: Path) -> None:
    # setSystemVars applies every `TS_*` field of ConfigManager as an environment override; the
    # audit's table (which also makes those variables known) must be that list, no more.
    with zipfile.ZipFile(JAR) as jar:
        jar.extract("org/pytorch/serve/util/ConfigManager.class", tmp_path)
    out = subprocess.run([str(shutil.which("javap")), "-p", "-constants", str(
        tmp_path / "org/pytorch/serve/util/ConfigManager.class")], capture_output=True,
        text=True, timeout=120, check=True).stdout
    fields = dict(re.findall(r'String (TS_[A-Z_]+) = "([a-z_]+)";', out))
    assert len(fields) > 50
    assert fields == ENV_OVERRIDES



@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system Python")
def test_user_site_under_a_home_others_can_write_is_high(world: dict[str, Path],
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A system (non-venv) CPython runs the .pth files of $HOME/.local/.../site-packages.
    version = subprocess.run(["/usr/bin/python3", "-c", "import sys; print('%d.%d' % "
                              "sys.version_info[:2])"], capture_output=True, text=True,
                             check=True, timeout=60).stdout.strip()
    home = world["shared"]
    site_packages = home / ".local" / "lib" / f"python{version}" / "site-packages"
    site_packages.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "ran"
    (site_packages / "planted.pth").write_text(f"import os; open({str(marker)!r}, 'w')\n")
    subprocess.run(["/usr/bin/python3", "-c", "pass"], env={"HOME": str(home)}, check=True,
                   timeout=60)
    assert marker.exists()
    # Judged for the interpreter the launcher passes as --python; this venv has no user site.
    monkeypatch.setattr("site.ENABLE_USER_SITE", True)
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"]))
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    assert ("HOME", "high") in findings(config, cmdline=command, env={"HOME": str(home)})
    for safe in ({"HOME": str(home), "PYTHONNOUSERSITE": "1"}, {"HOME": str(tmp_path)}):
        assert findings(config, cmdline=command, env=safe) == [], safe
