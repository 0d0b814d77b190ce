"""secure_handler.serving.text normalize and tokenize: strict UTF-8, normalisation, forbidden
characters, tokenizers (batching is in test_text_batching.py, Unicode sets in
test_text_unicode.py)."""

from __future__ import annotations

import json
import pickle
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_handler import (
    ConfigurationError,
    EmptyBody,
    InvalidText,
    TextLimits,
    TextTooLong,
    TooManyTokens,
)
from secure_handler.limits import build_limits
from secure_handler.serving.text import tokenize as T
from secure_handler.serving.text.normalize import default_ignorables

LIMITS = TextLimits()


def limits(**kw: object) -> TextLimits:
    return build_limits(TextLimits, kw)


# --- UTF-8 ------------------------------------------------------------------------------------


def test_strict_utf8_accepts_valid_text() -> None:
    assert T.decode_utf8(bytearray("héllo wörld ✓ 𝄞".encode())) == "héllo wörld ✓ 𝄞"


@pytest.mark.parametrize(("raw", "offset"), [
    (b"ok \xff", 3),                      # a byte that never appears in UTF-8
    (b"\xc0\xaf", 0),                     # overlong encoding of "/"
    (b"ab\xed\xa0\x80", 2),               # an encoded surrogate (CESU-8)
    (b"abc\xe2\x82", 3),                  # truncated sequence
    (b"\xf4\x90\x80\x80", 0),             # beyond U+10FFFF
])
def test_invalid_utf8_is_refused_with_its_offset(raw: bytes, offset: int) -> None:
    with pytest.raises(InvalidText, match=rf"byte {offset}\b") as err:
        T.decode_utf8(raw)
    assert err.value.status == 422
    assert err.value.code == "invalid_text"


def test_lone_surrogate_from_json_escape_is_refused() -> None:
    value = json.loads('"abc\\ud800"')
    with pytest.raises(InvalidText, match="unpaired surrogate at character 3"):
        T.utf8_size(value)
    assert T.utf8_size("é") == 2


# --- clean_text ------------------------------------------------------------------------------


def test_nfkc_folds_compatibility_forms() -> None:
    # Fullwidth letters and the "ﬁ" ligature become what a vocabulary contains.
    assert T.clean_text("ＧＯＯＤ ﬁne", LIMITS) == "GOOD fine"


def test_nfc_keeps_compatibility_forms_but_composes() -> None:
    assert T.clean_text("e\u0301 ﬁ", limits(normalize="NFC")) == "\u00e9 ﬁ"


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x7f",
                                  "\x80", "\x85", "\x9f"])
def test_control_characters_are_refused(char: str) -> None:
    with pytest.raises(InvalidText, match=rf"control character U\+{ord(char):04X} at character 2"):
        T.clean_text("ab" + char + "cd", LIMITS)


def test_tab_newline_and_carriage_return_are_text() -> None:
    assert T.clean_text("a\tb\r\nc\n", LIMITS) == "a\tb\r\nc\n"


def test_control_characters_pass_when_allowed() -> None:
    assert T.clean_text("a\x00b", limits(reject_control_chars=False)) == "a\x00b"


@pytest.mark.parametrize("char", ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e",
                                  "\u2066", "\u2067", "\u2068", "\u2069"])
def test_bidi_controls_are_refused(char: str) -> None:
    with pytest.raises(InvalidText, match=r"bidirectional control U\+20"):
        T.clean_text("access" + char + "granted", LIMITS)
    # Allowed, they are invisible characters like any other: removed, or refused on request.
    assert T.clean_text("x" + char, limits(reject_bidi_controls=False)) == "x"
    with pytest.raises(InvalidText, match="invisible"):
        T.clean_text("x" + char, limits(reject_bidi_controls=False, ignorables="reject"))


def test_arabic_and_hebrew_text_is_not_a_bidi_control() -> None:
    assert T.clean_text("שלום مرحبا", LIMITS) == unicodedata.normalize("NFKC", "שלום مرحبا")


def test_length_is_checked_before_normalisation() -> None:
    with pytest.raises(TextTooLong, match="is 11 characters; the limit is 10") as err:
        T.clean_text("a" * 11, limits(max_text_chars=10))
    assert err.value.code == "text_too_long"


