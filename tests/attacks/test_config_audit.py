"""Create-and-flag tests for `audit-config`: dangerous configs built here, each rated high.

The review found dangerous configurations rated low or not at all, in six families: address
case, whitespace in `vmargs`, JVM options, Java regex features in `allowed_urls`, paths and URLs
in `load_models`, and JVM option variables in the environment. Each test builds the hostile
input, shows with TorchServe's own reader (its Python launcher, or its Java classes from the
installed `model-server.jar` through one JVM run) that the danger is real, and asserts the
audit's exact rating. The Java oracle also cross-checks the audit's readers against Java on
inputs that should be safe, so a reader that drifts from Java fails here.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import pytest
import ts
from ts import model_server
from ts.model_server import load_properties

from secure_handler.deploy.audit import audit_file
from secure_handler.deploy.audit.context import parse_address
from secure_handler.deploy.audit.jregex import JavaRegexError, compile_java
from secure_handler.deploy.tsconfig import ModelSpec, hardened_properties, render_properties

JAR = Path(ts.__file__).parent / "frontend" / "model-server.jar"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")

# Asks TorchServe's own classes (and the JDK) one question per line: kind, then two
# UTF-8 strings in hex. Single-file source mode: no javac step, one JVM for the module.
ORACLE = r"""
import java.io.*;
import java.net.*;
import java.nio.charset.StandardCharsets;
import java.util.*;
import java.util.regex.*;
import org.pytorch.serve.archive.utils.ArchiveUtils;
import org.pytorch.serve.util.ConfigManager;

