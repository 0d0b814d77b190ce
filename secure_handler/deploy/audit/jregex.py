"""Java regular expressions read the way `java.util.regex` reads them, or refused.

TorchServe compiles `allowed_urls` (with `CASE_INSENSITIVE`) and `blacklist_env_vars` with
`java.util.regex.Pattern` and asks for a full match. Python's `re` reads many Java patterns
differently (`\\p{Alpha}`, `\\Q..\\E`, `[a-z&&[^x]]`, nested classes, possessive quantifiers,
which characters `.` skips, Unicode case folding), so an audit that evaluates a Java pattern with
`re` can be fooled into passing one that admits `http://attacker`.

This module accepts only a small subset that both engines read the same way (literals,
escaped punctuation, `.`, `\\d` `\\w`, simple classes and ranges, groups, `|`, greedy
quantifiers, `^` first and `$` last) and raises `JavaRegexError` naming the construct for
anything else. An accepted pattern becomes an NFA over code-point ranges, so questions are
answered for every string at once (automaton products), never by trying sample URLs.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["ANY", "DIGIT", "CharSet", "JavaRegexError", "Nfa", "compile_java"]

MAX_CODE = 0x10FFFF
MAX_REPEAT = 64  # {n,m} bounds above this are refused: the NFA is built by copying
MAX_STATES = 4096  # bounds the audit's cost whatever the pattern (the store pattern needs ~150)
_LINE_TERMINATORS = "\n\r\u0085\u2028\u2029"  # what Java's `.` skips (no DOTALL)
_SPECIAL_OUTSIDE = set("\\^$.|?*+()[]{}")


class JavaRegexError(ValueError):
    """The pattern uses a construct outside the subset read identically by Java and here."""


@dataclass(frozen=True)
class CharSet:
    """A set of code points as sorted, disjoint, inclusive ranges."""

    ranges: tuple[tuple[int, int], ...] = ()

    @staticmethod
    def of(chars: Iterable[str]) -> CharSet:
        return CharSet.union_all(CharSet(((ord(c), ord(c)),)) for c in chars)

    @staticmethod
    def span(lo: str, hi: str) -> CharSet:
        return CharSet(((ord(lo), ord(hi)),))

    @staticmethod
    def union_all(sets: Iterable[CharSet]) -> CharSet:
        merged: list[list[int]] = []
        for lo, hi in sorted(r for s in sets for r in s.ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        return CharSet(tuple((lo, hi) for lo, hi in merged))

    def __or__(self, other: CharSet) -> CharSet:
        return CharSet.union_all((self, other))

    def complement(self) -> CharSet:
        out, start = [], 0
        for lo, hi in self.ranges:
            if lo > start:
                out.append((start, lo - 1))
            start = hi + 1
        if start <= MAX_CODE:
            out.append((start, MAX_CODE))
        return CharSet(tuple(out))

    def __and__(self, other: CharSet) -> CharSet:
        out, i, j = [], 0, 0
        a, b = self.ranges, other.ranges
        while i < len(a) and j < len(b):
            lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if lo <= hi:
                out.append((lo, hi))
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return CharSet(tuple(out))

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __contains__(self, char: str) -> bool:
        code = ord(char)
        return any(lo <= code <= hi for lo, hi in self.ranges)

    def size(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges)

    def case_insensitive(self) -> CharSet:
        """Java's `CASE_INSENSITIVE` without `UNICODE_CASE`: ASCII letters only."""
        extra = []
        for lo, hi in self.ranges:
            for first, last, shift in ((0x41, 0x5A, 0x20), (0x61, 0x7A, -0x20)):
                low, high = max(lo, first), min(hi, last)
                if low <= high:
                    extra.append((low + shift, high + shift))
        return self | CharSet(tuple(extra))

    def sample(self) -> str:
        """One member, a readable one when there is any."""
        for preferred in ("abcdefghijklmnopqrstuvwxyz0123456789._-", string.printable.strip()):
            for c in preferred:
                if c in self:
                    return c
        return chr(self.ranges[0][0])


ANY = CharSet(((0, MAX_CODE),))
DOT = CharSet.of(_LINE_TERMINATORS).complement()
DIGIT = CharSet.span("0", "9")
WORD = CharSet.span("a", "z") | CharSet.span("A", "Z") | DIGIT | CharSet.of("_")


# --- syntax tree -----------------------------------------------------------------------

@dataclass(frozen=True)
class _Chars:
    chars: CharSet


@dataclass(frozen=True)
class _Seq:
    items: tuple[_Node, ...]


@dataclass(frozen=True)
class _Alt:
    options: tuple[_Node, ...]


