"""Deployment profiles of `secure-handler config --profile`: the hardened properties for where
TorchServe runs, and the audit rules that place adds.

* `local` (the default): `hardened_properties()` as it is, TorchServe on loopback.
* `kserve`: the layout of the `deploy/` manifests. KServe mounts the InferenceService's
  `storageUri` read-only at `/mnt/models`, which holds `config/config.properties` and
  `model-store/*.mar`. TorchServe listens on loopback ports inside the pod with token auth on and
  the model API off; the secure-handler gateway, in the same pod, is the port KServe routes to
  (8080) and holds TorchServe's tokens, so KServe's probes and clients never need them.
  `service_envelope` stays unset: TorchServe's KServe envelopes break batching (the v1 one
  answers only the first request's instances, the v2 one reads `body_list[0]`), while the
  handlers read v1 and v2 bodies per request themselves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from secure_handler.deploy.audit import AuditContext, ConfigFinding
from secure_handler.deploy.tsconfig import (
    ModelSpec,
    Ports,
    hardened_properties,
    store_allowed_urls,
)
from secure_handler.limits import DEFAULT_MAX_REQUEST_BYTES

__all__ = [
    "GATEWAY_PORT",
    "IMAGE_METRICS_CONFIG",
    "KSERVE_CONFIG",
    "KSERVE_PORTS",
    "KSERVE_STORE",
    "PROFILES",
    "kserve_command",
    "kserve_file_findings",
    "kserve_findings",
    "kserve_properties",
]

PROFILES = ("local", "kserve")
KSERVE_ROOT = PurePosixPath("/mnt/models")
KSERVE_STORE = KSERVE_ROOT / "model-store"
KSERVE_CONFIG = KSERVE_ROOT / "config" / "config.properties"
#: Where deploy/Containerfile copies the handlers' metrics declaration (serving/metrics.yaml).
IMAGE_METRICS_CONFIG = "/home/model-server/secure-handler/metrics.yaml"
#: TorchServe's ports inside the pod, all on loopback; 8080 is the gateway's.
KSERVE_PORTS = Ports(inference=8085, management=8086, metrics=8082, grpc_inference=7070,
                     grpc_management=7071, worker=9000)
GATEWAY_PORT = 8080


def kserve_properties(models: Sequence[ModelSpec],
                      max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                      job_queue_size: int = 100, response_timeout_s: int = 60) -> dict[str, str]:
    """The `config/config.properties` to upload beside `model-store/` under the storageUri."""
    props = hardened_properties(str(KSERVE_STORE), KSERVE_PORTS, tuple(models),
                                max_request_bytes, job_queue_size,
                                response_timeout_s=response_timeout_s)
    props["metrics_config"] = IMAGE_METRICS_CONFIG
    return props


def kserve_command(config: Path | None = None) -> list[str]:
    """TorchServe's command in the pod (the manifests' `kserve-container`); `config` stands
    in for the pod's config path when a local copy is audited."""
    return ["torchserve", "--start", "--foreground", "--ncs", "--ts-config",
            str(config or KSERVE_CONFIG), "--model-store", str(KSERVE_STORE)]


def kserve_file_findings(path: Path, command: Sequence[str]) -> list[ConfigFinding]:
    """`kserve_findings` for a written config file (read as TorchServe's Java reads it)."""
    text = path.read_bytes().decode("latin-1")
    return kserve_findings(AuditContext.build(text, cmdline=list(command), environ={}))


def kserve_findings(ctx: AuditContext) -> list[ConfigFinding]:
    """What the `kserve` profile needs beyond the general audit (run `audit()` as well)."""
    return [*_routed_through_gateway(ctx), *_store_layout(ctx), *_no_envelope(ctx)]


def _routed_through_gateway(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for key in ("inference_address", "management_address", "metrics_address"):
        address = ctx.address(key)
        if address is None or not address.local:
            yield ctx.finding(
                "high", key, "in the kserve profile only the gateway (port 8080) is reachable "
                "from outside the pod; TorchServe's own ports would bypass its keys, limits "
                "and audit log.", f"Set {key} to a 127.0.0.1 address (the profile's: "
                f"{_profile_address(key)}).", cwe=["CWE-284"])
    if any(address is not None and address.port == str(GATEWAY_PORT)
           for address in (ctx.address("inference_address"), ctx.address("management_address"))):
        yield ctx.finding(
            "medium", "inference_address", f"port {GATEWAY_PORT} is the gateway's in the "
            "kserve pod; TorchServe cannot share it.", "Use the profile's ports (8085/8086).")


def _profile_address(key: str) -> str:
    port = {"inference_address": KSERVE_PORTS.inference,
            "management_address": KSERVE_PORTS.management,
            "metrics_address": KSERVE_PORTS.metrics}[key]
    return f"http://127.0.0.1:{port}"


def _store_layout(ctx: AuditContext) -> Iterator[ConfigFinding]:
    store = ctx.get("model_store")
    if store != str(KSERVE_STORE):
        yield ctx.finding(
            "medium", "model_store", f"KServe mounts the storageUri at {KSERVE_ROOT}; the "
            f"archives are in {KSERVE_STORE}, not at {store!r}.",
            f"Set model_store={KSERVE_STORE}.")
    if ctx.get("allowed_urls") != store_allowed_urls(str(KSERVE_STORE)):
        yield ctx.finding(
            "high", "allowed_urls", "the kserve profile loads only the archives KServe mounted; "
            "anything wider lets a caller fetch other files or URLs (CVE-2023-43654).",
            "Use the value `secure-handler config --profile kserve` writes.",
            cwe=["CWE-918"], cve=["CVE-2023-43654"])


def _no_envelope(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.get("service_envelope"):
        yield ctx.finding(
            "high", "service_envelope", "TorchServe's KServe envelopes break batching: more "
            "than one request in a batch fails them all with 503, and per-request statuses "
            "are lost.", "Remove service_envelope; the secure handlers read KServe v1 and "
            "OIP v2 bodies themselves.", cwe=["CWE-400"])
    if ctx.flag("disable_token_authorization") or (
            ctx.cmdline is not None and getattr(ctx.cmdline, "token_auth", False)):
        yield ctx.finding(
            "high", "disable_token_authorization", "KServe's own TorchServe runtime turns token "
            "auth off; here the gateway holds the tokens, so it stays on.",
            "Remove the key (or set it to false) and drop --disable-token-auth.",
            cwe=["CWE-306"])

