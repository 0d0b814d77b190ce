"""One view of a MAR (CWE-436): what TorchServe's extractor writes is what `verify` inspected.

TorchServe unpacks a MAR with `ZipUtils.unzip` (Java's streaming `ZipInputStream`, local
headers in order); `verify` reads the central directory. Each hostile archive below is built
byte by byte from a clean `secure-handler archive` MAR, with every embedded digest correct
for the central directory's view. All of them, and the good archives, are unpacked by
TorchServe's own `ZipUtils.unzip` from the installed model-server.jar, so each test shows what
Java writes (the hidden handler module, a missing file, or an exception) and that `verify`
refuses the archive with the exact rule and member. Good archives (torch-model-archiver,
default and zip-store, `secure-handler archive`, an honest byte-level rebuild) pass, and Java
writes exactly the bytes `verify` extracted and inspected.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from attacks.zipcraft import (
    DEFLATED,
    MAGIC32,
    STORED,
    RawZip,
    TorchServeExtractor,
    crc,
    deflate,
    local_entry,
    rebuild,
    tree,
    zip64_extra,
)
from support import LABELS, build_tiny_classifier

from secure_handler.cli import main
from secure_handler.deploy.launcher import java_problem
from secure_handler.serving.loading import DIGESTS_MEMBER
from secure_handler.supply import localheaders
from secure_handler.supply.zipsafe import (
    ZipLimits,
    check_entries,
    check_local_headers,
    extract_checked,
)

pytestmark = pytest.mark.skipif(
    java_problem() is not None or shutil.which("javac") is None,
    reason=f"needs a JDK 17 (javac) to run TorchServe's extractor: {java_problem()}",
)

HANDLER = "secure_handler_image.py"  # the module the manifest names; TorchServe imports it
HOSTILE = b"import os\nos.system('id > /tmp/secure-handler-pwned')\n"
SMALL = b"X = 1\n"


@dataclass
class Clean:
    mar: Path
    members: dict[str, bytes]  # central-directory view, digests member excluded

    def with_digests(self, zf: RawZip, contents: dict[str, bytes]) -> RawZip:
        """Append an embedded digest manifest that is correct for `contents`."""
        files = {k: hashlib.sha256(v).hexdigest() for k, v in sorted(contents.items())}
        body = {"format": "secure-handler-digests/1", "algorithm": "sha256", "files": files}
        zf.add(DIGESTS_MEMBER, json.dumps(body).encode())
        return zf

    def honest(self, extra: dict[str, bytes] | None = None) -> RawZip:
        return self.with_digests(rebuild(self.members), {**self.members, **(extra or {})})


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Clean:
    src = tmp_path_factory.mktemp("views-src")
    labels = src / "index_to_name.json"
    labels.write_text(json.dumps(LABELS))
    model = build_tiny_classifier(src)
    export = src / "export"
    argv = ["archive", "--model-name", "tiny", "--version", "1.0", "--serialized-file",
            str(model), "--handler", "image", "--extra-files", str(labels), "--export-path",
            str(export)]  # fmt: skip
    assert main(argv) == 0
    mar = export / "tiny.mar"
    with zipfile.ZipFile(mar) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist() if i.filename != DIGESTS_MEMBER}
    assert HANDLER in members
    return Clean(mar, members)


# --- the hostile archives ----------------------------------------------------------------


def stored_zip64_short_size(c: Clean) -> bytes:
    """STORED, local sizes 0xFFFFFFFF + a ZIP64 extra giving a shorter size: the rest of the
    member (per the central directory) is a hidden local entry for the handler."""
    short = b"benign\n"
    region = short + local_entry(HANDLER, HOSTILE)
    zf = rebuild(c.members)
    zf.add("blob.bin", region, STORED, local={
        "crc": crc(short), "csize": MAGIC32, "size": MAGIC32,
        "extra": zip64_extra(len(short), len(short))})  # fmt: skip
    return c.with_digests(zf, {**c.members, "blob.bin": region}).finish()


def deflated_descriptor_short_stream(c: Clean) -> bytes:
    """DEFLATED with a data descriptor; the deflate stream ends long before the central
    size, and the bytes after the descriptor are a hidden handler entry."""
    short = b"benign\n"
    stream = deflate(short)
    descriptor = struct.pack("<4sIII", b"PK\x07\x08", crc(short), len(stream), len(short))
    region = stream + descriptor + local_entry(HANDLER, HOSTILE)
    zf = rebuild(c.members)
    zf.add("blob.bin", short, DEFLATED, region=region,
           local={"flags": 8, "crc": 0, "csize": 0, "size": 0}, central={"flags": 8})
    return c.with_digests(zf, {**c.members, "blob.bin": short}).finish()


def local_name_differs(c: Clean) -> bytes:
    """The central directory lists notes.txt (not scanned: not .py); its local header
    names the handler module."""
    zf = rebuild(c.members)
    zf.add("notes.txt", HOSTILE, local={"name": HANDLER.encode()})
    return c.with_digests(zf, {**c.members, "notes.txt": HOSTILE}).finish()


def local_method_differs(c: Clean) -> bytes:
    """The central directory says the handler is STORED (its bytes: a deflate stream, which
    Python reads verbatim); the local header says DEFLATED, so Java inflates it."""
    packed = deflate(HOSTILE)
    zf = RawZip()
    for name, data in c.members.items():
        if name == HANDLER:
            zf.add(name, packed, STORED,
                   local={"method": DEFLATED, "crc": crc(HOSTILE), "size": len(HOSTILE)})
        else:
            zf.add(name, data)
    return c.with_digests(zf, {**c.members, HANDLER: packed}).finish()


def entry_between_members(c: Clean) -> bytes:
    """A local entry no central record lists, right after the real handler."""
    zf = RawZip()
    for name, data in c.members.items():
        zf.add(name, data)
        if name == HANDLER:
            zf.raw(local_entry(HANDLER, HOSTILE))
    return c.with_digests(zf, c.members).finish()


def entry_before_the_directory(c: Clean) -> bytes:
    """A local entry after the last member, just before the central directory."""
    zf = c.honest()
    zf.raw(local_entry(HANDLER, HOSTILE))
    return zf.finish()


def entry_prepended(c: Clean) -> bytes:
    """A whole zip entry before the archive: zipfile shifts every offset past it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as hidden:
        hidden.writestr("sitecustomize.py", HOSTILE)
        start = hidden.start_dir
    return buf.getvalue()[:start] + c.honest().finish()


