"""The in-worker pin: the model must match the operator's lock, and nothing the archive says
decides which entry or whether one is needed.

`SecureBaseHandler` calls `verify_trust_store` before `torch.jit.load`. The lock (written by
`secure-handler lock`, named by `$SECURE_HANDLER_TRUST_STORE` in TorchServe's environment)
lives outside the archive. An entry is found by the model name TorchServe registered, and
must match the serialized file and the embedded digest manifest byte for byte; the archive's
manifest version and its model-config never select or waive an entry.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from secure_handler.errors import IntegrityError
from secure_handler.serving.loading import DIGESTS_MEMBER, TRUST_STORE_ENV, sha256_file

__all__ = ["verify_trust_store"]

logger = logging.getLogger(__name__)

_MAX_STORE_BYTES = 16 << 20


def verify_trust_store(
    name: str,
    serialized_path: str | os.PathLike[str],
    digests_sha256: str | None,
    required: bool = False,
    model_dir: str | os.PathLike[str] | None = None,
) -> bool:
    """Check the model against the trust store named by `$SECURE_HANDLER_TRUST_STORE`.

    Nothing here comes from the archive. The identity is `name`, the model name TorchServe
    registered (`context.model_name`: the operator's `load_models=NAME=FILE.mar` or register
    call; without one TorchServe falls back to the manifest's name, which still has to match
    a lock entry of that name byte for byte). The archive's version and its model-config are
    not consulted: the model must match one lock entry of that name exactly, by the SHA-256
    of the serialized file and of the embedded digest manifest (which covers every other
    member, MANIFEST.json and model-config.yaml included). With `model_dir` given, the
    directory may hold no file that the pinned digest manifest does not list.

    Whether a pin is required is the operator's choice too: with the variable set, a model
    without an entry refuses to load unless the lock says `"require_pin": false`. Without
    it, `required` (the handler config's `require_pin`, which can only make this stricter)
    refuses to load. Returns True when an entry matched.

    Raises:
        IntegrityError: no store or entry where one is required, or no entry matches.
    """
    store_path = os.environ.get(TRUST_STORE_ENV)
    if store_path is None:
        if required:
            raise IntegrityError(
                f"require_pin is set but ${TRUST_STORE_ENV} is not set in the TorchServe "
                "environment; point it at the lock file from `secure-handler lock`"
            )
        return False
    store = _read_trust_store(_operator_path(store_path, model_dir))
    entries = [e for e in store["models"] if e.get("name") == name]
    if not entries:
        if store.get("require_pin", True) is False:
            return False
        raise IntegrityError(
            f"trust store {store_path} has no entry for model {name!r} (the name TorchServe "
            "registered it under); lock the store again with `secure-handler lock`, or "
            'set "require_pin": false in the lock to serve unpinned models'
        )
    entry = _matching_entry(entries, sha256_file(serialized_path), digests_sha256)
    if entry is None:
        raise IntegrityError(
            f"model {name!r} does not match any of its {len(entries)} entries in trust store "
            f"{store_path} (serialized file and embedded digest manifest): the archive was "
            "swapped or changed after `secure-handler lock`. Restore it or lock it again"
        )
    if model_dir is not None and entry.get("digests_sha256"):
        _refuse_unlisted(Path(model_dir))
    logger.info("model %r matches trust store entry %s (version %s)", name,
                entry.get("mar"), entry.get("version"))
    return True


def _operator_path(store_path: str, model_dir: str | os.PathLike[str] | None) -> str:
    """The store must be named absolutely and lie outside the model directory.

    The worker's cwd is the extracted archive: a relative name (`lock.json`), or a path that
    resolves into the model directory, would read a lock the archive itself brought. An empty
    value is a pin switched off by mistake, not a choice: refused too.
    """
    if not os.path.isabs(store_path):
        raise IntegrityError(
            f"${TRUST_STORE_ENV}={store_path!r} is not an absolute path: the worker runs in the "
            "extracted archive, so a relative one would name a file the archive brought. Set "
            "it to the absolute path of the lock (`secure-handler serve` does), or unset it"
        )
    resolved = Path(store_path).resolve()
    inside = Path(model_dir if model_dir is not None else Path.cwd()).resolve()
    if resolved == inside or inside in resolved.parents:
        raise IntegrityError(
            f"${TRUST_STORE_ENV} resolves to {resolved}, inside the model directory {inside}: "
            "a lock there came with the archive. Keep the lock outside the model store and "
            "its extracted copies"
        )
    return str(resolved)


def _read_trust_store(store_path: str) -> dict[str, Any]:
    try:
        # A regular file, read within a bound: a FIFO or a device would block or never end.
        if not stat.S_ISREG(os.stat(store_path).st_mode):
            raise ValueError("not a regular file")
        with open(store_path, "rb") as fh:
            raw = fh.read(_MAX_STORE_BYTES + 1)
        if len(raw) > _MAX_STORE_BYTES:
            raise ValueError(f"over {_MAX_STORE_BYTES} bytes")
        store = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"cannot read trust store {store_path}: {exc}") from exc
    models = store.get("models") if isinstance(store, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise IntegrityError(
            f"trust store {store_path} is not a lock file (`models` must be a list of "
            "objects); write it with `secure-handler lock`"
        )
    return dict(store)


def _matching_entry(
    entries: list[dict[str, Any]], serialized_sha256: str, digests_sha256: str | None
) -> dict[str, Any] | None:
    for entry in entries:
        pinned = str(entry.get("serialized_sha256") or "").lower()
        if pinned == serialized_sha256 and entry.get("digests_sha256") == digests_sha256:
            return entry
    return None


def _refuse_unlisted(model_dir: Path) -> None:
    """Every file in the model directory must be listed in the (pinned) digest manifest.

    Listed files were already checked; an added one could be imported later (a module the
    handler imports lazily), so it is refused. `__pycache__` is the interpreter's own, written
    while the handler was imported. Links are not followed.
    """
    listed = set(json.loads(Path(model_dir, DIGESTS_MEMBER).read_text("utf-8"))["files"])
    listed.add(DIGESTS_MEMBER)
    for dirpath, dirnames, filenames in os.walk(model_dir, followlinks=False):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in [*filenames, *(d for d in dirnames if Path(dirpath, d).is_symlink())]:
            relative = Path(dirpath, name).relative_to(model_dir).as_posix()
            if relative not in listed:
                raise IntegrityError(
                    f"{relative} is in the model directory but not in the pinned "
                    f"{DIGESTS_MEMBER}: it was added after archiving. Restore the archive"
                )
