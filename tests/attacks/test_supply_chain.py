"""Supply-chain attacks on model archives: each hostile MAR is built here, then refused.

Every test names the CWE it covers and asserts the rule that refused it and the member it
named, so a refusal for the wrong reason fails. Pickles are built (with `__reduce__` or raw
opcodes) and NEVER loaded. Hostile archives come from the real torch-model-archiver where it
can produce them, and from `zipfile` where it cannot (the archiver never writes zip-slip names).
"""

from __future__ import annotations

import io
import json
import pickle
import stat
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from support import LABELS, archive_mar, build_tiny_classifier, script_and_save

from secure_handler.cli import main
from secure_handler.serving.loading import sha256_file


class _SystemCall:
    """Unpickling this would run `os.system`; it is only ever pickled."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return (os.system, ("echo pwned > /tmp/secure-handler-pwned",))


#: The same payload as raw protocol-0 opcodes: GLOBAL os.system, MARK, STRING, TUPLE, REDUCE.
PROTOCOL0_SYSTEM = b"cos\nsystem\n(S'echo pwned'\ntR."


class AlwaysThree(torch.nn.Module):
    """A swapped-in model: always predicts class 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 4)
        out[:, 3] = 1.0
        return out


@dataclass
class Src:
    dir: Path
    model: Path
    labels: Path


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Src:
    directory = tmp_path_factory.mktemp("supply-src")
    labels = directory / "index_to_name.json"
    labels.write_text(json.dumps(LABELS))
    return Src(directory, build_tiny_classifier(directory), labels)


