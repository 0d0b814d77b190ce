"""The append-only audit log: one JSON object per line, for every management call and denial.

Each line is written with a single `write(2)` on a descriptor opened `O_APPEND`, so lines from
several gateway processes sharing one file never interleave or overwrite each other. When the
file is renamed away (logrotate), the next write opens a new one at the configured path. The
key itself never reaches this file: only the key's configured name.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["AuditLog", "AuditRecord"]

#: Client-supplied strings (model names from the URL) are cut to this length.
_MAX_FIELD = 128


@dataclass(frozen=True)
class AuditRecord:
    """One audited event."""

    key: str | None  # the key's configured name; None when no valid key was presented
    client: str
    action: str
    model: str | None
    outcome: str  # "allowed" or "denied" or "upstream_error"
    status: int
    request_id: str
    code: str | None = None
    version: str | None = None


def _clip(value: str | None) -> str | None:
    return None if value is None else value[:_MAX_FIELD]


class AuditLog:
    """Appends `AuditRecord`s to a file; safe to share between processes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _reopen_if_rotated(self) -> None:
        try:
            same = os.path.samestat(os.stat(self.path), os.fstat(self._fd))
        except OSError:
            same = False
        if not same:
            os.close(self._fd)
            self._fd = self._open()

    def write(self, record: AuditRecord) -> None:
        """Append one line; `time` is UTC with milliseconds."""
        data = asdict(record)
        for field in ("model", "version", "client"):
            data[field] = _clip(data[field])
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        line = json.dumps({"time": now, **data}, separators=(",", ":"), ensure_ascii=True)
        with self._lock:
            if self._fd >= 0:
                self._reopen_if_rotated()
                os.write(self._fd, (line + "\n").encode("ascii"))

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
