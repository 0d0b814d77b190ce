"""Model loading: TorchScript only, digests and pins checked first, never unpickling.

TorchServe's stock `BaseHandler.initialize` takes the eager branch whenever the manifest has
`modelFile`: it imports code from the archive and calls `torch.load` without `weights_only`.
Here the only loader is `torch.jit.load`, and it runs only after the file has been shown to
be a TorchScript archive and every configured digest matched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secure_handler.errors import ConfigurationError, IntegrityError, UnsafeModelError
from secure_handler.serving.torchscript import check_torchscript_program
from secure_handler.zipview import check_single_view

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI starts fast
    import torch

__all__ = [
    "DIGESTS_MEMBER",
    "TRUST_STORE_ENV",
    "check_manifest",
    "check_torchscript_archive",
    "check_tree_unchanged",
    "choose_device",
    "load_torchscript",
    "save_torchscript",
    "sha256_file",
    "snapshot_tree",
    "verify_embedded_digests",
]

logger = logging.getLogger(__name__)

#: Where `secure-handler archive` embeds the SHA-256 of every other member of the MAR.
DIGESTS_MEMBER = "MAR-INF/secure-handler-digests.json"
#: Environment variable of the TorchServe process naming the trust store (a lock file).
TRUST_STORE_ENV = "SECURE_HANDLER_TRUST_STORE"

_CHUNK = 1 << 20
_MAX_TS_MEMBERS = 100_000


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def choose_device(properties: Mapping[str, Any], preference: str = "auto") -> torch.device:
    """`cuda:{gpu_id}` when CUDA is there and TorchServe assigned a GPU, else the CPU.

    `preference` is the handler config's `device`: `cpu` forces the CPU, `cuda` demands a GPU
    and fails loudly rather than silently running on the CPU.
    """
    import torch

    gpu_id = properties.get("gpu_id")
    cuda_ok = torch.cuda.is_available()
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not cuda_ok:
        raise ConfigurationError(
            "handler config asks for `device: cuda` but CUDA is not available in the worker; "
            "install a CUDA build of torch or set `device: cpu`"
        )
    if cuda_ok and (gpu_id is not None or preference == "cuda"):
        return torch.device(f"cuda:{int(gpu_id or 0)}")
    return torch.device("cpu")


def check_manifest(manifest: Mapping[str, Any]) -> str:
    """Refuse eager archives; return the serialized file's name.

    Raises:
        UnsafeModelError: the manifest names a `modelFile` (eager mode unpickles).
        ConfigurationError: the manifest names no `serializedFile`.
    """
    model = manifest.get("model") or {}
    if model.get("modelFile"):
        raise UnsafeModelError(
            f"manifest names modelFile={model['modelFile']!r}: eager models are loaded with "
            "torch.load, which unpickles. Export the model with torch.jit.script or "
            "torch.jit.trace and archive it without --model-file"
        )
    serialized = model.get("serializedFile")
    if not serialized:
        raise ConfigurationError(
            "manifest has no serializedFile; archive the TorchScript model with "
            "torch-model-archiver --serialized-file model.pt"
        )
    if os.path.isabs(serialized) or ".." in Path(serialized).parts:
        raise UnsafeModelError(f"serializedFile {serialized!r} escapes the model directory")
    return str(serialized)


def check_torchscript_archive(path: str | os.PathLike[str]) -> None:
    """Show that `path` is a TorchScript archive by its zip members, without unpickling.

    A TorchScript file is a zip with one top-level folder holding `code/`, `constants.pkl` and
    `data.pkl`. A `torch.save` checkpoint is a zip too, but has no `code/` or `constants.pkl`,
    so the magic bytes alone cannot tell them apart.

    Raises:
        UnsafeModelError: naming what was found instead and how to export a TorchScript model.
    """
    name = os.fspath(path)
    fix = "export it with torch.jit.script(model).save(path) or torch.jit.trace"
    try:
        with zipfile.ZipFile(name) as zf:
            members = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        kind = "a raw pickle" if _looks_like_pickle(name) else "not a zip archive"
        raise UnsafeModelError(f"{name}: {kind}, not TorchScript; {fix}") from exc
    if not members or len(members) > _MAX_TS_MEMBERS:
        raise UnsafeModelError(f"{name}: {len(members)} zip members, not TorchScript; {fix}")
    roots = {m.split("/", 1)[0] for m in members}
    if len(roots) != 1 or any(m.startswith("/") or ".." in m.split("/") for m in members):
        raise UnsafeModelError(f"{name}: zip members are not under one folder; {fix}")
    root = roots.pop()
    has_code = any(m.startswith(f"{root}/code/") for m in members)
    needed = {f"{root}/constants.pkl", f"{root}/data.pkl"}
    if not has_code or not needed <= set(members):
        what = "a torch.save checkpoint" if f"{root}/data.pkl" in members else "an unknown zip"
        raise UnsafeModelError(
            f"{name}: {what} (no code/ or constants.pkl), not TorchScript. torch.save files "
            f"are loaded by unpickling; {fix}"
        )


def _looks_like_pickle(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 1 <= head[1] <= 5


def verify_sha256(path: str | os.PathLike[str], expected: str, source: str) -> None:
    """Compare the file's SHA-256 with `expected` (hex), naming `source` on mismatch."""
    actual = sha256_file(path)
    if actual.lower() != expected.lower():
        raise IntegrityError(
            f"{os.fspath(path)}: SHA-256 {actual} does not match {expected} from {source}; "
            "the model file was changed or the pin is stale. Re-archive or update the pin"
        )


