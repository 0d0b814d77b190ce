"""The gateway's KServe v1 / OIP v2 routes, driven by NVIDIA's tritonclient and KServe's SDK.

The same keys, scopes, model allowlist, byte limit, rate limit and audit log as /predictions;
every refusal is in the protocols' error shape (`{"error": "[code] message", "code"}`), so each
client raises its own exception with the right status. A real TorchServe (tiny classifier and
tiny text model) behind a real `secure-handler gateway` process.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

tritonhttp = pytest.importorskip("tritonclient.http", reason="needs the kserve test extra")
kserve = pytest.importorskip("kserve", reason="needs the kserve test extra")
import httpx  # noqa: E402
from scale_support import gateway_process  # noqa: E402
from support import (  # noqa: E402  # noqa: E402
    archive_mar,
    classifier_mar,
    image_bytes,
    post,
    running_server,
    write_image_handler,
)
from support_models import build_text_model, write_text_files  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from secure_handler.deploy.tsconfig import ModelSpec  # noqa: E402
from secure_handler.gateway.keys import generate_key, hash_key  # noqa: E402

GENEROUS = {"per_second": 1000, "burst": 1000}
KEYS: dict[str, tuple[list[str], list[str], dict[str, float]]] = {
    "full": (["inference"], ["tiny", "text"], GENEROUS),
    "textonly": (["inference"], ["text"], GENEROUS),
    "ops": (["management"], ["tiny"], GENEROUS),
    "stingy": (["inference"], ["tiny"], {"per_second": 0.001, "burst": 2}),
}
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("protocols-gateway")
    store = tmp / "store"
    classifier_mar(tmp, store, "tiny")
    src = tmp / "text-src"
    archive_mar(store, "text", build_text_model(src),
                write_image_handler(src, base="SecureTextClassifier"), write_text_files(src),
                {"handler": {"max_batch_size": 8}})
    specs = [ModelSpec("tiny", "tiny.mar", batch_size=4, max_batch_delay_ms=50),
             ModelSpec("text", "text.mar", batch_size=4, max_batch_delay_ms=50)]
    keys = {name: generate_key() for name in KEYS}
    with running_server(tmp / "ts", store, specs) as info:
        config = {
            "upstream": {"inference_url": info.inference_url,
                         "management_url": info.management_url,
                         "key_file": str(tmp / "ts" / "key_file.json")},
            "model_store": str(store),
            "models": {"tiny": {"content_types": ["image/png"], "max_body_bytes": BODY_LIMIT},
                       "text": {"content_types": ["text/plain"]}},
            "keys": [{"name": name, "sha256": hash_key(keys[name]), "scopes": scopes,
                      "models": models, "rate": rate}
                     for name, (scopes, models, rate) in KEYS.items()],
            "audit_log": str(tmp / "audit.jsonl"),
        }
        path = tmp / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        with gateway_process(path, tmp / "gateway.log") as (_, url):
            yield {"url": url, "keys": keys, "audit": tmp / "audit.jsonl", "info": info}


def bearer(stack: dict[str, Any], name: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack['keys'][name]}"} if name else {}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def triton(stack: dict[str, Any]) -> Any:
    return tritonhttp.InferenceServerClient(stack["url"].removeprefix("http://"))


def inputs(values: list[str]) -> list[Any]:
    tensor = tritonhttp.InferInput("input-0", [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=False)
    return [tensor]


def label(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_tritonclient_through_the_gateway(stack: dict[str, Any]) -> None:
    client = triton(stack)
    result = client.infer("tiny", inputs([b64(image_bytes(c, fmt="PNG"))
                                          for c in ("red", "green", "blue")]),
                          headers=bearer(stack, "full"))
    client.close()
    assert [label(row[0]) for row in result.as_numpy("label")] == ["red", "green", "blue"]


@pytest.mark.parametrize(("key", "model", "status", "code"), [
    (None, "tiny", "401", "unauthorized"),
    ("textonly", "tiny", "403", "forbidden"),  # not this key's model
    ("ops", "tiny", "403", "forbidden"),  # no inference scope
    ("full", "spare", "403", "forbidden"),  # not a model of the gateway
])
def test_gateway_refusals_are_tritonclients_exceptions(stack: dict[str, Any], key: str | None,
                                                       model: str, status: str,
                                                       code: str) -> None:
    client = triton(stack)
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs([b64(image_bytes("red", fmt="PNG"))]),
                     headers=bearer(stack, key))
    client.close()
    assert info.value.status() == status
    assert f"[{code}]" in info.value.message()


def test_handler_refusals_pass_through_in_the_protocol_shape(stack: dict[str, Any]) -> None:
    client = triton(stack)
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny", inputs([b64(image_bytes("red", fmt="PNG")[:100])]),
                     headers=bearer(stack, "full"))
    client.close()
    assert info.value.status() == "422"
    assert "[invalid_image] instance 0: " in info.value.message()


def v2_body(values: list[str]) -> bytes:
    return json.dumps({"inputs": [{"name": "input-0", "shape": [len(values)],
                                   "datatype": "BYTES", "data": values}]}).encode()


@pytest.mark.parametrize(("path", "body", "content_type", "status", "code"), [
    ("/v2/models/tiny/infer", b"x" * (BODY_LIMIT + 1), "application/json", 413,
     "payload_too_large"),
    ("/v2/models/tiny/infer", v2_body(["aGk="]), "text/plain", 415, "unsupported_media_type"),
    ("/v2/models/tiny/infer", json.dumps({"data": "aGk="}).encode(), "application/json", 400,
     "malformed_request"),  # a plain body cannot ride a protocol route
    ("/v1/models/tiny:predict", v2_body(["aGk="]), "application/json", 400,
     "malformed_request"),  # nor a v2 body the v1 route
    ("/v2/models/tiny/infer?data=x", v2_body(["aGk="]), "application/json", 400,
     "malformed_request"),
])
def test_envelope_refusals_at_the_gateway(stack: dict[str, Any], path: str, body: bytes,
                                          content_type: str, status: int, code: str) -> None:
    got, answer = post(stack["url"] + path, body, content_type, stack["keys"]["full"])
    assert (got, answer["code"]) == (status, code)
    assert answer["error"].startswith(f"[{code}] ")


def test_one_rate_limit_for_predictions_v1_and_v2(stack: dict[str, Any]) -> None:
    image = image_bytes("red", fmt="PNG")
    status, _ = post(stack["url"] + "/predictions/tiny", image, "image/png",
                     stack["keys"]["stingy"])
    assert status == 200
    status, _ = post(stack["url"] + "/v2/models/tiny/infer", v2_body([b64(image)]),
                     "application/json", stack["keys"]["stingy"])
    assert status == 200
    client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v1"))

    async def third() -> Any:
        try:
            return await client.infer(stack["url"], {"instances": [b64(image)]}, "tiny",
                                      headers=bearer(stack, "stingy"))
        finally:
            await client.close()

    with pytest.raises(httpx.HTTPStatusError) as info:
        asyncio.run(third())
    assert info.value.response.status_code == 429
    assert info.value.response.json()["code"] == "rate_limited"
    assert int(info.value.response.headers["Retry-After"]) >= 1


def test_health_readiness_and_metadata(stack: dict[str, Any]) -> None:
    client = triton(stack)
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    assert client.is_model_ready("tiny", headers=bearer(stack, "full")) is True
    assert client.is_model_ready("tiny") is False  # no key: 401, not ready to this caller
    metadata = client.get_model_metadata("tiny", headers=bearer(stack, "full"))
    assert (metadata["name"], metadata["versions"]) == ("tiny", ["1.0"])
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("tiny", headers=bearer(stack, "textonly"))
    client.close()
    assert info.value.status() == "403"
    rest = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2"))

    async def kserve_checks() -> tuple[bool, bool, bool]:
        try:
            return (await rest.is_server_live(stack["url"]),
                    await rest.is_server_ready(stack["url"]),
                    await rest.is_model_ready(stack["url"], "text",
                                              headers=bearer(stack, "full")))
        finally:
            await rest.close()

    assert asyncio.run(kserve_checks()) == (True, True, True)


def test_protocol_denials_are_audited(stack: dict[str, Any]) -> None:
    client = triton(stack)
    with pytest.raises(InferenceServerException):
        client.infer("tiny", inputs(["aGk="]), headers=bearer(stack, "textonly"))
    client.close()
    lines = [json.loads(line) for line in Path(stack["audit"]).read_text().splitlines()]
    denied = [r for r in lines if r["action"] == "inference.oip_v2" and r["key"] == "textonly"]
    assert denied
    assert denied[-1]["outcome"] == "denied"
    assert denied[-1]["code"] == "forbidden"
