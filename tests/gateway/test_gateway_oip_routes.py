"""The KServe v1 / OIP v2 routes are wired into the gateway (oip.py) and pass the same gate:
a real gateway in front of the session's real TorchServe. The protocol clients' own tests
(tritonclient, KServe SDK) are in tests/integration/test_protocols_gateway.py."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from gateway_support import KeySet, MakeConfig, Upstream, serve_gateway

pytestmark = pytest.mark.integration


KEYS: dict[str, str] = {}


@pytest.fixture
def url(make_config: MakeConfig, torchserve: Upstream) -> Iterator[str]:
    keys = KeySet()
    KEYS["infer"] = keys.add("infer", ["inference"], ["tiny"])
    with serve_gateway(make_config(keys)) as base:
        yield base


def test_v2_health_answers_without_a_key(url: str) -> None:
    live = httpx.get(url + "/v2/health/live")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert live.headers["x-request-id"]


def test_v2_infer_refusals_are_in_the_protocol_shape(url: str) -> None:
    refused = httpx.post(url + "/v2/models/tiny/infer", json={"inputs": []})
    assert refused.status_code == 401
    assert refused.json() == {"error": "[unauthorized] a valid API key is required",
                              "code": "unauthorized"}
    assert refused.headers["www-authenticate"] == "Bearer"
    assert refused.headers["x-request-id"]


def test_a_flood_of_tiny_json_items_is_413_before_the_gateway_parses_it(url: str) -> None:
    # 3 MB of `{}` is under the byte limit but a million dicts to parse, holding the event
    # loop: counted first (as in the worker), refused in the protocol's shape.
    body = b'{"instances": [' + b",".join([b"{}"] * 1_000_000) + b"]}"
    refused = httpx.post(url + "/v1/models/tiny:predict", content=body, timeout=30,
                         headers={"Authorization": f"Bearer {KEYS['infer']}",
                                  "Content-Type": "application/json"})
    assert refused.status_code == 413
    assert refused.json()["code"] == "payload_too_large"


def test_json_that_is_not_utf8_is_400_at_the_gateway(url: str) -> None:
    # json.loads(bytes) would guess UTF-16; the worker reads only UTF-8.
    body = '{"instances": ["x"]}'.encode("utf-16-le")
    refused = httpx.post(url + "/v1/models/tiny:predict", content=body,
                         headers={"Authorization": f"Bearer {KEYS['infer']}"})
    assert (refused.status_code, refused.json()["code"]) == (400, "malformed_request")
