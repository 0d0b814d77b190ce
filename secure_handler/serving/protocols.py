"""KServe v1 and Open Inference Protocol (v2) bodies: read a request, build its answer.

TorchServe routes `POST /v1/models/{m}:predict` and `POST /v2/models/{m}/infer` to the worker
with the JSON body unchanged, and the worker cannot see the route. So a body is read as a
protocol by its shape alone, whatever content type it was declared with (NVIDIA's tritonclient
sends JSON with no `Content-Type`, which arrives as raw bytes):

* KServe v1: `{"instances": [...]}`, each instance read exactly as a `/predictions` body;
  answered `{"predictions": [...]}`, one entry per instance.
* OIP v2: `{"id"?, "parameters"?, "inputs": [one BYTES tensor], "outputs"?}`; answered with
  named, shaped, typed `outputs` (see `v2_outputs`). The binary tensor extension is refused.

Errors in both: `{"error": "[code] message", "code": "code"}` with the status `/predictions`
gives. Pure functions, no torch: the handler's own read/check functions do the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from secure_handler.errors import (
    MalformedRequest,
    PayloadTooLarge,
    SecureHandlerError,
    TooManyInstances,
)
from secure_handler.limits import (
    MAX_JSON_INT_DIGITS,
    MAX_JSON_ITEMS,
    RequestProtocol,
    json_items,
)

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "ProtocolRequest",
    "error_json",
    "find_protocol_body",
    "may_be_protocol_body",
    "parse",
    "response",
    "v2_outputs",
]

Protocol = RequestProtocol
PROTOCOLS: tuple[Protocol, ...] = ("torchserve", "kserve_v1", "oip_v2")

# An object, after an optional byte-order mark and whitespace: image bytes and base64 text
# never start so. (A BOM is then refused: the plain path's JSON reader refuses it too.)
_OBJECT_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*\{")
_OBJECT_START_TEXT = re.compile("\ufeff?[ \t\r\n]*\\{")
# `model_name` is not OIP's, but KServe's own client sends it.
_V2_KEYS = frozenset({"id", "model_name", "parameters", "inputs", "outputs"})
_V2_TENSOR_KEYS = frozenset({"name", "shape", "datatype", "data", "parameters"})
_V2_OUTPUT_KEYS = frozenset({"name", "parameters"})
_MAX_ID_CHARS = 256
_MAX_NAME_CHARS = 64
#: Output names each result shape produces (see `v2_outputs`); `result` is the fallback.
CLASSIFIER_OUTPUTS = ("label", "probability", "class")
DETECTOR_OUTPUTS = ("count", "boxes", "scores", "classes", "labels")
FALLBACK_OUTPUT = "result"
KNOWN_OUTPUTS = frozenset((*CLASSIFIER_OUTPUTS, *DETECTOR_OUTPUTS, FALLBACK_OUTPUT))
#: The OIP binary tensor extension's header: the body is JSON followed by raw tensor bytes.
BINARY_HEADER = "inference-header-content-length"


@dataclass(frozen=True, slots=True)
class ProtocolRequest:
    """One v1 or v2 request: its instances (each a `/predictions`-style body) and options."""

    protocol: Protocol
    instances: tuple[Any, ...]
    request_id: str | None = None
    outputs: tuple[str, ...] | None = None  # v2 output names asked for; None: all


def find_protocol_body(value: Any, headers: Mapping[str, Any] | None,
                       max_body: int) -> dict[str, Any] | None:
    """The body as a JSON object when it is a v1/v2 request, else None (a plain body).

    Raises:
        PayloadTooLarge: a JSON-looking raw body over `max_body` bytes.
        MalformedRequest: the body uses the v2 binary tensor extension.
    """
    if not may_be_protocol_body(value):
        return None
    if isinstance(value, dict):
        return value
    if _has_binary_extension(headers):
        raise MalformedRequest(
            "the binary tensor extension (Inference-Header-Content-Length) is not supported; "
            "send JSON data (tritonclient: binary_data=False)"
        )
    # Characters never outnumber UTF-8 bytes: a huge text is refused before it is encoded.
    size = len(value) if len(value) > max_body else len(_as_bytes(value))
    if size > max_body:
        raise PayloadTooLarge(f"JSON body is {size} bytes; the limit is {max_body} bytes")
    text = _strict_utf8(value)
    if text is None or json_items(text) > MAX_JSON_ITEMS:
        # Not UTF-8 JSON, or more items than are parsed anywhere (a 14 MB body of `{}` would
        # cost 3 s and 350 MB): a plain body, whose own reader refuses it as JSON or reads it
        # as what it is (text, image bytes), cheaply either way.
        return None
    return _strict_protocol_object(text)


def may_be_protocol_body(value: Any) -> bool:
    """False when `value` cannot be a v1/v2 request: not an object with `instances` or
    `inputs`, and not text or bytes that start like a JSON object. Cheap (a key lookup or
    one anchored match), so plain traffic is told apart without parsing anything."""
    if isinstance(value, dict):
        return _is_protocol_object(value)
    if isinstance(value, str):
        return _OBJECT_START_TEXT.match(value) is not None
    if isinstance(value, (bytes, bytearray)):
        return _OBJECT_START.match(value) is not None
    return False


def _as_bytes(value: str | bytes | bytearray) -> bytes | bytearray:
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value


def _strict_utf8(value: str | bytes | bytearray) -> str | None:
    """The body as text when it is strict UTF-8 (no lone surrogates), else None.

    Decoded here, never by `json.loads(bytes)`, which guesses UTF-16 and UTF-32 where the
    plain path's reader accepts only UTF-8."""
    try:
        if isinstance(value, str):
            value.encode("utf-8")
            return value
        return bytes(value).decode("utf-8")
    except UnicodeError:
        return None


