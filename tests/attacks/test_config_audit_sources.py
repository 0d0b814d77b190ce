"""Create-and-flag tests for `audit-config`, second review: where models and code come from.

Each test builds a setting that makes TorchServe load an archive or code from outside what
`serve` verified, shows it with TorchServe's own code where it runs here (its download path in
`model-server.jar`, its Python launcher), and asserts the audit rates it high: `allowed_urls`
admitting URL shapes java.net.URL opens beyond http(s):// and file://, `load_models` names that
are not `.mar` files, `default_service_handler` and `service_envelope`, and `plugins_path`
entries that are relative or open to other users.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
from attacks.audit_support import (
    JAR,
    JAVA,
    findings,
    hardened,
    launcher_command,
    make_world,
    needs_java,
    write_config,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("readers"))


# --- what replaces an archive's own code --------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [
    ("default_service_handler", "/tmp/evil.py:handle"),
    ("default_service_handler", "image_classifier"),
    ("service_envelope", "json"),
    ("service_envelope", "..image_classifier"),
])
def test_handler_and_envelope_defaults_are_high(key: str, value: str, world: dict[str, Path],
                                                tmp_path: Path) -> None:
    # ModelManager.createModelArchive: an archive without a handler gets
    # default_service_handler; every archive gets service_envelope, which the worker imports
    # as `.<value>` relative to ts.torch_handler.request_envelope.
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"], {key: value}))
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    assert (key, "high") in findings(config, cmdline=command)


# --- load_models: only `.mar` files, and ALL only as the whole value ----------------------------


@pytest.mark.parametrize("value", ["m=m", "m", "m.mar,all", "m.mar,ALL", "m=m.tar.gz",
                                   "m=m.model"])
def test_load_models_naming_folders_or_other_formats_is_high(value: str, world: dict[str, Path],
                                                             tmp_path: Path) -> None:
    # initModelStore treats ALL only as the whole value (equalsIgnoreCase); any other name is
    # looked up in the store, where a folder is served as an unpacked, unverified model.
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"], {"load_models": value}))
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    assert ("load_models", "high") in findings(config, cmdline=command)
    assert ("load_models", "high") in findings(config, cmdline=f"{command} --models {value}")
    for fine in ("all", "ALL", "m=m.mar,n=n.mar"):
        config.write_text(hardened(world["s1"], {"load_models": fine}))
        assert findings(config, cmdline=command) == [], fine


def test_log_config_writable_by_others_is_flagged(world: dict[str, Path],
                                                  tmp_path: Path) -> None:
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"]))
    log = world["shared"] / "log4j2.xml"
    log.write_text("<Configuration/>\n")
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    assert ("--log-config", "medium") in findings(config, cmdline=f"{command} --log-config {log}")


# --- allowed_urls: what java.net.URL opens, not only http(s):// and file:// -------------------

# TorchServe's own download path: ModelArchive.downloadModel -> validateURL -> new URL(url).
DOWNLOAD = r"""
import java.util.*;
import org.pytorch.serve.archive.model.ModelArchive;

public class Download {
    public static void main(String[] argv) {
        for (int i = 0; i + 2 < argv.length; i += 3) {
            String answer;
            try {
                ModelArchive.downloadModel(Arrays.asList(argv[i].split(",")), argv[i + 1], argv[i + 2], false);
                answer = "loaded";
            } catch (Throwable e) {
                Throwable root = e;
                while (root.getCause() != null) root = root.getCause();
                answer = e.getClass().getSimpleName() + "/" + root.getClass().getSimpleName();
            }
            System.out.println("= " + answer);
        }
    }
}
"""
# (allowed_urls pattern, URL a caller sends): each gets past validateURL and is opened.
OTHER_SHAPES = [
    ("file:/[^/].*", "file:{outside}"),  # one slash: a local file, no host
    (r" ?https://models\.example\.com/.*| file://.*", " file://{outside}"),  # blanks skipped
    ("\tfile://localhost/store/.*|\tfile:/.*", "\tfile:{outside}"),
    ("url:.*", "url:file:{outside}"),  # java.net.URL drops a leading `url:`
    ("jar:.*", "jar:file:{jar}!/m.mar"),  # an entry of a local (or remote) jar
    ("ftp://.*", "ftp://127.0.0.1:1/m.mar"),  # fetched over FTP
]


@pytest.fixture(scope="module")
def downloads(world: dict[str, Path]) -> list[tuple[str, Path]]:
    """Each case run by TorchServe's download code, into its own empty store."""
    if JAVA is None:
        pytest.skip("Java is not installed")
    outside = world["root"] / "outside.mar"
    outside.write_bytes(b"not verified\n")
    jar = world["root"] / "outside.jar"
    with zipfile.ZipFile(jar, "w") as zf:
        zf.writestr("m.mar", b"not verified either\n")
    argv, stores = [], []
    for n, (pattern, url) in enumerate(OTHER_SHAPES):
        store = world["root"] / f"dl{n}"
        store.mkdir()
        stores.append(store)
        argv += [pattern, str(store), url.format(outside=outside, jar=jar)]
    source = world["root"] / "Download.java"
    source.write_text(DOWNLOAD)
    run = subprocess.run([str(JAVA), "-cp", str(JAR), str(source), *argv], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    answers = [line[2:] for line in run.stdout.splitlines() if line.startswith("= ")]
    return list(zip(answers, stores, strict=True))


@needs_java
@pytest.mark.parametrize("case", range(len(OTHER_SHAPES)), ids=[p for p, _ in OTHER_SHAPES])
def test_allowed_urls_admitting_other_url_shapes_is_high(
        case: int, downloads: list[tuple[str, Path]], world: dict[str, Path],
        tmp_path: Path) -> None:
    answer, store = downloads[case]
    pattern, url = OTHER_SHAPES[case]
    if url.startswith("ftp:"):  # it tried to connect: FtpURLConnection, refused on port 1
        assert answer == "DownloadArchiveException/ConnectException"
    else:  # the archive from outside the store was copied into it
        assert [p.name for p in store.iterdir()] == ["outside.mar" if "jar:" not in url
                                                     else "m.mar"], answer
    config = tmp_path / "c.properties"
    config.write_text(hardened(world["s1"], {"allowed_urls": pattern}))
    command = f"torchserve --start --ncs --ts-config {config} --model-store {world['s1']}"
    found = findings(config, cmdline=command)
    assert [f for f in found if f[0] == "allowed_urls"] == [("allowed_urls", "high")]


def test_plugins_path_relative_empty_or_open_is_high(world: dict[str, Path],
                                                     tmp_path: Path) -> None:
    # The launcher builds `-cp .:<ts jars>:<plugins_path>/*` (ts.model_server.start).
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: anyone may add a jar, and `/*` loads every jar
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o755)
    cmd = launcher_command(write_config(tmp_path, world, {"plugins_path": f"{private}:"}),
                            "--model-store", str(world["s1"]))
    class_path = cmd[cmd.index("-cp") + 1].split(":")
    assert class_path[0] == "."  # the working directory, always
    assert class_path[-2:] == [str(private), "/*"]  # the empty entry became "/*": every jar in /
    command = f"torchserve --start --ncs --model-store {world['s1']} --ts-config"
    for value in ("plugins", f"{private}::{private}", f"{private}:lib", str(sticky),
                  str(world["shared"])):
        config = write_config(tmp_path, world, {"plugins_path": value})
        assert ("plugins_path", "high") in findings(config, cmdline=f"{command} {config}"), value
    config = write_config(tmp_path, world, {"plugins_path": str(private)})
    assert ("plugins_path", "medium") in findings(config, cmdline=f"{command} {config}")
