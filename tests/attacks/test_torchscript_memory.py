"""TorchScript models that reach memory outside their tensors (CWE-125/787): built, then refused.

Two families, each shown real with a harmless marker (a tensor whose extent exceeds the bytes
its storage owns; its elements would be the worker's heap, and in-place operators would write
there), then refused by the inspection that `verify` and the worker's loader run before
`torch.jit.load`:

* an operator that views memory at sizes and strides it is given without checking them
  (`aten::_reshape_alias`, `_reshape_alias_copy`): outside the allowlist by a schema rule;
* a `data.pkl`/`constants.pkl` storage reference claiming more elements than its record holds:
  TorchScript's unpickler sizes the storage by the claim and fills it from the record.
"""

from __future__ import annotations

import json
import pickletools
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from support import archive_mar, write_image_handler

from secure_handler.cli import main
from secure_handler.errors import UnsafeModelError
from secure_handler.serving.loading import load_torchscript, save_torchscript
from secure_handler.serving.opsallow import is_allowed_op, refusal_reason
from secure_handler.serving.torchscript import inspect_torchscript


class Weighted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(4, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) + self.w[:3]


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    """`torch.jit.load` without the inspection: only to show the threat is real."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated",
                                category=DeprecationWarning)
        module: torch.jit.ScriptModule = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    return module


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def _rewrite(path: Path, member_suffix: str, edit: bytes, by: bytes) -> Path:
    """Replace bytes in one member; re-zipped as `zipfile` writes it (one view, passes SH312)."""
    original = _members(path)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in original.items():
            if name.endswith(member_suffix):
                assert data.count(edit) == 1
                data = data.replace(edit, by)
            zf.writestr(name, data)
    return path


def _overclaiming(path: Path) -> Path:
    """`Weighted` whose storage reference claims 16384 floats over a 16-byte record."""
    save_torchscript(Weighted(), path)
    # ('storage', FloatStorage, '0', 'cpu', 4) and the tensor size (4,): both become 16384.
    data = _members(path)[f"{path.stem}/data.pkl"]
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    assert ("BININT1", 4) in ops
    _rewrite(path, "/data.pkl", b"cpuq\x06K\x04t", b"cpuq\x06M\x00\x40t")
    return _rewrite(path, "/data.pkl", b"(K\x04t(K\x01t", b"(M\x00\x40t(K\x01t")


def _reshape_alias_model(path: Path, op: str) -> Path:
    """`Weighted` whose forward returns `ops.aten.<op>(x, [4096], [1])`: a hand-edited member."""
    save_torchscript(Weighted(), path)
    original = _members(path)
    member = next(n for n, d in original.items() if n.endswith(".py") and b"class Weighted" in d)
    text = original[member].decode()
    head, _, _ = text.partition("    x: Tensor) -> Tensor:\n")
    body = f"    x: Tensor) -> Tensor:\n    return ops.aten.{op}(x, [4096], [1])\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in original.items():
            zf.writestr(name, (head + body).encode() if name == member else data)
    return path


@pytest.mark.parametrize("op", ["_reshape_alias", "_reshape_alias_copy"])
def test_unchecked_strided_view_is_real_and_refused(tmp_path: Path, op: str) -> None:
    model = _reshape_alias_model(tmp_path / "model.pt", op)
    # Real: torch loads it and reads 4096 floats from a 4-float input (the alias spans the
    # input's 16-byte buffer; the copy has read what lies beyond it).
    out = _jit_load(model)(torch.ones(4))
    assert out.numel() == 4096
    if op == "_reshape_alias":
        assert out.untyped_storage().nbytes() == 16
    # Refused by the inspection, naming the operator and why.
    issues = inspect_torchscript(model)
    assert [i.what for i in issues] == [f"aten::{op}"]
    assert "sizes and strides it is given without checking" in issues[0].reason
    assert not is_allowed_op(f"aten::{op}")
    assert not is_allowed_op(f"torch.ops.aten.{op}")


def test_strided_operators_torch_checks_stay_allowed() -> None:
    for name in ("aten::as_strided", "aten::as_strided_", "aten::empty_strided",
                 "aten::new_empty_strided", "aten::as_strided_scatter"):
        assert is_allowed_op(name), refusal_reason(name)


def test_storage_claiming_more_than_its_record_is_real_and_refused(tmp_path: Path) -> None:
    model = _overclaiming(tmp_path / "model.pt")
    # Real: the loaded parameter owns 64 KiB of "storage" backed by a 16-byte record.
    loaded = _jit_load(model)
    assert loaded.w.untyped_storage().nbytes() == 16384 * 4
    assert _members(model)[f"{model.stem}/data/0"] == torch.arange(4.0).numpy().tobytes()
    issues = inspect_torchscript(model)
    assert [(i.member, i.what) for i in issues] == [("data.pkl", "pickle tensor")]
    assert "claims 16384 elements (65536 bytes) but its record data/0 holds 16 bytes" in (
        issues[0].reason)
    with pytest.raises(UnsafeModelError, match="pickle tensor"):
        load_torchscript(model, torch.device("cpu"))


def test_verify_refuses_the_overclaiming_storage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "src").mkdir()
    model = _overclaiming(tmp_path / "src" / "model.pt")
    mar = archive_mar(tmp_path / "store", "hostile", model, write_image_handler(tmp_path / "src"))
    capsys.readouterr()
    code = main(["verify", "--allow-missing-digests", "--json", str(mar)])
    refused = [f for f in json.loads(capsys.readouterr().out)["findings"] if not f["allowed"]]
    assert code == 1
    assert any(f["rule"] == "SH421" and "record data/0 holds 16 bytes" in f["message"]
               for f in refused)


def test_tensor_view_past_its_storage_is_refused(tmp_path: Path) -> None:
    """Sizes past the storage with an honest reference: torch refuses it at load too, and
    the inspection refuses it first, without loading."""
    model = tmp_path / "model.pt"
    save_torchscript(Weighted(), model)
    _rewrite(model, "/data.pkl", b"(K\x04t(K\x01t", b"(K\xfft(K\x01t")
    issues = inspect_torchscript(model)
    assert [i.what for i in issues] == ["pickle tensor"]
    assert "reaches element 254 of a storage of 4" in issues[0].reason


def test_unknown_storage_type_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    save_torchscript(Weighted(), model)
    _rewrite(model, "/data.pkl", b"ctorch\nFloatStorage\n", b"ctorch\nFloatxStorage\n")
    assert [i.what for i in inspect_torchscript(model)] == ["pickle global torch FloatxStorage"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.bool,
                                   torch.complex64, torch.uint8, torch.float8_e4m3fn])
def test_honest_storages_of_every_kind_pass(tmp_path: Path, dtype: torch.dtype) -> None:
    class Buffered(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("b", torch.zeros(2, 3, dtype=dtype).t())  # a strided view
            self.register_buffer("empty", torch.zeros(0, dtype=dtype))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = tmp_path / "model.pt"
    save_torchscript(Buffered(), model)
    assert inspect_torchscript(model) == []


class Mixed(torch.nn.Module):
    """Conv+BatchNorm, interpolate, LayerNorm, attention, GRU, einsum, EmbeddingBag, a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.ln = torch.nn.LayerNorm(8)
        self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.bag = torch.nn.EmbeddingBag(50, 8, mode="mean")
        self.gru = torch.nn.GRU(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.relu(self.bn(self.conv(x)))
        y = torch.nn.functional.interpolate(y, scale_factor=2.0, mode="bilinear")
        s = self.ln(y.flatten(2).transpose(1, 2))
        a, _ = self.mha(s, s, s)
        g, _ = self.gru(a)
        e = torch.einsum("bnd,bmd->bnm", g, g)
        b = self.bag(torch.arange(0, 10), torch.tensor([0, 5]))
        out: list[torch.Tensor] = []
        for i in range(e.size(0)):
            out.append(e[i].mean().unsqueeze(0) if bool(e[i].sum() > 0) else e[i].max().unsqueeze(0))
        return torch.cat(out) + b.sum()


@pytest.mark.parametrize("how", ["script", "trace", "freeze", "freeze_trace"])
def test_realistic_frozen_and_traced_models_pass_and_load(tmp_path: Path, how: str) -> None:
    """Frozen models keep their weights in constants.pkl: replayed, not refused. (A model
    from `torch.jit.optimize_for_inference` also passes inspection, but torch 2.13 cannot
    load its own save of one: "required keyword attribute 'value' is undefined".)"""
    model, x = Mixed().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if how.endswith("trace"):
            scripted = torch.jit.trace(model, x, check_trace=False)
        else:
            scripted = torch.jit.script(model)
        if how.startswith("freeze"):
            scripted = torch.jit.freeze(scripted)
        scripted.save(str(tmp_path / "model.pt"))
    assert inspect_torchscript(tmp_path / "model.pt") == []
    loaded = load_torchscript(tmp_path / "model.pt", torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-4)


class Tagged(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = {"w": [torch.ones(2)]}  # TorchScript infers Dict[str, List[Tensor]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table["w"][0]


def test_type_tags_name_only_torchscript_types_and_program_classes(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    save_torchscript(Tagged(), model)
    assert b"Dict[str, List[Tensor]]" in _members(model)["model/data.pkl"]
    assert inspect_torchscript(model) == []
    evil = b"Dict[str, __torch__.torch.classes.c10d.Work]"
    data = _members(model)["model/data.pkl"]
    tag = b"X\x17\x00\x00\x00Dict[str, List[Tensor]]"
    assert tag in data
    _rewrite(model, "/data.pkl", tag, b"X" + len(evil).to_bytes(4, "little") + evil)
    issues = inspect_torchscript(model)
    assert [i.what for i in issues] == ["pickle tensor"]
    assert "names '__torch__.torch.classes.c10d.Work'" in issues[0].reason
