"""The content checks of a model archive, on an extracted (or staged) tree.

`verify` runs them on a MAR extracted after its container passed the zip checks; `archive`
runs the same checks on the staged inputs before calling torch-model-archiver, with the
manifest it is about to write. One implementation, so both refuse the same things.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from secure_handler.errors import UnsafeModelError
from secure_handler.serving.loading import DIGESTS_MEMBER, check_torchscript_archive, sha256_file
from secure_handler.serving.torchscript import inspect_torchscript
from secure_handler.supply.carriers import code_carrier
from secure_handler.supply.findings import Finding, blocking, finding
from secure_handler.supply.modelconfig import (
    MAX_CONFIG_BYTES,
    check_model_config,
    read_model_config,
)
from secure_handler.supply.pickles import report_pickle, sniff_pickle
from secure_handler.supply.policy import Policy
from secure_handler.supply.scan import scan_tree
from secure_handler.supply.zipsafe import ZipLimits, check_entries
from secure_handler.zipview import check_single_view

__all__ = ["MANIFEST_MEMBER", "MarReport", "VerifyOptions", "inspect_tree", "read_json"]

MANIFEST_MEMBER = "MAR-INF/MANIFEST.json"

_MAX_JSON_BYTES = 16 << 20
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_COMPILED_SUFFIXES = (".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll")
_PYTHON_RUNTIMES = frozenset({"python", "python3"})


@dataclass(frozen=True)
class VerifyOptions:
    """What an operator chose to allow. The defaults refuse everything optional."""

    allow_pickle: bool = False
    allow_requirements: bool = False
    builtin_handlers: frozenset[str] = frozenset()
    require_digests: bool = True
    limits: ZipLimits = field(default_factory=ZipLimits)
    #: The operator's waivers for the handler scan (`--policy`); never read from the archive.
    policy: Policy | None = None


@dataclass
class MarReport:
    """The result of verifying one archive. `ok` is False when any finding blocks."""

    path: str
    sha256: str | None = None
    name: str | None = None
    version: str | None = None
    serialized_file: str | None = None
    serialized_sha256: str | None = None
    digests_sha256: str | None = None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: The policy waivers the scan used ({file, rule, line_sha256}); recorded in the lock.
    waivers: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not blocking(self.findings)

    def add(self, rule: str, member: str | None, message: str) -> None:
        location = f"{Path(self.path).name}!{member}" if member else Path(self.path).name
        self.findings.append(finding(rule, location, message))

    def lock_entry(self) -> dict[str, Any]:
        """This archive's entry in a lock file (the trust store the worker reads)."""
        entry: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "mar": Path(self.path).name,
            "sha256": self.sha256,
            "serialized_file": self.serialized_file,
            "serialized_sha256": self.serialized_sha256,
            "digests_sha256": self.digests_sha256,
        }
        if self.waivers:  # absent when none, so locks without waivers keep their shape
            entry["waivers"] = list(self.waivers)
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            **{k: v for k, v in self.lock_entry().items() if k != "mar"},
            "findings": [f.to_dict() for f in self.findings],
            "notes": list(self.notes),
        }


def inspect_tree(
    root: Path,
    files: list[str],
    options: VerifyOptions,
    report: MarReport,
    manifest: Mapping[str, Any] | None = None,
    check_digests: bool = True,
) -> None:
    """Check an extracted (or staged) archive tree; `manifest` overrides MANIFEST.json."""
    hashes = _Hashes(root)
    manifest = manifest if manifest is not None else _read_manifest(root, files, report)
    roles: set[str] = {MANIFEST_MEMBER, DIGESTS_MEMBER}
    if manifest is not None:
        roles |= _check_manifest(root, files, manifest, options, report, hashes)
    members = sorted(set(files) - roles)
    _scan_python(root, [m for m in members if _is_python(m)], options, report)
    for name in members:
        _check_member(root, name, options, report)
    if check_digests:
        _check_digests(root, files, options, report, hashes)


@dataclass
class _Hashes:
    root: Path
    cache: dict[str, str] = field(default_factory=dict)

    def __call__(self, name: str) -> str:
        if name not in self.cache:
            self.cache[name] = sha256_file(self.root / name)
        return self.cache[name]


def read_json(path: Path) -> Any:
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise ValueError(f"over {_MAX_JSON_BYTES} bytes")
    return json.loads(path.read_text("utf-8"))


def _read_manifest(root: Path, files: list[str], report: MarReport) -> dict[str, Any] | None:
    if MANIFEST_MEMBER not in files:
        report.add("SH401", MANIFEST_MEMBER, "missing; this is not a TorchServe model archive")
        return None
    try:
        manifest = read_json(root / MANIFEST_MEMBER)
    except (ValueError, UnicodeDecodeError) as exc:
        report.add("SH401", MANIFEST_MEMBER, f"not valid JSON: {exc}")
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict):
        report.add("SH401", MANIFEST_MEMBER, "has no `model` object")
        return None
    return manifest