def test_length_is_checked_again_after_normalisation() -> None:
    # U+FDFA (one character) expands to 18 under NFKC.
    with pytest.raises(TextTooLong, match="18 characters after NFKC"):
        T.clean_text("\ufdfa", limits(max_text_chars=10))


def test_byte_order_mark_is_dropped_and_alone_is_empty() -> None:
    assert T.clean_text("\ufeffgood", LIMITS) == "good"
    with pytest.raises(EmptyBody):
        T.clean_text("\ufeff", LIMITS)


@given(st.text(max_size=200))
def test_clean_text_output_never_holds_a_forbidden_character(raw: str) -> None:
    try:
        cleaned = T.clean_text(raw, LIMITS)
    except (InvalidText, EmptyBody):
        return
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]",
                         cleaned)
    assert not set(map(ord, cleaned)) & default_ignorables()
    assert cleaned == unicodedata.normalize("NFKC", cleaned)


# --- tokenizers -------------------------------------------------------------------------------

VOCAB = {"<pad>": 0, "<unk>": 1, "good": 2, "don't": 3, "movie": 4}


def ids(tok: T.Tokenizer, text: str, limit: int) -> list[int]:
    """One text through the tokenizer's batch path."""
    flat, lengths = tok.encode_batch([text], limit)
    assert lengths.tolist() == [len(flat)]
    assert flat.dtype == lengths.dtype == "int64"
    return flat.tolist()


def write_vocab(tmp_path: Path, content: object, raw: bytes | None = None) -> Path:
    path = tmp_path / "vocab.json"
    path.write_bytes(raw if raw is not None else json.dumps(content).encode())
    return path


def test_word_tokenizer_lowercases_and_maps_unknown(tmp_path: Path) -> None:
    tok = T.load_vocab(write_vocab(tmp_path, VOCAB), LIMITS)
    assert (tok.pad_id, tok.unk_id, tok.max_id) == (0, 1, 4)
    assert ids(tok, "GOOD movie, don't! bad", 100) == [2, 4, 3, 1]
    assert ids(tok, "good good good", 2) == [2, 2]


def test_text_without_any_word_is_one_unknown_token(tmp_path: Path) -> None:
    tok = T.load_vocab(write_vocab(tmp_path, VOCAB), LIMITS)
    assert ids(tok, "!!! ???", 10) == [1]


def test_token_pattern_and_case_are_configurable(tmp_path: Path) -> None:
    tok = T.load_vocab(write_vocab(tmp_path, {**VOCAB, "Good": 5}),
                       limits(lowercase=False, token_pattern=r"\w+"))
    assert ids(tok, "Good good don't", 10) == [5, 2, 1, 1]


@pytest.mark.parametrize("pattern", ["[a-z]*", "(", "x?"])
def test_unusable_token_patterns_fail_initialisation(pattern: str) -> None:
    with pytest.raises(ConfigurationError, match="token_pattern"):
        limits(token_pattern=pattern)


def test_byte_tokenizer_is_utf8_bytes_plus_one() -> None:
    tok = T.ByteTokenizer()
    assert ids(tok, "aé", 10) == [ord("a") + 1, 0xC3 + 1, 0xA9 + 1]
    assert ids(tok, "abcdef", 2) == [98, 99]
    assert (tok.pad_id, tok.max_id) == (0, 256)


def test_encode_truncates_or_refuses(tmp_path: Path) -> None:
    tok = T.load_vocab(write_vocab(tmp_path, VOCAB), LIMITS)
    assert T.encode(tok, "good " * 5, 3, truncate=True) == [2, 2, 2]
    assert T.encode(tok, "good " * 3, 3, truncate=False) == [2, 2, 2]
    with pytest.raises(TooManyTokens, match="more than 3 tokens") as err:
        T.encode(tok, "good " * 4, 3, truncate=False)
    assert (err.value.status, err.value.code) == (422, "too_many_tokens")


