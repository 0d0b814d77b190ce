"""secure-handler end to end: build → archive → verify → lock → config → serve → client → stop.

    ./scripts/demo [--workdir DIR] [--no-gateway] [--keep] [--full]

1. Builds the three example models locally (nothing is downloaded).
2. Archives each with `secure-handler archive` into a model store, verifies every MAR, and
   pins the store in `models.lock` (kept outside the store).
3. Writes a hardened `config.properties` (`secure-handler config`) and starts one real
   torchserve for all three models with `secure-handler serve` (it verifies the store against
   the lock first, and always passes `--ncs --ts-config`), on loopback only.
4. Sends valid and hostile requests with `secure_handler.client.Client` (TorchServe's token
   from `key_file.json`), all at once so they share batches, and prints what came back.
5. Runs the gateway (`secure-handler gateway`) in front of the same torchserve: per-client
   keys (401/403), passthrough of TorchServe's answers, and a rate limit (429 + Retry-After).
6. Stops everything, also on failure, Ctrl-C or SIGTERM.

Exit status: 0 when every expectation held, 1 when one did not, 2 when a step failed,
130 when interrupted.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib.util
import io
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
VERSION = "1.0"
IOU_MIN = 0.5

# --- small helpers -----------------------------------------------------------------------


class StepFailed(Exception):
    """A step of the demo could not run (not an expectation that failed)."""


def section(title: str) -> None:
    print(f"\n{'=' * 78}\n== {title}\n{'=' * 78}", flush=True)


def load_module(path: Path) -> ModuleType:
    """Import an example helper (the example folders are not packages) under a unique name."""
    spec = importlib.util.spec_from_file_location(f"demo_{path.parent.name}_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise StepFailed(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the module look themselves up here
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Example:
    """One example folder and the model name it is served under."""

    model: str
    folder: str
    metrics: tuple[str, ...]  # keys of build_model.py's JSON line worth showing
    quick: bool  # build with --quick unless --full (same model or as good, less work)

    def path(self, examples: Path) -> Path:
        return examples / self.folder


EXAMPLES = (
    # The full image build is ~30 CPU-seconds and names every demo image right; --quick
    # trains on fewer images.
    Example("image_classifier", "image_classifier",
            ("held_out_accuracy", "served_accuracy"), quick=False),
    Example("text_classifier", "text_classifier",
            ("held_out_accuracy", "hand_written_accuracy"), quick=True),
    # The detector has no weights; --quick only evaluates it on fewer scenes.
    Example("object_detector", "object_detector", ("accuracy",), quick=True),
)


# --- requests and expectations -----------------------------------------------------------

Check = Callable[[Any], "tuple[bool, str]"]


@dataclass(frozen=True)
class Case:
    """One request and what must come back.

    `status` None means the client must refuse it before sending; `expect` is then, and for
    every non-200 status, the error code. A 200 row is judged by `check(body)`.
    """

    model: str
    what: str
    data: Any
    content_type: str | None
    status: int | None
    expect: str
    check: Check | None = None
    client: str = "default"


@dataclass
class Row:
    """A row of a results table."""

    model: str
    what: str
    expected: str
    got: str
    ok: bool


@dataclass
class Tally:
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]


def print_table(rows: Sequence[Row]) -> None:
    heads = ("model", "request", "expected", "got", "")
    cells = [(r.model, r.what, r.expected, r.got, "ok" if r.ok else "FAIL") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*heads).rstrip())
    print("  ".join("-" * w for w in widths))
    for cell in cells:
        print(line.format(*cell).rstrip())


def expected_text(case: Case) -> str:
    if case.status is None:
        return f"refused by client: {case.expect}"
    return f"{case.status} {case.expect}"


def outcome_text(status: int | None, code: str) -> str:
    return f"refused by client: {code} (not sent)" if status is None else f"{status} {code}"


# --- hostile inputs (built here, byte by byte) ---------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bomb(side: int = 100_000) -> bytes:
    """~100 bytes whose header declares side x side RGB pixels (30 GB once decoded)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096, 9)) + png_chunk(b"IEND", b""))