public class AuditOracle {
    static String unhex(String h) {
        byte[] b = new byte[h.length() / 2];
        for (int i = 0; i < b.length; i++) b[i] = (byte) Integer.parseInt(h.substring(2 * i, 2 * i + 2), 16);
        return new String(b, StandardCharsets.UTF_8);
    }
    static String answer(String kind, String a, String b) {
        try {
            switch (kind) {
                case "regex": return String.valueOf(Pattern.compile(a, Pattern.CASE_INSENSITIVE).matcher(b).matches());
                case "validate": return String.valueOf(ArchiveUtils.validateURL(Arrays.asList(a.split(",")), b));
                case "address": {  // Connector.parse: the frontend's pattern, then the host
                    Matcher m = ConfigManager.ADDRESS_PATTERN.matcher(a);
                    if (!m.matches()) return "invalid";
                    if (m.group(7) != null) return "unix";
                    InetAddress host = InetAddress.getByName(m.group(3));
                    return ("https".equalsIgnoreCase(m.group(2)) ? "https " : "http ")
                        + (host.isLoopbackAddress() ? "loopback" : "public");
                }
                case "int": return String.valueOf(Integer.parseInt(a));
                case "double": return String.valueOf(Double.valueOf(a));
                case "url": return new URL(a).openConnection().getClass().getSimpleName();
                default: return "unknown";
            }
        } catch (Throwable e) {
            return "error " + e.getClass().getSimpleName();
        }
    }
    public static void main(String[] args) throws IOException {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.US_ASCII));
        for (String line; (line = in.readLine()) != null; ) {
            String[] f = line.split("\t", -1);
            System.out.println("= " + answer(f[0], unhex(f[1]), unhex(f[2])));
        }
    }
}
"""

ATTACKER = "http://attacker.example/m.mar"
# token_expiration_min spellings Double.valueOf reads as "about forever".
NO_EXPIRY = ["0x1p30", "Infinity", "NaN", " 1e9 ", "\t100000d", "+1E7"]
# Addresses that bind plain HTTP beyond loopback, in the spellings Java accepts.
PUBLIC_ADDRESSES = ["HTTP://0.0.0.0:8080", "Http://0.0.0.0:8080", "hTTp://10.1.2.3:8080",
                    "http://0:8080", "HTTP://0.0.0.0", "http://0.0.0.0:08080"]
# More addresses for the cross-check (numeric hosts only: no DNS here).
OTHER_ADDRESSES = ["http://127.0.0.1:8080", "HTTP://LOCALHOST:8080", "http://127.1:8080",
                   "HTTPS://127.0.0.1:8443", "unix:/tmp/ts.sock", "UNIX:/tmp/ts.sock",
                   "http://[::1]:8080", "ftp://0.0.0.0:8080", "http://127.0.0.1 :8080",
                   "https://0.0.0.0:8443", "http://2130706433:8080", "http://0.0.0.0:8080/"]
# Every character Python's str.split() breaks on that a line can hold (the launcher splits
# vmargs with it); \x1c..\x1f and U+2028 also end a line for str.splitlines(), not for a file.
SEPARATORS = ["\u2028", "\u2029", "\u3000", "\u0085", "\x1c", "\x1d", "\x1e", "\x1f", "\x0b",
              "\x0c", "\u00a0", "\u1680", "\u2000", "\u200a", "\u202f", "\u205f", "\t", " "]
DANGEROUS_JVM = ["@/tmp/args", "-XX:VMOptionsFile=/tmp/opts", "--patch-module=java.base=/tmp/p",
                 "--add-opens=java.base/java.lang=ALL-UNNAMED", "-javaagent:/tmp/a.jar",
                 "-agentlib:jdwp=transport=dt_socket,server=y,address=*:5005",
                 "-agentpath:/tmp/a.so", "-Xbootclasspath/a:/tmp/x", "-Djava.library.path=/tmp",
                 "-Dlog4j2.configurationFile=/tmp/l.xml", "-XX:+EnableDynamicAgentLoading",
                 "-XX:OnOutOfMemoryError=/bin/sh", "-XX:Flags=/tmp/f", "-cp", "org.evil.Main",
                 "-XX:+UnlockDiagnosticVMOptions", "-XX:+HeapDumpOnOutOfMemoryError",
                 "-Xlog:gc:file=/tmp/x", "-verbose:class", "'-Xmx1g", "-Xmx1g\"", "-Xmx1gg"]
SAFE_JVM = "-Xmx2g -Xms512m -Xss1m -XX:MaxRAMPercentage=75.0 -XX:+UseG1GC -XX:MaxGCPauseMillis=200"
# allowed_urls written with Java-only features: Java admits http://attacker with each.
JAVA_ONLY = [r"\Qhttp://\E.*", r"\p{Alpha}+://.*", r"http://[a-z&&[^x]]+\.example/.*",
             r"http://[a-z[0-9]]+\.example/.*", r"(?i)http://.*", r"http://(?=a).*",
             r"http://(?>.*)", r"h\x74tp://.*", r"http://.*+", r"https?+://.*"]
# Subset patterns that admit remote archives; the URL beside each is admitted by TorchServe.
ADMITTING = [(p, ATTACKER) for p in JAVA_ONLY] + [
    (r"http://\w+\.example/.*", ATTACKER), (r"[h]ttps?://.*", ATTACKER),
    (r"http://models\.example\.com.*", "http://models.example.com.attacker.example/m.mar"),
    (r"https://models\.example\.com(:\d+)?/.*", "https://models.example.com:443/m.mar"),
    (r"http://models\.example\.com/.*", "http://models.example.com/m.mar"),
    ("file://.*", "file://attacker.example/m.mar"),
    (r"fil[e]://[^/]*/.*\.mar", "file://attacker.example/m.mar"),
]
# Patterns inside the subset, and inputs where Java and a naive reading could differ.
SUBSET = [(r"a.b", s) for s in ("a\nb", "a\rb", "a\u2028b", "a\u0085b", "a\tb", "aéb")] + [
    (r"[A-z]+", "_^`"), (r"[^a]", "A"), (r"[^a]", "\n"), (r"\w+", "é"), (r"\d", "٣"),
    (r"a{2,3}", "aaaa"), (r"(a|ab)(c|bcd)", "abcd"), (r"[a-]x", "-X"), (r"k", "\u212a"),
    (r"s", "\u017f"), (r"^file:///s/[^/]+\.mar$", "FILE:///s/a.MAR"), (r"x$", "x"),
    (r"\.\-\/", ".-/"), (r"[\]\\]", "\\"), (r"(?:ab)*c", "ababc"), (r"a|", ""),
]


def _random_subset_cases(count: int = 400) -> list[tuple[str, str]]:
    """Seeded random patterns of the accepted subset and inputs, for the differential test."""
    rng = random.Random(20261130)
    atoms = ["a", "b", "A", "-", "/", r"\.", ".", r"\d", r"\w", "[ab]", "[^a]", "[a-c]",
             "[A-z]", "[-b]", r"[\]x]"]
    alphabet = ["a", "b", "A", "B", "-", "/", ".", "1", "_", "x", "]", "\n", "\r", "\u2028",
                "\u0085", "é"]

    def pattern(depth: int) -> str:
        pieces = []
        for _ in range(rng.randint(1, 3)):
            atom = f"({pattern(depth - 1)})" if depth and rng.random() < 0.3 else \
                rng.choice(atoms)
            pieces.append(atom + rng.choice(["", "", "*", "+", "?", "{1,2}", "{2}"]))
        body = "".join(pieces)
        return body + "|" + pattern(depth - 1) if depth and rng.random() < 0.2 else body

    return [(pattern(2), "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5))))
            for _ in range(count)]


RANDOM_SUBSET = _random_subset_cases()


def _hex(text: str) -> str:
    return text.encode("utf-8").hex()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store")
    path.chmod(0o755)
    return path.resolve()


@pytest.fixture(scope="module")
def java(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Mapping[tuple[str, str, str],
                                                                           str]:
    """Every question of this module, answered by TorchServe's classes in one JVM run."""
    old_store_pattern = f"file://{store}/[^/]+\\.mar"
    questions = [("address", a, "") for a in PUBLIC_ADDRESSES + OTHER_ADDRESSES]
    questions += [("validate", p, url) for p, url in ADMITTING]
    questions += [("regex", p, s) for p, s in SUBSET + RANDOM_SUBSET]
    questions += [("validate", old_store_pattern, f"file://{store}/%2e%2e%2fevil.mar"),
                  ("url", "file://attacker.example/m.mar", ""), ("int", "١٠٠٠٠٠٠", ""),
                  ("int", "１２", "")]
    questions += [("double", text, "") for text in NO_EXPIRY]
    source = tmp_path_factory.mktemp("oracle") / "AuditOracle.java"
    source.write_text(ORACLE)
    lines = "".join(f"{k}\t{_hex(a)}\t{_hex(b)}\n" for k, a, b in questions)
    out = subprocess.run(["java", "-cp", str(JAR), str(source)], input=lines, text=True,
                         capture_output=True, timeout=600, check=True).stdout.splitlines()
    out = [line[2:] for line in out if line.startswith("= ")]  # log4j may print warnings
    assert len(out) == len(questions), out
    return dict(zip(questions, out, strict=True))


