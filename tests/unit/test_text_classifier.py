"""SecureTextClassifier through TorchServe's real Context and RequestProcessor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support_models import VOCAB, build_text_model, write_text_files

from secure_handler import ConfigurationError, SecureTextClassifier
from secure_handler.serving.text.tokenize import encode
from secure_handler.testing import Request, make_context, run_batch

MANIFEST = {"model": {"modelName": "text", "serializedFile": "model.pt",
                      "handler": "handler.py", "modelVersion": "1.0"}}


@pytest.fixture(scope="module")
def words_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text-ids")
    build_text_model(path, "ids_mask")
    write_text_files(path)
    return path


@pytest.fixture(scope="module")
def bag_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text-bag")
    build_text_model(path, "bag")
    write_text_files(path)
    return path


@pytest.fixture(scope="module")
def bytes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text-bytes")
    build_text_model(path, byte_level=True)
    (path / "index_to_name.json").write_text(json.dumps({"0": "plain", "1": "x-heavy"}))
    return path


def make_handler(model_dir: Path, handler_cfg: dict | None = None, batch_size: int = 8,
                 cls: type = SecureTextClassifier):
    ctx = make_context(model_dir, MANIFEST, {"handler": handler_cfg or {}},
                       batch_size=batch_size)
    handler = cls()
    handler.initialize(ctx)
    return handler, ctx


def top1(body: dict) -> str:
    return body["predictions"][0]["label"]


def text(value: str, content_type: str = "text/plain") -> Request:
    return Request.as_worker(value.encode("utf-8"), content_type)


def test_every_accepted_input_form(words_dir: Path) -> None:
    handler, ctx = make_handler(words_dir)
    requests = [
        text("a GOOD movie"),                                           # text/* → str
        Request(bytearray(b"bad, awful"), "application/octet-stream"),  # bytes → strict UTF-8
        Request({"text": "great"}, "application/json"),
        Request({"data": "meh"}, "application/json"),
        Request(bytearray(b'{"text": "awful"}'), "application/json; charset=utf-8"),
        text("Ｇｏｏｄ"),                                                # NFKC → "good"
    ]
    results = run_batch(handler, ctx, requests)
    assert [s for s, _ in results] == [200] * 6
    assert [top1(b) for _, b in results] == [
        "positive", "negative", "positive", "neutral", "negative", "positive"]


def test_output_shape_topk_and_rounding(words_dir: Path) -> None:
    handler, ctx = make_handler(words_dir, {"top_k": 2, "probability_digits": 3})
    [(status, body)] = run_batch(handler, ctx, [text("good good meh")])
    assert status == 200
    preds = body["predictions"]
    assert [p["class"] for p in preds] == [0, 2]
    assert preds[0]["label"] == "positive"
    assert all(round(p["probability"], 3) == p["probability"] for p in preds)


def test_padding_never_reaches_the_model(words_dir: Path) -> None:
    # <pad> votes 100 for "neutral"; a short text next to a long one must still be positive.
    handler, ctx = make_handler(words_dir)
    results = run_batch(handler, ctx, [text("good"), text("bad " * 40 + "bad")])
    assert [top1(b) for _, b in results] == ["positive", "negative"]


def test_pad_to_max_tokens_gives_the_same_answers(words_dir: Path) -> None:
    reqs = [text("good"), text("bad awful"), text("meh meh meh")]
    dyn = run_batch(*make_handler(words_dir), reqs)
    fixed = run_batch(*make_handler(words_dir, {"padding": "max_tokens", "max_tokens": 16}), reqs)
    assert dyn == fixed


def one_forward(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of a batch that runs as a single forward over its rows in order."""
    [part] = batch.parts
    assert part.rows is None
    return part.inputs


