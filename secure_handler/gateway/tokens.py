"""TorchServe's tokens for the gateway: read from `key_file.json`, checked, rotated sparingly.

TorchServe's tokens expire (60 minutes by default). The gateway re-reads the key file when it
changes or a token is close to expiry; a token still stale after the re-read is rotated with
TorchServe's API key (`GET /token?type=...` on the management port, which rewrites the file).

Deciding that TorchServe refused a token never rests on a prediction's body: a handler may
echo anything, including TorchServe's own error text. A suspicious answer is only a reason to
ask TorchServe itself, on a call with no handler in its path (`GET /ping` for the inference
token, `GET /models?limit=1` for the management token), and only its answer there (status 400
with TorchServe's `InvalidKeyException` body) counts. Those checks are cached per token for
`CHECK_INTERVAL_S`, so a flood of look-alike answers costs TorchServe at most one check a second.

Several gateway processes share one key file: rotation takes an exclusive `flock` on
`<key_file>.gateway-lock`, then skips rotating when the key file changed within
`MIN_ROTATION_INTERVAL_S` (another process rotated; its new token is read instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

__all__ = ["REFUSAL_TYPE", "TokenKind", "TokenSource", "is_refusal", "parse_expiry"]

logger = logging.getLogger(__name__)

TokenKind = Literal["inference", "management"]
#: The `type` of TorchServe's own JSON answer when a token is wrong or expired.
REFUSAL_TYPE = "InvalidKeyException"

#: (kind, token) → (status, body) of TorchServe's answer to a call with no handler behind it.
CheckCall = Callable[[TokenKind, str], Awaitable[tuple[int, bytes]]]
#: (kind, API key) → status of `GET /token?type=kind`.
RotateCall = Callable[[TokenKind, str], Awaitable[int]]


def parse_expiry(text: str) -> float:
    """A Java `Instant` string (`2024-02-16T21:12:24.801167Z`) → POSIX seconds."""
    text = text.strip().replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # Instant prints up to 9 fraction digits; Python 3.10 reads at most 6.
        digits = "".join(ch for ch in rest if ch.isdigit())
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def is_refusal(status: int, body: bytes) -> bool:
    """Whether an answer has the shape of TorchServe's token refusal (400 InvalidKeyException).

    Only a hint when the answer came from a handler's path; decisive on a handlerless call.
    """
    if status != 400 or len(body) > 4096:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("type") == REFUSAL_TYPE


@dataclass
class _Token:
    key: str
    expires_at: float  # POSIX seconds; inf when the file gives no expiry


class TokenSource:
    """The current TorchServe token of each kind, refreshed before it expires."""

    #: At most one rotation per kind this often, across all processes sharing the key file.
    MIN_ROTATION_INTERVAL_S = 5.0
    #: How long TorchServe's verdict on one token is believed.
    CHECK_INTERVAL_S = 1.0

    def __init__(
        self, key_file: Path | None, margin_s: float, check: CheckCall, rotate: RotateCall
    ) -> None:
        self._path = key_file
        self._margin = margin_s
        self._check = check
        self._rotate_call = rotate
        self._tokens: dict[str, _Token] = {}
        self._mtime: float | None = None
        self._verdicts: dict[tuple[str, str], tuple[float, bool]] = {}
        self._lock = asyncio.Lock()

    async def token(self, kind: TokenKind) -> str | None:
        """The token to send, or None when TorchServe runs without token auth."""
        if self._path is None:
            return None
        if self._needs_refresh(kind):
            async with self._lock:
                if self._needs_refresh(kind):  # another request may have refreshed meanwhile
                    self._read()
                    token = self._tokens.get(kind)
                    if token is not None and self._stale(token):
                        await self._rotate(kind, token.key)
        found = self._tokens.get(kind)
        if found is None:
            raise FileNotFoundError("TorchServe's key file is not readable")
        return found.key

    async def refused(self, kind: TokenKind, token: str) -> bool:
        """Ask TorchServe, on a handlerless call, whether it refuses `token` (cached)."""
        now = time.monotonic()
        cached = self._verdicts.get((kind, token))
        if cached is not None and now - cached[0] < self.CHECK_INTERVAL_S:
            return cached[1]
        status, body = await self._check(kind, token)
        verdict = is_refusal(status, body)
        if len(self._verdicts) > 64:
            self._verdicts.clear()  # a handful of tokens live at once; never grows past this
        self._verdicts[(kind, token)] = (now, verdict)
        return verdict

    async def recover(self, kind: TokenKind, refused: str) -> None:
        """TorchServe refused `refused`: re-read the key file first; rotate only if it still
        holds that token."""
        async with self._lock:
            current = self._tokens.get(kind)
            if current is not None and current.key != refused:
                return  # already replaced by a concurrent request
            self._read()
            current = self._tokens.get(kind)
            if current is None or current.key == refused:
                await self._rotate(kind, refused)

    def _needs_refresh(self, kind: TokenKind) -> bool:
        current = self._tokens.get(kind)
        return current is None or self._stale(current) or self._file_changed()

    def _stale(self, token: _Token) -> bool:
        return time.time() >= token.expires_at - self._margin

    def _file_changed(self) -> bool:
        try:
            return self._path is not None and self._path.stat().st_mtime != self._mtime
        except OSError:
            return True

    async def _rotate(self, kind: TokenKind, old: str) -> None:
        """Rotate `kind` unless some process did within the interval; then re-read."""
        api = self._tokens.get("API")
        if api is None or self._path is None:
            return
        async with _exclusive(self._path.with_name(self._path.name + ".gateway-lock")):
            self._read()
            current = self._tokens.get(kind)
            if current is not None and current.key != old:
                return  # another process rotated while we waited for the lock
            if self._changed_recently():
                return  # at most one rotation per interval, whoever did it
            status = await self._rotate_call(kind, api.key)
            if status != 200:
                logger.warning("TorchServe token rotation answered %s", status)
            else:
                logger.info("rotated TorchServe %s token", kind)
            self._read()

    def _changed_recently(self) -> bool:
        try:
            age = time.time() - self._path.stat().st_mtime if self._path else float("inf")
        except OSError:
            return False
        return age < self.MIN_ROTATION_INTERVAL_S

    def _read(self) -> None:
        assert self._path is not None
        try:
            mtime = self._path.stat().st_mtime
            data = json.loads(self._path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("cannot read TorchServe key file %s: %s", self._path, exc)
            return
        tokens: dict[str, _Token] = {}
        if isinstance(data, dict):
            for kind, entry in data.items():
                if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                    tokens[kind] = _Token(entry["key"], _expiry(entry.get("expiration time")))
        self._tokens, self._mtime = tokens, mtime


@contextlib.asynccontextmanager
async def _exclusive(path: Path, wait_s: float = 30.0) -> AsyncIterator[None]:
    """An exclusive advisory lock on `path` (created 0600, never followed if a symlink), polled
    so the event loop never blocks; when it cannot be had, rotation still runs, guarded by the
    key file's mtime alone."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        logger.warning("cannot open the rotation lock %s: %s", path, exc)
        yield
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    logger.warning("rotation lock %s held too long; going on without it", path)
                    break
                await asyncio.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _expiry(value: object) -> float:
    if not isinstance(value, str):
        return float("inf")  # no expiry given: rely on TorchServe's refusals
    try:
        return parse_expiry(value)
    except ValueError:
        logger.warning("unreadable token expiry %r in TorchServe's key file", value[:40])
        return float("inf")