def _strict_protocol_object(text: str) -> dict[str, Any] | None:
    """Parse; None when it is not a JSON object with a protocol key (a plain body). A
    protocol body with a key twice, NaN/Infinity, an integer of more than 64 digits or a
    leading byte-order mark is refused: json.loads would silently keep the last key, accept
    the constants, fail on a 4,301-digit integer as if the body were not JSON, and the plain
    path's reader refuses a BOM."""
    problems: list[str] = []
    if text.startswith("\ufeff"):
        problems.append("a byte-order mark before it")
        text = text[1:]

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            problems.append("a key twice in one object")
        return dict(items)

    def constant(name: str) -> float:
        problems.append(name)
        return 0.0

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_JSON_INT_DIGITS:
            problems.append(f"an integer of more than {MAX_JSON_INT_DIGITS} digits")
            return 0
        return int(digits)

    try:
        parsed = json.loads(text, object_pairs_hook=pairs, parse_constant=constant,
                            parse_int=integer)
    except (ValueError, RecursionError):
        # Not JSON, or deeper than the parser goes (so not known to be a protocol body): a
        # plain body; the handler's own checks answer it.
        return None
    if not (isinstance(parsed, dict) and _is_protocol_object(parsed)):
        return None
    if problems:
        raise MalformedRequest(f"the JSON body holds {problems[0]}, which is not valid here")
    return parsed


def _is_protocol_object(obj: Mapping[str, Any]) -> bool:
    return "instances" in obj or "inputs" in obj


def _has_binary_extension(headers: Mapping[str, Any] | None) -> bool:
    return any(str(name).lower() == BINARY_HEADER for name in (headers or {}))


def parse(obj: Mapping[str, Any], allowed: Sequence[Protocol], max_instances: int,
          model_name: str = "") -> ProtocolRequest:
    """Check a protocol object's envelope and take out its instances.

    Raises:
        MalformedRequest: wrong shape, unknown key, protocol off (`handler.protocols`).
        TooManyInstances: more than `max_instances` instances.
    """
    if "instances" in obj and "inputs" in obj:
        raise MalformedRequest('a body has either "instances" (KServe v1) or "inputs" (v2)')
    protocol: Protocol = "kserve_v1" if "instances" in obj else "oip_v2"
    if protocol not in allowed:
        raise MalformedRequest(
            f"protocol {protocol} is off for this model; handler.protocols allows: "
            + ", ".join(allowed)
        )
    if protocol == "kserve_v1":
        return _parse_v1(obj, max_instances)
    return _parse_v2(obj, max_instances, model_name)


def _parse_v1(obj: Mapping[str, Any], max_instances: int) -> ProtocolRequest:
    _only_keys(obj, frozenset({"instances"}), "a KServe v1 body")
    instances = obj["instances"]
    if not isinstance(instances, list) or not instances:
        raise MalformedRequest('"instances" must be a non-empty array')
    _check_count(len(instances), max_instances)
    for i, instance in enumerate(instances):
        if not isinstance(instance, (str, dict)):
            raise MalformedRequest(
                f"instance {i} must be a string or an object; got {_kind(instance)}")
    return ProtocolRequest("kserve_v1", tuple(instances))


