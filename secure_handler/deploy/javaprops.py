"""Java `.properties` files, read the way TorchServe reads them.

TorchServe's frontend loads `config.properties` with `java.util.Properties.load(InputStream)`:
ISO-8859-1 bytes, `=` `:` or whitespace between key and value, `\\` escapes including
`\\uXXXX`, a trailing odd backslash continues the line, `#` and `!` start comments, leading
whitespace is dropped on every physical line. A line-by-line reader gets all of that wrong, and
an audit that parses differently from the server can be fooled. `loads` follows the JDK 17
`Properties.LineReader` / `load0` / `loadConvert` algorithm step for step (tests compare it
with the real JVM).

TorchServe's Python launcher (`ts/model_server.py`) reads the same file a second time with its
own line-by-line parser to find `vmargs` and `plugins_path`. `launcher_view` reproduces that
reader, so an audit can see both and notice where they disagree.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from secure_handler.errors import ConfigurationError

__all__ = [
    "Entry",
    "PropertiesError",
    "dumps",
    "entries",
    "escape_key",
    "escape_value",
    "launcher_view",
    "decode",
    "load",
    "loads",
]

_WHITESPACE = " \t\f"
_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "f": "\f"}
_HEX = frozenset("0123456789abcdefABCDEF")


class PropertiesError(ConfigurationError, ValueError):
    """The file is not valid Java properties (Java throws IllegalArgumentException here)."""


@dataclass(frozen=True)
class Entry:
    """One key/value pair and the physical line its logical line starts on (1-based)."""

    key: str
    value: str
    line: int


class _LineReader:
    """A transcription of JDK 17 `Properties.LineReader`, quirks included.

    `\\r\\n`, `\\r` and `\\n` end a physical line; a CR that ends a continuation
    swallows one LF; a continuation right before the end of the file still yields a (possibly
    empty) line; a `#` or `!` starts a comment only where the logical line is still empty.
    """

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.skip_lf = text, 0, False

    def read_line(self) -> tuple[int, str] | None:
        """The next logical line and its start offset, escapes untouched; None at the end."""
        text, n = self.text, len(self.text)
        buf: list[str] = []
        skip_ws, appended_begin, backslash, start = True, False, False, self.pos
        while self.pos < n:
            c = text[self.pos]
            self.pos += 1
            if self._swallowed_lf(c):
                continue
            if skip_ws:
                if c in _WHITESPACE or (not appended_begin and c in "\r\n"):
                    continue
                skip_ws, appended_begin = False, False
            if not buf and c in "#!":
                if not self._skip_comment():
                    return None
                skip_ws = True
            elif c not in "\r\n":
                start = start if buf else self.pos - 1
                buf.append(c)
                backslash = (not backslash) if c == "\\" else False
            elif not buf:
                skip_ws = True
            elif self.pos >= n or not backslash:  # the logical line ends here
                break
            else:  # continuation: drop the backslash, skip the next line's indent
                buf.pop()
                skip_ws, appended_begin, backslash = True, True, False
                self.skip_lf = c == "\r"
        if not buf:
            return None
        if backslash:
            buf.pop()
        return start, "".join(buf)

    def _swallowed_lf(self, c: str) -> bool:
        """True for the LF of a CR LF that ended a continuation line."""
        swallow, self.skip_lf = self.skip_lf and c == "\n", False
        return swallow

    def _skip_comment(self) -> bool:
        """Consume the rest of a comment line and its terminator; False at end of file."""
        ends = [p for p in (self.text.find("\r", self.pos), self.text.find("\n", self.pos))
                if p >= 0]
        if not ends:
            self.pos = len(self.text)
            return False
        self.pos = min(ends) + 1
        return True


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    reader = _LineReader(text)
    while (item := reader.read_line()) is not None:
        yield item


def _line_number(text: str, offset: int) -> int:
    """1-based physical line of `offset`, counting `\\r\\n` once."""
    head = text[:offset]
    return head.count("\n") + head.count("\r") - head.count("\r\n") + 1


def _split(logical: str) -> tuple[str, str]:
    """Key and value of one logical line, still escaped (`Properties.load0`)."""
    limit = len(logical)
    key_len, value_start, has_sep, preceding_backslash = 0, limit, False, False
    while key_len < limit:
        c = logical[key_len]
        if c in "=:" and not preceding_backslash:
            value_start, has_sep = key_len + 1, True
            break
        if c in _WHITESPACE and not preceding_backslash:
            value_start = key_len + 1
            break
        preceding_backslash = (not preceding_backslash) if c == "\\" else False
        key_len += 1
    while value_start < limit:
        c = logical[value_start]
        if c not in _WHITESPACE:
            if not has_sep and c in "=:":
                has_sep = True
            else:
                break
        value_start += 1
    return logical[:key_len], logical[value_start:]


def _unescape(raw: str, line: int) -> str:
    """`Properties.loadConvert`: `\\t \\n \\r \\f \\uXXXX`, any other `\\x` is `x`."""
    if "\\" not in raw:
        return raw
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        i += 1
        if c != "\\":
            out.append(c)
            continue
        if i >= n:  # cannot happen after _logical_lines; Java would read past the end
            break
        c = raw[i]
        i += 1
        if c == "u":
            digits = raw[i : i + 4]
            if len(digits) < 4 or not set(digits) <= _HEX:
                raise PropertiesError(f"line {line}: malformed \\uxxxx encoding")
            out.append(chr(int(digits, 16)))
            i += 4
        else:
            out.append(_ESCAPES.get(c, c))
    # \uD83D\uDE00 pairs are UTF-16 code units in Java; join them into one code point.
    joined = "".join(out).encode("utf-16-le", "surrogatepass")
    return joined.decode("utf-16-le", "surrogatepass")


def entries(text: str) -> list[Entry]:
    """Every key/value pair in file order, duplicates included (the last one wins in Java).

    Raises:
        PropertiesError: on a malformed `\\uXXXX` escape, as Java does.
    """
    result = []
    for offset, logical in _logical_lines(text):
        key, value = _split(logical)
        line = _line_number(text, offset)
        result.append(Entry(_unescape(key, line), _unescape(value, line), line))
    return result


def loads(text: str) -> dict[str, str]:
    """Parse properties text into key → value, the last duplicate winning."""
    return {entry.key: entry.value for entry in entries(text)}


def decode(data: bytes) -> str:
    """Bytes as `Properties.load(InputStream)` sees them: ISO-8859-1, one char per byte."""
    return data.decode("latin-1")


def load(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a file exactly as TorchServe's frontend does (bytes → ISO-8859-1 → `loads`)."""
    with open(path, "rb") as handle:
        return loads(decode(handle.read()))