def verify_embedded_digests(model_dir: str | os.PathLike[str]) -> str | None:
    """Check every member listed in the embedded digest manifest, when there is one.

    Returns the SHA-256 of the digest manifest itself (so a trust store can pin it), or None
    when the archive carries none.
    """
    manifest_path = Path(model_dir, DIGESTS_MEMBER)
    if not manifest_path.is_file():
        return None
    try:
        files = json.loads(manifest_path.read_text("utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{DIGESTS_MEMBER} is not valid JSON with `files`") from exc
    if not isinstance(files, dict):
        raise IntegrityError(f"{DIGESTS_MEMBER}: `files` must map member names to SHA-256")
    root = Path(model_dir).resolve()
    for member, expected in files.items():
        target = (root / member).resolve()
        if root not in target.parents or not target.is_file():
            raise IntegrityError(f"{DIGESTS_MEMBER} lists {member!r}, which is missing")
        verify_sha256(target, str(expected), DIGESTS_MEMBER)
    return sha256_file(manifest_path)


#: A snapshot: relative path -> (file type, size, mtime in ns, SHA-256 of a small file or "").
TreeSnapshot = dict[str, tuple[int, int, int, str]]

_SNAPSHOT_HASH_BYTES = 1 << 20
_SNAPSHOT_MAX_ENTRIES = 100_000


def snapshot_tree(root: str | os.PathLike[str]) -> TreeSnapshot:
    """What is under `root`: names, types, sizes, mtimes, and the SHA-256 of files up to 1 MiB
    (so a same-size rewrite with a restored mtime still shows). Links are recorded, never
    followed. Python's bytecode caches (`__pycache__`) are left out: another worker of the same
    model writes them while importing the handler, at any time."""
    entries: TreeSnapshot = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            kind = stat.S_IFMT(info.st_mode)
            small = stat.S_ISREG(info.st_mode) and info.st_size <= _SNAPSHOT_HASH_BYTES
            size, mtime = info.st_size, info.st_mtime_ns
            if stat.S_ISDIR(info.st_mode):
                size = mtime = 0  # they change with the entries, which are compared anyway
            digest = sha256_file(path) if small else ""
            entries[os.path.relpath(path, root)] = (kind, size, mtime, digest)
            if len(entries) > _SNAPSHOT_MAX_ENTRIES:
                raise ConfigurationError(
                    f"model directory {os.fspath(root)} holds over {_SNAPSHOT_MAX_ENTRIES} "
                    "entries; archive only what the handler needs"
                )
    return entries


def check_tree_unchanged(root: str | os.PathLike[str], before: TreeSnapshot) -> None:
    """Defence in depth after loading: refuse if anything under `root` appeared, changed or
    went away. The model directory is the worker's working directory and first import path,
    so a file written there (`sitecustomize.py`) would run in the next worker."""
    after = snapshot_tree(root)
    appeared = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    modified = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    if appeared or removed or modified:
        parts = [f"{label}: {', '.join(names[:10])}" for label, names in
                 (("appeared", appeared), ("modified", modified), ("removed", removed)) if names]
        raise UnsafeModelError(
            f"loading the model changed its directory {os.fspath(root)} ({'; '.join(parts)}): "
            "the model ran code that writes files. Refuse this archive and rebuild the model "
            "from trusted source with torch.jit.script or torch.jit.trace"
        )


_MAX_LOAD_OUTPUT = 64 << 10  # bytes of load-time output logged; the rest is dropped


@contextlib.contextmanager
def _stderr_logged_escaped(source: str) -> Iterator[None]:
    """Hold what native code writes to fd 2 during the block, then log it as reprs.

    A model's `__setstate__` may call `warnings.warn` (aten::warn stays allowed:
    nn.TransformerEncoder calls it) with a message it builds, and inside `torch.jit.load` torch
    prints it straight to fd 2. TorchServe parses every worker stderr line starting with
    `[METRICS]` or `[PID]`, so "\\n[PID]1" in a message forged them (CWE-117).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            held = sink.read(_MAX_LOAD_OUTPUT)
            for line in held.decode("utf-8", "replace").splitlines():
                logger.warning("%s: output while loading: %r", source, line[:500])


def load_torchscript(path: str | os.PathLike[str], device: torch.device) -> torch.jit.ScriptModule:
    """`torch.jit.load` onto `device`, in eval mode. Call only after the checks above.

    `torch.jit.load` compiles the file's code and runs its `__setstate__` methods, so the
    program is inspected first (`serving.torchscript`): nothing outside the operator allowlist
    ever runs. Raises `UnsafeModelError` naming the operation, the method and the file.
    """
    # The inspector reads the zip with `zipfile`, torch with miniz: one view first, so the
    # program inspected is the program loaded.
    check_single_view(path)
    check_torchscript_program(path)
    logger.info("%s: TorchScript program inspected: every operation is on the allowlist",
                os.fspath(path))
    import torch

    with warnings.catch_warnings(), _stderr_logged_escaped(os.fspath(path)):
        # torch 2.13 deprecates TorchScript; silence exactly that message and nothing wider.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning
        )
        module: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]
            os.fspath(path), map_location=device
        )
    module.eval()
    return module


def save_torchscript(
    module: torch.nn.Module, path: str | os.PathLike[str]
) -> torch.jit.ScriptModule:
    """`torch.jit.script(module.eval())` saved to `path`: the only format the handlers load.

    For users' export scripts, the examples and the tests alike. torch.jit.script needs the
    module's source in a file (not stdin or `python -c`).
    """
    import torch

    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript; silence exactly that message and nothing wider.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning
        )
        scripted: torch.jit.ScriptModule = torch.jit.script(module.eval())
    scripted.save(os.fspath(path))
    return scripted