@pytest.mark.parametrize(("content", "raw", "message"), [
    (None, b"\x80\x04K\x01.", "not a readable UTF-8 JSON"),           # a pickle, never loaded
    (None, pickle.dumps({"<unk>": 1}), "not a readable UTF-8 JSON"),
    (None, b'{"<pad>": 0, "<unk>": 1, "a": 2, "a": 3}', "duplicate token"),
    (["<pad>", "<unk>"], None, "must be a non-empty JSON object"),
    ({}, None, "must be a non-empty JSON object"),
    ({"<pad>": 0, "<unk>": "1"}, None, "ids must be integers"),
    ({"<pad>": 0, "<unk>": True}, None, "ids must be integers"),
    ({"<pad>": 0, "<unk>": -1}, None, "ids must be integers"),
    ({"<pad>": 0, "<unk>": 1.0}, None, "ids must be integers"),
    ({"<pad>": 0, "a": 1}, None, "no entry for unk_token '<unk>'"),
    ({"<unk>": 0, "a": 1}, None, "no entry for pad_token '<pad>'"),
])
def test_bad_vocabularies_fail_initialisation(tmp_path: Path, content: object, raw: bytes | None,
                                              message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        T.load_vocab(write_vocab(tmp_path, content, raw), LIMITS)


def test_vocabulary_size_is_capped(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="max_vocab_entries is 3"):
        T.load_vocab(write_vocab(tmp_path, {**VOCAB}), limits(max_vocab_entries=3))


def test_make_tokenizer_picks_by_file_and_config(tmp_path: Path) -> None:
    assert isinstance(T.make_tokenizer(tmp_path, LIMITS), T.ByteTokenizer)
    with pytest.raises(ConfigurationError, match="tokenizer is 'word' but vocab.json"):
        T.make_tokenizer(tmp_path, limits(tokenizer="word"))
    write_vocab(tmp_path, VOCAB)
    assert isinstance(T.make_tokenizer(tmp_path, LIMITS), T.WordTokenizer)
    assert isinstance(T.make_tokenizer(tmp_path, limits(tokenizer="byte")), T.ByteTokenizer)


@pytest.mark.parametrize("name", ["../vocab.json", "/etc/passwd", "sub/vocab.json", ".hidden"])
def test_vocab_file_must_be_a_plain_name(name: str) -> None:
    with pytest.raises(ConfigurationError, match="vocab_file"):
        limits(vocab_file=name)


class CountingPattern:
    """A token pattern that counts how far tokenisation pulled matches and scanned text."""

    groups = 0

    def __init__(self, pattern: str) -> None:
        self.inner = re.compile(pattern)
        self.pulled = 0
        self.findall_chars = 0

    def findall(self, text: str) -> list[str]:
        self.findall_chars += len(text)
        return self.inner.findall(text)

    def finditer(self, text: str) -> Iterator[re.Match[str]]:
        for match in self.inner.finditer(text):
            self.pulled += 1
            yield match


def test_tokenisation_stops_after_the_wanted_tokens() -> None:
    pattern = CountingPattern(r"[a-z0-9']+")
    tok = T.WordTokenizer(VOCAB, 1, 0, pattern)  # type: ignore[arg-type]
    text = "good " * 100_000
    assert ids(tok, text, 5) == [2] * 5
    # Only the five wanted matches were produced; the other 99,995 words were never scanned.
    assert (pattern.pulled, pattern.findall_chars) == (5, 0)
    # A short text (at most 16 characters per wanted token) takes the one-call path.
    assert ids(tok, "good movie", 5) == [2, 4]
    assert pattern.findall_chars == len("good movie")


@given(st.lists(st.text(alphabet="gomdvie' !,", max_size=40), min_size=1, max_size=8),
       st.integers(1, 6))
def test_batch_tokenisation_equals_one_text_at_a_time(texts: list[str], limit: int) -> None:
    tok = T.WordTokenizer(VOCAB, 1, 0, re.compile(r"[a-z0-9']+"))
    flat, lengths = tok.encode_batch(texts, limit)
    rows, start = [], 0
    for n in lengths.tolist():
        rows.append(flat[start:start + n].tolist())
        start += n
    assert rows == [ids(tok, t, limit) for t in texts]
    expected = [[VOCAB.get(w, 1) for w in re.findall(r"[a-z0-9']+", t)][:limit] or [1]
                for t in texts]
    assert rows == expected