def _check_manifest(
    root: Path,
    files: list[str],
    manifest: Mapping[str, Any],
    options: VerifyOptions,
    report: MarReport,
    hashes: _Hashes,
) -> set[str]:
    """Manifest fields; returns the members whose role it defines (checked here)."""
    model = manifest["model"]
    report.name, report.version = model.get("modelName"), model.get("modelVersion")
    roles: set[str] = set()
    if model.get("modelFile"):
        report.add(
            "SH402",
            MANIFEST_MEMBER,
            f"modelFile={model['modelFile']!r}: TorchServe would import it and torch.load "
            "the weights (unpickling). Export TorchScript and archive without --model-file",
        )
    runtime = manifest.get("runtime", "python")
    if runtime not in _PYTHON_RUNTIMES:
        report.add("SH406", MANIFEST_MEMBER, f"runtime {runtime!r} loads a native handler")
    roles |= _check_requirements(model, files, options, report)
    roles |= _check_config(root, model, files, report)
    _check_handler(model, files, options, report)
    serialized = model.get("serializedFile")
    if not serialized or serialized not in files:
        report.add("SH405", MANIFEST_MEMBER, f"serializedFile {serialized!r} is not a member")
    else:
        roles.add(serialized)
        report.serialized_file = serialized
        report.serialized_sha256 = hashes(serialized)
        _check_serialized(root / serialized, serialized, options, report)
    return roles


def _check_requirements(
    model: Mapping[str, Any], files: list[str], options: VerifyOptions, report: MarReport
) -> set[str]:
    requirements = model.get("requirementsFile")
    if not requirements:
        return set()
    if not options.allow_requirements:
        report.add(
            "SH403",
            str(requirements),
            "requirementsFile: TorchServe pip-installs it when install_py_dep_per_model is on, "
            "which runs code from the index at load. Bake dependencies into the image, or "
            "pass --allow-requirements after review",
        )
    else:
        report.notes.append(f"requirements file {requirements} allowed by --allow-requirements")
    return {str(requirements)} if requirements in files else set()


def _check_config(
    root: Path, model: Mapping[str, Any], files: list[str], report: MarReport
) -> set[str]:
    config = model.get("configFile")
    if not config:
        return set()
    if config not in files:
        report.add("SH411", MANIFEST_MEMBER, f"configFile {config!r} is not a member")
        return set()
    try:
        with (root / config).open("rb") as fh:  # bounded: a config is a few hundred bytes
            data = read_model_config(fh.read(MAX_CONFIG_BYTES + 1))
    except ValueError as exc:
        report.add("SH411", config, str(exc))
        return {config}
    for rule, message in check_model_config(data):  # launch settings, by allowlist
        report.add(rule, config, message)
    return {config}


def _check_handler(
    model: Mapping[str, Any], files: list[str], options: VerifyOptions, report: MarReport
) -> None:
    handler = str(model.get("handler") or "")
    module = handler.split(":", 1)[0]
    module_file = module if module.endswith(".py") else f"{module}.py"
    if not handler:
        report.add("SH404", MANIFEST_MEMBER, "no handler")
    elif module_file not in files and module not in options.builtin_handlers:
        report.add(
            "SH404",
            MANIFEST_MEMBER,
            f"handler {handler!r} is not a .py in the archive and not an allowed built-in "
            "(--allow-builtin-handler NAME); an unknown module would be imported from the "
            "worker's path",
        )


def _check_serialized(path: Path, member: str, options: VerifyOptions, report: MarReport) -> None:
    try:
        check_torchscript_archive(path)
    except UnsafeModelError as exc:
        report.add("SH407", member, str(exc).replace(str(path), "serialized file"))
        return
    try:  # zipfile inspects it below, torch.jit.load reads it with miniz: one view first
        check_single_view(path)
    except UnsafeModelError as exc:
        report.add("SH312", member, str(exc).replace(str(path), "serialized file"))
        return
    with zipfile.ZipFile(path) as inner:
        where = f"{Path(report.path).name}!{member}"
        report.findings.extend(check_entries(inner.infolist(), options.limits, where))
    scanned = report_pickle(path, "TorchScript archive")
    if scanned.dangerous:
        names = ", ".join(str(g) for g in scanned.dangerous)
        report.add("SH413", member, f"TorchScript pickles import dangerous globals: {names}")
    # The program itself, read without loading it: what the worker's loader also refuses.
    for issue in inspect_torchscript(path):
        rule = "SH421" if issue.member.endswith("pkl") else "SH420"
        line = f":{issue.line}" if issue.line else ""
        location = f"{Path(report.path).name}!{member}!{issue.member}{line}"
        inside = f"in {issue.method}: " if issue.method else ""
        report.findings.append(finding(rule, location, f"{inside}{issue.what}: {issue.reason}"))