@dataclass(frozen=True)
class _Repeat:
    item: _Node
    low: int
    high: int | None  # None: unbounded


_Node = _Chars | _Seq | _Alt | _Repeat


class _Parser:
    """Recursive descent over the accepted subset; every other construct raises."""

    def __init__(self, pattern: str, ignore_case: bool) -> None:
        self.p, self.i, self.ci = pattern, 0, ignore_case

    def parse(self) -> _Node:
        # With a full match (`matches()`), a leading `^` and a trailing unescaped `$` add
        # nothing; anywhere else they are refused below.
        if self.p.startswith("^"):
            self.i = 1
        body = self.p[self.i :]
        backslashes = len(body[:-1]) - len(body[:-1].rstrip("\\"))
        if body.endswith("$") and backslashes % 2 == 0:
            self.p = self.p[:-1]
        node = self._alternation()
        if self.i < len(self.p):
            raise self._error("an unbalanced `)`")
        return node

    def _error(self, what: str) -> JavaRegexError:
        return JavaRegexError(f"{what} at offset {self.i}")

    def _peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def _alternation(self) -> _Node:
        options = [self._sequence()]
        while self._peek() == "|":
            self.i += 1
            options.append(self._sequence())
        return options[0] if len(options) == 1 else _Alt(tuple(options))

    def _sequence(self) -> _Node:
        items: list[_Node] = []
        while self._peek() not in (None, "|", ")"):
            items.append(self._quantified(self._atom()))
        return _Seq(tuple(items))

    def _atom(self) -> _Node:
        c = self.p[self.i]
        self.i += 1
        if c == "(":
            if self._peek() == "?":
                if self.p[self.i : self.i + 2] != "?:":
                    raise self._error("a `(?` construct (flags, lookaround, named or atomic "
                                      "group)")
                self.i += 2
            node = self._alternation()
            if self._peek() != ")":
                raise self._error("an unclosed `(`")
            self.i += 1
            return node
        if c == "[":
            return _Chars(self._class())
        if c == ".":
            return _Chars(DOT)
        if c == "\\":
            return _Chars(self._fold(self._escape()))
        if c in _SPECIAL_OUTSIDE:
            raise self._error(f"`{c}` where Java does not read it as a literal")
        return _Chars(self._fold(CharSet.of(c)))

    def _fold(self, chars: CharSet) -> CharSet:
        return chars.case_insensitive() if self.ci else chars

    def _escape(self) -> CharSet:
        c = self._peek()
        if c is None:
            raise self._error("a trailing backslash")
        self.i += 1
        named = {"d": DIGIT, "D": DIGIT.complement(), "w": WORD, "W": WORD.complement()}
        if c in named:
            return named[c]
        if c.isascii() and not c.isalnum() and c.isprintable():
            return CharSet.of(c)  # Java: a backslash before punctuation quotes it
        raise self._error(f"the escape `\\{c}` (\\p, \\Q..\\E, \\x, \\u, backreferences... "
                          "are outside the subset)")

    def _class(self) -> CharSet:
        negate = self._peek() == "^"
        self.i += negate
        if self._peek() == "]":
            raise self._error("a `]` first in a class (write `\\]`)")
        items: list[str | CharSet] = []  # a str is one literal character, "-" a bare dash
        while (c := self._peek()) != "]":
            if c is None:
                raise self._error("an unclosed `[`")
            self.i += 1
            if c in "[&":
                raise self._error(f"`{c}` inside a class (Java: nested class or `&&`)")
            if c == "\\":
                chars = self._escape()
                items.append(chars if chars.size() > 1 else chr(chars.ranges[0][0]))
            else:
                items.append(CharSet.of(c) if c == "-" else c)
        self.i += 1
        chars = self._fold(CharSet.union_all(self._ranges(items)))
        return chars.complement() if negate else chars

    def _ranges(self, items: list[str | CharSet]) -> Iterator[CharSet]:
        """Resolve `a-z` ranges; a bare dash is literal only first or last (Java and re)."""
        dash = CharSet.of("-")
        k = 0
        while k < len(items):
            item = items[k]
            if item == dash and 0 < k < len(items) - 1:
                raise self._error("a `-` that is neither first, last nor inside a range")
            if isinstance(item, str) and k + 2 < len(items) and items[k + 1] == dash:
                high = items[k + 2]
                if not isinstance(high, str) or ord(high) < ord(item):
                    raise self._error(f"the range starting at `{item}`")
                yield CharSet.span(item, high)
                k += 3
                continue
            yield CharSet.of(item) if isinstance(item, str) else item
            k += 1

    def _quantified(self, node: _Node) -> _Node:
        c = self._peek()
        if c is None or c not in "*+?{":
            return node
        self.i += 1
        bounds: dict[str, tuple[int, int | None]] = {"*": (0, None), "+": (1, None), "?": (0, 1)}
        low, high = bounds.get(c, (0, 0))
        if c == "{":
            low, high = self._bounds()
        if (after := self._peek()) is not None and after in "*+?{":
            raise self._error("a lazy, possessive or doubled quantifier")
        return _Repeat(node, low, high)

    def _bounds(self) -> tuple[int, int | None]:
        close = self.p.find("}", self.i)
        body = self.p[self.i : close] if close >= 0 else ""
        low_text, comma, high_text = body.partition(",")
        digits = set(string.digits)
        if not low_text or not set(low_text) <= digits or not set(high_text) <= digits:
            raise self._error("a `{` that is not a {n}, {n,} or {n,m} quantifier")
        low = int(low_text)
        high = None if comma and not high_text else int(high_text or low_text)
        if low > MAX_REPEAT or (high is not None and not low <= high <= MAX_REPEAT):
            raise self._error(f"repetition bounds {{{body}}} (at most {MAX_REPEAT})")
        self.i = close + 1
        return low, high


