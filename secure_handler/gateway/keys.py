"""Client API keys: 256-bit random, stored only as SHA-256, compared in constant time.

A fast hash is enough here (no bcrypt/argon2): the keys are 256 random bits, not passwords,
so nobody can search the key space from a leaked hash.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping

from secure_handler.gateway.config import KeyEntry

__all__ = ["KEY_PREFIX", "KeyRing", "bearer_token", "generate_key", "hash_key"]

#: Marks a key as ours, so secret scanners and humans recognise one in a log or a commit.
KEY_PREFIX = "shg_"
#: Longest Authorization value we hash; real keys are 47 characters.
_MAX_PRESENTED = 512


def generate_key() -> str:
    """A new client key: the prefix plus 32 random bytes, URL-safe base64 (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex SHA-256 of `key`, the only form a key is stored in."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    value = headers.get("authorization")
    if not value or len(value) > _MAX_PRESENTED:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


class KeyRing:
    """Looks a presented key up among the configured hashes."""

    def __init__(self, entries: Iterable[KeyEntry]) -> None:
        self._entries = [(bytes.fromhex(e.sha256), e) for e in entries]

    def authenticate(self, presented: str | None) -> KeyEntry | None:
        """The entry whose hash matches `presented`, else None.

        Every entry is compared, with `hmac.compare_digest`, whatever matched earlier, so the
        time taken does not tell which (or whether a) key matched (CWE-208).
        """
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: KeyEntry | None = None
        for stored, entry in self._entries:
            if hmac.compare_digest(stored, digest):
                found = entry
        return found