def gif_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="GIF")
    return buf.getvalue()


# --- the demo ----------------------------------------------------------------------------


class Demo:
    """Runs the steps in order; `close()` stops whatever was started."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.examples: Path = args.examples
        self.store = work / "model-store"
        self.lock = work / "models.lock"
        self.config = work / "config.properties"
        self.state = work / "serve.json"
        self.tally = Tally()
        self.gateway: subprocess.Popen[bytes] | None = None
        self.serving = False
        self.limits: dict[str, dict[str, Any]] = {}

    # -- running our CLI ------------------------------------------------------------------

    def shown(self, arg: str) -> str:
        """An argument as the reader would type it: paths relative to the work dir or repo."""
        for base in (self.work, REPO):
            arg = arg.replace(str(base) + os.sep, "")
        return arg

    def cli(self, *argv: str, expect: int = 0, quiet: bool = False) -> str:
        """Run `secure-handler ARGV` in this process (cwd: the work dir); return stdout."""
        from secure_handler.cli import main

        print(f"\n$ secure-handler {shlex.join(self.shown(a) for a in argv)}", flush=True)
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                code = main(list(argv))
        except Exception as exc:  # e.g. serve's TorchServeError: report it as a failed step
            print(textwrap.indent(out.getvalue().rstrip(), "  "))
            raise StepFailed(f"secure-handler {argv[0]}: {exc}") from exc
        text = out.getvalue()
        if not quiet:
            print(textwrap.indent(text.rstrip(), "  ") if text.strip() else "", end="")
            print(flush=True)
        if code != expect:
            if quiet:
                print(textwrap.indent(text.rstrip(), "  "))
            raise StepFailed(f"secure-handler {argv[0]} exited {code}, expected {expect}")
        return text

    # -- 1. build -------------------------------------------------------------------------

    def build(self) -> None:
        section("1. Build the three example models locally (no downloads)")
        print("  the three builds run side by side (each uses one thread)")
        jobs: list[tuple[Example, Path, subprocess.Popen[bytes], float]] = []
        try:
            for ex in EXAMPLES:
                out = self.work / "build" / ex.folder
                if self.args.reuse_models and (out / "model.pt").is_file():
                    print(f"\n  {ex.folder}: reusing {self.shown(str(out / 'model.pt'))}")
                    continue
                jobs.append((ex, out, *self.start_build(ex, out)))
            pending = list(jobs)
            while pending:  # report each build as it ends, in the order they end
                done = [job for job in pending if job[2].poll() is not None]
                for job in done:
                    pending.remove(job)
                    self.finish_build(*job)
                time.sleep(0.2)
        finally:
            for _, _, proc, _ in jobs:  # only left running when a build failed or on Ctrl-C
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def start_build(self, ex: Example, out: Path) -> tuple[subprocess.Popen[bytes], float]:
        script = ex.path(self.examples) / "build_model.py"
        quick = ex.quick and not self.args.full
        cmd = [sys.executable, str(script), "--out", str(out), *(["--quick"] if quick else [])]
        print(f"\n$ python {shlex.join(self.shown(a) for a in cmd[1:])} &", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "build.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
        return proc, time.monotonic()

    def finish_build(self, ex: Example, out: Path, proc: subprocess.Popen[bytes],
                     started: float) -> None:
        code = proc.wait()
        took = time.monotonic() - started
        log = (out / "build.log").read_text("utf-8", "replace")
        if code != 0:
            print(textwrap.indent(log[-3000:], "  "))
            raise StepFailed(f"{ex.folder}/build_model.py exited {code}")
        report = _last_json(log)
        shown = ", ".join(f"{k} {_compact(report[k])}" for k in ex.metrics if k in report)
        print(f"\n  built {self.shown(str(out / 'model.pt'))} in {took:.0f} s: {shown}",
              flush=True)

    # -- 2. archive, verify, lock ---------------------------------------------------------

    def archive(self) -> None:
        section("2. Archive with `secure-handler archive`, verify, lock the store")
        self.store.mkdir(parents=True, exist_ok=True)
        for ex in EXAMPLES:
            src, out = ex.path(self.examples), self.work / "build" / ex.folder
            extras = [str(p) for p in _extra_files(src, out)]
            config = src / "model-config.yaml"
            self.limits[ex.model] = _handler_section(config)
            self.cli("archive", "--model-name", ex.model, "-v", VERSION,
                     "--serialized-file", str(out / "model.pt"),
                     "--handler", str(src / "handler.py"), "--extra-files", ",".join(extras),
                     "-c", str(config), "--export-path", str(self.store), "--force")
        for ex in EXAMPLES:
            self.cli("verify", str(self.store / f"{ex.model}.mar"))
        self.cli("lock", str(self.store), "-o", str(self.lock))
        self.cli("verify", str(self.store), "--lock", str(self.lock))

    # -- 3. config and serve --------------------------------------------------------------

    def serve(self) -> None:
        section("3. Hardened config, then serve all three models under one torchserve")
        self.cli("config", "--model-store", str(self.store), "--out", str(self.config),
                 "--free-ports")
        self.serving = True  # from here on, close() runs `secure-handler stop`
        # A key_file.json left by an earlier run in this work dir holds dead tokens.
        (self.work / "torchserve" / "key_file.json").unlink(missing_ok=True)
        self.cli("serve", "--model-store", str(self.store), "--lock", str(self.lock),
                 "--config", str(self.config), "--workdir", str(self.work / "torchserve"),
                 "--state", str(self.state), "--timeout", "300")

    def server_state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state.read_text("utf-8"))
        return data

    # -- 4. client ------------------------------------------------------------------------

    def requests(self) -> None:
        section("4. Valid and hostile requests with secure_handler.client.Client")
        from secure_handler.client import Client

        state = self.server_state()
        print(f"  inference {state['inference_url']}, token from "
              f"{self.shown(state['key_file'])}")
        cases = [*self.image_cases(), *self.text_cases(), *self.detector_cases()]
        clients = {ex.model: Client(state["inference_url"], management_url=state["management_url"],
                                    key_file=state["key_file"],
                                    max_request_bytes=self.max_bytes(ex.model))
                   for ex in EXAMPLES}
        # A client that skips the size check, to show the handler's own 413.
        clients["unchecked"] = Client(state["inference_url"], key_file=state["key_file"],
                                      max_request_bytes=64 * 1024 * 1024)
        try:
            before = self.worker_pids(clients)
            print(f"  sending {len(cases)} requests at once (valid and hostile share batches)\n")
            rows = self.send_all(clients, cases)
            after = self.worker_pids(clients)
        finally:
            for client in clients.values():
                client.close()
        restarted = sorted(set(before) - set(after))
        rows.append(Row("(all)", "workers alive after the hostile requests",
                        f"same {len(before)} worker pids", f"{len(before) - len(restarted)} of "
                        f"{len(before)} unchanged", not restarted and bool(before)))
        print_table(rows)
        for row in rows:
            self.tally.add(row)

    def max_bytes(self, model: str) -> int:
        return int(self.limits[model].get("max_request_bytes", _DEFAULT_BYTES[model]))

    def worker_pids(self, clients: dict[str, Any]) -> list[int]:
        pids = []
        for ex in EXAMPLES:
            described = clients[ex.model].describe(ex.model)
            pids += [int(w["pid"]) for w in described[0]["workers"]]
        return pids

    def send_all(self, clients: dict[str, Any], cases: Sequence[Case]) -> list[Row]:
        with cf.ThreadPoolExecutor(max_workers=12) as pool:
            futures = [pool.submit(_send, clients[c.client if c.client != "default"
                                                  else c.model], c) for c in cases]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def image_cases(self) -> list[Case]:
        samples = load_module(self.examples / "image_classifier" / "sample_inputs.py")
        model = "image_classifier"
        cases = []
        items = samples.samples(len(samples.CLASSES), seed=2024)
        jpeg = next(data for _, fmt, data in items if fmt == "JPEG")
        for shape, fmt, data in items:
            size = _image_size(data)
            cases.append(Case(model, f"{fmt} {size[0]}x{size[1]} {shape}", data,
                              f"image/{fmt.lower()}", 200, shape, _top1(shape)))
        cap = self.max_bytes(model)
        cases += [
            Case(model, "JPEG cut in half", jpeg[: len(jpeg) // 2], "image/jpeg", 422,
                 "invalid_image"),
            Case(model, "GIF (not in allowed_formats)", gif_bytes(), "image/gif", 415,
                 "unsupported_media_type"),
            Case(model, "PNG header declaring 100000x100000", png_bomb(), "image/png", 422,
                 "image_too_large"),
            Case(model, 'JSON {"image": 42}', {"image": 42}, None, 400, "malformed_request"),
            Case(model, 'JSON {"data": "%%not base64%%"}', {"data": "%%not base64%%"}, None,
                 422, "invalid_base64"),
            Case(model, f"{cap + 1} bytes (limit {cap})", b"\xff\xd8\xff" + bytes(cap - 2),
                 "image/jpeg", None, "payload_too_large"),
        ]
        return cases

    def text_cases(self) -> list[Case]:
        corpus = load_module(self.examples / "text_classifier" / "corpus.py")
        model = "text_classifier"
        cases = []
        seen: set[str] = set()
        for sentence, topic in corpus.SAMPLES:
            if topic in seen:
                continue
            seen.add(topic)
            cases.append(Case(model, _clip(sentence), sentence.encode(), "text/plain", 200,
                              topic, _top1(topic)))
        cap = self.max_bytes(model)
        cases += [
            Case(model, 'JSON {"text": "...fog..."}', {"text": "Thick fog and frost tonight"},
                 None, 200, "weather", _top1("weather")),
            Case(model, "Latin-1 bytes (not UTF-8)", "café au lait".encode("latin-1"),
                 "application/octet-stream", 422, "invalid_text"),
            Case(model, "NUL byte in the text", b"the striker\x00 scored", "text/plain", 422,
                 "invalid_text"),
            Case(model, "bidi override U+202E", "good\u202egame".encode(), "text/plain", 422,
                 "invalid_text"),
            Case(model, 'JSON ["a list"]', ["a list"], None, 400, "malformed_request"),
            Case(model, 'JSON {"text": 5}', {"text": 5}, None, 400, "malformed_request"),
            Case(model, f"{cap + 1} bytes (limit {cap})", b"a" * (cap + 1), "text/plain", None,
                 "payload_too_large"),
            Case(model, f"{cap + 1} bytes, client check off", b"a" * (cap + 1), "text/plain",
                 413, "payload_too_large", client="unchecked"),
        ]
        return cases

    def detector_cases(self) -> list[Case]:
        scenes = load_module(self.examples / "object_detector" / "scenes.py")
        model = "object_detector"
        cases = []
        last = b""
        for i, (w, h) in enumerate(((640, 360), (300, 500), (420, 420))):
            scene = _busy_scene(scenes, 700 + 100 * i, w, h)
            fmt = "JPEG" if i % 2 else "PNG"
            last = scenes.encode(scene.image, fmt)
            truth = [(scenes.CLASSES[lab], box)
                     for lab, box in zip(scene.labels, scene.boxes, strict=True)]
            cases.append(Case(model, f"{fmt} {w}x{h} scene, {len(truth)} shapes", last,
                              f"image/{fmt.lower()}", 200,
                              f"{len(truth)} shapes found, IoU >= {IOU_MIN}",
                              _boxes(truth, scenes.iou)))
        cases += [
            Case(model, "PNG cut after 100 bytes", last[:100] if last[:4] == b"\x89PNG"
                 else png_bomb()[:100], "image/png", 422, "invalid_image"),
            Case(model, "PNG header declaring 100000x100000", png_bomb(), "image/png", 422,
                 "image_too_large"),
        ]
        return cases

    # -- 5. gateway -----------------------------------------------------------------------

    def run_gateway(self) -> None:
        section("5. Gateway in front of the same torchserve: keys, scopes, rate limit")
        import httpx

        from secure_handler.deploy.launcher import free_port

        keys = {
            "webapp": self.new_key("webapp", ["image_classifier", "text_classifier"], "20/s",
                                   40),
            "text-only": self.new_key("text-only", ["text_classifier"], "20/s", 40),
            "limited": self.new_key("limited", ["text_classifier"], "20/m", 3),
        }
        port = free_port()
        audit = self.work / "gateway-audit.jsonl"
        audit.unlink(missing_ok=True)  # this run's lines only
        config = self.write_gateway_config(port, keys)
        self.cli("gateway", "--config", str(config), "--check")
        exe = Path(sys.executable).with_name("secure-handler")
        cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "secure_handler.cli"])
        cmd += ["gateway", "--config", str(config)]
        log = self.work / "gateway.log"
        print(f"\n$ secure-handler gateway --config {self.shown(str(config))} &   "
              f"(log: {self.shown(str(log))})", flush=True)
        with open(log, "ab") as out:
            self.gateway = subprocess.Popen(cmd, cwd=self.work, stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, self.gateway, log)
        print(f"  gateway up on {url}\n")
        samples = load_module(self.examples / "image_classifier" / "sample_inputs.py")
        shape, _, png = samples.samples(1, seed=77)[0]
        rows = []
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
            rows += self.gateway_auth_rows(http, keys, png, shape)
            rows += self.gateway_rate_rows(http, keys["limited"][0])
        lines = audit.read_text("utf-8").splitlines() if audit.exists() else []
        secrets_leaked = any(key in line for key, _ in keys.values() for line in lines)
        # Refused by the gateway itself: 401, 401, 403, 415 and the two 429s.
        denials = sum(r.expected.split()[0] in {"401", "403", "415"} for r in rows) + 2
        rows.append(Row("gateway", "audit log", f"{denials} lines (one per refusal), no key",
                        f"{len(lines)} lines, keys in it: {'YES' if secrets_leaked else 'none'}",
                        len(lines) == denials and not secrets_leaked))
        print_table(rows)
        if lines:
            print(f"\n  last audit line: {lines[-1]}")
        for row in rows:
            self.tally.add(row)

    def new_key(self, name: str, models: list[str], rate: str, burst: int) -> tuple[str, Any]:
        text = self.cli("gateway", "new-key", name, "--scopes", "inference", "--models", *models,
                        "--rate", rate, "--burst", str(burst), "--json", quiet=True)
        data = json.loads(text)
        print(f"  key {name}: {data['key'][:6]}… (printed once; gateway.yaml keeps its SHA-256 "
              f"{data['entry']['sha256'][:12]}…)")
        return str(data["key"]), data["entry"]

    def write_gateway_config(self, port: int, keys: dict[str, tuple[str, Any]]) -> Path:
        state = self.server_state()
        image_types = ["image/jpeg", "image/png"]
        config = {
            "listen_host": "127.0.0.1",
            "listen_port": port,
            "upstream": {"inference_url": state["inference_url"],
                         "management_url": state["management_url"],
                         "key_file": state["key_file"]},
            "model_store": str(self.store),
            "models": {
                "image_classifier": {"content_types": image_types},
                "text_classifier": {"content_types": ["text/plain", "application/json"]},
                "object_detector": {"content_types": image_types},
            },
            "keys": [entry for _, entry in keys.values()],
            "audit_log": str(self.work / "gateway-audit.jsonl"),
        }
        path = self.work / "gateway.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), "utf-8")
        return path

    def gateway_auth_rows(self, http: Any, keys: dict[str, tuple[str, Any]], png: bytes,
                          shape: str) -> list[Row]:
        webapp, text_only = keys["webapp"][0], keys["text-only"][0]
        image = {"Content-Type": "image/png"}

        def bearer(key: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {key}", **image}

        checks: list[tuple[str, dict[str, str], bytes, int, str, Check | None]] = [
            ("no key", image, png, 401, "unauthorized", None),
            ("wrong key", bearer("x" * 43), png, 401, "unauthorized", None),
            ("key 'text-only' (no image model)", bearer(text_only), png, 403, "forbidden", None),
            ("good key, PNG", bearer(webapp), png, 200, shape, _top1(shape)),
            ("good key, GIF (not in the model's types)",
             {**bearer(webapp), "Content-Type": "image/gif"}, gif_bytes(), 415,
             "unsupported_media_type", None),
            ("good key, PNG bomb (handler's answer)", bearer(webapp), png_bomb(), 422,
             "image_too_large", None),
        ]
        rows = []
        for what, headers, body, status, expect, check in checks:
            resp = http.post("/predictions/image_classifier", content=body, headers=headers)
            rows.append(_http_row("image_classifier", what, resp, status, expect, check))
        return rows

    def gateway_rate_rows(self, http: Any, key: str) -> list[Row]:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "text/plain"}
        body = b"The striker scored twice and the team won the cup final."
        statuses, retry_after = [], ""
        for _ in range(5):
            resp = http.post("/predictions/text_classifier", content=body, headers=headers)
            statuses.append(resp.status_code)
            retry_after = resp.headers.get("retry-after", retry_after)
        rows = [Row("text_classifier", "5 in a row, key 'limited' (burst 3, 20/min)",
                    "200 200 200 429 429", " ".join(map(str, statuses)),
                    statuses == [200, 200, 200, 429, 429]),
                Row("text_classifier", "429 carries Retry-After", "Retry-After: N seconds",
                    f"Retry-After: {retry_after or '(missing)'}", retry_after.isdigit())]
        if retry_after.isdigit():
            time.sleep(int(retry_after))
            resp = http.post("/predictions/text_classifier", content=body, headers=headers)
            rows.append(_http_row("text_classifier", f"again after {retry_after} s", resp, 200,
                                  "sports", _top1("sports")))
        return rows

    # -- 6. stop --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the gateway and torchserve; safe to call at any point, and twice."""
        if self.gateway is not None:
            proc, self.gateway = self.gateway, None
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            print(f"  gateway stopped (exit {proc.returncode})")
        if self.serving:
            self.serving = False
            self.cli("stop", "--state", str(self.state))


