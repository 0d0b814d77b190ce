"""KServe v1 / OIP v2 envelopes: which bodies are read as a protocol, what each is refused
with, and the answer each protocol gets (pure functions, no model)."""

from __future__ import annotations

import json

import pytest

from secure_handler.errors import MalformedRequest, PayloadTooLarge, TooManyInstances
from secure_handler.serving import protocols
from secure_handler.serving.protocols import ProtocolRequest, find_protocol_body, parse

ALL = protocols.PROTOCOLS
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def v2(data: list, **extra: object) -> dict:
    return {"inputs": [{"name": "input-0", "shape": [len(data)], "datatype": "BYTES",
                        "data": data}], **extra}


# --- which bodies are protocol bodies ----------------------------------------------------


@pytest.mark.parametrize("value", [
    {"instances": ["a"]},
    {"inputs": []},
    bytearray(b'  {"instances": ["a"]}'),
    b'{"inputs": [{"name": "x"}]}',
    '\n{"instances": []}',
])
def test_json_objects_with_instances_or_inputs_are_protocol_bodies(value: object) -> None:
    found = find_protocol_body(value, {}, 10_000)
    assert isinstance(found, dict)
    assert "instances" in found or "inputs" in found


@pytest.mark.parametrize("value", [
    bytearray(PNG),  # image bytes never start with "{"
    b"\xff\xd8\xff\xe0" + b"{" * 10,
    "aGVsbG8=",  # base64 text
    {"data": "aGVsbG8="},  # the plain /predictions JSON envelope
    {"text": "hello"},
    b'{"text": "not a protocol"}',
    b"{not json at all",  # left to the handler's own checks
    '["instances"]',
    42,
    None,
])
def test_everything_else_is_a_plain_body(value: object) -> None:
    assert find_protocol_body(value, {}, 10_000) is None


def test_a_raw_json_body_is_bounded_before_it_is_parsed() -> None:
    body = b'{"instances": ["' + b"a" * 2000 + b'"]}'
    with pytest.raises(PayloadTooLarge):
        find_protocol_body(body, {}, 1000)


def test_the_binary_tensor_extension_is_refused_by_name() -> None:
    headers = {"Inference-Header-Content-Length": "120"}
    with pytest.raises(MalformedRequest, match="binary_data=False"):
        find_protocol_body(b'{"inputs": []}\x00\x01\x02', headers, 10_000)


def test_deeply_nested_json_is_a_plain_body_not_a_crash() -> None:
    body = b"{" + b'"a":[' * 100_000
    assert find_protocol_body(body, {}, 10_000_000) is None


# --- KServe v1 -----------------------------------------------------------------------------


def test_v1_instances_in_every_documented_form() -> None:
    req = parse({"instances": ["aGk=", {"data": "aGk="}, {"text": "hi"}]}, ALL, 8)
    assert req == ProtocolRequest("kserve_v1", ("aGk=", {"data": "aGk="}, {"text": "hi"}))


@pytest.mark.parametrize(("body", "match"), [
    ({"instances": []}, "non-empty"),
    ({"instances": "aGk="}, "non-empty array"),
    ({"instances": [1]}, "instance 0 must be a string or an object; got int"),
    ({"instances": ["ok", ["nested"]]}, "instance 1 .* an array"),
    ({"instances": ["a"], "signature_name": "x"}, "unknown field"),
    ({"instances": ["a"], "inputs": []}, "either"),
])
def test_v1_envelope_errors(body: dict, match: str) -> None:
    with pytest.raises(MalformedRequest, match=match):
        parse(body, ALL, 8)


def test_v1_more_instances_than_the_cap_is_413_too_many_instances() -> None:
    with pytest.raises(TooManyInstances) as info:
        parse({"instances": ["a"] * 9}, ALL, 8)
    assert (info.value.status, info.value.code) == (413, "too_many_instances")
    assert "max_instances_per_request" in info.value.message


# --- OIP v2 -------------------------------------------------------------------------------


def test_v2_request_with_id_parameters_and_outputs() -> None:
    body = v2(["aGk=", "aGk="], id="req-7", parameters={"binary_data_output": False},
              outputs=[{"name": "label"}, {"name": "probability", "parameters": {}}])
    req = parse(body, ALL, 8)
    assert req == ProtocolRequest("oip_v2", ("aGk=", "aGk="), "req-7", ("label", "probability"))


def test_v2_model_name_from_kserves_client_must_be_this_model() -> None:
    assert parse(v2(["x"], model_name="tiny"), ALL, 8, "tiny").instances == ("x",)


def test_v2_shape_n_by_one_is_accepted() -> None:
    body = {"inputs": [{"name": "t", "shape": [2, 1], "datatype": "BYTES", "data": ["a", "b"]}]}
    assert parse(body, ALL, 8).instances == ("a", "b")


@pytest.mark.parametrize(("body", "match"), [
    ({"inputs": []}, "exactly one"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"]}] * 2},
     "exactly one"),
    ({"inputs": ["x"]}, "must be an object"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "BYTES"),
    ({"inputs": [{"name": "a", "shape": [2], "datatype": "BYTES", "data": ["x"]}]}, "shape"),
    ({"inputs": [{"name": "a", "shape": [1, 1, 1], "datatype": "BYTES", "data": ["x"]}]},
     "shape"),
    ({"inputs": [{"name": "a", "shape": ["1"], "datatype": "BYTES", "data": ["x"]}]}, "shape"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": [["x"]]}]},
     "element 0 must be a string"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": []}]}, "non-empty"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES"}]}, "missing data"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"],
                  "parameters": {"binary_data_size": 4}}]}, "binary"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"],
                  "extra": 1}]}, "unknown field"),
    (v2(["x"], id=7), '"id" must be a string'),
    (v2(["x"], id="i" * 257), '"id" must be a string'),
    (v2(["x"], parameters=[]), "parameters"),
    (v2(["x"], outputs=[{"name": "logits"}]), "unknown output 'logits'"),
    (v2(["x"], outputs=[]), "outputs"),
    (v2(["x"], outputs=["label"]), "object with a"),
    (v2(["x"], model_name="other"), "not this model"),
    (v2(["x"], model_version="1"), "unknown field"),
])
def test_v2_envelope_errors(body: dict, match: str) -> None:
    with pytest.raises(MalformedRequest, match=match):
        parse(body, ALL, 8)