def _parse_v2(obj: Mapping[str, Any], max_instances: int, model_name: str) -> ProtocolRequest:
    _only_keys(obj, _V2_KEYS, "a v2 inference request")
    named = obj.get("model_name", model_name)
    if named != model_name:
        raise MalformedRequest(f'"model_name" {_brief(named, _MAX_NAME_CHARS)} is not this '
                               f"model ({model_name!r})")
    request_id = obj.get("id")
    if request_id is not None and not (isinstance(request_id, str)
                                       and len(request_id) <= _MAX_ID_CHARS):
        raise MalformedRequest(f'"id" must be a string of at most {_MAX_ID_CHARS} characters')
    if not isinstance(obj.get("parameters", {}), dict):
        raise MalformedRequest('"parameters" must be an object')
    inputs = obj["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise MalformedRequest('"inputs" must be an array of exactly one BYTES tensor')
    data = _v2_tensor_data(inputs[0], max_instances)
    outputs = _v2_requested(obj.get("outputs"), KNOWN_OUTPUTS)
    return ProtocolRequest("oip_v2", tuple(data), request_id, outputs)


def _v2_tensor_data(tensor: Any, max_instances: int) -> list[str]:
    if not isinstance(tensor, dict):
        raise MalformedRequest("each input must be an object {name, shape, datatype, data}")
    _only_keys(tensor, _V2_TENSOR_KEYS, "a v2 input")
    missing = sorted({"name", "shape", "datatype", "data"} - set(tensor))
    if missing:
        raise MalformedRequest(f"the input is missing {', '.join(missing)}")
    params = tensor.get("parameters", {})
    if not isinstance(params, dict):
        raise MalformedRequest('input "parameters" must be an object')
    if "binary_data_size" in params:
        raise MalformedRequest("binary tensor data is not supported; send JSON data")
    if tensor["datatype"] != "BYTES":
        raise MalformedRequest(
            f'input datatype must be "BYTES" (base64 images or UTF-8 text); '
            f"got {_brief(tensor['datatype'], 20)}")
    data, shape = tensor["data"], tensor["shape"]
    if not isinstance(data, list) or not data:
        raise MalformedRequest('input "data" must be a non-empty flat array of strings')
    _check_count(len(data), max_instances)  # before anything else walks the array
    if not _valid_shape(shape, len(data)):
        raise MalformedRequest(
            f'input "shape" must be [{len(data)}] or [{len(data)}, 1] for {len(data)} elements')
    for i, element in enumerate(data):
        if not isinstance(element, str):
            raise MalformedRequest(f"input element {i} must be a string; got {_kind(element)}")
    return data


def _valid_shape(shape: Any, count: int) -> bool:
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        return False
    return shape in ([count], [count, 1])


def _v2_requested(outputs: Any, known: frozenset[str]) -> tuple[str, ...] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not outputs or len(outputs) > len(known):
        raise MalformedRequest(f'"outputs" must be a non-empty array of at most {len(known)}')
    names: list[str] = []
    for entry in outputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise MalformedRequest('each requested output must be an object with a "name"')
        _only_keys(entry, _V2_OUTPUT_KEYS, "a requested output")
        name = entry["name"]
        if name not in known:
            raise MalformedRequest(
                f"unknown output {name[:_MAX_NAME_CHARS]!r}; this model has: "
                + ", ".join(sorted(known)))
        names.append(name)
    return tuple(dict.fromkeys(names))


def _only_keys(obj: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        shown = ", ".join(repr(k)[:40] for k in unknown[:5])
        raise MalformedRequest(
            f"unknown field(s) {shown} in {what}; allowed: {', '.join(sorted(allowed))}")


def _check_count(count: int, max_instances: int) -> None:
    if count > max_instances:
        raise TooManyInstances(
            f"{count} instances in one request; the limit is {max_instances} "
            "(handler.max_instances_per_request); split the request")


_KINDS: dict[type, str] = {dict: "an object", list: "an array", str: "a string"}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


# --- answers ---------------------------------------------------------------------------------


def response(request: ProtocolRequest, bodies: Sequence[Any], model_name: str,
             model_version: str | None) -> dict[str, Any]:
    """The protocol's answer for `request`, from one `/predictions` body per instance.

    Raises:
        MalformedRequest: a requested v2 output that this model's results do not have.
    """
    if request.protocol == "kserve_v1":
        return {"predictions": list(bodies)}
    outputs = v2_outputs(bodies)
    if request.outputs is not None:
        by_name = {o["name"]: o for o in outputs}
        missing = [n for n in request.outputs if n not in by_name]
        if missing:
            raise MalformedRequest(
                f"this model has no output {missing[0]!r}; it has: {', '.join(by_name)}")
        outputs = [by_name[n] for n in request.outputs]
    answer: dict[str, Any] = {"model_name": model_name, "model_version": model_version,
                              "outputs": outputs}
    if request.request_id is not None:
        answer = {"id": request.request_id, **answer}
    return answer


def v2_outputs(bodies: Sequence[Any]) -> list[dict[str, Any]]:
    """One v2 output tensor per field, rows in instance order.

    * classifier results (`{"predictions": [...]}` each): `label` BYTES, `probability` FP32
      and `class` INT64, each `[instances, top_k]`;
    * detector results (`{"detections": [...]}` each): `count` INT64 `[instances]` (how many
      detections each instance has, in order) and, over all detections, `boxes` FP32
      `[total, 4]` (x1, y1, x2, y2 in the image's pixels), `scores` FP32, `classes` INT64 and
      `labels` BYTES, each `[total]`;
    * anything else (a custom `format_outputs`): `result` BYTES `[instances]`, each the JSON
      text of that instance's result.
    """
    if all(_has_items(b, "predictions", _PREDICTION) for b in bodies):
        widths = {len(b["predictions"]) for b in bodies}
        if len(widths) == 1:
            return _classifier(bodies, widths.pop())
    if all(_has_items(b, "detections", _DETECTION) for b in bodies):
        return _detector(bodies)
    texts = [json.dumps(b, separators=(",", ":"), allow_nan=False) for b in bodies]
    return [_tensor(FALLBACK_OUTPUT, [len(texts)], "BYTES", texts)]


_PREDICTION = frozenset({"label", "class", "probability"})
_DETECTION = frozenset({"label", "class", "score", "box"})


def _has_items(body: Any, key: str, fields: frozenset[str]) -> bool:
    """`body[key]` is a list of objects with exactly the built-in handlers' fields (a custom
    result of another shape falls back to `result`)."""
    items = body.get(key) if isinstance(body, dict) else None
    return isinstance(items, list) and all(
        isinstance(item, dict) and set(item) == fields for item in items)


def _classifier(bodies: Sequence[Any], k: int) -> list[dict[str, Any]]:
    rows = [p for b in bodies for p in b["predictions"]]
    shape = [len(bodies), k]
    return [
        _tensor("label", shape, "BYTES", [str(p["label"]) for p in rows]),
        _tensor("probability", shape, "FP32", [p["probability"] for p in rows]),
        _tensor("class", shape, "INT64", [p["class"] for p in rows]),
    ]


def _detector(bodies: Sequence[Any]) -> list[dict[str, Any]]:
    found = [d for b in bodies for d in b["detections"]]
    total = len(found)
    return [
        _tensor("count", [len(bodies)], "INT64", [len(b["detections"]) for b in bodies]),
        _tensor("boxes", [total, 4], "FP32", [v for d in found for v in d["box"]]),
        _tensor("scores", [total], "FP32", [d["score"] for d in found]),
        _tensor("classes", [total], "INT64", [d["class"] for d in found]),
        _tensor("labels", [total], "BYTES", [str(d["label"]) for d in found]),
    ]


def _tensor(name: str, shape: list[int], datatype: str, data: list[Any]) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def error_json(err: SecureHandlerError) -> str:
    """The error body of both protocols: OIP's `{"error": message}`, the code twice over
    (in the message, for clients that show only it, and as a field, for programs)."""
    return json.dumps({"error": f"[{err.code}] {err.message}", "code": err.code},
                      separators=(",", ":"))


def _brief(value: Any, limit: int) -> str:
    """A client's value for an error message: a string cut to `limit`, else its JSON kind
    (never `str()` of a nested value, which recurses as deep as the client nested it)."""
    return repr(value[:limit]) if isinstance(value, str) else _kind(value)
