"""`SecureBaseHandler`: per-request isolation, typed errors, TorchScript-only loading.

A subclass says only what makes it different (see docs/ARCHITECTURE.md):

* `limits_model`: its pydantic limits;
* `read_payload(row, idx)`: the request's envelope → bytes or text (size, base64, JSON shape);
* `decode(payload, idx)`: payload → one item, raising a `RequestError` to refuse it;
* `assemble(items)`: the valid items → one model input;
* `format_outputs(outputs, items)`: the model output → one JSON-able result per item;
* optionally `setup()` (labels, buffers), `infer(batch)`, and `format_json(outputs, items)`:
  the same results written straight to JSON text, for the plain path.

`handle()` always returns exactly one entry per request. A refused request gets its own status
and `{"error": {"code", "message"}}` body; its neighbours are served. If inference fails, the
valid rows get 500 (507 when out of memory) and the worker stays alive.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import torch
from ts.torch_handler.base_handler import BaseHandler

from secure_handler.errors import (
    BatchError,
    BatchLimitExceeded,
    ConfigurationError,
    InferenceFailed,
    OutOfMemory,
    RequestError,
    SecureHandlerError,
)
from secure_handler.limits import BaseLimits, build_limits
from secure_handler.serving import loading, pin, protocol_batch
from secure_handler.serving.metrics import StageTimer, count_rejection, escape_warnings
from secure_handler.serving.outputs import NOT_JSON, JsonText, dumps

__all__ = ["SecureBaseHandler"]

logger = logging.getLogger(__name__)

JSON_TYPE = "application/json"


class SecureBaseHandler(BaseHandler, ABC):  # type: ignore[misc]
    """Base of every secure handler; subclass one of the concrete handlers instead."""

    limits_model: ClassVar[type[BaseLimits]] = BaseLimits

    def __init__(self) -> None:
        super().__init__()
        self.limits: Any = None
        self.model_name = ""
        self._pool: ThreadPoolExecutor | None = None

    # --- initialize ---------------------------------------------------------------------

    def initialize(self, context: Any) -> None:
        """Validate the config, verify and load the TorchScript model, run `setup()`."""
        self.context = context
        self.manifest = context.manifest
        self.model_name = str(getattr(context, "model_name", "") or "")
        properties = context.system_properties
        self.limits = build_limits(self.limits_model, self._handler_section(context),
                                   self._class_overrides())
        self._check_batch_size(properties.get("batch_size"))
        self.device = loading.choose_device(properties, self.limits.device)
        self.map_location = str(self.device)
        model_dir = Path(properties.get("model_dir") or ".")
        escape_warnings()  # a model's warning text must not forge TorchServe's log lines
        before = loading.snapshot_tree(model_dir)
        self.model = self._load_model(model_dir)
        # Defence in depth behind the TorchScript inspection: loading wrote nothing into the
        # worker's cwd and first import path, where a new file would run in the next worker.
        loading.check_tree_unchanged(model_dir, before)
        threads = int(getattr(self.limits, "decode_threads", 0))
        if threads > 0:
            # Pillow releases the GIL while decoding and resampling, so rows decode in parallel.
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="secure-decode")
        self.setup()
        if self.limits.warmup:
            self.warm_up()
        self.initialized = True
        logger.info("%s ready on %s with %s", self.model_name, self.device, self.limits)

    @staticmethod
    def _handler_section(context: Any) -> Mapping[str, Any] | None:
        config = getattr(context, "model_yaml_config", None) or {}
        if not isinstance(config, Mapping):
            raise ConfigurationError("model-config.yaml must be a mapping")
        section = config.get("handler")
        return section if section is not None else {}

    def _class_overrides(self) -> dict[str, Any]:
        """Limits set as class attributes of the user's subclass (e.g. `crop_size = 128`)."""
        fields = self.limits_model.model_fields
        return {name: getattr(type(self), name) for name in fields if hasattr(type(self), name)}

    def _check_batch_size(self, batch_size: Any) -> None:
        if batch_size is not None and int(batch_size) > self.limits.max_batch_size:
            raise ConfigurationError(
                f"TorchServe batch_size {batch_size} is larger than the handler's "
                f"max_batch_size {self.limits.max_batch_size}; lower batchSize in "
                "model-config.yaml (or config.properties `models=`) or raise max_batch_size"
            )

    def _load_model(self, model_dir: Path) -> torch.jit.ScriptModule:
        serialized = loading.check_manifest(self.manifest)
        path = model_dir / serialized
        if not path.is_file():
            raise ConfigurationError(f"serializedFile {serialized!r} is not in the archive")
        loading.check_torchscript_archive(path)
        if self.limits.model_sha256:
            loading.verify_sha256(path, self.limits.model_sha256, "handler.model_sha256")
        digests = loading.verify_embedded_digests(model_dir)
        # Identity is the name TorchServe registered; the archive's version is not consulted.
        pin.verify_trust_store(self.model_name, path, digests, self.limits.require_pin,
                               model_dir=model_dir)
        return loading.load_torchscript(path, self.device)

    # --- hooks -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Called once after the model is loaded (labels, buffers). Default: nothing."""

    def warm_up(self) -> None:
        """Run one batch of synthetic input through the model (optional, `warmup: true`)."""
        items = self.warmup_items()
        if items:
            self.infer(self.assemble(items))

    def warmup_items(self) -> list[Any]:
        """Items for `warm_up()`; subclasses that support warm-up override this."""
        return []

    @abstractmethod
    def read_payload(self, row: Mapping[str, Any], idx: int) -> Any:
        """Take one request's payload out of its envelope; raise a `RequestError` to refuse."""

    @abstractmethod
    def decode(self, payload: Any, idx: int) -> Any:
        """Check and decode one payload into an item; raise a `RequestError` to refuse it."""

    @abstractmethod
    def assemble(self, items: Sequence[Any]) -> Any:
        """Turn the valid items into one model input."""

    @abstractmethod
    def format_outputs(self, outputs: Any, items: Sequence[Any]) -> list[Any]:
        """Turn the model output into one JSON-able result per item."""

    def format_json(self, outputs: Any, items: Sequence[Any]) -> list[Any] | None:
        """`format_outputs`' results already written as JSON text (`outputs.JsonText`, or a
        `SecureHandlerError` for a row that has none), or None: use `format_outputs`.

        Only the plain `/predictions` path asks (a protocol answer reshapes the objects). A
        handler that overrides it must return None when a subclass overrides
        `format_outputs`, so the user's results are the ones sent (see `_formats_own`).
        """
        return None

    def _formats_own(self, owner: type) -> bool:
        """True while `format_outputs` is `owner`'s own: not a subclass's override, and not
        a function set on the instance."""
        return ("format_outputs" not in vars(self)
                and type(self).format_outputs is owner.format_outputs)  # type: ignore[attr-defined]

    def infer(self, batch: Any) -> Any:
        """Run the model under `torch.inference_mode()` on the handler's device."""
        with torch.inference_mode():
            return self.model(self.to_device(batch))

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host → device; from pinned memory and non-blocking on CUDA."""
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    # --- the request path ------------------------------------------------------------------

    def _is_describe(self) -> bool:
        # TorchServe copies every client header, so `describe: True` on /predictions would
        # turn the whole batch into a 503. Predictions never describe.
        return False

    def _is_explain(self) -> bool:
        return False

    def handle(self, data: list[Mapping[str, Any]], context: Any) -> list[Any]:
        """One entry per request, always; see the module docstring."""
        self.context = context
        protocol_rows = protocol_batch.plan(self, data)
        if protocol_rows is not None:  # KServe v1 / OIP v2 bodies: one row per instance
            return protocol_batch.handle(self, protocol_rows, context)
        timer = StageTimer(context)
        results: list[Any] = [None] * len(data)
        valid: dict[int, Any] = {}
        for idx, outcome in enumerate(self.decode_rows(data, timer)):
            if isinstance(outcome, SecureHandlerError):
                results[idx] = self._refuse(context, idx, outcome)
            else:
                valid[idx] = outcome
        timer.lap()
        if valid:
            bodies = self._run_batch(list(valid.values()), timer, as_json=True)
            for idx, body in zip(valid, bodies, strict=True):
                results[idx] = self._respond(context, idx, body)
        timer.emit()
        logger.info("batch rows=%d served=%d refused=%d", len(data), len(valid),
                    len(data) - len(valid))
        return results

    def decode_rows(self, data: list[Mapping[str, Any]],
                    timer: StageTimer | None = None) -> list[Any]:
        """Each row on its own (on the decode pool when configured): its item or its error.

        This is the per-request half of `handle()`; `assemble()` of the items is the rest of
        preprocessing (the benchmarks time exactly these two).
        """
        jobs = list(enumerate(data))
        if self._pool is None or len(jobs) < 2:
            decoded = [self._decode_row(idx, row) for idx, row in jobs]
        else:
            decoded = list(self._pool.map(lambda job: self._decode_row(*job), jobs))
        if timer is not None and decoded:  # summed per batch: a row pays no timer call
            timer.add("payload", sum(row[1] for row in decoded) * 1000.0)
            timer.add("decode", sum(row[2] for row in decoded) * 1000.0)
        return [row[0] for row in decoded]

    def _decode_row(self, idx: int, row: Mapping[str, Any]) -> tuple[Any, float, float]:
        """The row's item or error, and the seconds spent reading and decoding it."""
        start = time.perf_counter()
        read_at = None
        try:
            if idx >= self.limits.max_batch_size:
                raise BatchLimitExceeded("batch is over max_batch_size; retry the request")
            payload = self.read_payload(row, idx)
            read_at = time.perf_counter()
            outcome = self.decode(payload, idx)
        except RequestError as err:
            outcome = err
        except Exception as exc:  # a bug or library fault on this row only
            logger.exception("unexpected error reading request %d", idx)
            outcome = SecureHandlerError(
                f"internal error while reading the request ({type(exc).__name__})")
        end = time.perf_counter()
        if read_at is None:
            return outcome, end - start, 0.0
        return outcome, read_at - start, end - read_at

    def _run_batch(self, items: list[Any], timer: StageTimer,
                   as_json: bool = False) -> list[Any]:
        """The items' results (`as_json`: as JSON text where the handler writes it), or each
        item's share of the batch's failure."""
        try:
            batch = self.assemble(items)
            timer.mark("assemble")
            outputs = self.infer(batch)
            timer.mark("inference")
            bodies = self.format_json(outputs, items) if as_json else None
            if bodies is None:
                bodies = self.format_outputs(outputs, items)
            timer.mark("postprocess")
        except Exception as exc:
            failure = _batch_failure(exc)
            logger.error("batch of %d failed: %s: %s", len(items), type(exc).__name__, exc)
            return [failure] * len(items)
        if len(bodies) != len(items):
            return [InferenceFailed("model returned the wrong number of results")] * len(items)
        return bodies

    def _respond(self, context: Any, idx: int, body: Any) -> str:
        if isinstance(body, SecureHandlerError):
            return self._refuse(context, idx, body)
        try:
            text = str.__str__(body) if isinstance(body, JsonText) else dumps(body)
        except (TypeError, ValueError) as exc:  # NaN/inf scores or a non-JSON type: this row only
            logger.error("result %d is not JSON: %s", idx, exc)
            return self._refuse(context, idx, InferenceFailed(NOT_JSON))
        context.set_response_status(200, "OK", idx)
        context.set_response_content_type(idx, JSON_TYPE)
        return text

    def _refuse(self, context: Any, idx: int, err: SecureHandlerError) -> str:
        context.set_response_status(err.status, err.phrase, idx)
        context.set_response_content_type(idx, JSON_TYPE)
        count_rejection(context, err.code)
        # Never log the body or headers: they carry user data and the bearer token.
        logger.info("request %d refused: %s %s", idx, err.status, err.code)
        return err.to_json()


def _batch_failure(exc: BaseException) -> BatchError:
    if isinstance(exc, BatchError):
        return exc
    if isinstance(exc, MemoryError) or _is_oom(exc):
        return OutOfMemory("the model ran out of memory on this batch; retry with less load")
    return InferenceFailed(f"inference failed for this batch ({type(exc).__name__})")


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    # TorchScript wraps errors raised inside the module; the allocator's message survives.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
