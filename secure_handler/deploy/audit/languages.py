"""Questions about the strings a Java pattern admits, answered for all strings at once.

`witness` intersects a pattern's NFA (`jregex.compile_java`) with a small DFA ("starts with
http://", "a file URL outside the store") and returns a shortest shared string or None.
`authorities` lists the URL authorities a pattern admits after a scheme, or says that it admits
hosts that are not fixed names. Neither tries sample URLs: the answer covers every string.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from secure_handler.deploy.audit.jregex import ANY, DIGIT, CharSet, Nfa

NOT_DIGIT = DIGIT.complement()

__all__ = ["Dfa", "authorities", "literal", "witness"]


@dataclass(frozen=True)
class Dfa:
    """A complete DFA: each state's moves partition the alphabet (built by the helpers)."""

    moves: tuple[tuple[tuple[CharSet, int], ...], ...]
    accepting: frozenset[int]

    @staticmethod
    def prefix(steps: Sequence[CharSet]) -> Dfa:
        """Strings that start with `steps` (one character set per position)."""
        n = len(steps)  # state n: the prefix is read; n + 1: rejected
        moves: list[tuple[tuple[CharSet, int], ...]] = [
            ((chars, k + 1), (chars.complement(), n + 1)) for k, chars in enumerate(steps)]
        moves += [((ANY, n),), ((ANY, n + 1),)]
        return Dfa(_complete(moves), frozenset({n}))

    @staticmethod
    def outside(prefix: Sequence[CharSet], inside: Sequence[CharSet], tail: CharSet) -> Dfa:
        """Strings that start with `prefix` but are not `prefix inside tail+`."""
        steps = [*prefix, *inside, tail]
        n = len(steps)  # state n: inside, in the tail loop; n + 1: rejected; n + 2: outside
        moves: list[tuple[tuple[CharSet, int], ...]] = [
            ((chars, k + 1), (chars.complement(), n + 1 if k < len(prefix) else n + 2))
            for k, chars in enumerate(steps)]
        moves += [((tail, n), (tail.complement(), n + 2)), ((ANY, n + 1),), ((ANY, n + 2),)]
        return Dfa(_complete(moves), frozenset(range(len(prefix), n)) | {n + 2})


    @staticmethod
    def unprefixed(prefixes: Sequence[str]) -> Dfa:
        """Strings that leave every one of `prefixes` (ASCII case ignored) at some character:
        a trie of the prefixes whose every other move goes to the accepting `outside` state.
        A string that ends inside the trie (a part of a prefix) is not accepted."""
        nodes: list[dict[str, int]] = [{}]
        ends: set[int] = set()
        for prefix in prefixes:
            node = 0
            for char in prefix.lower():
                if char not in nodes[node]:
                    nodes.append({})
                    nodes[node][char] = len(nodes) - 1
                node = nodes[node][char]
            ends.add(node)
        inside, outside = len(nodes), len(nodes) + 1
        moves: list[tuple[tuple[CharSet, int], ...]] = []
        for node, children in enumerate(nodes):
            if node in ends:  # a whole prefix is read: judged elsewhere
                moves.append(((ANY, inside),))
                continue
            steps = [(CharSet.of(c).case_insensitive(), n) for c, n in children.items()]
            rest = CharSet.union_all(chars for chars, _ in steps).complement()
            moves.append((*steps, (rest, outside)))
        moves += [((ANY, inside),), ((ANY, outside),)]
        return Dfa(_complete(moves), frozenset({outside}))


def _dfa_live(dfa: Dfa) -> frozenset[int]:
    """States from which an accepting state can still be reached."""
    seen = set(dfa.accepting)
    grew = True
    while grew:
        grew = False
        for state, moves in enumerate(dfa.moves):
            if state not in seen and any(n in seen for _, n in moves):
                seen.add(state)
                grew = True
    return frozenset(seen)


def _complete(moves: Sequence[Sequence[tuple[CharSet, int]]]
              ) -> tuple[tuple[tuple[CharSet, int], ...], ...]:
    return tuple(tuple((chars, n) for chars, n in state if chars) for state in moves)


def literal(text: str, ignore_case: bool = True) -> list[CharSet]:
    """One CharSet per character of `text` (both ASCII cases when `ignore_case`)."""
    return [CharSet.of(c).case_insensitive() if ignore_case else CharSet.of(c) for c in text]


