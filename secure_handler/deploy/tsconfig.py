"""A hardened TorchServe `config.properties`, as data first and text second.

`hardened_properties()` is the single source of the safe settings; the `secure-handler config`
command, the tests and the examples all render their config through it, and `audit-config`
checks any config against the same numbers (`frontend_request_limit`, `store_allowed_urls`).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from secure_handler.deploy.javaprops import dumps
from secure_handler.limits import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_REQUEST_BYTES, BaseLimits

#: TorchServe metrics config declaring the handlers' custom metrics (see metrics.yaml).
METRICS_CONFIG = Path(__file__).parent.parent / "serving" / "metrics.yaml"

__all__ = [
    "DEFAULT_ALLOWED_URLS",
    "FRONTEND_SLACK",
    "SECRET_ENV_PATTERN",
    "HandlerLimits",
    "ModelSpec",
    "Ports",
    "Tls",
    "frontend_request_limit",
    "hardened_properties",
    "is_loopback",
    "MarInfo",
    "read_mar_info",
    "render_properties",
    "store_allowed_urls",
]

#: Environment variables whose names match are hidden from the Python workers.
SECRET_ENV_PATTERN = (
    r".*(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|AUTH).*|AWS_.*|AZURE_.*|GOOGLE_.*|GCP_.*"
)

#: TorchServe 0.12's `allowed_urls` when the key is absent: any file and any http(s) URL.
DEFAULT_ALLOWED_URLS = "file://.*|http(s)?://.*"

#: Room above the handler's byte limit for the HTTP envelope, so the handler (not Netty) is
#: the one that refuses an oversized payload, with a typed JSON 413.
FRONTEND_SLACK = 64 * 1024

_MAX_CONFIG_MEMBER = 1024 * 1024  # a model-config.yaml larger than this is not a config


@dataclass(frozen=True)
class Ports:
    """Loopback ports of one server; 0 leaves gRPC off (it binds to 127.0.0.1 regardless)."""

    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071
    worker: int = 9000


@dataclass(frozen=True)
class ModelSpec:
    """One entry of `models=`: a MAR from the store and how TorchServe batches it."""

    name: str
    mar: str
    version: str = "1.0"
    workers: int = 1
    batch_size: int = 8
    max_batch_delay_ms: int = 5
    response_timeout_s: int = 60

    def to_json(self) -> dict[str, object]:
        return {
            "marName": self.mar, "minWorkers": self.workers, "maxWorkers": self.workers,
            "batchSize": self.batch_size, "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
        }


@dataclass(frozen=True)
class Tls:
    """PEM files for an https inference address (needed for any non-loopback bind)."""

    certificate_file: Path
    private_key_file: Path


@dataclass(frozen=True)
class HandlerLimits:
    """The handler settings the frontend config must agree with (from `handler:`).

    A view of two fields of `BaseLimits`: their defaults and bounds are defined there, once.
    """

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None) -> HandlerLimits:
        """Read the two sizes from a `handler:` mapping; other keys are the handler's business.

        Raises:
            ValueError: a size outside what `BaseLimits` accepts.
        """
        values = {k: v for k, v in (section or {}).items() if k in _SIZE_KEYS}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"handler `{key}` must be a positive integer, got {value!r}")
        try:
            checked = BaseLimits.model_validate(values)
        except ValidationError as exc:
            raise ValueError(f"handler limits: {exc.errors()[0]['msg']} "
                             f"({', '.join(map(str, exc.errors()[0]['loc']))})") from None
        return cls(checked.max_request_bytes, checked.max_batch_size)

    @staticmethod
    def combined(limits: Iterable[HandlerLimits]) -> HandlerLimits:
        """One frontend serves every model, so it must admit the largest of them."""
        items = list(limits)
        if not items:
            return HandlerLimits()
        return HandlerLimits(max(x.max_request_bytes for x in items),
                             max(x.max_batch_size for x in items))


_SIZE_KEYS = ("max_request_bytes", "max_batch_size")


@dataclass(frozen=True)
class MarInfo:
    """What deployment needs from an archive: its name, version and handler limits."""

    name: str
    version: str
    limits: HandlerLimits


def read_mar_info(mar: str | Path) -> MarInfo:
    """The one bounded reader of a MAR's manifest, model config and handler limits.

    Opens the archive once; reads only JSON and YAML (`yaml.safe_load`), each member capped at
    `_MAX_CONFIG_MEMBER` bytes; no code in the archive runs.

    Raises:
        ValueError: the archive, its manifest or its config is malformed or too large.
    """
    try:
        with zipfile.ZipFile(mar) as archive:
            manifest = json.loads(_member(archive, "MAR-INF/MANIFEST.json"))
            model = manifest.get("model", {}) if isinstance(manifest, dict) else {}
            if not isinstance(model, dict):
                raise ValueError("the manifest's `model` is not an object")
            name = str(model.get("modelName") or Path(mar).stem)
            version = str(model.get("modelVersion") or "1.0")
            config_file = manifest.get("configFile") or model.get("configFile")
            config = yaml.safe_load(_member(archive, str(config_file))) if config_file else None
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{mar}: cannot read the manifest or model config: {exc}") from exc
    section = config.get("handler") if isinstance(config, dict) else None
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"{mar}: model-config.yaml `handler:` is not a mapping")
    return MarInfo(name, version, HandlerLimits.from_section(section))


def _member(archive: zipfile.ZipFile, name: str) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > _MAX_CONFIG_MEMBER:
        raise ValueError(f"{name} is {info.file_size} bytes; refusing to read it")
    with archive.open(info) as member:  # read at most the cap, whatever the header claims
        data = member.read(_MAX_CONFIG_MEMBER + 1)
    if len(data) > _MAX_CONFIG_MEMBER:
        raise ValueError(f"{name} inflates past {_MAX_CONFIG_MEMBER} bytes; refusing it")
    return data


def frontend_request_limit(max_request_bytes: int) -> int:
    """`max_request_size` for a handler limit: room for its base64 form plus the envelope.

    A base64 body of an image just under the handler's limit is 4/3 its size; a tighter
    frontend limit would refuse it with TorchServe's own untyped 413 before the handler sees it.
    """
    return math.ceil(max_request_bytes * 4 / 3) + FRONTEND_SLACK


def store_allowed_urls(model_store: str | Path) -> str:
    """`allowed_urls`: archives directly inside the store, as file:// URLs, nothing else.

    TorchServe compiles it case-insensitively and requires a full match. The name admits no
    `/` (subdirectories) and no `%`: Java percent-decodes file URL paths, so `[^/]+` would let
    `%2e%2e%2f` climb out of the store past TorchServe's literal `..` check. No http(s)
    alternative is left (CVE-2023-43654).
    """
    store = Path(model_store).resolve()
    return "file://" + re.escape(str(store)) + "/[A-Za-z0-9][A-Za-z0-9_.-]*\\.mar"


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP literals; any other name or address is public."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hardened_properties(
    model_store: str | Path,
    ports: Ports = Ports(),
    models: tuple[ModelSpec, ...] = (),
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    job_queue_size: int = 100,
    metrics_mode: str = "prometheus",
    *,
    bind: str = "127.0.0.1",
    tls: Tls | None = None,
    token_expiration_min: int = 60,
    response_timeout_s: int = 60,
    enable_model_api: bool = False,
) -> dict[str, str]:
    """The safe settings as an ordered mapping of key → value.

    `bind` moves only the inference API off loopback, and only with `tls`; management and
    metrics (which has no token check in TorchServe) always stay on 127.0.0.1.
    `enable_model_api` turns register/unregister on, for the secure-handler gateway's register
    path; management stays on loopback, and `audit-config` accepts it only when given the
    gateway's config (`--gateway-config`).

    Raises:
        ValueError: a non-loopback `bind` without `tls`.
    """
    store = Path(model_store).resolve()
    if not is_loopback(bind) and tls is None:
        raise ValueError(f"binding the inference API to {bind} needs TLS (a certificate and key)")
    scheme = "https" if tls else "http"
    props = {
        "inference_address": f"{scheme}://{bind}:{ports.inference}",
        "management_address": f"{scheme}://127.0.0.1:{ports.management}",
        "metrics_address": f"{scheme}://127.0.0.1:{ports.metrics}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_port": str(ports.grpc_management),
        "initial_worker_port": str(ports.worker),
        "model_store": str(store),
        "disable_token_authorization": "false",
        "token_expiration_min": str(token_expiration_min),
        "enable_model_api": "true" if enable_model_api else "false",
        # Only archives from this store, as file:// URLs; no http(s) (CVE-2023-43654).
        "allowed_urls": store_allowed_urls(store),
        "use_env_allowed_urls": "false",
        "install_py_dep_per_model": "false",
        "enable_envvars_config": "false",
        "blacklist_env_vars": SECRET_ENV_PATTERN,
        # Workers hand every body over as bytes, so the handler's strict reader is the only JSON
        # parser (the worker's own json.loads keeps the last of duplicate keys, accepts NaN).
        "decode_input_request": "false",
        # Frontend limit slightly above the handler's, so the handler's typed 413 answers.
        "max_request_size": str(frontend_request_limit(max_request_bytes)),
        "max_response_size": str(frontend_request_limit(max_request_bytes)),
        "job_queue_size": str(job_queue_size),
        "default_response_timeout": str(response_timeout_s),
        "limit_max_image_pixels": "true",
        "metrics_mode": metrics_mode,
        # TorchServe's prometheus mode exports only declared metrics; ours declares the
        # handlers' SecureHandlerRejected and SecureHandlerStageTime next to TorchServe's own.
        "metrics_config": str(METRICS_CONFIG),
        "disable_system_metrics": "false",
    }
    if tls:
        props["certificate_file"] = str(Path(tls.certificate_file).resolve())
        props["private_key_file"] = str(Path(tls.private_key_file).resolve())
    if models:
        props["load_models"] = ",".join(f"{m.name}={m.mar}" for m in models)
        props["models"] = json.dumps(
            {m.name: {m.version: m.to_json()} for m in models}, separators=(",", ":")
        )
    return props


def render_properties(props: Mapping[str, str], header: str = "") -> str:
    """Serialise key → value with Java properties escaping (ASCII only, `\\uXXXX` beyond)."""
    return dumps(props, header)
