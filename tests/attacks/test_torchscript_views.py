"""One view of the serialized file (CWE-436): the program inspected is the program loaded.

The TorchScript file inside a MAR is a zip too. The inspector (`serving.torchscript`) reads
it with Python's `zipfile`; `torch.jit.load` reads it with PyTorch's reader (miniz). Each
hostile file below is built from two real `torch.jit.save` files: a harmless program and one
the inspector refuses (it prints). The first three (a directory behind "prepended" bytes, a
ZIP64 locator pointing elsewhere, a code file named again in another case) make the readers
see different programs; the tests show that torch really loads the refused one while `zipfile`
shows the harmless one, and that `zipview.check_single_view` refuses the file in `verify`
(SH312) and in the worker's loader before torch sees it. Files `torch.jit.save` writes (and honest rewrites
by `zipfile`) pass.
"""

from __future__ import annotations

import io
import struct
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from support import archive_mar, build_tiny_classifier, running_server, write_image_handler

from secure_handler.deploy.launcher import java_problem
from secure_handler.deploy.tsconfig import ModelSpec
from secure_handler.errors import UnsafeModelError
from secure_handler.serving.loading import load_torchscript
from secure_handler.serving.torchscript import inspect_torchscript
from secure_handler.supply.verify import verify_mar
from secure_handler.zipview import check_single_view

_SOURCE = """
import torch


class Harmless(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Refused(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("not inspected")
        return x * 3
"""
_EOCD = struct.Struct("<4sHHHHIIH")
_Z64_LOC = struct.Struct("<4sIQI")
_Z64_END = struct.Struct("<4sQHHIIQQQQ")


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(harmless, refused): both saved by torch.jit.save under the same archive name."""
    root = tmp_path_factory.mktemp("programs")
    (root / "twoprograms.py").write_text(_SOURCE)  # torch.jit.script needs source in a file
    import importlib.util

    spec = importlib.util.spec_from_file_location("twoprograms", root / "twoprograms.py")
    assert spec is not None
    assert spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = []
    for kind in ("Harmless", "Refused"):
        (root / kind).mkdir()
        path = root / kind / "model.pt"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                    category=DeprecationWarning)
            torch.jit.script(getattr(module, kind)()).save(str(path))
        saved.append(path.read_bytes())
    return saved[0], saved[1]


def _load(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated",
                                category=DeprecationWarning)
        return str(torch.jit.load(str(path)).code)  # type: ignore[no-untyped-call]


def _repack(data: bytes) -> bytes:
    """The same members rewritten by `zipfile` (STORED, no descriptors, no ZIP64)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return out.getvalue()


def _split(data: bytes) -> tuple[bytes, bytes, int]:
    """(members, central directory, count) of a zip without ZIP64 records."""
    _, _, _, count, _, size, offset, _ = _EOCD.unpack(data[-22:])
    return data[:offset], data[offset:offset + size], count


def _shift(directory: bytes, delta: int) -> bytes:
    """The central directory with every local-header offset moved by `delta`."""
    out, pos = bytearray(directory), 0
    while pos < len(out):
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", out, pos + 28)
        struct.pack_into("<I", out, pos + 42, struct.unpack_from("<I", out, pos + 42)[0] + delta)
        pos += 46 + name_len + extra_len + comment_len
    return bytes(out)


def prepended_directory(harmless: bytes, refused: bytes) -> bytes:
    """zipfile finds the directory right before the end record and shifts every offset by the
    bytes "prepended"; miniz takes the recorded offset: it reads the refused archive that sits
    in front, zipfile the harmless one behind it."""
    a_members, a_dir, count = _split(_repack(harmless))
    b_members, b_dir, b_count = _split(_repack(refused))
    assert (len(a_dir), count) == (len(b_dir), b_count)  # same names: same directory size
    recorded = max(len(b_members), len(a_members))  # the directory offset miniz follows
    body = b_members.ljust(recorded, b"\0") + b_dir + a_members
    end = _EOCD.pack(b"PK\x05\x06", 0, 0, count, count, len(a_dir), recorded, 0)
    return body + _shift(a_dir, recorded - len(a_members)) + end