def _audit(store: Path, tmp_path: Path, *, props: Mapping[str, str] | None = None,
           raw: bytes = b"", env: Mapping[str, str] | None = None,
           cmdline: str | None = None) -> list[tuple[str, str]]:
    base = hardened_properties(store, models=(ModelSpec("m", "m.mar"),))
    config = tmp_path / "config.properties"
    config.write_bytes(render_properties({**base, **(props or {})}).encode("ascii") + raw)
    command = f"torchserve --start --ncs --ts-config {config} --model-store {store} " \
        + (cmdline or "")
    found = audit_file(config, cmdline=command, environ=dict(env or {}), model_store=store)
    return [(f.key, f.severity) for f in found]


# --- case: addresses ------------------------------------------------------------------------


@needs_java
@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
@pytest.mark.parametrize("key", ["inference_address", "management_address"])
def test_address_in_any_case_is_high(address: str, key: str, store: Path, tmp_path: Path,
                                     java: Mapping[tuple[str, str, str], str]) -> None:
    assert java["address", address, ""] == "http public"  # TorchServe binds it, in clear
    assert (key, "high") in _audit(store, tmp_path, props={key: address})


@needs_java
def test_address_reader_agrees_with_torchserve(java: Mapping[tuple[str, str, str], str]) -> None:
    # Safe direction: whatever the audit calls local, Java binds to loopback (or a socket);
    # whatever Java refuses, the audit calls unparseable; the scheme is read the same way.
    for address in PUBLIC_ADDRESSES + OTHER_ADDRESSES:
        ours, theirs = parse_address(address), java["address", address, ""]
        assert (ours is None) == (theirs == "invalid"), address
        if ours is None or theirs.startswith("error"):
            continue
        assert theirs.split()[0] == ("unix" if ours.unix_path else ours.scheme), address
        if ours.local:
            assert theirs in ("unix", "http loopback", "https loopback"), address