# --- automata ----------------------------------------------------------------------------

@dataclass
class Nfa:
    """Thompson NFA: epsilon moves and moves on a CharSet; one start, one accepting state."""

    eps: list[list[int]] = field(default_factory=list)
    moves: list[list[tuple[CharSet, int]]] = field(default_factory=list)
    start: int = 0
    accept: int = 0

    def _new(self) -> int:
        if len(self.eps) >= MAX_STATES:
            raise JavaRegexError(f"the pattern needs more than {MAX_STATES} states")
        self.eps.append([])
        self.moves.append([])
        return len(self.eps) - 1

    def _build(self, node: _Node) -> tuple[int, int]:
        start, end = self._new(), self._new()
        if isinstance(node, _Chars):
            self.moves[start].append((node.chars, end))
        elif isinstance(node, _Seq):
            current = start
            for item in node.items:
                s, e = self._build(item)
                self.eps[current].append(s)
                current = e
            self.eps[current].append(end)
        elif isinstance(node, _Alt):
            for option in node.options:
                s, e = self._build(option)
                self.eps[start].append(s)
                self.eps[e].append(end)
        else:
            self._repeat(node, start, end)
        return start, end

    def _repeat(self, node: _Repeat, start: int, end: int) -> None:
        current = start
        for _ in range(node.low):
            s, e = self._build(node.item)
            self.eps[current].append(s)
            current = e
        if node.high is None:
            s, e = self._build(node.item)
            self.eps[current] += [s, end]
            self.eps[e] += [s, end]
            return
        for _ in range(node.high - node.low):
            s, e = self._build(node.item)
            self.eps[current] += [s, end]
            current = e
        self.eps[current].append(end)

    def closure(self, states: Iterable[int]) -> frozenset[int]:
        todo = list(states)
        seen = set(todo)
        while todo:
            for nxt in self.eps[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return frozenset(seen)

    def step(self, states: Iterable[int], char: str) -> frozenset[int]:
        return self.closure(n for q in states for chars, n in self.moves[q] if char in chars)

    def run(self, text: str, states: Iterable[int] | None = None) -> frozenset[int]:
        current = self.closure([self.start]) if states is None else frozenset(states)
        for char in text:
            current = self.step(current, char)
        return current

    def matches(self, text: str) -> bool:
        """`Pattern.matcher(text).matches()`."""
        return self.accept in self.run(text)

    def live(self) -> frozenset[int]:
        """States from which the accepting state can still be reached."""
        back: list[list[int]] = [[] for _ in self.eps]
        for q, targets in enumerate(self.eps):
            for n in targets:
                back[n].append(q)
        for q, moves in enumerate(self.moves):
            for _, n in moves:
                back[n].append(q)
        seen, todo = {self.accept}, [self.accept]
        while todo:
            for prev in back[todo.pop()]:
                if prev not in seen:
                    seen.add(prev)
                    todo.append(prev)
        return frozenset(seen)




def compile_java(pattern: str, *, ignore_case: bool = False) -> Nfa:
    """The NFA of a Java pattern in the accepted subset.

    Raises:
        JavaRegexError: the pattern uses anything outside the subset (the message says what).
    """
    nfa = Nfa()
    nfa.start, nfa.accept = nfa._build(_Parser(pattern, ignore_case).parse())
    return nfa