def _split64(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(members, central directory, ZIP64 end record) of a torch.jit.save file."""
    record_at = len(data) - 22 - _Z64_LOC.size - _Z64_END.size
    fields = _Z64_END.unpack(data[record_at:record_at + _Z64_END.size])
    size, offset = fields[8], fields[9]
    return data[:offset], data[offset:offset + size], data[record_at:record_at + _Z64_END.size]


def zip64_locator(harmless: bytes, refused: bytes) -> bytes:
    """zipfile reads the ZIP64 end record just before its locator, miniz where the locator
    points: the locator points at the refused archive's record, in front."""
    b_members, b_dir, b_record = _split64(refused)
    a_members, a_dir, a_record = _split64(harmless)
    front = b_members + b_dir + b_record
    fields = list(_Z64_END.unpack(a_record))
    fields[9] += len(front)  # the harmless directory's real offset
    a_end = _Z64_END.pack(*fields)
    body = front + a_members + _shift(a_dir, len(front)) + a_end
    locator = _Z64_LOC.pack(b"PK\x06\x07", 0, len(b_members) + len(b_dir), 1)
    end = _EOCD.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return body + locator + end


def case_variant(harmless: bytes, refused: bytes) -> bytes:
    """miniz looks names up ignoring case: a `TWOPROGRAMS.py` before `twoprograms.py` is the
    code torch compiles for the module, while zipfile lists both as different files."""
    (code_name,) = [n for n, _ in _members(harmless) if n.endswith("/twoprograms.py")]
    (other,) = [b for n, b in _members(refused) if n.endswith("/twoprograms.py")]
    variant = (code_name.rsplit("/", 1)[0] + "/TWOPROGRAMS.py", other.replace(b"Refused",
                                                                              b"Harmless"))
    members = _members(harmless)
    at = [n for n, _ in members].index(code_name)
    return _zip([*members[:at], variant, *members[at:]])


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("craft", [prepended_directory, zip64_locator, case_variant])
def test_two_programs_in_one_file_are_refused_before_loading(
    craft: Any, programs: tuple[bytes, bytes], tmp_path: Path
) -> None:
    path = _write(tmp_path, craft(*programs))
    # The threat is real: torch loads the program that prints, zipfile shows the other one.
    loaded = _load(path)
    with zipfile.ZipFile(path) as zf:
        seen = b"".join(zf.read(n) for n in zf.namelist() if n.endswith("/twoprograms.py"))
    assert 'print("not inspected")' in loaded
    assert b"print" not in seen
    with pytest.raises(UnsafeModelError, match="not in the one zip form torch.jit.save writes"):
        check_single_view(path)
    # The worker's loader refuses it before torch.jit.load, whatever the inspector saw.
    with pytest.raises(UnsafeModelError, match="one zip form"):
        load_torchscript(path, torch.device("cpu"))


def test_verify_refuses_a_mar_whose_serialized_file_holds_two_programs(
    programs: tuple[bytes, bytes], tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    model = _write(tmp_path / "src", prepended_directory(*programs))
    assert inspect_torchscript(model) == []  # zipfile alone sees only the harmless program
    mar = archive_mar(tmp_path / "store", "dual", model, write_image_handler(tmp_path / "src"))
    report = verify_mar(mar)
    about_model = [(f.rule, f.location) for f in report.findings if "model.pt" in f.location]
    assert about_model == [("SH312", "dual.mar!model.pt")], report.findings
    assert "one zip form" in report.findings[0].message


def _members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Duplicate name", category=UserWarning)
        with zipfile.ZipFile(out, "w") as zf:
            for name, body in members:
                zf.writestr(name, body)
    return out.getvalue()


def _duplicate_code(data: bytes) -> bytes:
    members = _members(data)
    return _zip(members + [m for m in members if "/code/" in m[0]][:1])


def _local_name(data: bytes) -> bytes:
    plain = _repack(data)
    name_len = struct.unpack_from("<H", plain, 26)[0]
    return plain[:30] + b"X" + plain[31:30 + name_len] + plain[30 + name_len:]


def _hidden_between(data: bytes) -> bytes:
    """A member between two listed ones that the directory does not list."""
    members = _members(data)
    plain = _zip(members)
    hidden = _zip([("hidden/code/x.py", b"print(1)\n")])
    first_end = zipfile.ZipFile(io.BytesIO(plain)).infolist()[1].header_offset
    extra, _, _ = _split(hidden)
    members_part, directory, count = _split(plain)
    infos = zipfile.ZipFile(io.BytesIO(plain)).infolist()
    shifted = bytearray(directory)
    pos = 0
    for info in infos:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", shifted, pos + 28)
        if info.header_offset >= first_end:
            struct.pack_into("<I", shifted, pos + 42, info.header_offset + len(extra))
        pos += 46 + name_len + extra_len + comment_len
    body = members_part[:first_end] + extra + members_part[first_end:]
    end = _EOCD.pack(b"PK\x05\x06", 0, 0, count, count, len(directory), len(body), 0)
    return body + bytes(shifted) + end


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_duplicate_code, "duplicate name"),
        (_local_name, "its local header is missing or names"),
        (_hidden_between, "bytes between them"),
        (lambda d: d + b"PK\x05\x06" + bytes(18), "bytes before the archive or after"),
        (lambda d: d + b"junk", "not the last 22 bytes"),
        (lambda d: d[:-2] + b"\x04\x00" + b"junk", "not the last 22 bytes"),
        (lambda d: b"\0" * 64 + d, "the ZIP64 locator does not point just before itself"),
        (lambda d: b"\0" * 64 + _repack(d), "bytes before the archive"),
    ],
    ids=["duplicate", "local-name", "hidden-member", "trailing-end", "trailing", "comment", "prefix64",
         "prefix"],
)
def test_other_departures_from_the_one_form_are_refused(
    make: Any, why: str, programs: tuple[bytes, bytes], tmp_path: Path
) -> None:
    path = _write(tmp_path, make(programs[0]))
    with pytest.raises(UnsafeModelError, match=why):
        check_single_view(path)