# --- whitespace: vmargs as the launcher splits it --------------------------------------------


@pytest.mark.parametrize("sep", SEPARATORS, ids=[f"U+{ord(s):04X}" for s in SEPARATORS])
def test_vmargs_split_on_any_python_whitespace_is_high(sep: str, store: Path,
                                                       tmp_path: Path) -> None:
    raw = f"vmargs=-Xmx1g{sep}-javaagent:/tmp/evil.jar\n".encode()
    found = _audit(store, tmp_path, raw=raw)
    # TorchServe's own launcher reader, then its own split: the agent is a JVM argument.
    launcher = load_properties(str(tmp_path / "config.properties"))
    assert "-javaagent:/tmp/evil.jar" in launcher["vmargs"].split()
    assert ("vmargs", "high") in found
    assert ("vmargs", "low") not in found


def test_vmargs_key_hidden_behind_an_ideographic_space_is_high(store: Path,
                                                               tmp_path: Path) -> None:
    # Java reads the key `\u3000vmargs` (unknown to it); the launcher strips it to `vmargs`.
    found = _audit(store, tmp_path, raw="\u3000vmargs=-javaagent:/tmp/evil.jar\n".encode())
    assert load_properties(str(tmp_path / "config.properties"))["vmargs"] == \
        "-javaagent:/tmp/evil.jar"
    assert ("vmargs", "high") in found