def overlapping_entries(c: Clean) -> bytes:
    """A central record (extra.py) that points inside another member's data."""
    inner = local_entry("extra.py", SMALL, STORED)
    zf = rebuild(c.members)
    offset = len(zf.body)
    zf.add("blob.bin", inner, STORED)
    zf.add("extra.py", SMALL, STORED)
    zf.central[-1].offset = offset + 30 + len(b"blob.bin")
    zf.body = zf.body[: offset + 30 + len(b"blob.bin") + len(inner)]
    return c.with_digests(zf, {**c.members, "blob.bin": inner, "extra.py": SMALL}).finish()


def order_differs(c: Clean) -> bytes:
    """The central directory lists the members in another order than they are stored."""
    zf = c.honest()
    return zf.finish(order=[1, 0, *range(2, len(zf.central))])


def junk_between_members(c: Clean) -> bytes:
    """Bytes between two members: Java stops there and never writes the rest."""
    zf = RawZip()
    for name, data in c.members.items():
        zf.add(name, data)
        if name == HANDLER:
            zf.raw(b"\x00" * 16)
    return c.with_digests(zf, c.members).finish()


def second_end_record(c: Clean) -> bytes:
    """The end record's comment holds a second end record, the one zipfile takes."""
    good = c.honest().finish()
    fake = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0, 0, 0, 0, 0)
    return good[:-2] + struct.pack("<H", len(fake)) + fake


def archive_comment(c: Clean) -> bytes:
    good = c.honest().finish()
    return good[:-2] + struct.pack("<H", 5) + b"hello"


