"""The TorchScript inspector and its operator allowlist, on real TorchScript files.

Each hostile variant is a real `torch.jit.save` output with one member rewritten here, so the
rest of the file is exactly what torch writes; the attack suite (tests/attacks/
test_torchscript_code.py) runs whole hostile models through `verify` and the worker's loader.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from secure_handler.errors import UnsafeModelError
from secure_handler.serving import opsallow
from secure_handler.serving.loading import save_torchscript
from secure_handler.serving.torchscript import (
    InspectLimits,
    ScriptIssue,
    check_torchscript_program,
    inspect_torchscript,
)

#: Names that mean file, process, network, library or output I/O: none may be allowed.
IO_FAMILY = re.compile(
    r"from_file|(^|_)save|(^|_)load|pickle|library|(^|_)print$|Print|rpc|to_here|owner"
    r"|socket|url|system|popen|spawn|exec|dlopen|profile|^seed$|manual_seed"
)


class Plus(torch.nn.Module):
    """The smallest real scripted model: its printed code is `torch.add(x, 1)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


@pytest.fixture(scope="module")
def plus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plus") / "plus.pt"
    save_torchscript(Plus(), path)
    return path


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def rewrite(src: Path, dst: Path, replace: Mapping[str, bytes] = {},
            add: Mapping[str, bytes] = {}) -> Path:
    """Copy a TorchScript zip, replacing members (by their path under the top folder)."""
    original = members(src)
    root = next(iter(original)).split("/", 1)[0]
    with zipfile.ZipFile(dst, "w") as out:
        for name, data in original.items():
            out.writestr(name, replace.get(name.split("/", 1)[1], data))
        for name, data in add.items():
            out.writestr(f"{root}/{name}", data)
    return dst


def plus_member(path: Path) -> str:
    """The code member that defines `Plus` (its path follows this test module's name)."""
    return next(name.split("/", 1)[1] for name, data in members(path).items()
                if name.endswith(".py") and b"class Plus(" in data)


def with_forward(src: Path, dst: Path, body: str, extra: str = "") -> Path:
    """`Plus` with its forward body (and optionally more class lines) written by hand."""
    member = plus_member(src)
    qualifier = member[len("code/"):-len(".py")].replace("/", ".")
    code = (
        "class Plus(Module):\n"
        "  __parameters__ = []\n"
        "  __buffers__ = []\n"
        "  training : bool\n"
        "  _is_full_backward_hook : Optional[bool]\n"
        f"{extra}"
        f"  def forward(self: {qualifier}.Plus,\n"
        "    x: Tensor) -> Tensor:\n"
        f"{body}"
    )
    return rewrite(src, dst, {member: code.encode()})


def whats(issues: list[ScriptIssue]) -> list[str]:
    return [issue.what for issue in issues]


# --- the allowlist ------------------------------------------------------------------------


def test_data_file_is_what_the_schemas_of_this_torch_generate() -> None:
    """A torch upgrade that adds or changes operators fails here until the file is regenerated
    (python -m secure_handler.serving.opsallow --write) and the diff reviewed."""
    checked_in = [line for line in opsallow.DATA_FILE.read_text("ascii").splitlines()
                  if not line.startswith("#")]
    assert checked_in == opsallow.generate()


def test_allowlist_counts_and_namespaces() -> None:
    allowed = opsallow.ALLOWED_OPS
    overloads = {name for name in allowed if name.count(".")}
    bases = allowed - overloads
    assert len(overloads) > 3000
    assert len(bases) > 1500
    assert {name.split("::")[0] for name in allowed} == set(opsallow.ALLOWED_NAMESPACES)
    assert all(name.rsplit(".", 1)[0] in bases or name.rsplit(".", 1)[0] in
               opsallow.EXCLUDED_OPS for name in overloads)


def test_nothing_allowed_belongs_to_the_io_family() -> None:
    io_named = sorted(n for n in opsallow.ALLOWED_OPS if IO_FAMILY.search(n.split("::")[1]))
    assert io_named == []


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("aten::from_file", "file I/O"),
        ("aten::from_file.out", "file I/O"),
        ("aten::save", "file I/O"),
        ("prim::Print", "stdout"),
        ("aten::_print", "stdout"),
        ("aten::manual_seed", "process state"),
        ("prim::PythonOp", "Python"),
        ("prim::rpc_async", "network"),
        ("aten::to_here", "network"),
        ("aten::_unsafe_index", "memory safety"),
        ("prim::id", "address"),
        ("aten::set_", "Storage"),
        ("aten::sparse_coo_tensor.indices", "sparse tensor from indices"),
        ("aten::_sparse_coo_tensor_with_dims_and_tensors", "sparse tensor from indices"),
        ("aten::_nested_view_from_buffer", "offsets and strides"),
        ("aten::_index_put_impl_", "`unsafe` switch"),
        ("aten::segment_reduce", "`unsafe` switch"),
        ("aten::_test_string_default", "test-only"),
        ("myns::evil", "native libraries loaded at run time"),
        ("c10d::allreduce_", "network"),
        ("debugprims::load_tensor", "file I/O"),
        ("aten::no_such_operator", "not an operator known"),
        ("relu", "not a qualified operator name"),
    ],
)
def test_refusal_reasons_name_the_family(name: str, why: str) -> None:
    assert not opsallow.is_allowed_op(name)
    assert why in opsallow.refusal_reason(name)


@pytest.mark.parametrize("name", ["aten::relu", "aten::relu.default", "aten::add.Tensor",
                                  "torch.ops.aten.conv2d", "prim::dtype", "aten::warn",
                                  "quantized::linear_dynamic", "aten::set_.source_Tensor"])
def test_side_effect_free_operators_are_allowed(name: str) -> None:
    assert opsallow.is_allowed_op(name)
    assert opsallow.refusal_reason(name) == ""


def test_overload_free_name_needs_every_overload_allowed() -> None:
    """`torch.set_(x, y)` names no overload, and one overload of set_ takes a raw Storage."""
    assert opsallow.is_allowed_op("aten::set_.source_Tensor")
    assert not opsallow.is_allowed_op("aten::set_.source_Storage")
    assert not opsallow.is_allowed_op("aten::set_")


# --- the inspector on real files ----------------------------------------------------------


def test_a_real_scripted_model_passes(plus: Path) -> None:
    assert inspect_torchscript(plus) == []
    check_torchscript_program(plus)


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ("    return torch.from_file(\"/etc/hostname\", False, 4, dtype=0)\n", "aten::from_file"),
        ("    return ops.aten.from_file(\"/etc/hostname\", False, 4, dtype=0)\n",
         "aten::from_file"),
        ("    _0 = torch.save\n    _0(x, \"/tmp/x\")\n    return x\n", "aten::save"),
        ("    _0 = getattr(x, \"save\")\n    return x\n", ".save"),
        ("    x.save(\"/tmp/x\")\n    return x\n", ".save"),
        ("    return ops.myns.evil(x)\n", "myns::evil"),
        ("    print(\"[METRICS]forged\")\n    return x\n", "print()"),
        ("    ops.prim.Print(\"x\")\n    return x\n", "prim::Print"),
        ("    _0 = fork(x.add, x)\n    return x\n", "fork()"),
        ("    return ops.load_library(\"evil.so\")\n", "ops.load_library"),
        ("    return torch.ops.aten.add(x, 1)\n", "torch.ops.aten.add"),
        ("    f = lambda y: y\n    return x\n", "Lambda"),
        ("    return [y for y in x]\n", "ListComp"),
        ("    import os\n    return x\n", "Import"),
        ("    return os.system(\"id\")\n", "os"),
        ("    torch = x\n    return torch\n", "torch"),
        ("    _0 = x\n    return _0(x)\n", "_0()"),
        ("    return __torch__.no.such.thing(x)\n", "__torch__.no.such.thing"),
        ("    return x.frobnicate()\n", ".frobnicate()"),
        ("    return CONSTANTS.evil\n", "CONSTANTS.evil"),
    ],
)
def test_code_outside_the_allowlist_is_refused(
    tmp_path: Path, plus: Path, body: str, what: str
) -> None:
    hostile = with_forward(plus, tmp_path / "m.pt", body)
    issues = inspect_torchscript(hostile)
    assert what in whats(issues)
    hit = next(i for i in issues if i.what == what)
    assert (hit.member, hit.method) == (plus_member(plus), "Plus.forward")
    assert hit.line in range(8, 8 + body.count("\n"))  # a line of the body (it starts at 8)


def helper(x: torch.Tensor) -> torch.Tensor:
    return x * 2


class Forks(torch.nn.Module):
    """`torch.jit.fork`: the printer writes the forked call as a nested `def` (a closure)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        future = torch.jit.fork(helper, x)
        return torch.jit.wait(future) + 1


def test_fork_of_a_program_function_passes_and_its_closure_is_judged(tmp_path: Path) -> None:
    path = tmp_path / "fork.pt"
    save_torchscript(Forks(), path)
    assert inspect_torchscript(path) == []
    member = next(n for n, d in members(path).items() if b"def __forked_function" in d)
    code = members(path)[member].replace(
        b"    def __forked_function():\n",
        b"    def __forked_function():\n      torch.save(x, \"/tmp/p\")\n")
    hostile = rewrite(path, tmp_path / "m.pt", {member.split("/", 1)[1]: code})
    issues = inspect_torchscript(hostile)
    assert [(i.what, i.method) for i in issues] == [("aten::save", "Forks.forward.__forked_function")]


def test_custom_class_that_needs_a_native_library_is_refused(tmp_path: Path, plus: Path) -> None:
    extra = "  pg : __torch__.torch.classes.c10d.ProcessGroup\n"
    hostile = with_forward(plus, tmp_path / "m.pt", "    return x\n", extra)
    assert whats(inspect_torchscript(hostile)) == ["torch.classes.c10d.ProcessGroup"]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("    return torch.add(x, 1)  # a comment\n", "comment"),
        ("    return torch.add(x, 1)\t\n", "'\\t'"),
        ("    return torch.add(x, 1)\r\n", "'\\r'"),
        ("    return torch.add(x, 1)\x0c\n", "'\\x0c'"),
        ("    _0 = \"\"\"\n    torch.save(x, 'p')\"\"\"\n    return x\n", "triple-quoted"),
        ("    _0 = b\"abc\"\n    return x\n", "prefixed"),
        ("    return torch.add(x, \\\n1)\n", "continuation"),
    ],
)
def test_text_that_lexers_could_read_differently_is_refused(
    tmp_path: Path, plus: Path, body: str, problem: str
) -> None:
    hostile = with_forward(plus, tmp_path / "m.pt", body)
    issues = inspect_torchscript(hostile)
    assert (issues[0].member, issues[0].what) == (plus_member(plus), "source text")
    assert problem in issues[0].reason
    # Unread, the code defines nothing, so data.pkl now names an undefined class too.
    assert [i.member for i in issues[1:]] == ["data.pkl"]


def test_non_ascii_code_is_refused(tmp_path: Path, plus: Path) -> None:
    """A Cyrillic letter in `torch`: Python would normalise some look-alikes, TorchScript not."""
    hostile = with_forward(plus, tmp_path / "m.pt", "    return t\u043erch.add(x, 1)\n")
    assert "not ASCII" in inspect_torchscript(hostile)[0].reason


@pytest.mark.parametrize("name", ["bytecode.pkl", "code/__torch__/evil.so", "code/x.py",
                                  "data/../evil", "sitecustomize.py", "code/__torch__/a-b.py"])
def test_a_member_without_a_known_role_is_refused(tmp_path: Path, plus: Path, name: str) -> None:
    hostile = rewrite(plus, tmp_path / "m.pt", add={name: b"x = 1\n"})
    issues = inspect_torchscript(hostile)
    assert [(i.member, i.what) for i in issues] == [(name, "member")]


def pickle_with_global(module: str, name: str) -> bytes:
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (pickle_with_global("os", "system"), "pickle global os system"),
        (pickle_with_global("__torch__.nowhere", "Ghost"), "pickle global __torch__.nowhere Ghost"),
        (pickle_with_global("__torch__.torch.classes.myns", "Loader"),
         "pickle global __torch__.torch.classes.myns Loader"),
        (pickle.dumps(print, protocol=4), "pickle opcode STACK_GLOBAL"),
        (b"\x80\x02(S'id'\nios\nsystem\n.", "pickle opcode INST"),
    ],
)
def test_pickle_globals_and_opcodes_outside_the_allowlist_are_refused(
    tmp_path: Path, plus: Path, data: bytes, what: str
) -> None:
    hostile = rewrite(plus, tmp_path / "m.pt", {"data.pkl": data})
    issues = inspect_torchscript(hostile)
    assert what in whats(issues)
    assert all(i.member == "data.pkl" for i in issues)


@pytest.mark.parametrize(
    ("limits", "what"),
    [
        (InspectLimits(max_members=3), "members"),
        (InspectLimits(max_code_bytes=100), "code size"),
        (InspectLimits(max_pickle_bytes=10), "pickle size"),
        (InspectLimits(max_code_tokens=10), "code size"),
        (InspectLimits(max_pickle_opcodes=3), "pickle size"),
    ],
)
def test_cost_is_bounded(plus: Path, limits: InspectLimits, what: str) -> None:
    assert what in whats(inspect_torchscript(plus, limits))


def test_deeply_nested_code_is_refused_not_crashed_on(tmp_path: Path, plus: Path) -> None:
    """`x+x+...+x` parses into a tree as deep as it is long; the judge refuses it by name."""
    body = "    return " + "+".join(["x"] * 1500) + "\n"
    hostile = with_forward(plus, tmp_path / "m.pt", body)
    assert whats(inspect_torchscript(hostile)) == ["code nesting"]


def test_findings_are_capped(tmp_path: Path, plus: Path) -> None:
    body = "".join(f"    _{i} = torch.save\n" for i in range(50)) + "    return x\n"
    hostile = with_forward(plus, tmp_path / "m.pt", body)
    issues = inspect_torchscript(hostile, InspectLimits(max_issues=10))
    assert len(issues) == 11
    assert issues[-1].what == "findings"


def test_not_a_zip_is_one_finding(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(b"not a zip at all")
    assert whats(inspect_torchscript(path)) == ["zip"]


def test_check_raises_naming_operation_method_file_and_fix(tmp_path: Path, plus: Path) -> None:
    hostile = with_forward(plus, tmp_path / "m.pt", "    torch.save(x, \"/tmp/p\")\n    return x\n")
    with pytest.raises(UnsafeModelError) as err:
        check_torchscript_program(hostile)
    message = str(err.value)
    assert f"{plus_member(plus)}:8 in Plus.forward: aten::save" in message
    assert "Fix: export the model" in message


def test_both_copies_of_a_duplicated_member_are_read(tmp_path: Path, plus: Path) -> None:
    """Python's zipfile returns the last of two same-named members, torch's reader may take the
    first: each copy is inspected, whichever a reader picks."""
    evil = with_forward(plus, tmp_path / "e.pt", "    torch.save(x, \"/tmp/p\")\n    return x\n")
    name = f"plus/{plus_member(plus)}"
    hostile = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns on duplicate names
        with zipfile.ZipFile(hostile, "w") as out:
            out.writestr(name, members(evil)[name])
            for member, data in members(plus).items():
                out.writestr(member, data)
    assert "aten::save" in whats(inspect_torchscript(hostile))


def test_extra_files_are_data_and_pass(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    scripted = save_torchscript(Plus(), path)
    scripted.save(str(path), _extra_files={"notes.txt": b"import os"})
    with zipfile.ZipFile(path) as zf:
        assert "m/extra/notes.txt" in zf.namelist()
    assert inspect_torchscript(path) == []