def launcher_view(text: str) -> dict[str, str]:
    """What TorchServe's Python launcher reads (`ts/model_server.py::load_properties`).

    It strips each physical line, skips lines starting with `#`, splits on the first `=` and
    strips both sides: no `:` separator, no `!` comments, no escapes, no continuations. The
    launcher takes `vmargs` (extra JVM arguments) and `plugins_path` (extra classpath) from it.
    Lines end where a text-mode file iterator ends them (`\n`, `\r`, `\r\n`), not at every
    character `str.splitlines()` breaks on (`\x1c`, U+2028...): those stay inside the line,
    where `strip()` and `str.split()` still treat them as spaces. `text` must be decoded as
    the launcher decodes it (its locale's encoding, usually UTF-8).
    """
    props: dict[str, str] = {}
    for raw in re.split(r"\r\n|\r|\n", text):
        line = raw.strip()
        if line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    return props


def _escape(text: str, is_key: bool) -> str:
    out: list[str] = []
    for index, c in enumerate(text):
        code = ord(c)
        if c == "\\":
            out.append("\\\\")
        elif c in "\t\n\r\f":
            out.append("\\" + {"\t": "t", "\n": "n", "\r": "r", "\f": "f"}[c])
        elif c == " " and (is_key or index == 0):
            out.append("\\ ")  # a key ends at a space; a value loses its leading spaces
        elif is_key and c in "=:#!":
            out.append("\\" + c)
        elif 0x20 <= code <= 0x7E:
            out.append(c)
        else:
            # Java reads the file as ISO-8859-1; \uXXXX keeps non-ASCII exact in any locale.
            units = c.encode("utf-16-be", "surrogatepass")
            out.extend(f"\\u{units[k]:02X}{units[k + 1]:02X}" for k in range(0, len(units), 2))
    return "".join(out)


def escape_key(key: str) -> str:
    """A key written so that `loads` (and Java) read back exactly `key`."""
    return _escape(key, is_key=True)


def escape_value(value: str) -> str:
    """A value written so that `loads` (and Java) read back exactly `value`."""
    return _escape(value, is_key=False)


def dumps(props: Mapping[str, str], header: str = "") -> str:
    """Serialise key → value, ASCII only, one `key=value` per line, `# header` lines first."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{escape_key(key)}={escape_value(value)}" for key, value in props.items()]
    return "\n".join(lines) + "\n"