def test_dynamic_padding_width_is_the_longest_request(words_dir: Path) -> None:
    handler, _ = make_handler(words_dir, {"padding": "longest"})
    ids, mask = one_forward(handler.assemble([[2], [4, 4, 4], [6, 6]]))
    assert ids.shape == mask.shape == (3, 3)
    handler, _ = make_handler(words_dir, {"padding": "max_tokens", "max_tokens": 20})
    ids, _ = one_forward(handler.assemble([[2], [4, 4, 4]]))
    assert ids.shape == (2, 20)


def test_embedding_bag_contract(bag_dir: Path) -> None:
    handler, ctx = make_handler(bag_dir, {"model_input": "bag"})
    results = run_batch(handler, ctx, [text("good great"), text("bad"), text("meh"),
                                       text("x y z")])
    assert [top1(b) for _, b in results] == ["positive", "negative", "neutral", "neutral"]


def test_byte_level_ids_without_a_vocabulary(bytes_dir: Path) -> None:
    handler, ctx = make_handler(bytes_dir)
    results = run_batch(handler, ctx, [text("xxxxxxxx"), text("hello"), text("xx")])
    assert [top1(b) for _, b in results] == ["x-heavy", "plain", "x-heavy"]


def test_one_bad_request_does_not_fail_its_batch(words_dir: Path) -> None:
    handler, ctx = make_handler(words_dir, {"max_text_chars": 50, "max_tokens": 8,
                                            "max_request_bytes": 200})
    requests = [
        text("good"),
        Request(bytearray(b"caf\xe9"), "application/octet-stream"),  # Latin-1, not UTF-8
        text("bad"),
        text("nul\x00byte"),
        text("admin\u202eresu"),
        text("x " * 30),
        text("good " * 9),
        Request(bytearray(b"a" * 201), "text/plain"),
        Request({"text": 5}, "application/json"),
        Request([1, 2], "application/json"),
        Request({"text": "good", "extra": 1}, "application/json"),
        Request(bytearray(b'{"text": '), "application/json"),
        Request({"text": ""}, "application/json"),
        Request({"text": "abc\ud800"}, "application/json"),
        Request(bytearray(b""), "text/plain"),
        Request(None, "text/plain", params={"data": bytearray(b"good")}),
        Request(bytearray(b"good"), "text/plain", params={"data": bytearray(b"bad")}),
        text("meh"),
    ]
    results = run_batch(handler, ctx, requests)
    got = [(s, b["error"]["code"] if s != 200 else top1(b)) for s, b in results]
    assert got == [
        (200, "positive"),
        (422, "invalid_text"),
        (200, "negative"),
        (422, "invalid_text"),
        (422, "invalid_text"),
        (422, "text_too_long"),
        (422, "too_many_tokens"),
        (413, "payload_too_large"),
        (400, "malformed_request"),
        (400, "malformed_request"),
        (400, "malformed_request"),
        (400, "malformed_request"),
        (400, "empty_body"),
        (422, "invalid_text"),
        (400, "empty_body"),
        (200, "positive"),
        (400, "malformed_request"),
        (200, "neutral"),
    ]


def test_truncate_serves_long_texts(words_dir: Path) -> None:
    handler, ctx = make_handler(words_dir, {"max_tokens": 2, "truncate": True})
    [(status, body)] = run_batch(handler, ctx, [text("good good bad bad bad bad")])
    assert status == 200
    assert top1(body) == "positive"


def test_limits_from_class_attributes(words_dir: Path) -> None:
    class Short(SecureTextClassifier):
        max_tokens = 1

    handler, ctx = make_handler(words_dir, cls=Short)
    [(status, body)] = run_batch(handler, ctx, [text("good good")])
    assert (status, body["error"]["code"]) == (422, "too_many_tokens")


def test_labels_in_code_win_over_the_archive(words_dir: Path) -> None:
    class Named(SecureTextClassifier):
        labels = ("pos", "neg", "neu")

    handler, ctx = make_handler(words_dir, cls=Named)
    [(_, body)] = run_batch(handler, ctx, [text("awful")])
    assert top1(body) == "neg"