def archive_cmd(
    src: Src, export: Path, name: str, *extra: str, handler: str = "image"
) -> list[str]:
    return [
        "archive", "--model-name", name, "--version", "1.0", "--serialized-file",
        str(src.model), "--handler", handler, "--extra-files", str(src.labels),
        "--export-path", str(export), "--json", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def clean_mar(tmp_path_factory: pytest.TempPathFactory, src: Src) -> Path:
    export = tmp_path_factory.mktemp("clean")
    assert main(archive_cmd(src, export, "tiny")) == 0
    return export / "tiny.mar"


def run_json(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    capsys.readouterr()
    code = main(list(argv))
    return code, json.loads(capsys.readouterr().out)


def verify(
    mar: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, set[tuple[str, str]]]:
    code, report = run_json(["verify", "--json", *extra, str(mar)], capsys)
    return code, {(f["rule"], f["location"]) for f in report["findings"] if not f["allowed"]}


def refusal(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    code, result = run_json(argv, capsys)
    return code, {(f["rule"], f["location"]) for f in result["findings"] if not f["allowed"]}


def rewrite(
    src: Path,
    dst: Path,
    replace: dict[str, bytes] | None = None,
    add: Sequence[tuple[zipfile.ZipInfo | str, bytes]] = (),
) -> Path:
    """Copy a MAR member by member, replacing and appending members."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns on duplicate names
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
            for info in zin.infolist():
                out.writestr(info, (replace or {}).get(info.filename) or zin.read(info))
            for name_or_info, data in add:
                out.writestr(name_or_info, data)
    return dst


# --- integrity ---------------------------------------------------------------------------


def test_tampered_member_is_refused(tmp_path: Path, clean_mar: Path, capsys: Any) -> None:
    """CWE-345/CWE-494: the model swapped inside a signed-off archive."""
    swapped = script_and_save(AlwaysThree(), tmp_path / "swapped.pt").read_bytes()
    mar = rewrite(clean_mar, tmp_path / "tiny.mar", replace={"model.pt": swapped})
    assert verify(mar, capsys) == (1, {("SH502", "tiny.mar!model.pt")})
    code, found = verify(mar, capsys, "--sha256", sha256_file(clean_mar))
    assert (code, found) == (1, {("SH502", "tiny.mar!model.pt"), ("SH506", "tiny.mar")})


def test_member_added_after_archiving_is_refused(
    tmp_path: Path, clean_mar: Path, capsys: Any
) -> None:
    """CWE-345: an extra file slipped in after the digests were written."""
    mar = rewrite(clean_mar, tmp_path / "tiny.mar", add=[("notes.txt", b"hello")])
    assert verify(mar, capsys) == (1, {("SH503", "tiny.mar!notes.txt")})


# --- the zip container -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rule"),
    [("../../escape.py", "SH303"), ("/etc/cron.d/job", "SH302"), ("..\\win.py", "SH302")],
)
def test_zip_slip_member_is_refused(
    tmp_path: Path, clean_mar: Path, capsys: Any, name: str, rule: str
) -> None:
    """CWE-22: a member name that extracts outside the model directory (CVE-2023-48299)."""
    mar = rewrite(clean_mar, tmp_path / "tiny.mar", add=[(name, b"print('hi')\n")])
    code, found = verify(mar, capsys)
    assert (code, found) == (1, {(rule, f"tiny.mar!{name}")})


def test_symlink_member_is_refused(tmp_path: Path, clean_mar: Path, capsys: Any) -> None:
    """CWE-59: a member stored as a symlink to a host file."""
    link = zipfile.ZipInfo("index_link.json")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    mar = rewrite(clean_mar, tmp_path / "tiny.mar", add=[(link, b"/etc/passwd")])
    assert verify(mar, capsys) == (1, {("SH304", "tiny.mar!index_link.json")})


def test_duplicate_member_is_refused(tmp_path: Path, clean_mar: Path, capsys: Any) -> None:
    """CWE-436: two members with one name; Python reads one, Java extracts the other last."""
    mar = rewrite(clean_mar, tmp_path / "tiny.mar", add=[("model.pt", b"second copy")])
    assert verify(mar, capsys) == (1, {("SH305", "tiny.mar!model.pt")})


def test_entry_hidden_from_the_central_directory_is_refused(
    tmp_path: Path, clean_mar: Path, capsys: Any
) -> None:
    """CWE-436: TorchServe unzips with Java's ZipInputStream, which walks LOCAL headers.

    An entry prepended before the first member is invisible to zipfile (central directory)
    but extracted by a streaming reader.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as hidden:
        hidden.writestr("sitecustomize.py", "import os\nos.system('id')\n")
        hidden_bytes = buf.getvalue()[: hidden.start_dir]
    mar = tmp_path / "tiny.mar"
    mar.write_bytes(hidden_bytes + clean_mar.read_bytes())
    with zipfile.ZipFile(mar) as zf:
        assert "sitecustomize.py" not in zf.namelist()  # Python's view hides it
    code, found = verify(mar, capsys)
    assert code == 1
    assert found == {("SH310", "tiny.mar!model.pt")}


def set_encrypted_flag(mar: Path, member: str) -> Path:
    """Set the 'encrypted' bit of one member in both headers (zipfile never writes it)."""
    data = bytearray(mar.read_bytes())
    with zipfile.ZipFile(mar) as zf:
        info, start = zf.getinfo(member), zf.start_dir
    data[info.header_offset + 6] |= 0x1  # local header: general purpose flags
    pos = start
    while data[pos : pos + 4] == b"PK\x01\x02":  # central directory entries
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        if data[pos + 46 : pos + 46 + name_len] == member.encode():
            data[pos + 8] |= 0x1
        pos += 46 + name_len + extra_len + comment_len
    mar.write_bytes(bytes(data))
    return mar


def test_encrypted_member_is_refused(tmp_path: Path, clean_mar: Path, capsys: Any) -> None:
    """CWE-345: content that cannot be inspected."""
    mar = rewrite(clean_mar, tmp_path / "tiny.mar", add=[("secret.bin", b"\x00" * 64)])
    set_encrypted_flag(mar, "secret.bin")
    assert verify(mar, capsys) == (1, {("SH306", "tiny.mar!secret.bin")})


def test_zip_bomb_member_is_refused(tmp_path: Path, clean_mar: Path, capsys: Any) -> None:
    """CWE-409: a member that inflates a thousandfold."""
    mar = rewrite(clean_mar, tmp_path / "tiny.mar", add=[("blob.txt", bytes(8 << 20))])
    code, found = verify(mar, capsys)
    assert (code, found) == (1, {("SH309", "tiny.mar!blob.txt")})
    code, found = verify(mar, capsys, "--max-ratio", "100000")
    assert ("SH309", "tiny.mar!blob.txt") not in found


# --- what the archive asks TorchServe to do ------------------------------------------------


def real_archiver(export: Path, name: str, *args: str) -> Path:
    """torch-model-archiver itself, for archives `secure-handler archive` refuses to build."""
    exe = Path(sys.executable).with_name("torch-model-archiver")
    cmd = [str(exe), "--model-name", name, "--version", "1.0", "--export-path", str(export),
           "-f", *args]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return export / f"{name}.mar"


def test_eager_model_file_is_refused(tmp_path: Path, src: Src, capsys: Any) -> None:
    """CWE-502: `modelFile` makes TorchServe import it and torch.load (unpickle) the weights."""
    model_py = tmp_path / "model.py"
    model_py.write_text("import torch\n\n\nclass Net(torch.nn.Module):\n    pass\n")
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, weights)
    handler = tmp_path / "handler.py"
    handler.write_text("from secure_handler import SecureImageClassifier\n\n\n"
                       "class H(SecureImageClassifier):\n    pass\n")  # fmt: skip

    code, found = refusal(
        [*archive_cmd(src, tmp_path, "eager"), "--model-file", str(model_py)], capsys
    )
    assert (code, found) == (1, {("SH402", str(model_py))})
    assert not (tmp_path / "eager.mar").exists()

    mar = real_archiver(tmp_path, "eager", "--model-file", str(model_py), "--serialized-file",
                        str(weights), "--handler", str(handler))  # fmt: skip
    code, found = verify(mar, capsys)
    assert code == 1
    assert ("SH402", "eager.mar!MAR-INF/MANIFEST.json") in found
    assert ("SH407", "eager.mar!weights.pth") in found


def test_torch_save_checkpoint_as_serialized_file_is_refused(
    tmp_path: Path, src: Src, capsys: Any
) -> None:
    """CWE-502: a torch.save zip looks like TorchScript by magic bytes but unpickles freely."""
    ckpt = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), ckpt)
    argv = archive_cmd(src, tmp_path, "ckpt")
    argv[argv.index("--serialized-file") + 1] = str(ckpt)
    code, result = run_json(argv, capsys)
    assert code == 1
    [hit] = result["findings"]
    assert (hit["rule"], hit["location"]) == ("SH407", "ckpt.mar!model.pt")
    assert "torch.save checkpoint" in hit["message"]

    handler = tmp_path / "handler.py"
    handler.write_text("from secure_handler import SecureImageClassifier\n\n\n"
                       "class H(SecureImageClassifier):\n    pass\n")  # fmt: skip
    mar = archive_mar(tmp_path / "store", "ckpt", ckpt, handler)
    code, found = verify(mar, capsys, "--allow-missing-digests")
    assert (code, found) == (1, {("SH407", "ckpt.mar!model.pt")})


