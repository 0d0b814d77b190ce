"""The gateway's cost: the same load straight to TorchServe and through `secure-handler gateway`.

    /tmp/venv/bin/python benchmarks/bench_gateway.py [--quick] [--rounds N] [--redis] [--json F]

Bounded and loopback only: every server binds 127.0.0.1, each ApacheBench run has a fixed
request count AND a time limit, and every process is stopped at the end.

Setup: the tiny TorchScript model (benchmarks/models.py: inference is free, so the numbers
are the serving path's own cost and the gateway's share is as large as it can get) behind the
library's `SecureImageClassifier`, one worker, batchSize 8, maxBatchDelay 5 ms, the hardened
config.properties. One 500x375 JPEG (corpus.py) POSTed by ApacheBench (`ab -k`, concurrency 16)
with a Bearer token: TorchServe's inference token directly, a gateway key through the gateway.
The gateway is one uvicorn process with the in-memory limiter (`--redis`: a real redis-server
on loopback and the Lua limiter), a rate limit far above the load, and the audit log on.

Runs alternate direct / gateway for `--rounds` rounds; the median round is reported.
Printed: req/s, p50 and p99 (ms, from ab's percentiles) for each path, and the overhead ratio
= gateway req/s / direct req/s (1.0 = free), plus the added p50/p99 latency and the gateway
process's own CPU time per request (from /proc: the cost that does not depend on how busy the
machine is).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from corpus import KINDS, make_image  # noqa: E402
from models import TinyModel, save_scripted  # noqa: E402

from secure_handler.gateway.keys import generate_key, hash_key  # noqa: E402
from secure_handler.server import TorchServe, free_port  # noqa: E402
from secure_handler.tsconfig import ModelSpec, Ports, hardened_properties, render_properties  # noqa: E402

CONCURRENCY = 16
BATCH = 8
MAX_BATCH_DELAY_MS = 5
CLASSES = 10  # TinyModel's logits

HANDLER = '''"""Benchmark handler: the library's classifier, unchanged."""

from secure_handler import SecureImageClassifier


class BenchHandler(SecureImageClassifier):
    """Exactly what a user writes."""