def trailing_bytes(c: Clean) -> bytes:
    return c.honest().finish() + b"\x00" * 8


def non_ascii_name(c: Clean) -> bytes:
    """A name zipfile decodes as cp437 and Java as UTF-8."""
    zf = rebuild(c.members)
    zf.add("handl\u00e9r.py", SMALL)
    return c.with_digests(zf, {**c.members, "handl\u00e9r.py": SMALL}).finish()


def consistent_data_descriptors(c: Clean) -> bytes:
    """zipfile writing to a pipe: data descriptors on every member (both views agree here;
    refused because the construct lets them differ)."""
    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            self.data += bytes(b)
            return len(b)

    pipe = Pipe()
    with zipfile.ZipFile(pipe, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in c.members.items():
            zf.writestr(name, data)
    return bytes(pipe.data)


def zip64_on_a_small_member(c: Clean) -> bytes:
    """zipfile's force_zip64 on the handler: both views agree on its sizes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in c.members.items():
            with zf.open(name, "w", force_zip64=name == HANDLER) as fh:
                fh.write(data)
    return buf.getvalue()


def deflate_stream_ends_early(c: Clean) -> bytes:
    """No descriptor; the deflate stream ends 8 bytes before its compressed size."""
    region = deflate(SMALL) + b"PK\x03\x04junk"
    zf = rebuild(c.members)
    zf.add("extra.py", SMALL, DEFLATED, region=region, local={"csize": len(region)})
    return c.with_digests(zf, {**c.members, "extra.py": SMALL}).finish()


def local_crc_differs(c: Clean) -> bytes:
    zf = rebuild(c.members)
    zf.add("extra.py", SMALL, STORED, local={"crc": 1})
    return c.with_digests(zf, {**c.members, "extra.py": SMALL}).finish()


@dataclass(frozen=True)
class Case:
    build: Callable[[Clean], bytes]
    finding: tuple[str, str]  # (rule, location) verify must report, and nothing else
    java: str  # what TorchServe's extractor does: hostile | differs | same | error


CASES = {
    "stored-zip64-short-size": Case(stored_zip64_short_size, ("SH312", "blob.bin"), "hostile"),
    "deflated-descriptor-short-stream": Case(
        deflated_descriptor_short_stream, ("SH312", "blob.bin"), "hostile"),
    "local-name-differs": Case(local_name_differs, ("SH310", "notes.txt"), "hostile"),
    "local-method-differs": Case(local_method_differs, ("SH310", HANDLER), "hostile"),
    "entry-between-members": Case(
        entry_between_members, ("SH310", "index_to_name.json"), "hostile"),
    "entry-before-the-directory": Case(entry_before_the_directory, ("SH310", HANDLER), "hostile"),
    "entry-prepended": Case(entry_prepended, ("SH310", "model.pt"), "differs"),
    "overlapping-entries": Case(overlapping_entries, ("SH310", "extra.py"), "differs"),
    "order-differs": Case(order_differs, ("SH310", HANDLER), "same"),
    "junk-between-members": Case(
        junk_between_members, ("SH310", "index_to_name.json"), "differs"),
    "second-end-record": Case(second_end_record, ("SH310", "model.pt"), "differs"),
    "archive-comment": Case(archive_comment, ("SH312", ""), "same"),
    "trailing-bytes": Case(trailing_bytes, ("SH312", ""), "same"),
    "non-ascii-name": Case(non_ascii_name, ("SH312", "handl\u251c\u2310r.py"), "differs"),
    "consistent-data-descriptors": Case(
        consistent_data_descriptors, ("SH312", "model.pt"), "same"),
    "zip64-on-a-small-member": Case(zip64_on_a_small_member, ("SH312", HANDLER), "same"),
    "deflate-stream-ends-early": Case(deflate_stream_ends_early, ("SH301", ""), "error"),
    "local-crc-differs": Case(local_crc_differs, ("SH310", "extra.py"), "error"),
}  # fmt: skip


# --- running both readers ----------------------------------------------------------------


@dataclass
class Outcome:
    path: Path
    java: str  # "OK" or "ERR <exception>"
    java_tree: dict[str, bytes]
    central: dict[str, bytes]  # what zipfile (the central directory) says each member holds


def real_archiver(export: Path, src: Path, *args: str) -> Path:
    exe = Path(sys.executable).with_name("torch-model-archiver")
    model = build_tiny_classifier(src)
    handler = src / "handler.py"
    handler.write_text("from secure_handler import SecureImageClassifier\n\n\n"
                       "class Handler(SecureImageClassifier):\n    pass\n")
    cmd = [str(exe), "--model-name", "plain", "--version", "1.0", "--serialized-file",
           str(model), "--handler", str(handler), "--export-path", str(export), "-f", *args]
    subprocess.run(cmd, check=True, capture_output=True)
    return export / "plain.mar"


def central_view(path: Path) -> dict[str, bytes]:
    """Each member as zipfile reads it (the central directory's view)."""
    view = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            try:
                view[info.filename] = zf.read(info)
            except (zipfile.BadZipFile, ValueError) as exc:  # zipfile refuses this member
                view[info.filename] = f"<unreadable: {exc}>".encode()
    return view


@pytest.fixture(scope="module")
def extractor(tmp_path_factory: pytest.TempPathFactory) -> TorchServeExtractor:
    return TorchServeExtractor(tmp_path_factory.mktemp("java"))


@pytest.fixture(scope="module")
def outcomes(
    clean: Clean, extractor: TorchServeExtractor, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Outcome]:
    """Every archive (hostile and good) through TorchServe's extractor, in one JVM."""
    work = tmp_path_factory.mktemp("views")
    archives: dict[str, Path] = {}
    for name, case in CASES.items():
        archives[name] = work / name / "tiny.mar"
        archives[name].parent.mkdir()
        archives[name].write_bytes(case.build(clean))
    archives["good:secure-handler-archive"] = clean.mar
    archives["good:rebuilt"] = work / "rebuilt.mar"
    archives["good:rebuilt"].write_bytes(clean.honest().finish())
    for fmt in ("default", "zip-store"):
        export = work / f"archiver-{fmt}"
        export.mkdir()
        archives[f"good:archiver-{fmt}"] = real_archiver(export, work / f"src-{fmt}",
                                                         "--archive-format", fmt)
    jobs = [(path, work / "java" / name.replace(":", "-")) for name, path in archives.items()]
    lines = extractor.extract(jobs)
    result = {}
    for (name, path), (_, out), line in zip(archives.items(), jobs, lines, strict=True):
        result[name] = Outcome(path, line, tree(out) if out.exists() else {}, central_view(path))
    return result


def verify_json(mar: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    capsys.readouterr()
    code = main(["verify", "--json", "--allow-missing-digests", str(mar)])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_archive_is_refused_for_what_java_would_write(
    name: str, outcomes: dict[str, Outcome], tmp_path: Path, clean: Clean,
    capsys: pytest.CaptureFixture[str],
) -> None:
    case, outcome = CASES[name], outcomes[name]
    if case.java == "hostile":  # the attack is real: Java writes the hidden handler module
        assert outcome.java == "OK"
        assert outcome.java_tree[HANDLER] == HOSTILE
        assert outcome.central.get(HANDLER) != HOSTILE  # what verify would have inspected
    elif case.java == "differs":
        assert outcome.java == "OK"
        assert outcome.java_tree != outcome.central
    elif case.java == "same":  # refused by the allowlist although this one agrees
        assert (outcome.java, outcome.java_tree) == ("OK", outcome.central)
    else:
        assert outcome.java.startswith("ERR java.util.zip.ZipException")

    mar = tmp_path / "tiny.mar"
    mar.write_bytes(case.build(clean))
    code, report = verify_json(mar, capsys)
    rule, member = case.finding
    location = f"tiny.mar!{member}" if member else "tiny.mar"
    assert code == 1
    assert [(f["rule"], f["location"]) for f in report["findings"]] == [(rule, location)]
    message = report["findings"][0]["message"]
    if rule in ("SH310", "SH312"):
        assert "re-create the archive with `secure-handler archive`" in message


@pytest.mark.parametrize("name", ["good:secure-handler-archive", "good:rebuilt",
                                  "good:archiver-default", "good:archiver-zip-store"])
def test_good_archive_passes_and_java_writes_the_verified_bytes(
    name: str, outcomes: dict[str, Outcome], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcome = outcomes[name]
    code, report = verify_json(outcome.path, capsys)
    assert (code, report["findings"]) == (0, [])
    verified = tmp_path / "verified"
    with zipfile.ZipFile(outcome.path) as zf:
        extract_checked(zf, verified, ZipLimits())  # the extraction verify inspects
    assert outcome.java == "OK"
    assert outcome.java_tree == tree(verified) == outcome.central


def test_every_header_byte_mutation_is_refused_or_java_writes_the_verified_bytes(
    clean: Clean, extractor: TorchServeExtractor, tmp_path: Path
) -> None:
    """Flip one bit (0x01, then 0x80) of every byte of every local header, the central
    directory and the end record: each mutant is refused by the container checks, or the
    extraction `verify` inspects is exactly what TorchServe's extractor writes."""
    data = clean.mar.read_bytes()
    with zipfile.ZipFile(clean.mar) as zf:
        headers = [range(i.header_offset, i.header_offset + 30 + len(i.filename))
                   for i in zf.infolist()]
        positions = [p for r in headers for p in r] + list(range(zf.start_dir, len(data)))
    accepted: list[tuple[Path, Path]] = []
    for pos in positions:
        for bit in (0x01, 0x80):
            mutant = bytearray(data)
            mutant[pos] ^= bit
            path = tmp_path / f"m{pos}-{bit}.mar"
            path.write_bytes(bytes(mutant))
            verified = container_view(path, tmp_path / f"m{pos}-{bit}-verified")
            if verified is not None:
                accepted.append((path, verified))
    assert 0 < len(accepted) < len(positions)  # both outcomes happen: the check can fail
    jobs = [(path, path.with_suffix(".java")) for path, _ in accepted]
    lines = extractor.extract(jobs)
    diverging = [path.name for (path, verified), (_, java), line in zip(accepted, jobs, lines,
                                                                         strict=True)
                 if line != "OK" or tree(java) != tree(verified)]
    assert diverging == []


def container_view(path: Path, dest: Path) -> Path | None:
    """The extraction `verify` inspects, or None when the container checks refuse."""
    try:
        with zipfile.ZipFile(path) as zf:
            limits = ZipLimits()
            if check_entries(zf.infolist(), limits, "m") or check_local_headers(path, zf, "m"):
                return None
            extract_checked(zf, dest, limits)
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error, NotImplementedError,
            zlib.error, OSError):
        return None
    return dest


def test_zip64_as_zipfile_writes_it_for_big_members_passes_and_java_agrees(
    extractor: TorchServeExtractor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZIP64 local and central fields and the ZIP64 end records, exactly as zipfile writes
    them for members and offsets past 2 GiB, are accepted when the sizes need them. Both
    thresholds are lowered so a few KiB stand in for gigabytes."""
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1000)
    mar = tmp_path / "big.mar"
    with zipfile.ZipFile(mar, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("small.txt", SMALL)
        zf.writestr("big.bin", bytes(range(256)) * 8, compress_type=zipfile.ZIP_STORED)
        zf.writestr("after.txt", SMALL)  # its offset needs a ZIP64 field in the directory
        with zf.open("streamed.bin", "w", force_zip64=True) as fh:
            fh.write(bytes(range(256)) * 12)
    with zipfile.ZipFile(mar) as zf:  # refused at the real threshold: these members are small
        assert [f.rule for f in check_local_headers(mar, zf, "big.mar")] == ["SH312"]
    monkeypatch.setattr(localheaders, "_ZIP64_MIN_SIZE", 500)
    verified = container_view(mar, tmp_path / "verified")
    assert verified is not None
    [line] = extractor.extract([(mar, tmp_path / "java")])
    assert line == "OK"
    assert tree(tmp_path / "java") == tree(verified)
