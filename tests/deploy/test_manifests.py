"""Every manifest under deploy/, checked offline against the Kubernetes and KServe API models.

No cluster is reachable here, so each document is built field by field into the model classes
of the `kubernetes` and `kserve` packages (the `kserve` test extra): an unknown field, a value
of the wrong type or a missing required field fails, at any depth. Then what the deployment
promises is checked on the parsed objects: non-root containers, read-only root filesystems and
model store, TorchServe started with `--ncs --ts-config` and token auth on, only the gateway
reachable, and the gateway config agreeing with the `kserve` profile's ports and paths.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes", reason="needs the kserve test extra")
kserve = pytest.importorskip("kserve", reason="needs the kserve test extra")

from secure_handler.deploy.profiles import (  # noqa: E402
    GATEWAY_PORT,
    IMAGE_METRICS_CONFIG,
    KSERVE_CONFIG,
    KSERVE_PORTS,
    KSERVE_STORE,
)
from secure_handler.gateway.config import GatewayConfig  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KINDS = {
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "object": (object,),
}


class SchemaError(ValueError):
    """A manifest that the API models refuse; the message names the path."""


def model_class(name: str) -> Any:
    found = getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name, None)
    if found is None:
        raise SchemaError(f"no model class {name}")
    return found


def build(data: Any, type_name: str, path: str) -> Any:
    """`data` as an instance of `type_name`, refusing what the model does not define."""
    inner = re.fullmatch(r"(?:List|list)\[(.+)\]", type_name)
    if inner:
        if not isinstance(data, list):
            raise SchemaError(f"{path}: expected a list, got {type(data).__name__}")
        return [build(v, inner.group(1), f"{path}[{i}]") for i, v in enumerate(data)]
    mapping = re.fullmatch(r"(?:Dict\[str, (.+)\]|dict\(str, (.+)\))", type_name)
    if mapping:
        if not isinstance(data, dict):
            raise SchemaError(f"{path}: expected a mapping, got {type(data).__name__}")
        value_type = mapping.group(1) or mapping.group(2)
        return {k: build(v, value_type, f"{path}.{k}") for k, v in data.items()}
    if type_name in _PRIMITIVES:
        wanted = _PRIMITIVES[type_name]
        if (type_name == "int" and isinstance(data, bool)) or not isinstance(data, wanted):
            raise SchemaError(f"{path}: expected {type_name}, got {data!r}")
        return data
    return _build_model(data, model_class(type_name), path)


def _build_model(data: Any, cls: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: expected an object ({cls.__name__})")
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    if unknown:
        raise SchemaError(f"{path}: {cls.__name__} has no field(s) {unknown}")
    kwargs = {by_json[k]: build(v, cls.openapi_types[by_json[k]], f"{path}.{k}")
              for k, v in data.items()}
    try:
        return cls(**kwargs)  # the models' client-side validation: required fields, enums
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"{path}: {exc}") from exc


def validate(doc: dict[str, Any], where: str = "") -> Any:
    kind = KINDS.get((doc.get("apiVersion"), doc.get("kind")))
    if kind is None:
        raise SchemaError(f"{where}: unexpected kind {doc.get('apiVersion')}/{doc.get('kind')}")
    return build(doc, kind, where or kind)


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text("utf-8"))):
            docs.append((f"{path.relative_to(DEPLOY)}#{i}", doc))
    return docs


DOCS = documents()


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def server_deployment() -> dict[str, Any]:
    [found] = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "secure-handler"]
    return found


def test_the_manifests_are_all_there() -> None:
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds == sorted(["Secret", "ServingRuntime", "InferenceService", "Deployment",
                            "Deployment", "Service", "Service", "HorizontalPodAutoscaler",
                            "PersistentVolumeClaim", "NetworkPolicy"])


@pytest.mark.parametrize(("where", "doc"), DOCS, ids=[w for w, _ in DOCS])
def test_every_manifest_builds_into_the_api_models(where: str, doc: dict[str, Any]) -> None:
    built = validate(doc, where)
    assert built.kind == doc["kind"]
    assert built.metadata.name == doc["metadata"]["name"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["spec"].update(replica=3), "no field(s) ['replica']"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicy=1),
     "expected str"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"), "name"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][1]["ports"][0].update(
        containerPort="8080"), "expected int"),
    (lambda d: d["spec"]["template"]["spec"]["volumes"][0].update(hostPath={"path": "/"},
                                                                    bogus=1), "bogus"),
])
def test_the_check_refuses_what_the_api_would(change: Any, message: str) -> None:
    """Create-and-refuse: the validator itself fails on a typo, a wrong type, a missing field."""
    doc = yaml.safe_load(yaml.safe_dump(server_deployment()))
    change(doc)
    with pytest.raises(SchemaError, match=re.escape(message)):
        validate(doc)


def test_kserve_runtime_refuses_an_unknown_spec_field() -> None:
    doc = yaml.safe_load(yaml.safe_dump(by_kind("ServingRuntime")[0]))
    doc["spec"]["protocolVersion"] = "v2"  # the InferenceService's field, not the runtime's
    with pytest.raises(SchemaError, match="protocolVersion"):
        validate(doc)


# --- what the deployment promises ------------------------------------------------------------


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [("ServingRuntime", doc["spec"]) for doc in by_kind("ServingRuntime")]
    specs += [(f"Deployment {d['metadata']['name']}", d["spec"]["template"]["spec"])
              for d in by_kind("Deployment")]
    return specs


def security(container: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    return {**(pod.get("securityContext") or {}), **(container.get("securityContext") or {})}


@pytest.mark.parametrize(("where", "pod"), pod_specs(), ids=[w for w, _ in pod_specs()])
def test_every_container_is_locked_down(where: str, pod: dict[str, Any]) -> None:
    for container in pod["containers"]:
        ctx = security(container, pod)
        assert ctx["runAsNonRoot"] is True, (where, container["name"])
        assert ctx["runAsUser"] != 0
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
        assert "privileged" not in ctx


def torchserve_containers() -> list[dict[str, Any]]:
    return [c for _, pod in pod_specs() for c in pod["containers"]
            if c.get("command") == ["torchserve"]]


def test_torchserve_starts_with_the_profiles_config_and_keeps_token_auth() -> None:
    containers = torchserve_containers()
    assert len(containers) == 2  # the KServe runtime and the plain Deployment
    for container in containers:
        args = container["args"]
        assert args[:3] == ["--start", "--foreground", "--ncs"]
        assert args[args.index("--ts-config") + 1] == str(KSERVE_CONFIG)
        assert args[args.index("--model-store") + 1] == str(KSERVE_STORE)
        assert not any(a.startswith(("--dt", "--disable-token", "--enable-model-api"))
                       for a in args)
        assert "ports" not in container  # only the gateway is reachable
        assert container["workingDir"] == "/home/model-server/run"  # key_file.json lands here


def test_only_the_gateway_has_a_port_and_the_service_targets_it() -> None:
    server_pods = [by_kind("ServingRuntime")[0]["spec"],
                   server_deployment()["spec"]["template"]["spec"]]
    for pod in server_pods:
        with_ports = [c for c in pod["containers"] if c.get("ports")]
        assert [c["name"] for c in with_ports] == ["gateway"]
        assert [p["containerPort"] for p in with_ports[0]["ports"]] == [GATEWAY_PORT]
        assert with_ports[0]["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    [service] = [s for s in by_kind("Service") if s["metadata"]["name"] == "secure-handler"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_the_model_store_is_mounted_read_only() -> None:
    pod = server_deployment()["spec"]["template"]["spec"]
    mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", [])
              if m["mountPath"] == "/mnt/models"]
    assert mounts
    assert all(m["readOnly"] is True for m in mounts)
    [volume] = [v for v in pod["volumes"] if v["name"] == "models"]
    assert volume["persistentVolumeClaim"]["readOnly"] is True


def test_the_gateway_config_matches_the_kserve_profile() -> None:
    [secret] = by_kind("Secret")
    config = GatewayConfig.model_validate(yaml.safe_load(secret["stringData"]["gateway.yaml"]))
    assert config.listen_port == GATEWAY_PORT
    assert config.upstream.inference_url == f"http://127.0.0.1:{KSERVE_PORTS.inference}"
    assert config.upstream.management_url == f"http://127.0.0.1:{KSERVE_PORTS.management}"
    assert str(config.upstream.key_file) == "/home/model-server/run/key_file.json"
    assert str(config.model_store) == str(KSERVE_STORE)
    assert config.rate_limit_backend == "redis"
    assert config.redis is not None
    assert config.redis.url.startswith("redis://secure-handler-redis:")
    [runtime] = by_kind("ServingRuntime")
    assert runtime["spec"]["volumes"][-1]["secret"]["secretName"] == secret["metadata"]["name"]


def test_the_inference_service_uses_the_runtime_and_the_storage_layout() -> None:
    [isvc] = by_kind("InferenceService")
    [runtime] = by_kind("ServingRuntime")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in
                                            runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"].startswith(("s3://", "gs://", "pvc://", "https://"))


def test_the_containerfile_runs_as_non_root_with_the_profiles_paths() -> None:
    text = (DEPLOY / "Containerfile").read_text("utf-8")
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    assert IMAGE_METRICS_CONFIG in text
    assert '"--ncs"' in text
    assert str(KSERVE_CONFIG) in text