def test_v2_count_is_checked_before_the_elements_are_walked() -> None:
    body = v2([None] * 1000)  # elements that would each be refused
    with pytest.raises(TooManyInstances):
        parse(body, ALL, 8)


@pytest.mark.parametrize(("body", "off"), [
    ({"instances": ["a"]}, "kserve_v1"),
    (v2(["a"]), "oip_v2"),
])
def test_a_protocol_that_is_off_is_refused_naming_the_setting(body: dict, off: str) -> None:
    allowed = tuple(p for p in ALL if p != off)
    with pytest.raises(MalformedRequest, match=f"{off} is off.*handler.protocols"):
        parse(body, allowed, 8)


# --- answers ------------------------------------------------------------------------------

CLASSIFIER_BODIES = [
    {"predictions": [{"label": "red", "class": 0, "probability": 0.9},
                     {"label": "blue", "class": 2, "probability": 0.1}]},
    {"predictions": [{"label": "blue", "class": 2, "probability": 0.7},
                     {"label": "red", "class": 0, "probability": 0.3}]},
]
DETECTOR_BODIES = [
    {"detections": [{"label": "red", "class": 0, "score": 0.9, "box": [1, 2, 3, 4]},
                    {"label": "blue", "class": 2, "score": 0.8, "box": [5, 6, 7, 8]}]},
    {"detections": []},
    {"detections": [{"label": "green", "class": 1, "score": 0.7, "box": [0, 0, 9, 9]}]},
]


def test_v1_answer_is_one_predictions_body_per_instance() -> None:
    req = ProtocolRequest("kserve_v1", ("a", "b"))
    assert protocols.response(req, CLASSIFIER_BODIES, "m", "1.0") == {
        "predictions": CLASSIFIER_BODIES}


def test_v2_classifier_outputs_are_instances_by_top_k() -> None:
    req = ProtocolRequest("oip_v2", ("a", "b"), "id-1")
    answer = protocols.response(req, CLASSIFIER_BODIES, "tiny", "1.0")
    assert answer == {"id": "id-1", "model_name": "tiny", "model_version": "1.0", "outputs": [
        {"name": "label", "shape": [2, 2], "datatype": "BYTES",
         "data": ["red", "blue", "blue", "red"]},
        {"name": "probability", "shape": [2, 2], "datatype": "FP32",
         "data": [0.9, 0.1, 0.7, 0.3]},
        {"name": "class", "shape": [2, 2], "datatype": "INT64", "data": [0, 2, 2, 0]},
    ]}


def test_v2_detector_outputs_count_each_instance() -> None:
    req = ProtocolRequest("oip_v2", ("a", "b", "c"))
    outputs = {o["name"]: o for o in protocols.response(req, DETECTOR_BODIES, "d", None)["outputs"]}
    assert outputs["count"] == {"name": "count", "shape": [3], "datatype": "INT64",
                                "data": [2, 0, 1]}
    assert outputs["boxes"]["shape"] == [3, 4]
    assert outputs["boxes"]["data"] == [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 9, 9]
    assert outputs["scores"]["data"] == [0.9, 0.8, 0.7]
    assert outputs["classes"]["data"] == [0, 2, 1]
    assert outputs["labels"] == {"name": "labels", "shape": [3], "datatype": "BYTES",
                                 "data": ["red", "blue", "green"]}


def test_v2_requested_outputs_are_answered_in_the_order_asked() -> None:
    req = ProtocolRequest("oip_v2", ("a", "b"), None, ("class", "label"))
    outputs = protocols.response(req, CLASSIFIER_BODIES, "m", "1")["outputs"]
    assert [o["name"] for o in outputs] == ["class", "label"]
    assert "id" not in protocols.response(req, CLASSIFIER_BODIES, "m", "1")


def test_v2_output_this_model_does_not_have_is_refused() -> None:
    req = ProtocolRequest("oip_v2", ("a",), None, ("boxes",))
    with pytest.raises(MalformedRequest, match="no output 'boxes'"):
        protocols.response(req, CLASSIFIER_BODIES[:1], "m", "1")


def test_v2_custom_results_fall_back_to_json_text() -> None:
    req = ProtocolRequest("oip_v2", ("a",))
    [output] = protocols.response(req, [{"score": 3}], "m", "1")["outputs"]
    assert output == {"name": "result", "shape": [1], "datatype": "BYTES",
                      "data": ['{"score":3}']}


def test_error_body_carries_the_stable_code_twice() -> None:
    body = json.loads(protocols.error_json(TooManyInstances("9 instances")))
    assert body == {"error": "[too_many_instances] 9 instances", "code": "too_many_instances"}


def test_v2_results_of_another_shape_fall_back_to_json_text() -> None:
    odd = [{"predictions": [{"label": "red", "score": 1}]}, {"predictions": ["red"]}]
    [output] = protocols.response(ProtocolRequest("oip_v2", ("a", "b")), odd, "m", "1")["outputs"]
    assert output["name"] == "result"
    assert [json.loads(x) for x in output["data"]] == odd
