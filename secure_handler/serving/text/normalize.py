"""Bytes or text → checked, normalised text: what the model reads is what a reviewer reads.

Order matters for safety and cost:

1. bytes: the size limit (in the envelope), then strict UTF-8 (no replacement characters, no
   surrogates, no overlong forms); a `str` that came from JSON escapes is checked for lone
   surrogates too;
2. `max_text_chars` before anything that costs per character;
3. ASCII text stops here (after the control check): NFC and NFKC leave ASCII unchanged, and
   ASCII holds no invisible or combining character;
4. the bidi embedding/override/isolate controls U+202A-U+202E and U+2066-U+2069 are refused
   ("Trojan Source", CVE-2021-42574), before step 5 would silently remove them;
5. Unicode's default-ignorable code points (ZWSP, ZWJ, WJ, soft hyphen, an inner BOM,
   variation selectors, tag characters...) are removed (`ignorables: remove`, the default) or
   refused (`ignorables: reject`): they render as nothing, so a word split by one reads the
   same to a person but becomes unknown tokens to the model (an evasion);
6. a run of more than `max_combining_marks` (default 30, Unicode's stream-safe limit, UAX #15)
   non-starters is refused: NFC/NFKC reorder such a run in quadratic time (measured 5.4 s for
   a 40,000-mark run), so the cap comes BEFORE normalisation;
7. Unicode normalisation (NFC or NFKC), then `max_text_chars` again on what the model sees;
8. the C0 controls except tab, LF and CR, DEL and the C1 controls are refused.

The Unicode sets come from `unicodedata` (the running Python's Unicode version), built once per
process on first use: Python has no Default_Ignorable_Code_Point property, so `_ignorables()`
derives it exactly as Unicode's DerivedCoreProperties.txt does (tests compare the result with
the published list).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable
from typing import Literal

import numpy as np
import numpy.typing as npt

from secure_handler.errors import EmptyBody, InvalidText, TextTooLong
from secure_handler.limits import TextLimits

__all__ = [
    "clean_text",
    "decode_utf8",
    "default_ignorables",
    "non_starters",
    "utf8_size",
]

# Tab (09), LF (0A) and CR (0D) are allowed: CRLF is what HTML forms and Windows send.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")

# The planes that hold format characters and combining marks (BMP, SMP, SSP); planes 2-3 hold
# only CJK ideographs, 4-13 are unassigned, 15-16 are private use. A test checks that the whole
# code space gives the same sets with the running Python.
_SCANNED_PLANES = (range(0x0, 0x20000), range(0xE0000, 0xF0000))

# PropList.txt's Other_Default_Ignorable_Code_Point (stable: reserved code points included so
# that characters assigned there later are already ignorable).
_OTHER_IGNORABLE = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x2065, 0x2065),
                    (0x3164, 0x3164), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0xE0000, 0xE0000),
                    (0xE0002, 0xE001F), (0xE0080, 0xE00FF), (0xE01F0, 0xE0FFF))
# PropList.txt's Variation_Selector.
_VARIATION_SELECTORS = ((0x180B, 0x180D), (0x180F, 0x180F), (0xFE00, 0xFE0F),
                        (0xE0100, 0xE01EF))
# Format characters that are NOT ignorable: interlinear annotation marks, Egyptian hieroglyph
# format controls, and Prepended_Concatenation_Mark (visible signs such as U+0600).
_VISIBLE_FORMAT = ((0xFFF9, 0xFFFB), (0x13430, 0x1343F), (0x0600, 0x0605), (0x06DD, 0x06DD),
                   (0x070F, 0x070F), (0x0890, 0x0891), (0x08E2, 0x08E2), (0x110BD, 0x110BD),
                   (0x110CD, 0x110CD))


def _expand(ranges: Iterable[tuple[int, int]]) -> set[int]:
    return {cp for first, last in ranges for cp in range(first, last + 1)}


def _code_points() -> list[int]:
    return [cp for plane in _SCANNED_PLANES for cp in plane]


@functools.cache
def default_ignorables() -> frozenset[int]:
    """Default_Ignorable_Code_Point, derived as DerivedCoreProperties.txt defines it:
    Other_Default_Ignorable_Code_Point + Cf + Variation_Selector - White_Space
    - FFF9..FFFB - 13430..1343F - Prepended_Concatenation_Mark."""
    points = _code_points()
    # map() over the C functions: about 3x faster than a Python loop calling them.
    categories = map(unicodedata.category, map(chr, points))
    fmt = {cp for cp, category in zip(points, categories, strict=True) if category == "Cf"}
    found = fmt | _expand(_OTHER_IGNORABLE) | _expand(_VARIATION_SELECTORS)
    found -= _expand(_VISIBLE_FORMAT)
    return frozenset(cp for cp in found if not chr(cp).isspace())


@functools.cache
def non_starters() -> frozenset[int]:
    """Code points whose compatibility decomposition starts with a non-starter (canonical
    combining class > 0): the characters that extend a run normalisation must reorder.
    This is every combining mark plus a few such as U+FF9E HALFWIDTH VOICED SOUND MARK."""
    points = _code_points()
    classes = map(unicodedata.combining, map(chr, points))
    decompositions = map(unicodedata.decomposition, map(chr, points))
    return frozenset(
        cp for cp, combining, decomposition in zip(points, classes, decompositions, strict=True)
        if combining or (decomposition and _starts_with_mark(chr(cp))))


def _starts_with_mark(char: str) -> bool:
    return unicodedata.combining(unicodedata.normalize("NFKD", char)[0]) > 0


@functools.cache
def growth(form: Literal["NFC", "NFKC"]) -> npt.NDArray[np.uint8]:
    """`growth(form)[cp]`: how many characters code point `cp` adds under `form` (U+FDFA: 17
    under NFKC). Composition only shortens text, so a text's length plus its growth bounds
    its normalised length from above."""
    table = np.zeros(0x110000, dtype=np.uint8)
    for cp in _code_points():
        char = chr(cp)
        if unicodedata.decomposition(char):
            table[cp] = len(unicodedata.normalize(form, char)) - 1
    return table


def _char_class(code_points: Iterable[int]) -> str:
    """A regex character class of `code_points`, as ranges (compact and fast to match)."""
    parts: list[str] = []
    run_start = run_end = -2
    for cp in sorted(code_points):
        if cp != run_end + 1:
            if run_start >= 0:
                parts.append(_range(run_start, run_end))
            run_start = cp
        run_end = cp
    if run_start >= 0:
        parts.append(_range(run_start, run_end))
    return "[" + "".join(parts) + "]"


def _range(first: int, last: int) -> str:
    start = re.escape(chr(first))
    return start if first == last else f"{start}-{re.escape(chr(last))}"


@functools.cache
def _ignorable_pattern() -> re.Pattern[str]:
    return re.compile(_char_class(default_ignorables()))


@functools.cache
def _mark_run_pattern(limit: int) -> re.Pattern[str]:
    marks = _char_class(non_starters())
    # The lookbehind starts a match only where a run starts, so a long run is scanned once,
    # not once per position in it.
    return re.compile(f"(?<!{marks}){marks}{{{limit + 1},}}")


def prepare(limits: TextLimits) -> None:
    """Build the Unicode tables `limits` need now (at worker start), not on a first request."""
    _ignorable_pattern()
    _mark_run_pattern(limits.max_combining_marks)
    growth(limits.normalize)


def decode_utf8(data: bytes | bytearray) -> str:
    """Strict UTF-8 → str.

    Raises:
        InvalidText: naming the byte offset of the first invalid sequence.
    """
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidText(
            f"the body is not valid UTF-8 (byte {exc.start}: {exc.reason}); send UTF-8 text"
        ) from exc
    return text


def utf8_size(text: str) -> int:
    """Bytes of `text` as UTF-8; lone surrogates (possible via JSON `\\ud800`) are refused."""
    if text.isascii():  # a flag CPython keeps on the string: no pass over it
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidText(
            f"the text holds an unpaired surrogate at character {exc.start}; "
            "send valid Unicode"
        ) from exc


def _check_chars(text: str, limit: int, when: str = "") -> None:
    if len(text) > limit:
        raise TextTooLong(f"the text is {len(text)} characters{when}; the limit is {limit}")


def _refuse_match(pattern: re.Pattern[str], text: str, what: str, fix: str = "remove it") -> None:
    found = pattern.search(text)
    if found is not None:
        raise InvalidText(
            f"the text contains {what} U+{ord(found.group()[0]):04X} at character "
            f"{found.start()}; {fix}"
        )


def clean_text(text: str, limits: TextLimits) -> str:
    """Length limits, invisible characters, normalisation and controls (see the docstring).

    Raises:
        EmptyBody: nothing but a byte-order mark or invisible characters.
        TextTooLong: over `max_text_chars` before or after normalisation.
        InvalidText: a forbidden control, bidi or (with `ignorables: reject`) invisible
            character, or a run of combining marks over `max_combining_marks`.
    """
    if text.startswith("\ufeff"):  # a byte-order mark is an encoding artefact, not text
        text = text[1:]
    if not text:
        raise EmptyBody("the text is empty")
    _check_chars(text, limits.max_text_chars)
    if not text.isascii():
        text = _clean_unicode(text, limits)
    # A printable text has no control character; only others need the scan that names it.
    if limits.reject_control_chars and not text.isprintable():
        _refuse_match(_CONTROL, text, "the control character")
    return text


def _clean_unicode(text: str, limits: TextLimits) -> str:
    if limits.reject_bidi_controls:
        _refuse_match(_BIDI, text, "the bidirectional control")
    ignorable = _ignorable_pattern()
    if limits.ignorables == "reject":
        _refuse_match(ignorable, text, "the invisible (default-ignorable) character",
                      "remove it (or the operator can set handler.ignorables: remove)")
    elif ignorable.search(text) is not None:
        text = ignorable.sub("", text)
        if not text:
            raise EmptyBody("the text holds only invisible characters")
    run = _mark_run_pattern(limits.max_combining_marks).search(text)
    if run is not None:
        raise InvalidText(
            f"the text has a run of {len(run.group())} combining marks at character "
            f"{run.start()}; the limit is {limits.max_combining_marks} "
            "(Unicode's stream-safe text format)"
        )
    _check_growth(text, limits)
    text = unicodedata.normalize(limits.normalize, text)
    _check_chars(text, limits.max_text_chars, f" after {limits.normalize} normalisation")
    return text


# No code point grows by more than this (U+FDFA: 1 → 18 under NFKC); a shorter text needs no
# count. A test checks the constant against the tables.
_MAX_GROWTH = 17


def _check_growth(text: str, limits: TextLimits) -> None:
    """Refuse, BEFORE normalising, a text that could outgrow `max_text_chars` (a 1 MB text of
    U+FDFA would otherwise build an 18-million-character string first): one vectorised count
    over the code points, in 4 bytes per character."""
    if len(text) * (_MAX_GROWTH + 1) <= limits.max_text_chars:
        return
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    bound = len(text) + int(growth(limits.normalize)[points].sum(dtype=np.int64))
    if bound > limits.max_text_chars:
        raise TextTooLong(
            f"the text could be up to {bound} characters after {limits.normalize} "
            f"normalisation; the limit is {limits.max_text_chars}"
        )
