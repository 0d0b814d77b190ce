"""Findings of the third gateway review, each built and refused without a server.

CWE-404 (a WebSocket upgrade took the socket past the connection guard: its slot was never
released), CWE-400 (key-less health checks each called TorchServe; integers of thousands of
digits held the event loop), CWE-703 (a 5,000-digit query value was a 500), CWE-778 (OPTIONS,
HEAD, TRACE on management paths were answered 405 without an audit line).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from secure_handler.errors import MalformedRequest
from secure_handler.gateway.app import Gateway
from secure_handler.gateway.config import GatewayConfig, KeyEntry
from secure_handler.gateway.connections import server_config
from secure_handler.gateway.errors import GatewayError
from secure_handler.gateway.keys import generate_key, hash_key
from secure_handler.gateway.manage import management_routes
from secure_handler.gateway.management import scale_params
from secure_handler.gateway.oip import _check_envelope
from secure_handler.gateway.upstream import OneFlight


def _config(tmp_path: Path) -> GatewayConfig:
    key = KeyEntry.model_validate({"name": "a", "sha256": hash_key(generate_key()),
                                   "scopes": ["management"], "models": ["tiny"],
                                   "rate": {"per_second": 1, "burst": 1}})
    return GatewayConfig.model_validate({
        "upstream": {"inference_url": "http://127.0.0.1:9", "management_url": "http://127.0.0.1:9"},
        "model_store": str(tmp_path), "audit_log": str(tmp_path / "audit.jsonl"),
        "models": {"tiny": {"content_types": ["image/jpeg"]}},
        "keys": [key.model_dump(mode="json")],
    })


def test_websocket_upgrades_are_off(tmp_path: Path) -> None:
    # With `websockets` importable (the kserve extra installs it) uvicorn's default "auto"
    # handed an `Upgrade: websocket` request to its WebSocket protocol.
    assert server_config(object(), _config(tmp_path)).ws == "none"


def test_a_health_answer_is_asked_once_however_many_wait() -> None:
    asked = 0

    async def ask() -> bool:
        nonlocal asked
        asked += 1
        await asyncio.sleep(0.05)
        return True

    async def scenario() -> list[bool]:
        flight = OneFlight(60.0, ask)
        waiting = [asyncio.ensure_future(flight.get()) for _ in range(30)]
        await asyncio.sleep(0)
        waiting[0].cancel()  # a client that goes away cancels nothing for the others
        answers = await asyncio.gather(*waiting[1:])
        answers.append(await flight.get())  # cached now
        return answers

    assert asyncio.run(scenario()) == [True] * 30
    assert asked == 1


@pytest.mark.parametrize("number", [b"7" * 5000, b"-" + b"7" * 65, b"1" * 100])
def test_a_huge_integer_in_a_protocol_body_is_400_at_the_gateway(number: bytes) -> None:
    body = b'{"instances": [' + b",".join([number] * 3) + b"]}"
    with pytest.raises(MalformedRequest, match="digits are read"):
        _check_envelope(body, "instances")


def test_ordinary_numbers_pass_the_gateway() -> None:
    _check_envelope(json.dumps({"instances": [1, -2, 3.5, 10**60]}).encode(), "instances")


def test_a_5000_digit_query_value_is_400_not_500() -> None:
    with pytest.raises(GatewayError):
        scale_params([("min_worker", "0" * 5000 + "1")], 4)


def test_every_other_method_on_management_paths_is_refused_and_audited(tmp_path: Path) -> None:
    routes = management_routes(Gateway(_config(tmp_path)))
    for route in routes:
        for method in ("OPTIONS", "HEAD", "TRACE", "CONNECT", "PATCH", "DELETE"):
            assert route.methods[method][0] == "management.refused", (route, method)
