"""The KServe v1 / OIP v2 routes are wired into the gateway (oip.py) and pass the same gate:
a real gateway in front of the session's real TorchServe. The protocol clients' own tests
(tritonclient, KServe SDK) are in tests/integration/test_protocols_gateway.py."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from gateway_support import KeySet, MakeConfig, Upstream, serve_gateway

pytestmark = pytest.mark.integration


@pytest.fixture
def url(make_config: MakeConfig, torchserve: Upstream) -> Iterator[str]:
    keys = KeySet()
    keys.add("infer", ["inference"], ["tiny"])
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
