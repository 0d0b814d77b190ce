"""Verify MARs and lock model stores: what `secure-handler verify` and `lock` run.

A MAR is a zip whose handler `.py` TorchServe imports and whose serialized model TorchScript
unpickles, and TorchServe keeps no digest of either. `verify_mar` checks, in this order:

1. the container (names, links, duplicates, encryption, bombs, Java/Python header agreement);
2. after a bounded extraction: the manifest (no `modelFile`, no `requirementsFile` unless
   allowed, a known handler, a python runtime), the TorchScript layout of the serialized file,
   every `.py` with the allowlist `scan`, every other file for pickles, code Python could
   import (compiled, zip-carrying, `.pth`), and members that would shadow importable modules;
3. the embedded digest manifest (`MAR-INF/secure-handler-digests.json`): every member listed,
   every digest equal;
4. optionally the whole-file SHA-256 and a lock-file entry (including the scan waivers the
   operator's policy granted: they must be the same).

The lock file pins each archive outside the archive; the worker reads the same file through
`$SECURE_HANDLER_TRUST_STORE` (`serving.pin.verify_trust_store`).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_handler.serving.loading import DIGESTS_MEMBER, sha256_file
from secure_handler.supply.findings import Finding, blocking, finding
from secure_handler.supply.inspection import (
    MANIFEST_MEMBER,
    MarReport,
    VerifyOptions,
    inspect_tree,
    read_json,
)
from secure_handler.supply.zipsafe import (
    InflationError,
    check_entries,
    check_local_headers,
    extract_checked,
)

__all__ = [
    "DIGESTS_FORMAT",
    "LOCK_FORMAT",
    "MANIFEST_MEMBER",
    "LockResult",
    "MarReport",
    "VerifyOptions",
    "compute_digests",
    "embed_digests",
    "inspect_tree",
    "lock_store",
    "parse_sha256",
    "read_lock",
    "render_lock",
    "store_entries",
    "verify_mar",
    "verify_store",
]

DIGESTS_FORMAT = "secure-handler-digests/1"
LOCK_FORMAT = "secure-handler-lock/1"

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
#: What zipfile raises on a damaged archive (UnicodeDecodeError is a ValueError).
_CORRUPT_ZIP = (zipfile.BadZipFile, ValueError, EOFError, struct.error, NotImplementedError)
#: Sidecar files that may sit next to MARs in a model store.
_STORE_SIDECARS = (".mar.sha256", ".mar.sig")


# --- digests ---------------------------------------------------------------------------------


def _sha256_stream(stream: Any) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def compute_digests(mar: Path) -> dict[str, str]:
    """SHA-256 of every file member of a zip, except the digest manifest itself."""
    with zipfile.ZipFile(mar) as zf:
        out = {}
        for info in zf.infolist():
            if not info.is_dir() and info.filename != DIGESTS_MEMBER:
                with zf.open(info) as fh:
                    out[info.filename] = _sha256_stream(fh)
    return dict(sorted(out.items()))


def embed_digests(mar: Path) -> str:
    """Append `MAR-INF/secure-handler-digests.json` to a MAR; return that member's SHA-256."""
    with zipfile.ZipFile(mar) as zf:
        if DIGESTS_MEMBER in zf.namelist():
            raise ValueError(f"{mar} already has {DIGESTS_MEMBER}")
    body = {"format": DIGESTS_FORMAT, "algorithm": "sha256", "files": compute_digests(mar)}
    data = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode("utf-8")
    info = zipfile.ZipInfo(DIGESTS_MEMBER, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    with zipfile.ZipFile(mar, "a") as zf:
        zf.writestr(info, data)
    return hashlib.sha256(data).hexdigest()


def parse_sha256(value: str) -> str:
    """A hex SHA-256 given directly, or read from a `sha256sum`-format sidecar file."""
    if _HEX64.fullmatch(value.strip()):
        return value.strip().lower()
    text = Path(value).read_text("utf-8")
    token = text.split()[0] if text.split() else ""
    if not _HEX64.fullmatch(token):
        raise ValueError(f"{value}: neither a hex SHA-256 nor a sha256sum line")
    return token.lower()


# --- verify ----------------------------------------------------------------------------------


def verify_mar(
    path: str | Path,
    options: VerifyOptions | None = None,
    expected_sha256: str | None = None,
    lock_entry: Mapping[str, Any] | None = None,
) -> MarReport:
    """Verify one MAR. Raises OSError when it cannot be read; everything else is a finding."""
    options = options or VerifyOptions()
    mar = Path(path)
    report = MarReport(path=str(mar), sha256=sha256_file(mar))
    if expected_sha256 and report.sha256 != expected_sha256.lower():
        report.add("SH506", None, f"SHA-256 {report.sha256} differs from the pin {expected_sha256}")
    try:
        zf = zipfile.ZipFile(mar)
    except _CORRUPT_ZIP as exc:
        report.add("SH301", None, f"not a readable zip archive ({type(exc).__name__}: {exc})")
        return report
    with zf:
        _verify_open_zip(mar, zf, options, report)
    if lock_entry is not None:
        _compare_lock(report, lock_entry)
    return report


def _verify_open_zip(
    mar: Path, zf: zipfile.ZipFile, options: VerifyOptions, report: MarReport
) -> None:
    structural = check_entries(zf.infolist(), options.limits, mar.name)
    try:
        structural += check_local_headers(mar, zf, mar.name)
    except struct.error:  # a header cut short by the end of the file
        structural.append(finding("SH310", mar.name, "a local header runs past the end"))
    if structural:
        report.findings.extend(structural)
        report.notes.append("content not inspected: the container itself is unsafe")
        return
    with tempfile.TemporaryDirectory(prefix="secure-handler-verify-") as tmp:
        try:
            files = extract_checked(zf, Path(tmp), options.limits)
        except InflationError as exc:
            report.add("SH309", None, f"extraction stopped: {exc}")
            return
        except (*_CORRUPT_ZIP, zlib.error, OSError) as exc:
            report.add("SH301", None, f"member data is corrupt ({type(exc).__name__}: {exc})")
            return
        inspect_tree(Path(tmp), files, options, report)


def _compare_lock(report: MarReport, entry: Mapping[str, Any]) -> None:
    mine = report.lock_entry()
    for key in ("sha256", "name", "version", "serialized_sha256", "digests_sha256"):
        if entry.get(key) != mine[key]:
            report.add(
                "SH507", None, f"{key} is {mine[key]!r}, the lock file pins {entry.get(key)!r}"
            )
    # The lock records the operator's waivers: verifying with another policy is a mismatch.
    if (entry.get("waivers") or []) != mine.get("waivers", []):
        report.add(
            "SH507",
            None,
            f"the scan used the waivers {mine.get('waivers', [])}, the lock file records "
            f"{entry.get('waivers') or []}: pass the --policy the lock was made with",
        )


# --- lock ------------------------------------------------------------------------------------


def store_entries(store: Path, ignore: Iterable[Path] = ()) -> tuple[list[Path], list[Finding]]:
    """The MARs in a model store, plus a finding for anything else TorchServe could load.

    TorchServe also serves extracted directories and `.tar.gz` archives from the store,
    which these checks cannot vouch for, so only `*.mar` files (and their `.sha256` / `.sig`
    sidecars) may be there.
    """
    ignored = {p.resolve() for p in ignore}
    mars: list[Path] = []
    findings: list[Finding] = []
    for entry in sorted(store.iterdir()):
        if entry.resolve() in ignored or entry.name.endswith(_STORE_SIDECARS):
            continue
        if entry.name.endswith(".mar") and entry.is_file() and not entry.is_symlink():
            mars.append(entry)
        else:
            findings.append(
                finding(
                    "SH508",
                    str(entry),
                    "not a regular .mar file; TorchServe could load it without these checks",
                )
            )
    return mars, findings


@dataclass
class LockResult:
    """A lock file's content, the per-archive reports, and store-level findings."""

    lock: dict[str, Any]
    reports: list[MarReport]
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not blocking(self.findings) and all(r.ok for r in self.reports)


def lock_store(
    store: Path, options: VerifyOptions | None = None, ignore: Iterable[Path] = ()
) -> LockResult:
    """Verify every MAR in `store` and build the lock file that pins them.

    `ignore` names files in the store that are not models (the lock file itself).
    """
    mars, findings = store_entries(store, ignore)
    reports = [verify_mar(mar, options) for mar in mars]
    seen: dict[tuple[Any, Any], str] = {}
    for report in reports:
        key = (report.name, report.version)
        if key in seen:
            report.add("SH507", None, f"model {key[0]!r} version {key[1]!r} also in {seen[key]}")
        seen[key] = Path(report.path).name
    entries = [r.lock_entry() for r in reports if r.ok]
    return LockResult({"format": LOCK_FORMAT, "models": entries}, reports, findings)


def render_lock(lock: Mapping[str, Any]) -> str:
    """The lock file's text: stable key order, one trailing newline."""
    return json.dumps(lock, indent=2, sort_keys=True) + "\n"


def read_lock(path: Path) -> dict[str, Any]:
    """Read a lock file; ValueError when it is not one."""
    data = read_json(path)
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != LOCK_FORMAT:
        raise ValueError(f"{path}: not a {LOCK_FORMAT} lock file")
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ValueError(f"{path}: `models` must be a list of objects")
    return data


def verify_store(store: Path, lock: Path, options: VerifyOptions | None = None) -> list[Finding]:
    """Check a whole model store against its lock file before torchserve starts.

    Returns the blocking findings (empty means: serve it). Every MAR must be in the lock and
    match its entry and pass `verify_mar`; every lock entry must have its MAR; nothing else
    loadable may sit in the store. Raises OSError when the store or lock cannot be read.
    """
    try:
        entries = {str(m.get("mar")): m for m in read_lock(lock)["models"]}
    except ValueError as exc:
        return [finding("SH507", str(lock), str(exc))]
    mars, findings = store_entries(store, ignore=[lock])
    for mar in mars:
        entry = entries.pop(mar.name, None)
        if entry is None:
            findings.append(finding("SH508", str(mar), f"not in the lock file {lock}"))
            continue
        findings.extend(blocking(verify_mar(mar, options, lock_entry=entry).findings))
    for name in sorted(entries):
        findings.append(finding("SH509", str(store / name), f"pinned in {lock} but absent"))
    return blocking(findings)
