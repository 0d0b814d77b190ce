"""Checked text → token ids, for a whole batch at once.

Tokenisation stops after `max_tokens + 1` tokens: a text far longer than its token budget is
scanned only as far as that, so the work per request is bounded by the limits, not the text.
Each batch's ids come out as ONE flat int64 array and the row lengths (no list per row, no
Python int per id on the byte path), which `batching.py` pads or bags in one step.

Vocabularies are JSON (`{"token": id}`), never pickles. With no vocabulary the ids are the
UTF-8 bytes plus one (0 is padding), so a byte-level model needs no file at all.

The checks before tokenisation live in `normalize.py`; they are re-exported here.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from secure_handler.errors import ConfigurationError, TooManyTokens
from secure_handler.limits import TextLimits
from secure_handler.serving.text.normalize import clean_text, decode_utf8, utf8_size

__all__ = [
    "BYTE_PAD_ID",
    "BYTE_VOCAB_SIZE",
    "ByteTokenizer",
    "Ids",
    "Tokenizer",
    "WordTokenizer",
    "clean_text",
    "decode_utf8",
    "encode",
    "encode_batch",
    "load_vocab",
    "make_tokenizer",
    "utf8_size",
]

#: Byte-level ids: 0 is padding, byte b is b + 1, so the vocabulary has 257 entries.
BYTE_PAD_ID = 0
BYTE_VOCAB_SIZE = 257

MAX_VOCAB_FILE_BYTES = 256 * 1024 * 1024

# Up to this many characters per wanted token, one C-level `findall` over the whole text is
# cheaper than stopping early (measured 3x faster than a Python loop over `finditer`) and its
# work is still bounded by the token limit; a longer text is scanned only up to its last
# wanted token.
_FINDALL_CHARS_PER_TOKEN = 16

Ids = npt.NDArray[np.int64]


class Tokenizer(Protocol):
    """Texts → ids: at most `limit` ids per text, and at least one for non-empty text."""

    @property
    def pad_id(self) -> int: ...

    @property
    def max_id(self) -> int: ...

    def encode_batch(self, texts: Sequence[str], limit: int) -> tuple[Ids, Ids]:
        """`(flat ids, lengths)`: text i's ids are the next `lengths[i]` of `flat`."""
        ...

    def encode(self, text: str, limit: int) -> list[int]:
        """One text's ids as a list (for tests and tools; the handler uses `encode_batch`)."""
        ...


class _EncodeOne:
    """`encode()` for a tokenizer that has `encode_batch()`."""

    __slots__ = ()

    def encode_batch(self, texts: Sequence[str], limit: int) -> tuple[Ids, Ids]:
        raise NotImplementedError

    def encode(self, text: str, limit: int) -> list[int]:
        flat, _ = self.encode_batch([text], limit)
        ids: list[int] = flat.tolist()
        return ids


@dataclass(frozen=True, slots=True)
class ByteTokenizer(_EncodeOne):
    """UTF-8 bytes as ids (byte + 1; 0 is padding): numpy from the bytes, no per-id object."""

    pad_id: int = BYTE_PAD_ID
    max_id: int = BYTE_VOCAB_SIZE - 1

    def encode_batch(self, texts: Sequence[str], limit: int) -> tuple[Ids, Ids]:
        chunks = [text.encode("utf-8")[:limit] for text in texts]
        lengths = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
        flat = np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.int64)
        flat += 1
        return flat, lengths


class _Vocab(dict[object, int]):
    """token → id; a missing token is the unknown id, so lookups run as one C-level `map`."""

    __slots__ = ("unk_id",)

    def __init__(self, mapping: Mapping[str, int], unk_id: int) -> None:
        super().__init__(mapping.items())
        self.unk_id = unk_id

    def __missing__(self, key: object) -> int:
        return self.unk_id


# Stands for "no word at all" ("!!!"): never a vocabulary key, so it maps to the unknown id.
_NO_WORD = object()


