"""Helpers for the `audit-config` attack tests: the hardened config, the audit, TorchServe's
own launcher (its JVM command line, with no process started) and a set of folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from unittest import mock

import pytest
import ts
from ts import model_server

from secure_handler.deploy.audit import audit_file
from secure_handler.deploy.tsconfig import ModelSpec, hardened_properties, render_properties

JAR = Path(ts.__file__).parent / "frontend" / "model-server.jar"
JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(JAVA is None, reason="Java is not installed")


def hardened(store: Path, extra: Mapping[str, str] | None = None) -> str:
    props = hardened_properties(store, models=(ModelSpec("m", "m.mar"),))
    return render_properties({**props, **(extra or {})})


def findings(config: Path, *, cmdline: str, env: Mapping[str, str] | None = None,
             store: Path | None = None) -> list[tuple[str, str]]:
    found = audit_file(config, cmdline=cmdline, environ=dict(env or {}), model_store=store)
    return [(f.key, f.severity) for f in found]


def launcher_java_args(config: Path, *extra: str) -> list[str]:
    """The arguments TorchServe's own launcher (`ts.model_server.start`) gives to Java."""
    cmd = launcher_command(config, *extra)
    return cmd[cmd.index("org.pytorch.serve.ModelServer") + 1:]


def launcher_command(config: Path, *extra: str) -> list[str]:
    """The JVM command line TorchServe's own launcher (`ts.model_server.start`) runs."""
    seen: dict[str, list[str]] = {}

    def popen(cmd: list[str], *args: object, **kwargs: object) -> mock.Mock:
        seen["cmd"] = cmd
        return mock.Mock(pid=0)

    argv = ["torchserve", "--start", "--ncs", "--ts-config", str(config), *extra]
    # Its pid file goes to a folder of this test, not the machine's temp folder.
    with mock.patch.object(subprocess, "Popen", popen), mock.patch.object(sys, "argv", argv), \
            mock.patch.object(model_server.tempfile, "gettempdir", return_value=str(config.parent)):
        model_server.start()
    return seen["cmd"]


def make_world(root: Path) -> dict[str, Path]:
    """Stores, a folder anyone can write, and a fake TorchServe home in it, under `root`."""
    paths = {name: root / name for name in ("s1", "s2", "s3", "shared")}
    for path in paths.values():
        path.mkdir(mode=0o755)
        path.chmod(0o755)
    paths["shared"].chmod(0o777)
    (paths["shared"] / "ts").mkdir()
    (paths["shared"] / "ts" / "version.txt").write_text("0.12.0\n")
    paths["root"] = root
    return paths


def write_config(tmp_path: Path, world: dict[str, Path], extra: Mapping[str, str]) -> Path:
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"], extra))
    return config
