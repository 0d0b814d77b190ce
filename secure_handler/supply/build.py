"""Build a MAR with the real torch-model-archiver, after checks, with digests embedded.

Order matters. Inputs are first COPIED into a private staging directory laid out exactly like
the archive will be, and the checks run on those copies, so what was checked is what gets
archived (no swap between check and use). The archiver then runs as a subprocess with its own
TMPDIR: it stages files under `tempfile.gettempdir()/<model name>`, a predictable shared path.
Finally the digest manifest is appended, the finished MAR is verified like any other, and only
then is it moved into the export directory, atomically, next to its `.sha256` sidecar.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_handler.errors import ConfigurationError
from secure_handler.serving.loading import DIGESTS_MEMBER, sha256_file
from secure_handler.supply.findings import Finding, blocking, finding
from secure_handler.supply.templates import HANDLER_KINDS, write_handler
from secure_handler.supply.verify import (
    MANIFEST_MEMBER,
    MarReport,
    VerifyOptions,
    embed_digests,
    inspect_tree,
    verify_mar,
)
from secure_handler.supply.zipsafe import copy_file_nofollow

__all__ = ["ArchiveRequest", "ArchiveResult", "ArchiverError", "build_archive", "sidecar_text"]

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")
_ARCHIVER_ENTRY = "from model_archiver.model_packaging import generate_model_archive as g; g()"
_ARCHIVER_TIMEOUT_S = 1800
# The archiver splits --extra-files on commas and expands globs, and drops these names.
_UNSAFE_NAME_CHARS = re.compile(r"[,*?\[\]]")
_DROPPED_NAMES = ("MANIFEST.json", ".DS_Store")
_DROPPED_SUFFIXES = (".pyc", ".mar")


class ArchiverError(ConfigurationError, RuntimeError):
    """torch-model-archiver itself failed (not a finding about the inputs)."""


@dataclass(frozen=True)
class ArchiveRequest:
    """The inputs of `secure-handler archive`; fields mirror torch-model-archiver's flags.

    `handler` is `image`, `text` or `detector` (a one-class file is generated), a path to a
    `.py`, or a built-in module name allowed by `VerifyOptions.builtin_handlers`.
    """

    model_name: str
    version: str
    serialized_file: Path
    handler: str
    export_path: Path = Path(".")
    extra_files: tuple[Path, ...] = ()
    config_file: Path | None = None
    requirements_file: Path | None = None
    model_file: Path | None = None
    force: bool = False


@dataclass
class ArchiveResult:
    """A written archive (`mar` set) or a refusal (`findings` say why)."""

    mar: Path | None = None
    sha256: str | None = None
    sidecar: Path | None = None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.mar is not None and not blocking(self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mar": str(self.mar) if self.mar else None,
            "sha256": self.sha256,
            "sidecar": str(self.sidecar) if self.sidecar else None,
            "findings": [f.to_dict() for f in self.findings],
            "notes": list(self.notes),
        }


def sidecar_text(sha256: str, mar_name: str) -> str:
    """One `sha256sum`-format line: `sha256sum -c` checks the MAR with it."""
    return f"{sha256}  {mar_name}\n"


def build_archive(request: ArchiveRequest, options: VerifyOptions | None = None) -> ArchiveResult:
    """Check the inputs, run torch-model-archiver, embed digests, verify, publish.

    Raises:
        FileNotFoundError / OSError: an input or the export directory cannot be read/written.
        FileExistsError: the MAR exists and `force` is off.
        ValueError: inputs the archiver would mangle (commas, globs, name collisions).
        ArchiverError: torch-model-archiver failed.
    """
    options = options or VerifyOptions()
    result = ArchiveResult(findings=_request_findings(request, options))
    if blocking(result.findings):
        return result
    target = request.export_path / f"{request.model_name}.mar"
    if target.exists() and not request.force:
        raise FileExistsError(f"{target} exists; pass -f/--force to overwrite")
    with tempfile.TemporaryDirectory(prefix="secure-handler-archive-") as tmp:
        work = Path(tmp)
        built = _check_and_build(request, options, work, result)
        if built is not None:
            _publish(built, target, result)
    return result


def _check_and_build(
    request: ArchiveRequest, options: VerifyOptions, work: Path, result: ArchiveResult
) -> Path | None:
    stage = work / "stage"
    stage.mkdir()
    plan = _stage_inputs(request, stage, result)
    if blocking(result.findings):
        return None
    pre = MarReport(path=str(request.export_path / f"{request.model_name}.mar"))
    files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
    manifest = _planned_manifest(request, plan)
    inspect_tree(stage, files, options, pre, manifest=manifest, check_digests=False)
    result.findings.extend(pre.findings)
    result.notes.extend(pre.notes)
    if blocking(result.findings):
        return None
    mar = _run_archiver(request, plan, stage, work)
    embed_digests(mar)
    report = verify_mar(mar, options)
    if not report.ok:  # the archiver changed something we checked; never publish that
        result.findings.extend(report.findings)
        return None
    result.sha256 = report.sha256
    result.notes.extend(f"scan waiver used (operator policy): {w}" for w in report.waivers)
    return mar


def _request_findings(request: ArchiveRequest, options: VerifyOptions) -> list[Finding]:
    findings = []
    if not _MODEL_NAME.match(request.model_name):
        raise ValueError(
            f"model name {request.model_name!r} must match {_MODEL_NAME.pattern} "
            "(torch-model-archiver's rule)"
        )
    if request.model_file is not None:
        findings.append(
            finding(
                "SH402",
                str(request.model_file),
                "--model-file makes TorchServe import it and torch.load the weights "
                "(unpickling); export TorchScript (torch.jit.script/trace) instead",
            )
        )
    if request.requirements_file is not None and not options.allow_requirements:
        findings.append(
            finding(
                "SH403",
                str(request.requirements_file),
                "TorchServe pip-installs it at load (code from the index runs); bake "
                "dependencies into the image or pass --allow-requirements after review",
            )
        )
    return findings


@dataclass
class _Plan:
    serialized: str
    handler: str
    config: str | None = None
    requirements: str | None = None
    has_extras: bool = False


@dataclass
class _Stage:
    """Copies inputs into the archive layout, refusing symlinks and name collisions."""

    root: Path
    result: ArchiveResult
    used: set[str] = field(default_factory=set)

    def put(self, src: Path, name: str) -> str:
        _check_archivable_name(name)
        if name in self.used:
            raise ValueError(f"two inputs would both be archived as {name!r}")
        self.used.add(name)
        if src.is_symlink():
            self.result.findings.append(finding("SH304", str(src), "symlinked input refused"))
        else:
            copy_file_nofollow(src, self.root / name)
        return name

    def put_extra(self, extra: Path) -> None:
        if extra.is_symlink() or extra.is_file():
            self.put(extra, extra.name)
            return
        if not extra.is_dir():
            raise FileNotFoundError(f"extra file {extra} does not exist")
        # The archiver copies a directory's CONTENTS to the archive root; keep that layout.
        for dirpath, dirnames, filenames in os.walk(extra):
            for name in [*dirnames, *filenames]:
                src = Path(dirpath, name)
                if src.is_symlink() or src.is_file():
                    self.put(src, src.relative_to(extra).as_posix())


def _stage_inputs(request: ArchiveRequest, stage: Path, result: ArchiveResult) -> _Plan:
    staged = _Stage(stage, result)
    plan = _Plan(
        serialized=staged.put(request.serialized_file, request.serialized_file.name),
        handler=_stage_handler(request.handler, staged),
    )
    if request.config_file is not None:
        plan.config = staged.put(request.config_file, request.config_file.name)
    if request.requirements_file is not None:
        plan.requirements = staged.put(request.requirements_file, request.requirements_file.name)
    for extra in request.extra_files:
        staged.put_extra(extra)
    plan.has_extras = bool(request.extra_files)
    return plan


def _stage_handler(handler: str, staged: _Stage) -> str:
    if handler in HANDLER_KINDS:
        name = write_handler(handler, staged.root).name
        staged.used.add(name)
        return name
    path = Path(handler.split(":", 1)[0])
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"handler file {path} does not exist")
        return staged.put(path, path.name)
    return handler  # a built-in module name; inspect_tree checks that it is allowed


def _check_archivable_name(name: str) -> None:
    base = name.rsplit("/", 1)[-1]
    if _UNSAFE_NAME_CHARS.search(name):
        raise ValueError(f"{name!r}: torch-model-archiver splits on ',' and expands globs")
    if (
        base in _DROPPED_NAMES
        or base.endswith(_DROPPED_SUFFIXES)
        or any(
            part.startswith(".") or part in ("__pycache__", "__MACOSX") for part in name.split("/")
        )
    ):
        raise ValueError(f"{name!r}: torch-model-archiver silently drops this name; rename it")
    if name.startswith("MAR-INF/") or name == DIGESTS_MEMBER:
        raise ValueError(f"{name!r}: MAR-INF/ is reserved for the archive's own metadata")


def _planned_manifest(request: ArchiveRequest, plan: _Plan) -> dict[str, Any]:
    """The manifest the archiver will write, so the staged tree is checked as the MAR."""
    model: dict[str, Any] = {
        "modelName": request.model_name,
        "modelVersion": request.version,
        "serializedFile": plan.serialized,
        "handler": plan.handler,
    }
    if plan.config:
        model["configFile"] = plan.config
    if plan.requirements:
        model["requirementsFile"] = plan.requirements
    return {"runtime": "python", "model": model}


def _run_archiver(request: ArchiveRequest, plan: _Plan, stage: Path, work: Path) -> Path:
    out, tmp = work / "out", work / "tmp"
    out.mkdir()
    tmp.mkdir()
    handler_file = stage / plan.handler
    handler = str(handler_file) if handler_file.is_file() else plan.handler
    args = [
        "--model-name", request.model_name,
        "--version", request.version,
        "--serialized-file", str(stage / plan.serialized),
        "--handler", handler,
        "--export-path", str(out),
        "--archive-format", "default",
    ]  # fmt: skip
    if plan.has_extras:
        # The stage already has the archive's layout; the archiver copies a directory's
        # contents to the root (re-copying serialized/handler files onto themselves).
        args += ["--extra-files", str(stage)]
    if plan.config:
        args += ["--config-file", str(stage / plan.config)]
    if plan.requirements:
        args += ["--requirements-file", str(stage / plan.requirements)]
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "TMP": str(tmp)}
    proc = subprocess.run(
        [sys.executable, "-c", _ARCHIVER_ENTRY, *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=_ARCHIVER_TIMEOUT_S,
        check=False,
    )
    mar = out / f"{request.model_name}.mar"
    if proc.returncode != 0 or not mar.is_file():
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ArchiverError(f"torch-model-archiver failed (exit {proc.returncode}): {tail}")
    return mar


def _publish(built: Path, target: Path, result: ArchiveResult) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.copyfile(built, partial)
    os.replace(partial, target)
    if sha256_file(target) != result.sha256:
        raise OSError(f"{target} changed while it was being written")
    sidecar = target.with_name(target.name + ".sha256")
    partial = sidecar.with_name(f".{sidecar.name}.partial-{os.getpid()}")
    partial.write_text(sidecar_text(str(result.sha256), target.name), "utf-8")
    os.replace(partial, sidecar)
    result.mar, result.sidecar = target, sidecar
    result.notes.append(f"{MANIFEST_MEMBER} and {DIGESTS_MEMBER} written")