@pytest.mark.parametrize(
    ("filename", "payload"),
    [
        ("vocab.json", pickle.dumps(_SystemCall(), protocol=4)),  # the name lies
        ("weights.bin", pickle.dumps(_SystemCall(), protocol=2)),
        ("merges.txt", PROTOCOL0_SYSTEM),  # protocol 0 is printable text
    ],
)
def test_extra_file_pickle_calling_os_system_is_refused(
    tmp_path: Path, src: Src, capsys: Any, filename: str, payload: bytes
) -> None:
    """CWE-502: an extra file whose __reduce__ calls os.system, found by content, not name."""
    evil = tmp_path / filename
    evil.write_bytes(payload)
    argv = archive_cmd(src, tmp_path, "pkl")
    argv[argv.index("--extra-files") + 1] += f",{evil}"
    for extra in ((), ("--allow-pickle",)):  # --allow-pickle never admits dangerous globals
        code, result = run_json([*argv, *extra], capsys)
        assert code == 1
        [hit] = result["findings"]
        assert (hit["rule"], hit["location"]) == ("SH413", f"pkl.mar!{filename}")
        assert "system (dangerous)" in hit["message"]
    assert not (tmp_path / "pkl.mar").exists()

    handler = tmp_path / "handler.py"
    handler.write_text("from secure_handler import SecureImageClassifier\n\n\n"
                       "class H(SecureImageClassifier):\n    pass\n")  # fmt: skip
    mar = archive_mar(tmp_path / "store", "pkl", src.model, handler, [evil])
    code, found = verify(mar, capsys, "--allow-missing-digests")
    assert (code, found) == (1, {("SH413", f"pkl.mar!{filename}")})


HOSTILE_HANDLERS = {
    # the allowlist refuses the import itself: no such module may be named at all
    "subprocess-alias": ("import subprocess as sp\n", "sp.run(['id'])", "SH110", 1),
    "from-import-system": ("from os import system\n", "system('id')", "SH110", 1),
    "from-import-renamed": ("from os import system as log_it\n", "log_it('id')", "SH110", 1),
    "from-posix": ("from posix import system\n", "system('id')", "SH110", 1),
    "getattr-literal": ("import os\n", "getattr(os, 'system')('id')", "SH110", 1),
    # an allowed module, a name not on its list; a computed name; a value's file write
    "torch-os": ("import torch\n", "torch.os.system('id')", "SH111", 9),
    "getattr-computed": ("", "getattr(self.model, 'sa' + 've')('/tmp/x')", "SH213", 8),
    "model-save": ("", "self.model.save('/tmp/x')", "SH212", 8),
    "eval-alias": ("", "run = [eval][0]", "SH210", 8),
}