def test_vmargs_in_latin1_bytes_is_high(store: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Not UTF-8: the launcher in an ISO-8859-1 locale decodes \x85 as NEL and splits there.
    found = _audit(store, tmp_path, raw=b"vmargs=-Xmx1g\x85-javaagent:/tmp/evil.jar\n")
    monkeypatch.setattr(model_server, "open", partial(open, encoding="latin-1"), raising=False)
    launcher = model_server.load_properties(str(tmp_path / "config.properties"))
    assert "-javaagent:/tmp/evil.jar" in launcher["vmargs"].split()
    assert ("vmargs", "high") in found


# --- JVM options: an allowlist, from the config and from the environment ---------------------


@pytest.mark.parametrize("option", DANGEROUS_JVM)
def test_jvm_option_outside_the_allowlist_is_high(option: str, store: Path,
                                                  tmp_path: Path) -> None:
    found = _audit(store, tmp_path, raw=f"vmargs=-Xmx1g {option}\n".encode())
    assert ("vmargs", "high") in found
    for name in ("JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS",
                 "OPENJ9_JAVA_OPTIONS", "IBM_JAVA_OPTIONS"):
        assert (name, "high") in _audit(store, tmp_path, env={name: f"-Xmx1g {option}"}), name


def test_heap_and_gc_settings_are_low(store: Path, tmp_path: Path) -> None:
    env = {"JAVA_TOOL_OPTIONS": SAFE_JVM, "JDK_JAVA_OPTIONS": SAFE_JVM}
    found = _audit(store, tmp_path, raw=f"vmargs={SAFE_JVM}\n".encode(), env=env)
    assert sorted(found) == [("JAVA_TOOL_OPTIONS", "low"), ("JDK_JAVA_OPTIONS", "low"),
                             ("vmargs", "low")]


def test_quoted_jvm_environment_is_high(store: Path, tmp_path: Path) -> None:
    # The JVM honours quotes; the audit does not interpret them, it refuses them.
    env = {"JAVA_TOOL_OPTIONS": "'-Xmx1g -javaagent:/tmp/a.jar'"}
    assert ("JAVA_TOOL_OPTIONS", "high") in _audit(store, tmp_path, env=env)


@pytest.mark.parametrize("name", ["PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "JAVA_HOME",
                                  "PYTHONHOME"])
def test_loader_variables_naming_writable_paths_are_high(name: str, store: Path,
                                                         tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # a folder any user can write: anyone can plant code there
    shared.mkdir()
    shared.chmod(0o777)
    for value in (str(shared), f"/usr/lib:{shared}/lib", f"{shared}/missing/lib.so"):
        value = value if name != "JAVA_HOME" else value.split(":")[-1]
        assert (name, "high") in _audit(store, tmp_path, env={name: value}), value
    private = tmp_path / "private"
    private.mkdir(mode=0o755)
    private.chmod(0o755)
    expected = [(name, "medium")] if name == "LD_PRELOAD" else []
    assert _audit(store, tmp_path, env={name: str(private)}) == expected


# --- Java regex: allowed_urls ------------------------------------------------------------------


@needs_java
@pytest.mark.parametrize(("pattern", "url"), ADMITTING, ids=[p for p, _ in ADMITTING])
def test_allowed_urls_admitting_remote_archives_are_flagged(
        pattern: str, url: str, store: Path, tmp_path: Path,
        java: Mapping[tuple[str, str, str], str]) -> None:
    assert java["validate", pattern, url] == "true"  # TorchServe's own check admits it
    expected = "medium" if url.startswith("https://models.example.com") else "high"
    found = _audit(store, tmp_path, props={"allowed_urls": f"{pattern},file://{store}/m\\.mar"})
    assert [f for f in found if f[0] == "allowed_urls"] == [("allowed_urls", expected)]


@needs_java
def test_file_url_with_a_host_is_fetched_over_ftp(
        java: Mapping[tuple[str, str, str], str]) -> None:
    assert java["url", "file://attacker.example/m.mar", ""] == "FtpURLConnection"


@needs_java
def test_percent_encoded_escape_from_the_store(store: Path, tmp_path: Path,
                                               java: Mapping[tuple[str, str, str], str]) -> None:
    # The pattern `config` wrote before: `[^/]+` admits %2e%2e%2f, which Java decodes to ../
    old = f"file://{store}/[^/]+\\.mar"
    assert java["validate", old, f"file://{store}/%2e%2e%2fevil.mar"] == "true"
    assert ("allowed_urls", "medium") in _audit(store, tmp_path, props={"allowed_urls": old})
    assert _audit(store, tmp_path) == []  # today's generated pattern is clean


@needs_java
def test_subset_reader_agrees_with_java(java: Mapping[tuple[str, str, str], str]) -> None:
    for pattern, text in SUBSET:
        assert compile_java(pattern, ignore_case=True).matches(text) == \
            (java["regex", pattern, text] == "true"), (pattern, text)


@needs_java
def test_subset_reader_agrees_with_java_on_random_patterns(
        java: Mapping[tuple[str, str, str], str]) -> None:
    mismatches = [(p, s) for p, s in RANDOM_SUBSET
                  if compile_java(p, ignore_case=True).matches(s)
                  != (java["regex", p, s] == "true")]
    assert mismatches == []
    assert {java["regex", p, s] for p, s in RANDOM_SUBSET} == {"true", "false"}


def test_patterns_beyond_the_cost_bound_are_refused(store: Path, tmp_path: Path) -> None:
    hosts = "|".join(f"h{i}\\.example\\.com" for i in range(300))
    with pytest.raises(JavaRegexError, match="states"):
        compile_java(f"https://({hosts})/.*", ignore_case=True)
    with pytest.raises(JavaRegexError, match="bounds"):
        compile_java("a{65}")
    found = _audit(store, tmp_path, props={"allowed_urls": f"https://({hosts})/.*"})
    assert ("allowed_urls", "high") in found


@pytest.mark.parametrize("pattern", JAVA_ONLY)
def test_constructs_outside_the_subset_are_refused(pattern: str) -> None:
    with pytest.raises(JavaRegexError):
        compile_java(pattern, ignore_case=True)


# --- paths and URLs in load_models -------------------------------------------------------------


@pytest.mark.parametrize("item", [
    "m=file:///tmp/evil.mar", "m=FILE:///tmp/evil.mar", "m=/tmp/evil.mar", "m=../evil.mar",
    "m=sub/evil.mar", "m=HTTPS://attacker.example/m.mar", "m=ftp://attacker.example/m.mar",
    "m=m.mar,n=file:///tmp/evil.mar", "m= m.mar", "m=m.mar\\", "m=%2e%2e%2fevil.mar"])
def test_load_models_outside_the_store_is_high(item: str, store: Path, tmp_path: Path) -> None:
    assert ("load_models", "high") in _audit(store, tmp_path, props={"load_models": item})


def test_file_urls_with_load_models_outside_the_store(store: Path, tmp_path: Path) -> None:
    props = {"allowed_urls": "file://.*", "load_models": "m=file:///tmp/evil.mar"}
    found = _audit(store, tmp_path, props=props)
    assert ("allowed_urls", "high") in found
    assert ("load_models", "high") in found
    cmd = _audit(store, tmp_path, cmdline="--models m=file:///tmp/evil.mar")
    assert ("load_models", "high") in cmd


def test_model_snapshot_is_high(store: Path, tmp_path: Path) -> None:
    snapshot = '{"name":"s","modelCount":1,"models":{"m":{"1.0":{"marName":"file:///x.mar"}}}}'
    assert ("model_snapshot", "high") in _audit(store, tmp_path,
                                                props={"model_snapshot": snapshot})


def test_store_names_and_all_are_accepted(store: Path, tmp_path: Path) -> None:
    for item in ("ALL", "m=m.mar", "m.mar", "m=m-1.0_x.mar,n=n.mar"):
        assert _audit(store, tmp_path, props={"load_models": item}) == [], item


# --- numbers as Java reads them, unknown keys ----------------------------------------------


@needs_java
def test_unicode_digits_are_numbers_to_java(store: Path, tmp_path: Path,
                                            java: Mapping[tuple[str, str, str], str]) -> None:
    assert java["int", "١٠٠٠٠٠٠", ""] == "1000000"
    found = _audit(store, tmp_path, props={"job_queue_size": "١٠٠٠٠٠٠"})
    assert ("job_queue_size", "high") in found


@needs_java
@pytest.mark.parametrize("text", NO_EXPIRY)
def test_token_expiry_as_java_reads_it(text: str, store: Path, tmp_path: Path,
                                       java: Mapping[tuple[str, str, str], str]) -> None:
    assert not float(java["double", text, ""]) <= 24 * 60  # Java: tokens live > a day
    found = _audit(store, tmp_path, props={"token_expiration_min": text})
    assert ("token_expiration_min", "medium") in found


@pytest.mark.parametrize("key", ["enable_model_apis", "Inference_address", "vmarg",
                                 "allowed_url", "x-custom"])
def test_unknown_keys_are_flagged(key: str, store: Path, tmp_path: Path) -> None:
    assert (key, "medium") in _audit(store, tmp_path, props={key: "true"})


# --- two JSON readers: the worker's (lenient) before the handler's (strict) -------------------


def test_worker_side_body_decoding_is_flagged(store: Path, tmp_path: Path) -> None:
    # decode_input_request=true (TorchServe's default) makes the worker json.loads exact
    # application/json bodies itself: the last of duplicate keys wins before our reader looks.
    assert ("decode_input_request", "medium") not in _audit(store, tmp_path)
    for value in ("true", "TRUE"):
        found = _audit(store, tmp_path, props={"decode_input_request": value})
        assert ("decode_input_request", "medium") in found, value
    base = hardened_properties(store, models=(ModelSpec("m", "m.mar"),))
    assert base["decode_input_request"] == "false"
    del base["decode_input_request"]
    config = tmp_path / "missing.properties"
    config.write_text(render_properties(base))
    found = audit_file(config, cmdline=f"torchserve --start --ncs --ts-config {config} "
                       f"--model-store {store}", environ={}, model_store=store)
    assert ("decode_input_request", "medium") in [(f.key, f.severity) for f in found]