class WordTokenizer(_EncodeOne):
    """Word-level ids from a JSON vocabulary; unknown words map to `unk_id`."""

    __slots__ = ("_vocab", "lowercase", "max_id", "pad_id", "pattern", "unk_id")

    def __init__(self, vocab: Mapping[str, int], unk_id: int, pad_id: int,
                 pattern: re.Pattern[str], lowercase: bool = True) -> None:
        if pattern.groups:
            raise ConfigurationError("token_pattern must not have capturing groups; use (?:...)")
        self._vocab = _Vocab(vocab, unk_id)
        self.unk_id, self.pad_id = unk_id, pad_id
        self.pattern, self.lowercase = pattern, lowercase
        self.max_id = max(vocab.values())

    def words(self, text: str, limit: int) -> list[object]:
        """The first `limit` words of `text` (one stand-in when it has none)."""
        if self.lowercase:
            text = text.lower()
        if len(text) <= _FINDALL_CHARS_PER_TOKEN * limit:
            found: list[object] = self.pattern.findall(text)
            del found[limit:]
        else:
            found = [m.group() for m in itertools.islice(self.pattern.finditer(text), limit)]
        # A text with no word at all is one unknown token, never an empty row: an
        # all-padding row would make a masked mean divide by zero.
        return found or [_NO_WORD]

    def encode_batch(self, texts: Sequence[str], limit: int) -> tuple[Ids, Ids]:
        rows = [self.words(text, limit) for text in texts]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        # One C-level pass looks up every word of the batch.
        flat = np.fromiter(map(self._vocab.__getitem__, itertools.chain.from_iterable(rows)),
                           dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads silently keeps the last of duplicate keys; a vocabulary must be unambiguous.
    result = dict(pairs)
    if len(result) != len(pairs):
        dupes = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
        raise ConfigurationError(f"duplicate token(s) {dupes[:5]!r}; each token may appear once")
    return result


def load_vocab(path: Path, limits: TextLimits) -> WordTokenizer:
    """Read and validate `vocab.json`: `{"token": non-negative int id}`, JSON only.

    Raises:
        ConfigurationError: unreadable, not an object of token → id, too large, duplicate
            tokens, or the `unk_token`/`pad_token` missing.
    """
    name = path.name
    try:
        size = path.stat().st_size
        if size > MAX_VOCAB_FILE_BYTES:
            raise ConfigurationError(f"{name} is {size} bytes; the limit is {MAX_VOCAB_FILE_BYTES}")
        raw = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{name} is not a readable UTF-8 JSON file: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ConfigurationError(f"{name} must be a non-empty JSON object mapping token to id")
    if len(raw) > limits.max_vocab_entries:
        raise ConfigurationError(
            f"{name} has {len(raw)} entries; max_vocab_entries is {limits.max_vocab_entries}"
        )
    for token, idx in raw.items():
        if type(idx) is not int or not 0 <= idx < 2**31:
            raise ConfigurationError(
                f"{name}: token {token[:40]!r} maps to {idx!r}; ids must be integers 0..2^31-1"
            )
    special = {}
    for key in ("unk_token", "pad_token"):
        token = getattr(limits, key)
        if token not in raw:
            raise ConfigurationError(
                f"{name} has no entry for {key} {token!r}; add it or set handler.{key}"
            )
        special[key] = raw[token]
    return WordTokenizer(raw, special["unk_token"], special["pad_token"],
                         re.compile(limits.token_pattern), limits.lowercase)


def make_tokenizer(model_dir: Path, limits: TextLimits) -> Tokenizer:
    """The word-level tokenizer when `vocab_file` is shipped (or required), else bytes."""
    path = model_dir / limits.vocab_file
    if limits.tokenizer == "byte" or (limits.tokenizer == "auto" and not path.exists()):
        return ByteTokenizer()
    if not path.is_file():
        raise ConfigurationError(
            f"tokenizer is 'word' but {limits.vocab_file} is not in the archive; ship it with "
            "--extra-files or set handler.tokenizer: byte"
        )
    return load_vocab(path, limits)


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str], max_tokens: int,
                 truncate: bool) -> list[Ids | TooManyTokens]:
    """Each text's ids (a view of one flat array), cut to `max_tokens` when `truncate`, else
    a `TooManyTokens` for that text alone when it is longer."""
    limit = max_tokens if truncate else max_tokens + 1
    flat, lengths = tokenizer.encode_batch(texts, limit)
    ends = np.cumsum(lengths).tolist()
    rows: list[Ids | TooManyTokens] = []
    start = 0
    for end in ends:
        if end - start > max_tokens:
            rows.append(TooManyTokens(
                f"the text has more than {max_tokens} tokens; shorten it "
                "(or the operator can set handler.truncate: true)"))
        else:
            rows.append(flat[start:end])
        start = end
    return rows


def encode(tokenizer: Tokenizer, text: str, max_tokens: int, truncate: bool) -> list[int]:
    """One text's ids (see `encode_batch`).

    Raises:
        TooManyTokens: more than `max_tokens` and `truncate` is off.
    """
    [row] = encode_batch(tokenizer, [text], max_tokens, truncate)
    if isinstance(row, TooManyTokens):
        raise row
    return [int(i) for i in row]
