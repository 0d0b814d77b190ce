"""A batch holding KServe v1 / OIP v2 requests: each instance checked as a request is.

`SecureBaseHandler.handle()` hands a batch here when any request in it is a v1/v2 body (or
when `handler.protocols` turns plain bodies off). Every instance then becomes one row of the
batch, read and checked by the handler's own `decode_rows()` exactly as a `/predictions` body
would be (each instance sees its request's headers), so the statuses and codes are the same.
Instances count against `max_batch_size` (each takes a batch slot); a request whose instances
do not fit is refused with 503 `batch_limit_exceeded` (retryable). One bad instance refuses
its own request, in its protocol's error shape; the other requests of the batch are served.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from secure_handler.errors import (
    BatchLimitExceeded,
    InferenceFailed,
    MalformedRequest,
    RequestError,
    SecureHandlerError,
)
from secure_handler.serving import envelope, protocols
from secure_handler.serving.metrics import StageTimer, count_rejection

__all__ = ["Handler", "Row", "handle", "plan"]

logger = logging.getLogger(__name__)

JSON_TYPE = "application/json"
# Room for the JSON envelope around base64 instances (same slack as the frontend's).
_ENVELOPE_SLACK = 64 * 1024


class Handler(Protocol):
    """What this module uses of `SecureBaseHandler` (whose `handle()` calls it)."""

    limits: Any
    context: Any
    model_name: str
    manifest: Any

    def decode_rows(self, data: list[Mapping[str, Any]],
                    timer: StageTimer | None = None) -> list[Any]: ...

    def _run_batch(self, items: list[Any], timer: StageTimer) -> list[Any]: ...

    def _respond(self, context: Any, idx: int, body: Any) -> str: ...

    def _refuse(self, context: Any, idx: int, err: SecureHandlerError) -> str: ...


@dataclass(slots=True)
class Row:
    """One request of the batch: a plain body, or a protocol request, or its refusal."""

    idx: int
    row: Mapping[str, Any]
    protocol: bool = False  # read as v1/v2: answers (and refusals) in the protocol's shape
    request: protocols.ProtocolRequest | None = None
    error: SecureHandlerError | None = None
    slots: list[int] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)


def plan(handler: Handler, data: list[Mapping[str, Any]]) -> list[Row] | None:
    """The batch's rows when it needs the protocol path, else None (the plain path serves it).

    Cheap for plain traffic: a parsed JSON body is looked up by key, raw bytes only when
    they start with `{` (image bytes and base64 never do).
    """
    plain_allowed = "torchserve" in handler.limits.protocols
    if plain_allowed and not any(map(_may_be_protocol, data)):
        return None  # the common case, told apart without reading any row further
    rows = [_looked_at(handler, idx, row) for idx, row in enumerate(data)]
    if plain_allowed and not any(r.protocol for r in rows):
        return None
    return rows


def _may_be_protocol(row: Any) -> bool:
    """False when `row` is certainly a plain request; a row that cannot be looked at (a
    fault in an odd mapping) goes to `_looked_at`, which deals with it without raising."""
    try:
        return isinstance(row, Mapping) and protocols.may_be_protocol_body(
            row.get("body", row.get("data")))
    except Exception:
        return True


def _looked_at(handler: Handler, idx: int, row: Any) -> Row:
    """`_read_row`, never raising: a row this cannot read (not a mapping, a fault) is left to
    the plain path, whose per-row checks refuse it alone; an exception here would fail the
    whole batch."""
    if not isinstance(row, Mapping):
        return Row(idx, row)
    try:
        return _read_row(handler, idx, row)
    except Exception:  # a bug or library fault on this row only
        logger.exception("could not read request %d as a protocol body", idx)
        return Row(idx, row)


def _read_row(handler: Handler, idx: int, row: Mapping[str, Any]) -> Row:
    limits = handler.limits
    headers = handler.context.get_all_request_header(idx)
    value = row.get("body", row.get("data"))
    max_body = envelope.b64_limit(limits.max_request_bytes) + _ENVELOPE_SLACK
    try:
        obj = protocols.find_protocol_body(value, headers, max_body)
    except RequestError as err:
        return Row(idx, row, protocol=True, error=err)
    if obj is None:
        return Row(idx, row)
    try:
        if "data" in row and "body" in row:
            raise MalformedRequest("the payload was sent twice (as the body and as a `data` "
                                   "field or query parameter); send it once")
        max_instances = min(limits.max_instances_per_request, limits.max_batch_size)
        request = protocols.parse(obj, limits.protocols, max_instances, handler.model_name)
    except RequestError as err:
        return Row(idx, row, protocol=True, error=err)
    return Row(idx, row, protocol=True, request=request)


def handle(handler: Handler, rows: list[Row], context: Any) -> list[Any]:
    """One answer per request, each in the protocol it came in (see the module docstring)."""
    timer = StageTimer(context)
    _give_slots(handler, rows)
    jobs = [(r, slot, value) for r in rows for slot, value in zip(r.slots, _values(r),
                                                                     strict=True)]
    outcomes = _decode(handler, jobs, context, timer) if jobs else []
    for (row, _, _), outcome in zip(jobs, outcomes, strict=True):
        if row.error is not None:
            continue
        if isinstance(outcome, SecureHandlerError):
            row.error = _for_instance(row, len(row.items), outcome)
        else:
            row.items.append(outcome)
    timer.lap()
    served = [r for r in rows if r.error is None]
    items = [item for r in served for item in r.items]
    bodies = handler._run_batch(items, timer) if items else []
    results: list[Any] = [None] * len(rows)
    start = 0
    for row in served:
        results[row.idx] = _answer(handler, context, row, bodies[start:start + len(row.items)])
        start += len(row.items)
    for row in rows:
        if row.error is not None:
            results[row.idx] = _refuse(handler, context, row, row.error)
    timer.emit()
    logger.info("protocol batch rows=%d items=%d refused=%d", len(rows), len(items),
                len(rows) - len(served))
    return results


def _values(row: Row) -> list[Any]:
    if row.error is not None:
        return []
    if row.request is None:
        return [None]  # a plain body: read from the row itself
    return list(row.request.instances)


def _give_slots(handler: Handler, rows: list[Row]) -> None:
    """Each instance (and each plain request) takes one batch slot, in request order."""
    limits = handler.limits
    free = limits.max_batch_size
    used = 0
    for row in rows:
        if row.error is not None:
            continue
        if row.request is None and "torchserve" not in limits.protocols:
            row.error = MalformedRequest(
                "plain /predictions bodies are off for this model; handler.protocols allows: "
                + ", ".join(limits.protocols))
            continue
        need = 1 if row.request is None else len(row.request.instances)
        if used + need > free:
            row.error = BatchLimitExceeded(
                f"the batch has no room for {need} more instance(s) (max_batch_size "
                f"{free}); retry the request")
            continue
        row.slots = list(range(used, used + need))
        used += need


def _decode(handler: Handler, jobs: list[tuple[Row, int, Any]], context: Any,
            timer: StageTimer) -> list[Any]:
    """The handler's own `decode_rows()` over one row per slot (an instance, or a plain
    body), so every check and batch step a request gets, an instance gets too."""
    rows: list[Mapping[str, Any]] = []
    headers: list[Mapping[str, Any]] = []
    for row, _, value in jobs:
        if row.request is None:
            rows.append(row.row)
            headers.append(context.get_all_request_header(row.idx))
        else:
            rows.append({"body": value})
            headers.append(_instance_headers(value))
    handler.context = _SlotContext(context, headers)
    try:
        return list(handler.decode_rows(rows, timer))
    finally:
        handler.context = context


def _instance_headers(value: Any) -> dict[str, Any]:
    """The headers of the /predictions request TorchServe would hand over with `value` as its
    body: an object comes from `application/json`, a string from `text/plain`. Nothing of
    the protocol request's own headers (its token, its JSON type) applies to one instance."""
    declared = "application/json" if isinstance(value, dict) else "text/plain"
    return {"body": {"content-type": declared}}


