"""The Unicode sets behind text cleaning: default-ignorables, non-starters, growth under NFKC.

Python has no Default_Ignorable_Code_Point property, so `normalize.py` derives it from
`unicodedata`; these tests hold the derivation to Unicode's published list and check the
shortcuts the module takes (the planes it scans, the largest growth) over the whole code space.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_handler import EmptyBody, InvalidText, TextLimits, TextTooLong
from secure_handler.limits import build_limits
from secure_handler.serving.text import normalize as N

LIMITS = TextLimits()

# DerivedCoreProperties.txt of Unicode 14.0 (the version of Python 3.11's unicodedata),
# `Default_Ignorable_Code_Point`, adjacent ranges merged.
PUBLISHED_14 = [
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
]


def expand(ranges: list[tuple[int, int]]) -> set[int]:
    return {cp for first, last in ranges for cp in range(first, last + 1)}


def limits(**kw: object) -> TextLimits:
    return build_limits(TextLimits, kw)


def test_derived_ignorables_are_unicodes_list() -> None:
    published = expand(PUBLISHED_14)
    derived = set(N.default_ignorables())
    if unicodedata.unidata_version == "14.0.0":
        assert derived == published
    else:  # a newer Unicode only adds format characters
        assert derived >= published


def test_the_scanned_planes_hold_every_format_character_and_mark() -> None:
    everything = [chr(cp) for cp in range(0x110000)]
    outside = [c for c in everything if not any(ord(c) in p for p in N._SCANNED_PLANES)]
    assert not [c for c in outside if unicodedata.category(c) == "Cf"]
    assert not [c for c in outside if unicodedata.combining(c)]
    assert not [c for c in outside if unicodedata.decomposition(c)
                and unicodedata.combining(unicodedata.normalize("NFKD", c)[0])]
    assert not [c for c in outside if len(unicodedata.normalize("NFKC", c)) > 1]


@pytest.mark.parametrize("char", ["\u200b", "\u200c", "\u200d", "\u2060", "\u00ad", "\ufeff",
                                  "\ufe0f", "\U000e0041", "\u180e", "\u034f", "\U000e0101"])
def test_well_known_invisibles_are_in_the_set(char: str) -> None:
    assert ord(char) in N.default_ignorables()


@pytest.mark.parametrize("char", [" ", "\u00a0", "\u0600", "\ufff9", "\U00013430", "\u0301",
                                  "a", "\u3000"])
def test_visible_format_characters_spaces_and_marks_are_not(char: str) -> None:
    assert ord(char) not in N.default_ignorables()


def test_normalisation_never_creates_an_ignorable() -> None:
    ignorables = N.default_ignorables()
    made = [hex(cp) for cp in range(0x110000) if cp not in ignorables
            and any(ord(c) in ignorables for c in unicodedata.normalize("NFKC", chr(cp)))]
    assert made == []


def test_non_starters_are_the_marks_and_what_decomposes_to_one() -> None:
    marks = N.non_starters()
    assert {cp for cp in range(0x110000) if unicodedata.combining(chr(cp))} <= marks
    assert 0xFF9E in marks  # HALFWIDTH KATAKANA VOICED SOUND MARK: class 0, NFKD U+3099
    assert ord("a") not in marks
    assert 0x00E9 not in marks


@pytest.mark.parametrize("form", ["NFC", "NFKC"])
def test_growth_table_and_its_maximum(form: str) -> None:
    table = N.growth(form)  # type: ignore[arg-type]
    assert int(table.max()) <= N._MAX_GROWTH
    assert table[0xFDFA] == (17 if form == "NFKC" else 0)
    assert table[ord("a")] == 0


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_growth_bounds_the_normalised_length(text: str) -> None:
    for form in ("NFC", "NFKC"):
        points = np.array([ord(c) for c in text], dtype=np.int64)
        bound = len(text) + int(N.growth(form)[points].sum())  # type: ignore[arg-type]
        assert len(unicodedata.normalize(form, text)) <= bound


# --- clean_text with the sets -----------------------------------------------------------------


@pytest.mark.parametrize("char", ["\u200b", "\u200d", "\u2060", "\u00ad", "\ufeff", "\ufe0f",
                                  "\U000e0067", "\u180e"])
def test_invisible_characters_are_removed_by_default(char: str) -> None:
    assert N.clean_text(f"go{char}od mo{char * 3}vie", LIMITS) == "good movie"


def test_invisible_characters_are_refused_on_request() -> None:
    with pytest.raises(InvalidText, match=r"invisible .* U\+200B at character 2"):
        N.clean_text("go\u200bod", limits(ignorables="reject"))


def test_text_of_invisible_characters_only_is_empty() -> None:
    with pytest.raises(EmptyBody, match="only invisible characters"):
        N.clean_text("\u200b\u200d\u2060", LIMITS)


def test_combining_runs_up_to_the_limit_pass_and_longer_ones_are_refused() -> None:
    assert N.clean_text("a" + "\u0301" * 30, LIMITS) == unicodedata.normalize(
        "NFKC", "a" + "\u0301" * 30)
    with pytest.raises(InvalidText, match="run of 31 combining marks at character 1"):
        N.clean_text("a" + "\u0301" * 31, LIMITS)
    with pytest.raises(InvalidText, match="run of 40 combining marks"):
        N.clean_text("x" + "\uff9e" * 40, LIMITS)  # class 0 itself, a mark once decomposed
    assert N.clean_text("e" + "\u0301" * 5, limits(max_combining_marks=5))


def test_an_invisible_character_does_not_split_a_combining_run() -> None:
    # The grapheme joiner U+034F is how stream-safe text breaks a run; here it is removed
    # first, so the run it hid is counted whole.
    text = "a" + "\u0301" * 20 + "\u034f" + "\u0301" * 20
    with pytest.raises(InvalidText, match="run of 40 combining marks"):
        N.clean_text(text, LIMITS)


def test_text_that_could_outgrow_the_limit_is_refused_before_normalising() -> None:
    with pytest.raises(TextTooLong, match="could be up to 1800 characters after NFKC"):
        N.clean_text("\ufdfa" * 100, limits(max_text_chars=1000))
    # Short enough that no growth could pass the limit: no count at all, same answer.
    assert N.clean_text("\ufb01" * 10, limits(max_text_chars=1000)) == "fi" * 10


def test_limits_refuse_settings_beyond_the_budget() -> None:
    from secure_handler import ConfigurationError

    for key, value in (("max_text_chars", 1_000_001), ("max_request_bytes", 16 * 2**20 + 1),
                       ("max_combining_marks", 256), ("ignorables", "keep")):
        with pytest.raises(ConfigurationError, match=key):
            limits(**{key: value})
