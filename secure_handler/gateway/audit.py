"""The append-only audit log: one JSON object per line, for every management call and denial.

Each line is written with a single `write(2)` on a descriptor opened `O_APPEND`, so lines from
several gateway processes sharing one file never interleave or overwrite each other. The file
is opened with `O_NOFOLLOW` (a symlink planted at the path is refused, not followed) and
`O_CLOEXEC`. When the file is renamed away (logrotate), the next write opens a new one at the
configured path; the old descriptor is closed only once the new one is open, so a failed
reopen leaves no stale descriptor number behind that a later socket could reuse.

The log fails closed: a line that cannot be written raises `AuditUnavailable` (503), the line
goes to stderr instead, and a management call whose attempt was not recorded is not made.

Denials anyone can cause in bulk (no key, or a key past its own rate limit) share a token
bucket of `denials_per_s` lines a second; past it they are counted, and the count is written
as one `denials_suppressed` line when lines flow again, so a flood cannot fill the disk.
The key itself never reaches this file: only the key's configured name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from secure_handler.gateway.errors import AuditUnavailable

__all__ = ["AuditLog", "AuditRecord"]

logger = logging.getLogger(__name__)

#: Client-supplied strings (model names from the URL) are cut to this length.
_MAX_FIELD = 128
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class AuditRecord:
    """One audited event."""

    key: str | None  # the key's configured name; None when no valid key was presented
    client: str
    action: str
    model: str | None
    outcome: str  # attempted, allowed, denied, upstream_refused or upstream_error
    status: int | None  # None on an "attempted" line: nothing is answered yet
    request_id: str
    code: str | None = None
    version: str | None = None
    #: register only: the archive the client asked for (`url=`), as sent
    archive: str | None = None


def _clip(value: str | None) -> str | None:
    return None if value is None else value[:_MAX_FIELD]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class _Budget:
    """A token bucket for floodable lines, plus the count of lines it held back."""

    def __init__(self, per_second: float) -> None:
        self.rate = per_second
        self.burst = max(1.0, per_second * 10)
        self.tokens = self.burst
        self.at = time.monotonic()
        self.suppressed = 0
        self.since: str | None = None

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        if self.suppressed == 0:
            self.since = _now()
        self.suppressed += 1
        return False


class AuditLog:
    """Appends `AuditRecord`s to a file; safe to share between processes."""

    def __init__(self, path: Path, denials_per_s: float = 20.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._budget = _Budget(denials_per_s)
        self._fd = os.open(self.path, _FLAGS, 0o600)  # at start: fail loudly, not later

    def write(self, record: AuditRecord, floodable: bool = False) -> None:
        """Append one line (`time` is UTC with milliseconds); AuditUnavailable if it cannot be.

        `floodable` lines are subject to the denial budget and may be counted instead.
        """
        data = asdict(record)
        for field in ("model", "version", "client", "archive"):
            data[field] = _clip(data[field])
        lines = []
        with self._lock:
            if floodable and not self._budget.take():
                return
            if self._budget.suppressed:
                lines.append(self._summary())
            lines.append(_line({"time": _now(), **data}))
            self._append("".join(lines))

    def _summary(self) -> str:
        budget = self._budget
        line = _line({"time": _now(), "action": "audit.denials_suppressed",
                      "outcome": "suppressed", "count": budget.suppressed,
                      "since": budget.since})
        budget.suppressed, budget.since = 0, None
        return line

    def _append(self, text: str) -> None:
        try:
            self._reopen_if_rotated()
            os.write(self._fd, text.encode("ascii"))
        except OSError as exc:
            # Fail closed, and say so where an operator will see it: the lines themselves too.
            logger.error("audit log %s unwritable (%s); lines: %s", self.path,
                         type(exc).__name__, text.rstrip())
            raise AuditUnavailable("the audit log is unavailable; try again later",
                                   {"Retry-After": "5"}) from exc

    def _reopen_if_rotated(self) -> None:
        if self._fd >= 0:
            try:
                if os.path.samestat(os.stat(self.path, follow_symlinks=False),
                                    os.fstat(self._fd)):
                    return
            except OSError:
                pass  # gone or unreadable: reopen below
        new = os.open(self.path, _FLAGS, 0o600)  # raises: the old descriptor stays as it was
        old, self._fd = self._fd, new
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        with self._lock:
            if self._budget.suppressed:
                with contextlib.suppress(AuditUnavailable):  # reported on stderr
                    self._append(self._summary())
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _line(data: dict[str, object]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True) + "\n"