def test_a_subclass_format_outputs_shapes_the_answer(words_dir: Path) -> None:
    # The plain path writes JSON text straight from the logits, but only while
    # format_outputs is the library's own: a user's override must be what is sent.
    class Top1(SecureTextClassifier):
        def format_outputs(self, outputs, items):
            return [{"label": body["predictions"][0]["label"]}
                    for body in super().format_outputs(outputs, items)]

    plain, plain_ctx = make_handler(words_dir)
    own, own_ctx = make_handler(words_dir, cls=Top1)
    [(_, body)] = run_batch(plain, plain_ctx, [text("awful")])
    [(status, custom)] = run_batch(own, own_ctx, [text("awful")])
    assert (status, custom) == (200, {"label": top1(body)})
    # ... and so must a function set on the instance.
    plain.format_outputs = lambda outputs, items: [{"mine": True}] * len(items)
    assert run_batch(plain, plain_ctx, [text("awful")]) == [(200, {"mine": True})]


def test_labels_and_limits_are_read_when_answering(words_dir: Path) -> None:
    handler, ctx = make_handler(words_dir)
    run_batch(handler, ctx, [text("awful")])  # the one-pass writer now holds the old labels
    handler.label_map = {0: "a", 1: "b", 2: "c"}
    handler.limits = handler.limits.model_copy(update={"top_k": 1})
    [(status, body)] = run_batch(handler, ctx, [text("awful")])
    assert (status, body) == (200, {"predictions": [
        {"label": "b", "class": 1, "probability": body["predictions"][0]["probability"]}]})


def test_model_failure_is_a_500_for_the_valid_rows_only(words_dir: Path, tmp_path: Path) -> None:
    # The bag model called with (ids [B,T], mask) fails inside TorchScript: wrong contract.
    build_text_model(tmp_path, "bag")
    write_text_files(tmp_path)
    handler, ctx = make_handler(tmp_path, {"model_input": "ids_mask"})
    results = run_batch(handler, ctx, [text("good"), text("a\x00")])
    assert [(s, b["error"]["code"]) for s, b in results] == [
        (500, "inference_failed"), (422, "invalid_text")]


def test_warmup_catches_a_vocabulary_larger_than_the_model(tmp_path: Path) -> None:
    build_text_model(tmp_path, "ids_mask")
    write_text_files(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({**VOCAB, "extra": len(VOCAB) + 10}))
    with pytest.raises(ConfigurationError, match="token id 18 .* out of bounds"):
        make_handler(tmp_path, {"warmup": True})


def test_warmup_runs_on_a_good_archive(words_dir: Path) -> None:
    handler, ctx = make_handler(words_dir, {"warmup": True})
    assert run_batch(handler, ctx, [text("great")])[0][0] == 200


@pytest.mark.parametrize(("cfg", "message"), [
    ({"normalize": "NFD"}, "normalize"),
    ({"model_input": "tokens"}, "model_input"),
    ({"tokenizer": "word", "vocab_file": "missing.json"}, "missing.json"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"unk_token": "[UNK]"}, "no entry for unk_token"),
    ({"bogus": 1}, "unknown key `bogus`"),
])
def test_bad_config_fails_initialize(words_dir: Path, cfg: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make_handler(words_dir, cfg)


def test_ids_tensor_dtype_and_values(words_dir: Path) -> None:
    handler, _ = make_handler(words_dir)
    rows = [encode(handler.tokenizer, handler.decode(t, i), 8, truncate=False)
            for i, t in enumerate(["good movie", "bad"])]
    ids, mask = one_forward(handler.assemble(rows))
    assert ids.dtype == mask.dtype == torch.int64
    assert ids.tolist() == [[VOCAB["good"], VOCAB["<unk>"]], [VOCAB["bad"], VOCAB["<pad>"]]]
    assert mask.tolist() == [[1, 1], [1, 0]]