_DEFAULT_BYTES = {"image_classifier": 10 * 1024 * 1024, "text_classifier": 64 * 1024,
                  "object_detector": 10 * 1024 * 1024}


def _send(client: Any, case: Case) -> Row:
    from secure_handler.errors import SecureHandlerError

    try:
        body = client.predict(case.model, case.data, content_type=case.content_type)
    except SecureHandlerError as exc:
        status = getattr(exc, "http_status", None)
        ok = status == case.status and exc.code == case.expect
        return Row(case.model, case.what, expected_text(case), outcome_text(status, exc.code), ok)
    if case.status != 200 or case.check is None:
        return Row(case.model, case.what, expected_text(case), f"200 {_clip(str(body), 40)}",
                   False)
    ok, got = case.check(body)
    return Row(case.model, case.what, expected_text(case), f"200 {got}", ok)


def _http_row(model: str, what: str, resp: Any, status: int, expect: str,
              check: Check | None) -> Row:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code == 200 and check is not None:
        ok, got = check(body)
        return Row(model, what, f"{status} {expect}", f"200 {got}", ok and status == 200)
    code = body.get("error", {}).get("code", "?") if isinstance(body, dict) else "?"
    ok = resp.status_code == status and code == expect
    return Row(model, what, f"{status} {expect}", f"{resp.status_code} {code}", ok)


