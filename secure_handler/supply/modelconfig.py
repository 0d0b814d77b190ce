"""The archive's `model-config.yaml`: read with a bounded reader, then checked by allowlist.

TorchServe's frontend reads the top-level keys of this file (`ModelConfig.java`) to decide how
to launch the model's workers, and the worker hands the whole file to the handler. An archive
can therefore ask for a torchrun launch with a rendezvous endpoint on another host (torch's
rendezvous store unpickles what it receives), other devices, a per-model virtualenv, or a
worker protocol these handlers do not speak. Only the ordinary worker and batching keys, within
bounds, and a `handler:` section that one of the handler limits models accepts may appear;
every other key is flagged (SH414) with the fix. The YAML itself must be small, a plain
mapping, without anchors, aliases, explicit tags or duplicate keys (SH411): readers disagree on
those, and aliases let a few bytes expand into a large tree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from secure_handler.errors import ConfigurationError
from secure_handler.limits import (
    ImageClassifierLimits,
    ObjectDetectorLimits,
    TextClassifierLimits,
    build_limits,
)

__all__ = ["MAX_CONFIG_BYTES", "WorkerSettings", "check_model_config", "read_model_config"]

#: model-config.yaml files are a few hundred bytes; anything near this is not one.
MAX_CONFIG_BYTES = 64 * 1024
_MAX_EVENTS = 5000
_MAX_DEPTH = 8
_ASCII_WHITESPACE = frozenset(b"\t\n\r")

_HANDLER_KINDS = (ImageClassifierLimits, TextClassifierLimits, ObjectDetectorLimits)

_FIX = "remove it from model-config.yaml; the operator sets launch options in config.properties"
_PLAIN = "write model-config.yaml as one small UTF-8 mapping of plain keys and values"
_BOUNDS = "set a value within the bounds, or leave the key out"

#: Why the keys TorchServe knows, but that are not allowed here, are refused.
_LAUNCH_KEYS = {
    "parallelType": "makes TorchServe launch the worker with torchrun (distributed inference)",
    "parallelLevel": "makes TorchServe launch several cooperating worker processes",
    "torchrun": "sets torchrun options, e.g. a rendezvous endpoint on another host (torch's "
                "rendezvous store unpickles what it receives)",
    "deviceType": "chooses the devices the worker runs on",
    "deviceIds": "chooses the devices the worker runs on",
    "useVenv": "makes TorchServe create a per-model virtualenv (and pip-install into it)",
    "continuousBatching": "switches the worker to a protocol these handlers do not implement",
    "sequenceBatching": "switches the worker to a protocol these handlers do not implement",
    "asyncCommunication": "switches the worker to a protocol these handlers do not implement",
    "sequenceMaxIdleMSec": "a sequence-batching setting these handlers do not implement",
    "sequenceTimeoutMSec": "a sequence-batching setting these handlers do not implement",
    "maxSequenceJobQueueSize": "a sequence-batching setting these handlers do not implement",
    "maxNumSequence": "a sequence-batching setting these handlers do not implement",
}  # fmt: skip


class WorkerSettings(BaseModel):
    """The top-level keys allowed in an archive's model-config.yaml, with their bounds.

    Strict types: TorchServe's Java reader ignores a value that is not an integer or boolean,
    so a string that Python would coerce must not pass here either.
    """

    model_config = ConfigDict(extra="forbid")

    minWorkers: StrictInt = Field(1, ge=0, le=64)
    maxWorkers: StrictInt = Field(1, ge=0, le=64)
    batchSize: StrictInt = Field(1, ge=1, le=4096)
    maxBatchDelay: StrictInt = Field(100, ge=0, le=60_000)  # ms
    responseTimeout: StrictInt = Field(120, ge=1, le=3600)  # s
    startupTimeout: StrictInt = Field(120, ge=1, le=3600)  # s
    maxRetryTimeoutInSec: StrictInt = Field(300, ge=0, le=3600)
    clientTimeoutInMills: StrictInt = Field(0, ge=0, le=3_600_000)
    jobQueueSize: StrictInt = Field(100, ge=1, le=10_000)
    useJobTicket: StrictBool = False
    handler: dict[str, Any] | None = None


def read_model_config(text: bytes) -> Any:
    """Parse model-config.yaml within bounds. Raises ValueError naming what is refused."""
    try:
        if len(text) > MAX_CONFIG_BYTES:
            raise ValueError(f"{len(text)} bytes, limit {MAX_CONFIG_BYTES}")
        # Printable ASCII only: YAML 1.1 breaks lines at NEL, U+2028 and U+2029 and readers
        # differ on encodings and BOMs; `\uXXXX` escapes in double quotes read the same in both.
        if any(b > 0x7E or (b < 0x20 and b not in _ASCII_WHITESPACE) for b in text):
            raise ValueError("not printable ASCII (write other characters as \\uXXXX escapes "
                             "inside double quotes)")
        decoded = text.decode("utf-8")
        _check_events(yaml.parse(decoded, Loader=yaml.SafeLoader))
        _check_duplicates(yaml.compose(decoded, Loader=yaml.SafeLoader))
        return yaml.safe_load(decoded)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid YAML: {exc}; {_PLAIN}") from exc
    except ValueError as exc:
        raise ValueError(f"{exc}; {_PLAIN}") from exc


def _check_events(events: Iterator[yaml.Event]) -> None:
    depth = 0
    for count, event in enumerate(events):
        if count > _MAX_EVENTS:
            raise ValueError(f"more than {_MAX_EVENTS} YAML nodes")
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ValueError("YAML anchors and aliases are not allowed (they expand the tree)")
        tag = getattr(event, "tag", None)  # the parser sets it only when written explicitly
        if tag is not None:
            raise ValueError(f"explicit YAML tag {tag!r} is not allowed")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > _MAX_DEPTH:
                raise ValueError(f"nested deeper than {_MAX_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _check_duplicates(node: yaml.Node | None) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.value in seen:
                raise ValueError(f"key {key.value!r} appears twice; readers keep different ones")
            seen.add(key.value)
            _check_duplicates(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicates(item)


def check_model_config(data: Any) -> Iterator[tuple[str, str]]:
    """(rule, message) for each refused setting of a parsed model-config.yaml."""
    if data is None:
        return
    if not isinstance(data, Mapping):
        yield "SH411", "model-config must be a YAML mapping"
        return
    for key in data:
        if not isinstance(key, str):
            yield "SH414", f"key {key!r} is not a string; {_FIX}"
        elif key in _LAUNCH_KEYS:
            yield "SH414", f"`{key}` {_LAUNCH_KEYS[key]}; {_FIX}"
        elif key not in WorkerSettings.model_fields:
            yield "SH414", f"`{key}` is not a worker or batching setting secure-handler knows, " \
                           f"and TorchServe or a handler may act on it; {_FIX}"
    allowed = {k: v for k, v in data.items() if k in WorkerSettings.model_fields}
    try:
        WorkerSettings.model_validate(allowed)
    except ValidationError as exc:
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            yield "SH411", f"`{key}`: {err['msg']} (got {err.get('input')!r}); {_BOUNDS}"
        return
    yield from _check_handler_section(allowed.get("handler"))


def _check_handler_section(section: Mapping[str, Any] | None) -> Iterator[tuple[str, str]]:
    problems = []
    for kind in _HANDLER_KINDS:
        try:
            build_limits(kind, section)
            return
        except ConfigurationError as exc:
            problems.append(f"{kind.__name__}: {exc}")
    yield "SH411", "`handler:` is valid for no handler kind (fix the keys the README's Limits " \
                   "section lists): " + " | ".join(problems)
