"""Read TorchServe's `key_file.json`: shared by the client, the gateway and the launcher.

Kept at the top level (stdlib only) so that the client and the gateway need neither torch nor
the deployment package to find TorchServe's tokens.
"""

from __future__ import annotations

import json
import os

__all__ = ["MAX_KEY_FILE_BYTES", "read_key_file"]

#: A real key file is a few hundred bytes; anything far larger is not one.
MAX_KEY_FILE_BYTES = 64 * 1024


def read_key_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """The `management`, `inference` and `API` keys from TorchServe's `key_file.json`.

    Raises ValueError for a file that is too large or not the expected JSON shape, KeyError
    never (entries without a key are skipped), OSError when it cannot be read.
    """
    with open(path, "rb") as handle:
        raw = handle.read(MAX_KEY_FILE_BYTES + 1)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path}: over {MAX_KEY_FILE_BYTES} bytes; not a TorchServe key file")
    data = json.loads(raw.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return {str(kind): str(entry["key"]) for kind, entry in data.items()
            if isinstance(entry, dict) and "key" in entry}