def test_files_torch_writes_pass(programs: tuple[bytes, bytes], tmp_path: Path) -> None:
    for index, data in enumerate([programs[0], _repack(programs[0]), programs[1]]):
        (tmp_path / str(index)).mkdir()
        check_single_view(_write(tmp_path / str(index), data))
    model = build_tiny_classifier(tmp_path / "tiny")
    check_single_view(model)
    assert load_torchscript(model, torch.device("cpu")) is not None


@pytest.mark.skipif(java_problem() is not None, reason=str(java_problem()))
def test_the_torchserve_worker_refuses_two_programs_in_one_file(
    programs: tuple[bytes, bytes], tmp_path: Path
) -> None:
    """Served without `verify` (torch-model-archiver, no lock): the worker itself refuses."""
    (tmp_path / "src").mkdir()
    model = _write(tmp_path / "src", prepended_directory(*programs))
    store = tmp_path / "store"
    archive_mar(store, "dual", model, write_image_handler(tmp_path / "src"))
    workdir = tmp_path / "work"
    log = workdir / "logs" / "model_log.log"
    with running_server(workdir, store, [ModelSpec("dual", "dual.mar", batch_size=1)],
                        wait=False):
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # bounded wait; the frontend retries the worker
            text = log.read_text(errors="replace") if log.is_file() else ""
            if "one zip form torch.jit.save writes" in text:
                break
            time.sleep(0.5)
    text = log.read_text(errors="replace")
    assert "one zip form torch.jit.save writes" in text
    assert "secure_handler.errors.UnsafeModelError" in text