def hostile_handler(directory: Path, header: str, call: str) -> Path:
    path = directory / "handler.py"
    path.write_text(
        f"{header}from secure_handler import SecureImageClassifier\n\n\n"
        "class Handler(SecureImageClassifier):\n"
        '    """Looks like a normal handler."""\n\n'
        "    def postprocess(self, outputs):\n"
        f"        {call}\n"
        "        return super().postprocess(outputs)\n"
    )
    return path


@pytest.mark.parametrize("case", sorted(HOSTILE_HANDLERS))
def test_hostile_handler_is_refused(tmp_path: Path, src: Src, capsys: Any, case: str) -> None:
    """CWE-749 (CWE-470 for computed names): handlers reaching processes, files or eval."""
    header, call, rule, line = HOSTILE_HANDLERS[case]
    handler = hostile_handler(tmp_path, header, call)
    code, found = refusal(archive_cmd(src, tmp_path, "h", handler=str(handler)), capsys)
    assert (code, found) == (1, {(rule, f"h.mar!handler.py:{line}")})
    assert not (tmp_path / "h.mar").exists()

    mar = archive_mar(tmp_path / "store", "h", src.model, handler)  # the stock archiver agrees
    code, found = verify(mar, capsys, "--allow-missing-digests")
    assert (code, found) == (1, {(rule, f"h.mar!handler.py:{line}")})


def test_requirements_file_is_refused(tmp_path: Path, src: Src, capsys: Any) -> None:
    """CWE-829: TorchServe pip-installs a MAR's requirements at load (code from an index)."""
    req = tmp_path / "requirements.txt"
    req.write_text("totally-safe-package==1.0\n")
    argv = [*archive_cmd(src, tmp_path, "req"), "-r", str(req)]
    code, found = refusal(argv, capsys)
    assert (code, found) == (1, {("SH403", str(req))})

    assert main([*argv, "--allow-requirements"]) == 0  # reviewed: build it anyway
    mar = tmp_path / "req.mar"
    assert verify(mar, capsys) == (1, {("SH403", "req.mar!requirements.txt")})
    assert verify(mar, capsys, "--allow-requirements") == (0, set())


def test_member_shadowing_an_installed_module_is_refused(
    tmp_path: Path, clean_mar: Path, src: Src, capsys: Any
) -> None:
    """CWE-427: the model dir comes first on the worker's path; a `secure_handler/` package
    in the archive would replace the checks themselves."""
    fake = b"def verify_trust_store(*args, **kwargs):\n    return True\n"
    mar = rewrite(clean_mar, tmp_path / "tiny.mar", add=[("secure_handler/loading.py", fake)])
    code, found = verify(mar, capsys)
    assert code == 1
    assert ("SH412", "tiny.mar!secure_handler/loading.py") in found

    overrides = tmp_path / "overrides"
    overrides.mkdir()
    (overrides / "json.py").write_text("loads = dumps = None\n")
    argv = archive_cmd(src, tmp_path, "shadow")
    argv[argv.index("--extra-files") + 1] += f",{overrides}"
    assert refusal(argv, capsys) == (1, {("SH412", "shadow.mar!json.py")})


def test_sitecustomize_member_is_refused(tmp_path: Path, src: Src, capsys: Any) -> None:
    """CWE-427: `site` imports sitecustomize from PYTHONPATH, which holds the model dir, so it
    would run when the worker starts, before any handler (however harmless it looks)."""
    startup = tmp_path / "startup"
    startup.mkdir()
    (startup / "sitecustomize.py").write_text("GREETING = 'hello'\n")
    argv = archive_cmd(src, tmp_path, "site")
    argv[argv.index("--extra-files") + 1] += f",{startup}"
    assert refusal(argv, capsys) == (1, {("SH412", "site.mar!sitecustomize.py")})


def test_compiled_code_member_is_refused(tmp_path: Path, clean_mar: Path, capsys: Any) -> None:
    """CWE-94: a native extension is importable from the model dir and cannot be reviewed."""
    so = "fastops.cpython-311-x86_64-linux-gnu.so"
    mar = rewrite(clean_mar, tmp_path / "tiny.mar", add=[(so, b"\x7fELF" + bytes(60))])
    code, found = verify(mar, capsys)
    assert ("SH408", f"tiny.mar!{so}") in found
    assert code == 1
