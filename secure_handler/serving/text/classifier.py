"""`SecureTextClassifier`: checked text → token ids → length-bucketed batches → top-k.

Model contract (TorchScript), chosen with `handler.model_input`:

* `ids_mask` (default): `forward(input_ids: int64 [B, T], attention_mask: int64 [B, T])`
  → logits `[B, classes]`. With `padding: bucketed` (default) a batch's rows are sorted by
  length and may run as several forwards of similar length (see `batching.py`); T is the
  longest row of each forward (`padding: longest`: of the whole batch; `padding:
  max_tokens`: always `max_tokens`, for models traced at a fixed length). Padding is the
  vocabulary's `pad_token` id and mask 0. Every row gets the answer it gets alone.
* `bag`: `forward(ids: int64 [N], offsets: int64 [B])` → logits `[B, classes]`, the
  `nn.EmbeddingBag` convention: request i is `ids[offsets[i]:offsets[i+1]]`, no padding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from secure_handler.errors import ConfigurationError, MalformedRequest
from secure_handler.limits import TextClassifierLimits
from secure_handler.serving import envelope as payload
from secure_handler.serving.base import SecureBaseHandler
from secure_handler.serving.metrics import StageTimer
from secure_handler.serving.outputs import load_labels, top_k, top_k_json
from secure_handler.serving.text import batching, normalize
from secure_handler.serving.text import tokenize as text

__all__ = ["SecureTextClassifier"]

JSON_TYPE = "application/json"
#: `bucket_split_tokens` when `auto` cannot measure (the model fails on the probe batches).
FALLBACK_SPLIT_TOKENS = 256

logger = logging.getLogger(__name__)


class SecureTextClassifier(SecureBaseHandler):
    """Hardened, batched text classifier for TorchScript models.

    Accepts a `text/*` body, a binary body that must be strict UTF-8, or JSON
    `{"text": "..."}` / `{"data": "..."}`. Override limits as class attributes, e.g.::

        class MyHandler(SecureTextClassifier):
            max_tokens = 128
            truncate = True
    """

    limits_model: ClassVar[type[TextClassifierLimits]] = TextClassifierLimits
    json_fields: ClassVar[tuple[str, ...]] = ("text", "data")
    #: Optional labels in code; `index_to_name.json` in the archive is used otherwise.
    labels: ClassVar[Sequence[str] | None] = None

    def setup(self) -> None:
        model_dir = Path(self.context.system_properties.get("model_dir") or ".")
        self.tokenizer = text.make_tokenizer(model_dir, self.limits)
        normalize.prepare(self.limits)
        self.split_tokens = self._split_tokens()
        if self.labels is not None:
            self.label_map = dict(enumerate(self.labels))
        else:
            self.label_map = load_labels(model_dir / "index_to_name.json")

    def _split_tokens(self) -> int:
        """`bucket_split_tokens`, measured on this model when `auto` (see `batching.py`)."""
        limits: TextClassifierLimits = self.limits
        if limits.bucket_split_tokens != "auto":
            return int(limits.bucket_split_tokens)
        if limits.padding != "bucketed" or limits.model_input == "bag":
            return 0  # no buckets are cut
        try:
            with torch.inference_mode():
                measured = batching.measure_split_tokens(
                    self._forward, self.tokenizer.max_id, self.tokenizer.pad_id, limits.max_tokens)
        except Exception as exc:  # a broken model fails its batches (500), not the worker
            logger.warning("could not measure bucket_split_tokens (%s); using %d",
                           type(exc).__name__, FALLBACK_SPLIT_TOKENS)
            return FALLBACK_SPLIT_TOKENS
        logger.info("bucket_split_tokens: %d (measured)", measured)
        return measured

    def _forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.model(*(self.to_device(t) for t in inputs))  # type: ignore[no-any-return]

    # --- per request ---------------------------------------------------------------------

    def read_payload(self, row: Mapping[str, Any], idx: int) -> str:
        """The request's text, within `max_request_bytes` and valid Unicode (envelope.py)."""
        limits: TextClassifierLimits = self.limits
        found = payload.read(row, self.context.get_all_request_header(idx),
                             limits.max_request_bytes, "text/plain; charset=utf-8",
                             text.decode_utf8)
        value = found.value
        if found.is_json:
            field = payload.json_field(value, self.json_fields)
            if not isinstance(field, str):
                raise MalformedRequest(f"JSON field must be a string; got {type(field).__name__}")
            payload.check_size(text.utf8_size(field), limits.max_request_bytes, "text")
            return field
        if isinstance(value, str):
            # Characters never outnumber bytes, so this refuses a huge body before encoding it.
            payload.check_size(len(value), limits.max_request_bytes)
            payload.check_size(text.utf8_size(value), limits.max_request_bytes)
            return value
        payload.check_size(len(value), limits.max_request_bytes)
        return text.decode_utf8(value)

    def decode(self, payload: str, idx: int) -> str:
        """Check and normalise one text; `decode_rows` tokenizes the batch's texts at once."""
        return text.clean_text(payload, self.limits)

    def decode_rows(self, data: list[Mapping[str, Any]],
                    timer: StageTimer | None = None) -> list[Any]:
        """Each row's ids (or its error): texts checked row by row, then tokenized in one
        pass over the batch (one vocabulary lookup pass, one flat id array)."""
        rows = super().decode_rows(data, timer)
        texts = {idx: row for idx, row in enumerate(rows) if isinstance(row, str)}
        if texts:
            limits: TextClassifierLimits = self.limits
            encoded = text.encode_batch(self.tokenizer, list(texts.values()),
                                        limits.max_tokens, limits.truncate)
            for idx, ids in zip(texts, encoded, strict=True):
                rows[idx] = ids
        return rows

    # --- per batch ----------------------------------------------------------------------

    def assemble(self, items: Sequence[Sequence[int] | text.Ids]) -> batching.TextBatch:
        """All valid requests → the forwards of `handler.padding` (see `batching.py`)."""
        limits: TextClassifierLimits = self.limits
        layout = "bag" if limits.model_input == "bag" else limits.padding
        return batching.build_batch(items, layout, self.tokenizer.pad_id, limits.max_tokens,
                                    self.split_tokens)

    def infer(self, batch: batching.TextBatch) -> torch.Tensor:
        with torch.inference_mode():
            return batching.run_parts(batch, self._forward)

    def format_outputs(self, outputs: Any, items: Sequence[Any]) -> list[Any]:
        limits: TextClassifierLimits = self.limits
        return top_k(outputs, limits.top_k, limits.probability_digits, self.label_map)

    def format_json(self, outputs: Any, items: Sequence[Any]) -> list[Any] | None:
        """`format_outputs` as JSON text in one pass, unless a subclass reshapes the results."""
        if not self._formats_own(SecureTextClassifier):
            return None
        return top_k_json(self, outputs)

    def warm_up(self) -> None:
        try:
            super().warm_up()
        except Exception as exc:
            first = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
            raise ConfigurationError(
                f"warm-up with token id {self.tokenizer.max_id} (the vocabulary's highest) "
                f"failed: {first[0][:200]}. Check that {self.limits.vocab_file} matches the "
                "model's embedding size and that handler.model_input matches its forward()"
            ) from exc

    def warmup_items(self) -> list[list[int]]:
        # The highest id in the vocabulary: an embedding too small for it fails at load time,
        # not on the first request that uses the word.
        return [[self.tokenizer.max_id], [self.tokenizer.max_id] * 2]


def _parse_json(body: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MalformedRequest("the body is declared as JSON but is not valid JSON") from exc