class _SlotContext:
    """The worker's context seen slot by slot: slot i has the headers `headers[i]`."""

    def __init__(self, context: Any, headers: list[Mapping[str, Any]]) -> None:
        self._context = context
        self._headers = headers

    def get_all_request_header(self, idx: int) -> Mapping[str, Any]:
        return self._headers[idx]

    def get_request_header(self, idx: int, key: str) -> Any:
        return self._headers[idx].get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _for_instance(row: Row, position: int, err: SecureHandlerError) -> SecureHandlerError:
    """The instance's own error (same class, so same status and code), naming the instance."""
    if row.request is None:
        return err
    try:
        return type(err)(f"instance {position}: {err.message}")
    except TypeError:  # a subclass with another constructor: keep its own message
        return err


def _answer(handler: Handler, context: Any, row: Row, bodies: list[Any]) -> Any:
    if row.request is None:
        return handler._respond(context, row.idx, bodies[0])
    failed = next((b for b in bodies if isinstance(b, SecureHandlerError)), None)
    if failed is not None:
        return _refuse(handler, context, row, failed)
    try:
        answer = protocols.response(row.request, [_parsed(b) for b in bodies],
                                    handler.model_name, _model_version(handler))
    except RequestError as err:
        return _refuse(handler, context, row, err)
    except Exception as exc:  # a result that does not fit the protocol: this request only
        logger.exception("cannot answer request %d in %s", row.idx, row.request.protocol)
        return _refuse(handler, context, row, InferenceFailed(
            f"the model's output cannot be answered in {row.request.protocol} "
            f"({type(exc).__name__})"))
    return handler._respond(context, row.idx, answer)


def _refuse(handler: Handler, context: Any, row: Row,
            err: SecureHandlerError) -> str:
    if not row.protocol:
        return handler._refuse(context, row.idx, err)
    context.set_response_status(err.status, err.phrase, row.idx)
    context.set_response_content_type(row.idx, JSON_TYPE)
    count_rejection(context, err.code)
    # Never log the body or headers: they carry user data and the bearer token.
    logger.info("request %d refused: %s %s", row.idx, err.status, err.code)
    return protocols.error_json(err)


def _parsed(body: Any) -> Any:
    """A result the handler already rendered to JSON text (`outputs.JsonText`), as the object
    it encodes: a protocol answer re-shapes it."""
    if isinstance(body, str):
        try:
            return json.loads(body)
        except ValueError:
            return body  # a plain string result stays one
    return body


def _model_version(handler: Handler) -> str | None:
    model = (getattr(handler, "manifest", None) or {}).get("model") or {}
    version = model.get("modelVersion")
    return str(version) if version is not None else None
