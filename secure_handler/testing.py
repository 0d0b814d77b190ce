"""Drive a handler in-process with TorchServe's own `Context` and `RequestProcessor`.

Nothing here is a fake: these are the objects the worker builds (`ts/service.py`), filled the
way the worker fills them, so a test sees what a real batch looks like.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ts
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

__all__ = ["Request", "make_context", "run_batch"]


@dataclass
class Request:
    """One HTTP request as the worker hands it over.

    `body` is what TorchServe delivers for the content type: a `bytearray` for binary types,
    a `str` for `text/*`, parsed JSON for `application/json`. Use `as_worker()` to get that.
    """

    body: Any
    content_type: str = "application/octet-stream"
    headers: Mapping[str, Any] | None = None
    params: Mapping[str, Any] | None = None  # query parameters or form fields

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = dict(self.params or {})
        if self.body is not None:
            row["body"] = self.body
        return row

    def header_map(self) -> dict[str, Any]:
        hdrs: dict[str, Any] = {"body": {"content-type": self.content_type}}
        for name in self.params or {}:
            hdrs[name] = {"content-type": None}
        hdrs.update(self.headers or {})
        return hdrs

    @classmethod
    def as_worker(cls, raw: bytes, content_type: str, **kw: Any) -> Request:
        """Decode `raw` as the worker does (`otf_message_handler._retrieve_input_data`)."""
        value: Any = bytearray(raw)
        if content_type == "application/json":
            try:
                value = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError):
                value = bytearray(raw)
        elif content_type.startswith("text"):
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                value = bytearray(raw)
        return cls(value, content_type, **kw)


def make_context(
    model_dir: str | os.PathLike[str],
    manifest: Mapping[str, Any] | None = None,
    model_yaml_config: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    gpu: int | None = None,
    model_name: str = "model",
) -> Context:
    """A real `ts.context.Context` with the worker's metrics cache."""
    if manifest is None:
        manifest_path = Path(model_dir, "MAR-INF", "MANIFEST.json")
        manifest = json.loads(manifest_path.read_text("utf-8"))
    metrics_yaml = Path(ts.__file__).parent / "configs" / "metrics.yaml"
    metrics = MetricsCacheYamlImpl(config_file_path=str(metrics_yaml))
    metrics.initialize_cache()
    ctx = Context(
        model_name, str(model_dir), dict(manifest), batch_size, gpu, "0.12.0",
        limit_max_image_pixels=True, metrics=metrics,
        model_yaml_config=dict(model_yaml_config or {}),
    )
    return ctx


def run_batch(handler: Any, ctx: Context, requests: Sequence[Request]) -> list[tuple[int, Any]]:
    """Send one batch through `handler.handle` and return `(status, parsed body)` per request."""
    ctx.request_processor = [RequestProcessor(r.header_map()) for r in requests]
    ctx.request_ids = {i: f"req-{i}" for i in range(len(requests))}
    ctx.metrics.set_request_ids(",".join(ctx.request_ids.values()))
    out = handler.handle([r.row() for r in requests], ctx)
    if not isinstance(out, list) or len(out) != len(requests):
        raise AssertionError(f"handler returned {type(out).__name__} of wrong length")
    results = []
    for i, body in enumerate(out):
        status = ctx.get_response_status(i)[0]
        results.append((status, json.loads(body) if isinstance(body, (str, bytes)) else body))
    return results