@functools.lru_cache(maxsize=1)
def _importable_names() -> frozenset[str]:
    """Top-level modules a member could shadow: the model dir precedes them on the path."""
    names = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    names |= {"secure_handler", "ts", "torch", "model_archiver"}
    # Imported by `site` at interpreter start from any sys.path entry, so a worker started
    # with the model dir on PYTHONPATH runs them before any handler code.
    names |= {"sitecustomize", "usercustomize"}
    names |= set(importlib.metadata.packages_distributions())
    return frozenset(names)


def _shadowed(name: str) -> str | None:
    parts = PurePosixPath(name).parts
    if not name.endswith((".py", *_COMPILED_SUFFIXES)):
        return None
    top = parts[0] if len(parts) > 1 else parts[0].split(".", 1)[0]
    return top if top in _importable_names() else None


def _is_python(name: str) -> bool:
    return name.lower().endswith(".py")


def _scan_python(root: Path, names: list[str], options: VerifyOptions, report: MarReport) -> None:
    """The allowlist scan of every `.py` member together (they may import each other)."""
    sources = {name: (root / name).read_bytes() for name in names}
    scanned = scan_tree(sources, f"{Path(report.path).name}!", options.policy)
    report.findings.extend(scanned.findings)
    report.waivers.extend(scanned.waivers)


def _check_member(root: Path, name: str, options: VerifyOptions, report: MarReport) -> None:
    if module := _shadowed(name):
        report.add(
            "SH412",
            name,
            f"would shadow the installed module {module!r}: the model directory comes first "
            "on the worker's import path. Rename it",
        )
    if carrier := code_carrier(root / name, name):
        report.add(*carrier)
        return
    if _is_python(name):
        return  # judged by the allowlist scan
    kind = sniff_pickle(root / name)
    if kind:
        _check_pickle(root / name, name, kind, options, report)


def _check_pickle(
    path: Path, name: str, kind: str, options: VerifyOptions, report: MarReport
) -> None:
    scanned = report_pickle(path, kind)
    if scanned.dangerous:
        names = ", ".join(str(g) for g in scanned.dangerous)
        report.add("SH413", name, f"{kind} imports dangerous globals: {names}")
    elif options.allow_pickle and scanned.safe_to_allow:
        report.notes.append(f"{name}: allowed by --allow-pickle: {scanned.describe()}")
    else:
        hint = "" if options.allow_pickle else "; use JSON/safetensors, or --allow-pickle"
        report.add("SH409", name, f"{scanned.describe()}; unpickling runs code{hint}")


def _check_digests(
    root: Path, files: list[str], options: VerifyOptions, report: MarReport, hashes: _Hashes
) -> None:
    if DIGESTS_MEMBER not in files:
        if options.require_digests:
            report.add(
                "SH501", None, f"no {DIGESTS_MEMBER}; build it with `secure-handler archive`"
            )
        return
    listed = _read_digests(root, report)
    if listed is None:
        return
    report.digests_sha256 = hashes(DIGESTS_MEMBER)
    present = set(files) - {DIGESTS_MEMBER}
    for name in sorted(present - set(listed)):
        report.add("SH503", name, "not listed in the digest manifest (added after archiving)")
    for name in sorted(set(listed) - present):
        report.add("SH504", name, "listed in the digest manifest but missing")
    for name in sorted(present & set(listed)):
        if hashes(name) != listed[name].lower():
            report.add(
                "SH502",
                name,
                f"content differs from its embedded digest (SHA-256 {hashes(name)}, "
                f"manifest {listed[name]}): the member was modified",
            )


def _read_digests(root: Path, report: MarReport) -> dict[str, str] | None:
    try:
        body = read_json(root / DIGESTS_MEMBER)
    except (ValueError, UnicodeDecodeError) as exc:
        report.add("SH505", DIGESTS_MEMBER, f"not valid JSON: {exc}")
        return None
    files = body.get("files") if isinstance(body, dict) else None
    if (
        not isinstance(body, dict)
        or body.get("algorithm") != "sha256"
        or not isinstance(files, dict)
        or not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in files.values())
    ):
        report.add("SH505", DIGESTS_MEMBER, "expected {algorithm: sha256, files: {name: hex}}")
        return None
    return {str(k): str(v) for k, v in files.items()}
