"""A hardened TorchServe `config.properties`, as data first and text second.

`hardened_properties()` is the single source of the safe settings; the `secure-handler config`
command, the tests and the examples all render their config through it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelSpec", "Ports", "hardened_properties", "render_properties"]

#: Environment variables whose names match are hidden from the Python workers.
SECRET_ENV_PATTERN = (
    r".*(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|AUTH).*|AWS_.*|AZURE_.*|GOOGLE_.*|GCP_.*"
)


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


def hardened_properties(
    model_store: str | Path,
    ports: Ports = Ports(),
    models: tuple[ModelSpec, ...] = (),
    max_request_bytes: int = 10 * 1024 * 1024,
    job_queue_size: int = 100,
    metrics_mode: str = "prometheus",
) -> dict[str, str]:
    """The safe settings as an ordered mapping of key → value."""
    store = Path(model_store).resolve()
    props = {
        "inference_address": f"http://127.0.0.1:{ports.inference}",
        "management_address": f"http://127.0.0.1:{ports.management}",
        "metrics_address": f"http://127.0.0.1:{ports.metrics}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_port": str(ports.grpc_management),
        "initial_worker_port": str(ports.worker),
        "model_store": str(store),
        "disable_token_authorization": "false",
        "enable_model_api": "false",
        # Only archives from this store, as file:// URLs; no http(s) (CVE-2023-43654).
        "allowed_urls": "file://" + re.escape(str(store)) + "/[^/]+\\.mar",
        "install_py_dep_per_model": "false",
        "enable_envvars_config": "false",
        "blacklist_env_vars": SECRET_ENV_PATTERN,
        # Frontend limit slightly above the handler's, so the handler's typed 413 answers.
        "max_request_size": str(max_request_bytes + 64 * 1024),
        "max_response_size": str(max_request_bytes + 64 * 1024),
        "job_queue_size": str(job_queue_size),
        "default_response_timeout": "60",
        "limit_max_image_pixels": "true",
        "metrics_mode": metrics_mode,
        "disable_system_metrics": "false",
    }
    if models:
        props["load_models"] = ",".join(f"{m.name}={m.mar}" for m in models)
        props["models"] = json.dumps(
            {m.name: {m.version: m.to_json()} for m in models}, separators=(",", ":")
        )
    return props


def _escape(value: str) -> str:
    # Java properties: backslash escapes backslashes; ':' '=' '#' '!' are safe in values.
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def render_properties(props: Mapping[str, str], header: str = "") -> str:
    """Serialise key → value with Java properties escaping."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{key}={_escape(value)}" for key, value in props.items()]
    return "\n".join(lines) + "\n"