def _top1(label: str) -> Check:
    def check(body: Any) -> tuple[bool, str]:
        try:
            best = body["predictions"][0]
            return best["label"] == label, f"{best['label']} {best['probability']:.2f}"
        except (KeyError, IndexError, TypeError):
            return False, _clip(str(body), 40)
    return check


def _boxes(truth: Sequence[tuple[str, Sequence[float]]], iou: Callable[..., float]) -> Check:
    def check(body: Any) -> tuple[bool, str]:
        try:
            found = [(d["label"], d["box"]) for d in body["detections"]]
        except (KeyError, TypeError):
            return False, _clip(str(body), 40)
        best = [max((iou(tuple(box), tuple(want)) for lab, box in found if lab == label),
                    default=0.0) for label, want in truth]
        matched = sum(v >= IOU_MIN for v in best)
        extra = max(0, len(found) - len(truth))
        ok = matched == len(truth)
        return ok, (f"{matched}/{len(truth)} found, min IoU {min(best, default=0.0):.2f}"
                    + (f", {extra} extra" if extra else ""))
    return check


def _busy_scene(scenes: ModuleType, seed: int, width: int, height: int) -> Any:
    """The first scene from `seed` on with at least three shapes (scenes are deterministic)."""
    for offset in range(100):
        scene = scenes.make_scene(seed + offset, width, height)
        if len(scene.boxes) >= 3:
            return scene
    return scene


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    return int(width), int(height)


