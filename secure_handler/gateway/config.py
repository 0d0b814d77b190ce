"""The gateway's configuration: one pydantic model, loaded from YAML with `yaml.safe_load`.

Everything the gateway enforces is written here and nowhere else: who holds a key (only its
SHA-256), what each key may do (scopes, models, versions), how fast (a token bucket), which
content types and how many bytes each model accepts, and where TorchServe lives.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from secure_handler.limits import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_RESPONSE_BYTES

__all__ = [
    "GatewayConfig",
    "KeyEntry",
    "ModelGrant",
    "ModelPolicy",
    "RateLimit",
    "RedisConfig",
    "Scope",
    "UpstreamConfig",
    "load_config",
    "parse_rate",
]

Scope = Literal["inference", "management"]

#: Model and key names: no dots, slashes, percent signs or spaces, so a name can never be a
#: path trick once it is turned into `<name>.mar`.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
#: Versions may hold dots (`1.0`), never two in a row.
VERSION_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.)){0,31}$"
NAME_RE = re.compile(NAME_PATTERN)
VERSION_RE = re.compile(VERSION_PATTERN)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimit(_Strict):
    """A token bucket: `burst` requests at once, refilled at `per_second`."""

    per_second: float = Field(gt=0, le=1_000_000)
    burst: int = Field(ge=1, le=1_000_000)


def parse_rate(text: str, burst: int | None = None) -> RateLimit:
    """`"5"`, `"5/s"`, `"300/m"` or `"1000/h"` → a RateLimit (burst defaults to ⌈rate/s⌉)."""
    amount, _, unit = text.strip().partition("/")
    seconds = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}.get(unit.strip().lower())
    if seconds is None:
        raise ValueError(f"rate {text!r}: the unit must be /s, /m or /h")
    per_second = float(amount) / seconds
    if not math.isfinite(per_second) or per_second <= 0:
        raise ValueError(f"rate {text!r} must be a positive number")
    return RateLimit(per_second=per_second, burst=burst or max(1, math.ceil(per_second)))


class ModelGrant(_Strict):
    """One model a key may use; an empty `versions` means every version."""

    name: str = Field(pattern=NAME_PATTERN)
    versions: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        # Shorthand in YAML and on the command line: "tiny" or "tiny:1.0".
        if isinstance(value, str):
            name, _, version = value.partition(":")
            return {"name": name, "versions": [version] if version else []}
        return value

    @field_validator("versions")
    @classmethod
    def _check_versions(cls, versions: tuple[str, ...]) -> tuple[str, ...]:
        for version in versions:
            if not VERSION_RE.fullmatch(version):
                raise ValueError(f"invalid version {version!r}")
        return versions

    def allows(self, version: str | None) -> bool:
        """Whether a request for `version` (None: TorchServe's default) is covered."""
        if not self.versions:
            return True
        # The default version is chosen by TorchServe and may change; a restricted grant
        # therefore needs the version spelled out.
        return version is not None and version in self.versions


class KeyEntry(_Strict):
    """One client key, stored as the hex SHA-256 of the key; the key itself is never kept."""

    name: str = Field(pattern=NAME_PATTERN)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: frozenset[Scope] = Field(min_length=1)
    models: tuple[ModelGrant, ...] = ()
    rate: RateLimit

    def grant(self, model: str) -> ModelGrant | None:
        """The grant for `model`, if this key has one."""
        return next((g for g in self.models if g.name == model), None)


class ModelPolicy(_Strict):
    """What the gateway accepts for one model's inference requests."""

    content_types: tuple[str, ...] = Field(min_length=1)
    max_body_bytes: int | None = Field(default=None, ge=1)

    @field_validator("content_types")
    @classmethod
    def _lower(cls, types: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(t.strip().lower() for t in types)


class UpstreamConfig(_Strict):
    """Where TorchServe listens and how long the gateway waits for it."""

    inference_url: str = Field(pattern=r"^https?://[^/?#]+$")
    management_url: str = Field(pattern=r"^https?://[^/?#]+$")
    #: TorchServe's `key_file.json` (in its working directory); None when token auth is off.
    key_file: Path | None = None
    #: Re-read (and if needed rotate) a TorchServe token this long before it expires.
    token_refresh_margin_s: float = Field(default=120.0, ge=0)
    connect_timeout_s: float = Field(default=2.0, gt=0, le=60)
    read_timeout_s: float = Field(default=30.0, gt=0, le=600)
    management_timeout_s: float = Field(default=120.0, gt=0, le=600)
    max_connections: int = Field(default=64, ge=1, le=10_000)
    max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, ge=1024)


class RedisConfig(_Strict):
    """A shared Redis for the rate limiter (several gateway processes, one limit)."""

    url: str = Field(default="redis://127.0.0.1:6379/0", pattern=r"^rediss?://")
    prefix: str = "secure-handler:rl:"
    timeout_s: float = Field(default=0.5, gt=0, le=30)


class GatewayConfig(_Strict):
    """The whole gateway, as read from `gateway.yaml`."""

    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8090, ge=0, le=65535)
    #: Serve HTTPS; without it keys cross the network in clear text (fine on loopback only).
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    #: Proxies whose X-Forwarded-For is believed (the client address of limits and audit).
    #: Empty: the TCP peer is the client, and forwarded headers are ignored.
    forwarded_allow_ips: tuple[str, ...] = ()
    upstream: UpstreamConfig
    #: The directory TorchServe loads archives from; register resolves names inside it only.
    model_store: Path
    models: dict[str, ModelPolicy]
    keys: tuple[KeyEntry, ...] = ()
    #: Optional second bucket per client address, checked before the key is even looked at.
    per_client: RateLimit | None = None
    rate_limit_backend: Literal["memory", "redis"] = "memory"
    redis: RedisConfig | None = None
    max_body_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, ge=1)
    #: How long a client may take to send its body (slow-body clients, CWE-400).
    body_timeout_s: float = Field(default=30.0, gt=0, le=600)
    #: Ceiling for `initial_workers` / `max_worker` on register and scale.
    max_workers: int = Field(default=4, ge=1, le=256)
    audit_log: Path
    #: Requests inside the app at once; more get 503 (None: no cap).
    max_concurrency: int | None = Field(default=256, ge=1)
    # Connection hygiene (connections.py): every socket costs memory and a descriptor.
    #: A request's whole header section must arrive within this, from its first byte.
    header_timeout_s: float = Field(default=10.0, gt=0, le=300)
    #: A connection with no request under way is closed after this (new or kept alive).
    idle_timeout_s: float = Field(default=5.0, gt=0, le=300)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    max_header_count: int = Field(default=64, ge=8, le=1000)
    #: Open sockets per client address (IPv6: per /64), and in all.
    max_connections_per_client: int = Field(default=32, ge=1, le=100_000)
    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    #: Audit lines a second for denials anyone can cause in bulk (no key, or past a key's
    #: rate limit); past it they are counted into one `audit.denials_suppressed` line.
    audit_denials_per_s: float = Field(default=20.0, gt=0, le=100_000)
    shutdown_grace_s: int = Field(default=20, ge=1, le=600)

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, ModelPolicy]) -> dict[str, ModelPolicy]:
        for name in models:
            if not NAME_RE.fullmatch(name):
                raise ValueError(f"invalid model name {name!r}")
        return models

    @model_validator(mode="after")
    def _consistent(self) -> GatewayConfig:
        names = [k.name for k in self.keys]
        hashes = [k.sha256 for k in self.keys]
        if len(set(names)) != len(names) or len(set(hashes)) != len(hashes):
            raise ValueError("key names and key hashes must be unique")
        for key in self.keys:
            unknown = [g.name for g in key.models if g.name not in self.models]
            if unknown:
                raise ValueError(f"key {key.name!r} grants models not under `models:`: {unknown}")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together")
        if self.rate_limit_backend == "redis" and self.redis is None:
            raise ValueError("rate_limit_backend: redis needs a `redis:` section")
        return self

    def body_limit(self, model: str) -> int:
        """The byte limit for `model`'s request bodies."""
        policy = self.models[model]
        return policy.max_body_bytes or self.max_body_bytes


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate `gateway.yaml`; relative paths are taken from the file's folder."""
    path = Path(path)
    data = yaml.safe_load(path.read_text("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    base = path.resolve().parent
    for field in ("model_store", "audit_log", "tls_certfile", "tls_keyfile"):
        if isinstance(data.get(field), str):
            data[field] = str(base / data[field])
    upstream = data.get("upstream")
    if isinstance(upstream, dict) and isinstance(upstream.get("key_file"), str):
        upstream["key_file"] = str(base / upstream["key_file"])
    return GatewayConfig.model_validate(data)
