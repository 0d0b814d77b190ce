"""`secure_handler.deploy.javaprops` reads config.properties exactly like the JVM does.

The reference is the real `java.util.Properties.load(InputStream)` of the Java 17 on PATH: a
small Java program dumps what it parsed, and every case (hand-written and random) must match.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_handler.deploy.javaprops import (
    PropertiesError,
    dumps,
    entries,
    launcher_view,
    load,
    loads,
)

JAVA_DUMP = r"""
import java.io.*;
import java.nio.file.*;
import java.util.*;

public class PropsDump {
    static String hex(String s) {
        StringBuilder b = new StringBuilder();
        for (char c : s.toCharArray()) b.append(String.format("%04x", (int) c));
        return b.toString();
    }
    public static void main(String[] args) throws Exception {
        for (String path : args) {
            Properties p = new Properties();
            try (InputStream in = Files.newInputStream(Paths.get(path))) {
                p.load(in);
            } catch (IllegalArgumentException e) {
                System.out.println("ERROR");
                continue;
            }
            StringBuilder line = new StringBuilder("OK");
            for (String k : new TreeSet<>(p.stringPropertyNames()))
                line.append(" ").append(hex(k)).append(":").append(hex(p.getProperty(k)));
            System.out.println(line);
        }
    }
}
"""

CASES = {
    "plain": "a=1\nb = 2\nc:3\nd 4\n",
    "separators": "k1 = = v\nk2 :: v\nk3\t\f=v\nk4 \t v w \nk5=\nk6\n",
    "leading_ws": "   a=1\n\t\fb=2\n",
    "comments": "# c\n! c\n  # indented\na=#not comment\nb=!x\n#x=1\n",
    "comment_backslash": "# comment ending in backslash \\\nreal=1\n",
    "continuation": "a=one\\\n    two\\\n\tthree\nb=x\n",
    "continuation_comment": "a=x\\\n# not a comment\n",
    "continuation_blank": "a=x\\\n\nb=2\n",
    "even_backslashes": "a=x\\\\\nb=y\n",
    "crlf": "a=1\r\nb=2\\\r\n  3\r\nc=4\rd=5\n",
    "cr_continuation": "a=1\\\r\r\nb=2\n",
    "escapes": "a=\\t\\n\\r\\f\\q\\=\\:\\ x\nk\\ ey\\=x\\:y=v\n",
    "unicode": "a=\\u0041\\u00e9\\uD83D\\uDE00\nb=\\u005c\\u006e\n",
    "latin1": "caf\xe9=na\xefve\n",
    "trailing_ws": "a=true \nb= x\t\n",
    "duplicates": "a=1\na=2\n",
    "eof_backslash": "a=1\\",
    "eof_no_newline": "a=1",
    "only_key": "alone",
    "blank_lines": "\n\n   \n\t\na=1\n\n",
    "backslash_only_line": "\\\n#c\na=1\n",
    "key_escapes_sep": "a\\=b=c\na\\ b c\n",
    "empty": "",
}

BAD_CASES = {"short_u": "a=\\u12\n", "bad_hex": "a=\\uZZZZ\n", "eof_u": "a=\\u"}


def _java_available() -> bool:
    return shutil.which("java") is not None


def _java_parse(tmp_path: Path, docs: list[str]) -> list[dict[str, str] | None]:
    """Parse each doc (written as ISO-8859-1 bytes) with the real JVM."""
    src = tmp_path / "PropsDump.java"
    src.write_text(JAVA_DUMP)
    files = []
    for index, doc in enumerate(docs):
        path = tmp_path / f"case{index}.properties"
        path.write_bytes(doc.encode("latin-1"))
        files.append(str(path))
    out = subprocess.run(["java", str(src), *files], capture_output=True, text=True,
                         check=True, timeout=300).stdout.splitlines()
    assert len(out) == len(docs)
    return [_decode_dump(line) for line in out]


def _unhex(text: str) -> str:
    units = bytes.fromhex(text)
    return units.decode("utf-16-be", "surrogatepass")


def _decode_dump(line: str) -> dict[str, str] | None:
    if line == "ERROR":
        return None
    pairs = line.split(" ")[1:]
    return {_unhex(k): _unhex(v) for k, v in (pair.split(":") for pair in pairs)}


def _ours(doc: str) -> dict[str, str] | None:
    try:
        return loads(doc)
    except PropertiesError:
        return None


needs_java = pytest.mark.skipif(not _java_available(), reason="Java is not installed")


@needs_java
def test_matches_the_jvm_on_hand_written_cases(tmp_path: Path) -> None:
    docs = list(CASES.values()) + list(BAD_CASES.values())
    expected = _java_parse(tmp_path, docs)
    for name, doc, java in zip([*CASES, *BAD_CASES], docs, expected, strict=True):
        assert _ours(doc) == java, name


@needs_java
def test_matches_the_jvm_on_random_documents(tmp_path: Path) -> None:
    # Random text over the characters that matter to the grammar; one JVM run for all of it.
    alphabet = ["a", "b", "=", ":", " ", "\t", "\f", "\\", "\n", "\r", "#", "!", "u", "0",
                "4", "1", "e", "é", "n", "t"]
    rng = random.Random(20231003)
    docs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
            for _ in range(3000)]
    expected = _java_parse(tmp_path, docs)
    mismatches = [doc for doc, java in zip(docs, expected, strict=True) if _ours(doc) != java]
    assert mismatches == []


def test_known_values() -> None:
    props = loads(CASES["continuation"] + CASES["escapes"] + CASES["unicode"])
    assert props["a"] == "\u0041\u00e9\U0001F600"
    assert props["b"] == "\\n"
    assert props["k ey=x:y"] == "v"
    assert loads(CASES["continuation"])["a"] == "onetwothree"
    assert loads(CASES["trailing_ws"]) == {"a": "true ", "b": "x\t"}
    assert loads(CASES["continuation_comment"]) == {"a": "x# not a comment"}


def test_malformed_unicode_escape_is_an_error() -> None:
    for doc in BAD_CASES.values():
        with pytest.raises(PropertiesError, match="uxxxx"):
            loads(doc)


def test_entries_keep_duplicates_and_line_numbers() -> None:
    found = entries("# head\n\na=1\nb=2\\\n  3\na=4\n")
    assert [(e.key, e.value, e.line) for e in found] == [
        ("a", "1", 3), ("b", "23", 4), ("a", "4", 6)]


def test_load_reads_bytes_as_latin1(tmp_path: Path) -> None:
    path = tmp_path / "c.properties"
    path.write_bytes("store=/m\u00e9dia\n".encode())  # UTF-8 on disk: Java sees two chars
    assert load(path)["store"] == "/m\u00c3\u00a9dia"
    path.write_text(dumps({"store": "/m\u00e9dia"}), "ascii")
    assert load(path)["store"] == "/m\u00e9dia"


def test_launcher_reads_the_file_differently() -> None:
    doc = "x=1\\\nvmargs=-javaagent:/tmp/a.jar\n! plugins_path=/p\nk:v\n"
    assert "vmargs" not in loads(doc)
    assert launcher_view(doc)["vmargs"] == "-javaagent:/tmp/a.jar"
    assert "! plugins_path" in launcher_view(doc)
    assert "k" in loads(doc)
    assert "k" not in launcher_view(doc)


_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


@given(st.dictionaries(_text, _text, max_size=8))
def test_dumps_round_trips(props: dict[str, str]) -> None:
    rendered = dumps(props, header="generated\nby a test")
    assert rendered.isascii()
    assert loads(rendered) == props