def _clip(text: str, width: int = 44) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _compact(value: Any) -> str:
    """A build metric for one line; the detector's per-resize-mode dicts in short."""
    if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
        return "; ".join(f"{mode}: recall@IoU0.5 {v.get('recall_at_iou_0.5')}, mean IoU "
                         f"{v.get('mean_iou')}, {v.get('scenes')} scenes"
                         for mode, v in value.items())
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict):
                return data
    return {}


def _extra_files(src: Path, built: Path) -> list[Path]:
    """Labels and vocabulary for the archive: the build's copy first, then the example's."""
    found = []
    for name in ("index_to_name.json", "vocab.json"):
        for folder in (built, src):
            if (folder / name).is_file():
                found.append(folder / name)
                break
    return found


def _handler_section(config: Path) -> dict[str, Any]:
    data = yaml.safe_load(config.read_text("utf-8")) or {}
    section = data.get("handler") if isinstance(data, dict) else None
    return dict(section) if isinstance(section, dict) else {}


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StepFailed(f"the gateway exited {proc.returncode}:\n"
                             f"{log.read_text('utf-8', 'replace')[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=1, trust_env=False).status_code == 200:
                return
        time.sleep(0.1)
    raise StepFailed(f"the gateway did not answer /healthz in {timeout:.0f} s; see {log}")


# --- entry point -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path,
                        help="where to build, archive and run (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp work dir (it is kept anyway when a step fails)")
    parser.add_argument("--no-gateway", dest="gateway", action="store_false",
                        help="skip step 5 (the gateway in front of torchserve)")
    parser.add_argument("--full", action="store_true",
                        help="build every example without --quick (longer training and evaluation)")
    parser.add_argument("--reuse-models", action="store_true",
                        help="with --workdir: keep models already built there")
    parser.add_argument("--examples", type=Path, default=REPO / "examples",
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, so `finally` stops the servers
    (also when a shell started the demo in the background with SIGINT ignored)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, interrupt) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """While stopping, a second Ctrl-C must not leave a server behind."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows live through a pipe too
    started = time.monotonic()
    temp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="secure-handler-demo-")) if temp else args.workdir
    work = work.resolve()
    args.examples = args.examples.resolve()  # before the chdir below
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the CLI commands are shown (and run) with paths relative to it
    print(f"secure-handler demo in {work}")
    demo = Demo(args, work)
    code, problem = 0, ""
    with stop_signals_raise():
        try:
            demo.build()
            demo.archive()
            demo.serve()
            demo.requests()
            if args.gateway:
                demo.run_gateway()
        except KeyboardInterrupt:
            code, problem = 130, "interrupted"
        except StepFailed as exc:
            code, problem = 2, str(exc)
        finally:
            with signals_ignored():
                section("6. Stop everything")
                try:
                    demo.close()
                except StepFailed as exc:
                    code, problem = code or 2, problem or str(exc)
    elapsed = time.monotonic() - started
    failed = demo.tally.failed
    if code == 0 and failed:
        code, problem = 1, f"{len(failed)} of {len(demo.tally.rows)} expectations did not hold"
    if code == 0 and temp and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        where = ""
    else:
        where = f"; files in {work}"
    held = len(demo.tally.rows) - len(failed)
    verdict = "OK" if code == 0 else f"FAILED ({problem})"
    print(f"\ndemo {verdict}: {held}/{len(demo.tally.rows)} expectations held "
          f"in {elapsed:.0f} s{where}")
    return code


if __name__ == "__main__":
    sys.exit(main())
