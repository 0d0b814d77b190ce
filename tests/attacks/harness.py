"""The attack suite's harness: the real handler on TorchServe's real `Context`.

`Target.send(*requests)` runs one batch through a secure handler's `handle` exactly as a
worker would and returns `[(status, parsed body)]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from secure_handler import SecureBaseHandler
from secure_handler.testing import Request, run_batch

MANIFEST = {"model": {"modelName": "tiny", "serializedFile": "model.pt",
                      "handler": "handler.py", "modelVersion": "1.0"}}


@dataclass
class Target:
    """One initialised handler and the real `Context` it was initialised with."""

    handler: SecureBaseHandler
    context: Any

    def send(self, *requests: Request) -> list[tuple[int, Any]]:
        return run_batch(self.handler, self.context, requests)

    def one(self, raw: bytes, content_type: str = "application/octet-stream",
            **kw: Any) -> tuple[int, Any]:
        """Send `raw` alone, decoded as the worker decodes that content type."""
        return self.send(Request.as_worker(raw, content_type, **kw))[0]


#: The `classifier` fixture: `classifier(batch_size=8, **handler_config) -> Target`.
Build = Callable[..., Target]


def assert_refused(result: tuple[int, Any], status: int, code: str) -> None:
    """The exact status, the exact stable code, and the one error body shape."""
    got_status, body = result
    assert (got_status, _code(body)) == (status, code), body
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]


def assert_class(result: tuple[int, Any], label: str) -> None:
    """Served with 200, and the top prediction is `label`."""
    status, body = result
    assert status == 200, body
    assert body["predictions"][0]["label"] == label, body


def _code(body: Any) -> Any:
    return body.get("error", {}).get("code") if isinstance(body, dict) else body