def witness(nfa: Nfa, dfa: Dfa) -> str | None:
    """A string in both L(nfa) and L(dfa), short and readable, or None when there is none."""
    start = (nfa.start, 0)
    parent: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    todo = deque([start])
    hopeful, nfa_live = _dfa_live(dfa), nfa.live()  # prune pairs that can no longer accept
    shared: dict[tuple[CharSet, CharSet], str | None] = {}
    while todo:
        pair = todo.popleft()
        q, d = pair
        if q == nfa.accept and d in dfa.accepting:
            return _spell(parent, pair)
        nexts = [((n, d), "") for n in nfa.eps[q]]
        for chars, n in nfa.moves[q]:
            for dchars, dn in dfa.moves[d]:
                if (chars, dchars) not in shared:
                    both = chars & dchars
                    shared[chars, dchars] = both.sample() if both else None
                if (char := shared[chars, dchars]) is not None:
                    nexts.append(((n, dn), char))
        for nxt, char in nexts:
            if nxt[1] not in hopeful or nxt[0] not in nfa_live:
                continue
            if nxt not in parent:
                parent[nxt] = (pair, char)
                todo.append(nxt)
    return None


def _spell(parent: dict[tuple[int, int], tuple[tuple[int, int], str] | None],
           pair: tuple[int, int]) -> str:
    chars: list[str] = []
    link = parent[pair]
    while link is not None:
        pair, char = link
        chars.append(char)
        link = parent[pair]
    return "".join(reversed(chars))


def authorities(nfa: Nfa, scheme: str, limit: int = 16) -> list[str] | None:
    """The URL authorities (`user@host:port`) L(nfa) admits after `scheme://`, lowercased.

    The authority ends at the first `/`, `?` or `#`, as `java.net.URL` cuts it. The answer is
    a sorted list when every admitted authority is one of at most `limit` fixed strings (each
    position a single character up to ASCII case), `[]` when the scheme is not admitted at all,
    and None when some position is a class, a loop or there are too many: "any host".
    """
    start = nfa.run(scheme.lower())
    if not start:
        return []
    stops = CharSet.of("/?#")
    live = nfa.live()
    exits = frozenset(q for q in range(len(nfa.eps)) if q == nfa.accept or any(
        c & stops and n in live for c, n in nfa.moves[q]))
    walker = _AuthorityWalk(nfa, stops.complement(), exits, limit)
    walker.prepare()
    return walker.run(start)


@dataclass
class _AuthorityWalk:
    nfa: Nfa
    alphabet: CharSet
    exits: frozenset[int]
    limit: int
    budget: int = 20_000  # walk steps; a pattern that needs more is "any host"
    found: set[str] = field(default_factory=set)
    usable: list[list[tuple[CharSet, int]]] = field(default_factory=list)
    useful: frozenset[int] = frozenset()

    def prepare(self) -> None:
        """Per state, its moves restricted to authority characters that can still end the
        authority; computed once, so the walk costs O(steps), not O(steps x states)."""
        back: list[list[int]] = [[] for _ in self.nfa.eps]
        self.usable = [[] for _ in self.nfa.eps]
        for q, moves in enumerate(self.nfa.moves):
            for chars, n in moves:
                if part := chars & self.alphabet:
                    self.usable[q].append((part, n))
                    back[n].append(q)
            for n in self.nfa.eps[q]:
                back[n].append(q)
        seen, todo = set(self.exits), list(self.exits)
        while todo:
            for prev in back[todo.pop()]:
                if prev not in seen:
                    seen.add(prev)
                    todo.append(prev)
        self.useful = frozenset(seen)

    def run(self, start: frozenset[int]) -> list[str] | None:
        if not self._walk(start, ""):
            return None
        return sorted(self.found)

    def _walk(self, current: frozenset[int], prefix: str) -> bool:
        self.budget -= 1
        if self.budget < 0 or len(prefix) > 255 or len(self.found) > self.limit:
            return False
        if ":" in prefix.rpartition("@")[2] and self._port_digits_only(current):
            # A port: any digits after a fixed host still reach that host only.
            self.found.add(prefix + "<port>")
            return True
        if current & self.exits:
            self.found.add(prefix)
        by_char: dict[str, set[int]] = {}
        for q in current:
            for usable, n in self.usable[q]:
                if n not in self.useful:
                    continue
                char = _single(usable)
                if char is None:
                    return False
                by_char.setdefault(char, set()).add(n)
        return all(self._walk(self.nfa.closure(targets), prefix + char)
                   for char, targets in sorted(by_char.items()))

    def _port_digits_only(self, current: frozenset[int]) -> bool:
        """Every way from here to the end of the authority reads digits only."""
        seen, todo = set(current), list(current)
        while todo:
            q = todo.pop()
            for n in self.nfa.eps[q]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
            for usable, n in self.usable[q]:
                if n not in self.useful:
                    continue
                if usable & NOT_DIGIT:
                    return False
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return True


def _single(chars: CharSet) -> str | None:
    """The one character `chars` stands for, up to ASCII case; None for a real class."""
    if chars.size() > 2:
        return None
    folded = {chr(code).lower() if chr(code).isascii() else chr(code)
              for lo, hi in chars.ranges for code in range(lo, hi + 1)}
    return folded.pop() if len(folded) == 1 else None