'''


@dataclass(frozen=True)
class Load:
    """One ApacheBench run: at most `requests` requests and at most `time_limit_s` seconds."""

    requests: int
    time_limit_s: int


@dataclass(frozen=True)
class AbResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    complete: int
    failed: int
    non_2xx: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


LOAD = Load(3000, 60)
QUICK_LOAD = Load(600, 30)


# --- artefacts --------------------------------------------------------------------------------


def build_archive(src: Path, store: Path) -> str:
    """TinyModel as TorchScript + the one-class handler + labels → `store/tiny.mar`."""
    src.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    model = save_scripted(TinyModel(), src / "model.pt")
    handler = src / "handler.py"
    handler.write_text(HANDLER, "utf-8")
    labels = src / "index_to_name.json"
    labels.write_text(json.dumps({str(i): f"class_{i}" for i in range(CLASSES)}), "utf-8")
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run([str(archiver), "--model-name", "tiny", "--version", "1.0",
                    "--serialized-file", str(model), "--handler", str(handler),
                    "--extra-files", str(labels), "--export-path", str(store), "-f"],
                   check=True, capture_output=True)
    return "tiny.mar"


# --- load -------------------------------------------------------------------------------------


def check_prediction(url: str, token: str, body: bytes) -> str:
    """One request before timing: the model must answer 200."""
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", "image/jpeg")
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # loopback only
            return str(resp.read().decode("utf-8", "replace"))[:120]
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"{url}: HTTP {err.code}: {err.read()[:300]!r}") from err


def run_ab(url: str, token: str, image: Path, load: Load, workdir: Path) -> AbResult:
    """ApacheBench with keep-alive (`-k`: without it ab hangs against TorchServe)."""
    ab = shutil.which("ab")
    if ab is None:
        raise RuntimeError("ApacheBench missing: apt-get install -y apache2-utils")
    pct = workdir / "ab-percentiles.csv"
    # -t before -n: -t resets the request count, the later -n sets it again.
    cmd = [ab, "-k", "-q", "-l", "-s", "60", "-c", str(CONCURRENCY), "-t", str(load.time_limit_s),
           "-n", str(load.requests), "-p", str(image), "-T", "image/jpeg",
           "-H", f"Authorization: Bearer {token}", "-e", str(pct), url]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          timeout=load.time_limit_s + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"ab failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return parse_ab(proc.stdout, pct.read_text("utf-8"))


def _field(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def parse_ab(stdout: str, percentiles_csv: str) -> AbResult:
    """req/s and failures from ab's report; p50/p99 from its `-e` percentile CSV."""
    pct = {int(float(row[0])): float(row[1])
           for row in csv.reader(percentiles_csv.splitlines()[1:]) if len(row) == 2}
    return AbResult(
        requests_per_s=_field(r"Requests per second:\s+([\d.]+)", stdout),
        p50_ms=pct[50], p99_ms=pct[99],
        complete=int(_field(r"Complete requests:\s+(\d+)", stdout)),
        failed=int(_field(r"Failed requests:\s+(\d+)", stdout)),
        non_2xx=int(_field(r"Non-2xx responses:\s+(\d+)", stdout)),
    )


# --- servers ----------------------------------------------------------------------------------


@contextmanager
def torchserve(workdir: Path, store: Path, mar: str) -> Iterator[tuple[str, str, str]]:
    """TorchServe with `tiny` READY; yields (inference URL, management URL, inference token)."""
    ports = Ports(*(free_port() for _ in range(6)))
    spec = ModelSpec("tiny", mar, workers=1, batch_size=BATCH,
                     max_batch_delay_ms=MAX_BATCH_DELAY_MS)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.properties"
    config.write_text(render_properties(hardened_properties(store, ports, (spec,))), "utf-8")
    with TorchServe(config, store, workdir) as server:
        mgmt = f"http://127.0.0.1:{ports.management}"
        server.wait_ready(mgmt, "tiny", timeout=300)
        yield f"http://127.0.0.1:{ports.inference}", mgmt, server.keys()["inference"]


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server on loopback (scripts/redis.sh installs it if missing)."""
    exe = shutil.which("redis-server")
    if exe is None:
        subprocess.run(["bash", str(HERE.parent / "scripts" / "redis.sh"), "install"], check=True)
        exe = shutil.which("redis-server") or "redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def gateway_config(workdir: Path, store: Path, upstream: tuple[str, str], key_file: Path,
                   key: str, redis_url: str | None) -> Path:
    config: dict[str, Any] = {
        "listen_host": "127.0.0.1",
        "upstream": {"inference_url": upstream[0], "management_url": upstream[1],
                     "key_file": str(key_file)},
        "model_store": str(store),
        "models": {"tiny": {"content_types": ["image/jpeg"]}},
        "keys": [{"name": "bench", "sha256": hash_key(key), "scopes": ["inference"],
                  "models": ["tiny"], "rate": {"per_second": 1_000_000, "burst": 1_000_000}}],
        "audit_log": str(workdir / "audit.jsonl"),
        "max_concurrency": 1024,
    }
    if redis_url:
        config["rate_limit_backend"] = "redis"
        config["redis"] = {"url": redis_url}
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), "utf-8")
    return path


@contextmanager
def gateway(config: Path, workdir: Path) -> Iterator[tuple[str, int]]:
    """`secure-handler gateway` as its own process (yields URL and pid); SIGTERM at the end."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    with open(workdir / "gateway.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "secure_handler.cli", "gateway", "--config", str(config),
             "--port", str(port), "--log-level", "WARNING"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):  # loopback only
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError("gateway not healthy after 120 s")


def _median(results: Sequence[AbResult]) -> AbResult:
    ranked = sorted(results, key=lambda r: r.requests_per_s)
    return ranked[len(ranked) // 2]


def measure(rounds: int, load: Load, use_redis: bool, tmp: Path) -> dict[str, Any]:
    store = tmp / "store"
    mar = build_archive(tmp / "src", store)
    image = tmp / "image.jpg"
    image.write_bytes(make_image(KINDS[0], 0))  # jpeg_500x375
    key = generate_key()
    runs: dict[str, list[AbResult]] = {"direct": [], "gateway": []}
    cpu_ms: list[float] = []
    with torchserve(tmp / "ts", store, mar) as (inference, management, token), \
            (redis_server(tmp) if use_redis else _nothing()) as redis_url:
        cfg = gateway_config(tmp, store, (inference, management), tmp / "ts" / "key_file.json",
                             key, redis_url)
        with gateway(cfg, tmp) as (gw, pid):
            targets = {"direct": (f"{inference}/predictions/tiny", token),
                       "gateway": (f"{gw}/predictions/tiny", key)}
            for name, (url, bearer) in targets.items():
                print(f"  {name}: {check_prediction(url, bearer, image.read_bytes())}")
                run_ab(url, bearer, image, Load(min(300, load.requests), 30), tmp)  # warm-up
            for round_no in range(rounds):
                order = ("direct", "gateway") if round_no % 2 == 0 else ("gateway", "direct")
                for name in order:
                    url, bearer = targets[name]
                    cpu_before = _cpu_seconds(pid)
                    result = run_ab(url, bearer, image, load, tmp)
                    runs[name].append(result)
                    if name == "gateway":
                        cpu_ms.append((_cpu_seconds(pid) - cpu_before) * 1000 / result.complete)
                    print(f"  round {round_no + 1} {name:8s} {result.requests_per_s:8.1f} req/s"
                          f"  p50 {result.p50_ms:5.0f} ms  p99 {result.p99_ms:5.0f} ms"
                          f"  failed {result.failed}  non-2xx {result.non_2xx}", flush=True)
    return summarise(runs, load, use_redis, cpu_ms)


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarise(runs: dict[str, list[AbResult]], load: Load, use_redis: bool,
              cpu_ms: list[float]) -> dict[str, Any]:
    direct, through = _median(runs["direct"]), _median(runs["gateway"])
    return {
        "load": {"requests": load.requests, "time_limit_s": load.time_limit_s,
                 "concurrency": CONCURRENCY, "rounds": len(runs["direct"])},
        "limiter": "redis" if use_redis else "memory",
        "direct": direct.to_json(),
        "gateway": through.to_json(),
        "throughput_ratio": round(through.requests_per_s / direct.requests_per_s, 3),
        "added_p50_ms": round(through.p50_ms - direct.p50_ms, 1),
        "added_p99_ms": round(through.p99_ms - direct.p99_ms, 1),
        # The gateway's own cost, independent of how busy the machine is.
        "gateway_cpu_ms_per_request": round(sorted(cpu_ms)[len(cpu_ms) // 2], 3),
        "all_rounds": {k: [r.requests_per_s for r in v] for k, v in runs.items()},
        "cpus": os.cpu_count(),
    }


def report(summary: dict[str, Any]) -> str:
    d, g = summary["direct"], summary["gateway"]
    rows = [
        "| path | req/s | p50 ms | p99 ms | failed | non-2xx |",
        "|---|---|---|---|---|---|",
        f"| TorchServe directly | {d['requests_per_s']:.1f} | {d['p50_ms']:.0f} | "
        f"{d['p99_ms']:.0f} | {d['failed']} | {d['non_2xx']} |",
        f"| through the gateway ({summary['limiter']} limiter) | {g['requests_per_s']:.1f} | "
        f"{g['p50_ms']:.0f} | {g['p99_ms']:.0f} | {g['failed']} | {g['non_2xx']} |",
    ]
    return "\n".join(rows) + (
        f"\n\noverhead ratio (gateway req/s / direct req/s): {summary['throughput_ratio']:.3f}"
        f"; added latency p50 {summary['added_p50_ms']:+.1f} ms, "
        f"p99 {summary['added_p99_ms']:+.1f} ms; gateway CPU per request "
        f"{summary['gateway_cpu_ms_per_request']:.2f} ms"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LOAD.requests} requests")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", action="store_true", help="Redis limiter (real redis-server)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    load = QUICK_LOAD if args.quick else LOAD
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        summary = measure(max(1, args.rounds), load, args.redis, Path(tmp))
    print()
    print(report(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2), "utf-8")
    return 0 if summary["gateway"]["failed"] == 0 and summary["gateway"]["non_2xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
