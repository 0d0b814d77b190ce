"""The gateway's cost: the same load straight to TorchServe and through `secure-handler gateway`.

    /tmp/venv/bin/python benchmarks/bench_gateway.py [--quick] [--rounds N] [--redis] [--json F]

Bounded and loopback only: every server binds 127.0.0.1, each ApacheBench run has a fixed
request count AND a time limit, and every process is stopped at the end.

Setup: the tiny TorchScript model (benchmarks/models.py: inference is free, so the numbers
are the serving path's own cost and the gateway's share is as large as it can get) behind the
library's `SecureImageClassifier`, one worker, batchSize 8, maxBatchDelay 5 ms, the hardened
config.properties. One 500x375 JPEG (corpus.py) POSTed over 16 connections with a Bearer
token: TorchServe's inference token directly, a gateway key through the gateway. The load
client is a small asyncio HTTP/1.1 keep-alive client (`--client ab`: ApacheBench `-k`, which
speaks HTTP/1.0; uvicorn never keeps HTTP/1.0 alive, so there each gateway request also pays a
new TCP connection while TorchServe keeps its connections).
The gateway is one uvicorn process with the in-memory limiter (`--redis`: a real redis-server
on loopback and the Lua limiter), a rate limit far above the load, and the audit log on.

The runs come in pairs, a direct run next to a gateway run (order alternating), and each
figure is the median over the pairs of the per-pair value: on a busy machine neighbouring runs
share most of the drift. Printed: req/s, p50 and p99 (ms, from ab's percentiles) of the median
pair; the overhead ratio = gateway req/s / direct req/s (1.0 = free); the added p50/p99; and
CPU time per request of TorchServe (frontend + worker, direct runs) and of the gateway process
(gateway runs), read from /proc, which moves far less with the machine's load than req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from _ab import CONCURRENCY, AbResult, Load, check_prediction, run_ab  # noqa: E402
from corpus import KINDS, make_image  # noqa: E402
from models import TinyModel, save_scripted  # noqa: E402

from secure_handler.deploy.launcher import TorchServe, free_port  # noqa: E402
from secure_handler.deploy.tsconfig import ModelSpec, Ports, hardened_properties, render_properties  # noqa: E402
from secure_handler.gateway.keys import generate_key, hash_key  # noqa: E402

BATCH = 8
MAX_BATCH_DELAY_MS = 5
CLASSES = 10  # TinyModel's logits

HANDLER = '''"""Benchmark handler: the library's classifier, unchanged."""

from secure_handler import SecureImageClassifier


class BenchHandler(SecureImageClassifier):
    """Exactly what a user writes."""
'''


LOAD, ROUNDS = Load(600, 30), 8
QUICK_LOAD, QUICK_ROUNDS = Load(300, 20), 3


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


class _Budget:
    """The requests left to send, shared by the connections of one run."""

    def __init__(self, requests: int, seconds: float) -> None:
        self.left = requests
        self.deadline = time.monotonic() + seconds

    def take(self) -> bool:
        if self.left <= 0 or time.monotonic() >= self.deadline:
            return False
        self.left -= 1
        return True


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """One HTTP/1.1 response: (status, whether the server keeps the connection)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    pairs = (h.partition(":") for h in head[1:] if h)
    headers = {k.strip().lower(): v.strip() for k, _, v in pairs}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF (no trailers)
            if size == 0:
                break
    return status, headers.get("connection", "").lower() != "close"


async def _connection(host: str, port: int, request: bytes, budget: _Budget,
                      latencies: list[float], statuses: list[int]) -> int:
    """Send requests over one kept-alive connection (reopened if the server closes it)."""
    failures = 0
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while budget.take():
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            started = time.perf_counter()
            writer.write(request)
            status, keep = await _read_response(reader)
            latencies.append(time.perf_counter() - started)
            statuses.append(status)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            failures, keep = failures + 1, False
        if not keep and writer is not None:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()
    return failures


def run_keepalive(url: str, token: str, image: Path, load: Load, workdir: Path) -> AbResult:
    """Like `run_ab`, but HTTP/1.1 with keep-alive (ab speaks HTTP/1.0, which uvicorn never
    keeps alive, so under ab every gateway request pays a new TCP connection)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = image.read_bytes()
    request = (f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Authorization: Bearer {token}\r\nContent-Type: image/jpeg\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    statuses: list[int] = []

    async def run() -> int:
        budget = _Budget(load.requests, load.time_limit_s)
        tasks = [_connection(host, port, request, budget, latencies, statuses)
                 for _ in range(CONCURRENCY)]
        return sum(await asyncio.gather(*tasks))

    started = time.perf_counter()
    failed = asyncio.run(run())
    elapsed = time.perf_counter() - started
    ranked = sorted(latencies) or [0.0]
    return AbResult(
        requests_per_s=round(len(statuses) / elapsed, 2),
        p50_ms=ranked[len(ranked) // 2] * 1000,
        p99_ms=ranked[min(len(ranked) - 1, int(len(ranked) * 0.99))] * 1000,
        complete=len(statuses), failed=failed,
        non_2xx=sum(not 200 <= s < 300 for s in statuses),
    )


# --- servers ----------------------------------------------------------------------------------


@contextmanager
def torchserve(workdir: Path, store: Path, mar: str) -> Iterator[tuple[str, str, str, int]]:
    """TorchServe with `tiny` READY; yields inference URL, management URL, inference token and
    its process group (frontend and workers)."""
    ports = Ports(*(free_port() for _ in range(6)))
    spec = ModelSpec("tiny", mar, workers=1, batch_size=BATCH,
                     max_batch_delay_ms=MAX_BATCH_DELAY_MS)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.properties"
    config.write_text(render_properties(hardened_properties(store, ports, (spec,))), "utf-8")
    with TorchServe(config, store, workdir) as server:
        mgmt = f"http://127.0.0.1:{ports.management}"
        server.wait_ready(mgmt, "tiny", timeout=300)
        assert server.process is not None
        yield (f"http://127.0.0.1:{ports.inference}", mgmt, server.keys()["inference"],
               server.process.pid)  # started with start_new_session: pid == pgid


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


@dataclass(frozen=True)
class Pair:
    """One direct run and one gateway run back to back (a busy machine drifts slowly, so
    comparing neighbours cancels most of the drift)."""

    direct: AbResult
    gateway: AbResult
    torchserve_cpu_ms: float  # TorchServe's CPU per request (frontend + worker), direct run
    gateway_cpu_ms: float  # the gateway process's CPU per request, gateway run


def measure(rounds: int, load: Load, use_redis: bool, client: str, tmp: Path) -> dict[str, Any]:
    send = run_ab if client == "ab" else run_keepalive
    store = tmp / "store"
    mar = build_archive(tmp / "src", store)
    image = tmp / "image.jpg"
    image.write_bytes(make_image(KINDS[0], 0))  # jpeg_500x375
    key = generate_key()
    pairs: list[Pair] = []
    with torchserve(tmp / "ts", store, mar) as (inference, management, token, ts_group), \
            (redis_server(tmp) if use_redis else _nothing()) as redis_url:
        cfg = gateway_config(tmp, store, (inference, management), tmp / "ts" / "key_file.json",
                             key, redis_url)
        with gateway(cfg, tmp) as (gw, gw_pid):
            targets = {"direct": (f"{inference}/predictions/tiny", token),
                       "gateway": (f"{gw}/predictions/tiny", key)}
            for name, (url, bearer) in targets.items():
                print(f"  {name}: {check_prediction(url, bearer, image.read_bytes())}")
                send(url, bearer, image, Load(min(300, load.requests), 30), tmp)  # warm-up
            for round_no in range(rounds):
                order = ("direct", "gateway") if round_no % 2 == 0 else ("gateway", "direct")
                results, cpu = {}, {}
                for name in order:
                    url, bearer = targets[name]
                    before = _side_cpu(name, ts_group, gw_pid)
                    results[name] = send(url, bearer, image, load, tmp)
                    spent = _side_cpu(name, ts_group, gw_pid) - before
                    cpu[name] = spent * 1000 / max(1, results[name].complete)
                pair = Pair(results["direct"], results["gateway"], cpu["direct"], cpu["gateway"])
                pairs.append(pair)
                print(_pair_line(round_no + 1, pair), flush=True)
    return summarise(pairs, load, use_redis, client)


def _pair_line(number: int, pair: Pair) -> str:
    d, g = pair.direct, pair.gateway
    return (f"  pair {number}: direct {d.requests_per_s:6.1f} req/s p50 {d.p50_ms:4.0f} "
            f"p99 {d.p99_ms:5.0f} | gateway {g.requests_per_s:6.1f} req/s p50 {g.p50_ms:4.0f} "
            f"p99 {g.p99_ms:5.0f} | ratio {g.requests_per_s / d.requests_per_s:.3f} | CPU/req "
            f"torchserve {pair.torchserve_cpu_ms:.2f} ms, gateway {pair.gateway_cpu_ms:.2f} ms"
            f" | failed {d.failed + g.failed}, non-2xx {d.non_2xx + g.non_2xx}")


def _side_cpu(name: str, ts_group: int, gw_pid: int) -> float:
    """CPU seconds of the side that does the work being measured: TorchServe for a direct
    run, the gateway process for a gateway run."""
    return _group_cpu_seconds(ts_group) if name == "direct" else _cpu_seconds(gw_pid)


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _stat_fields(pid: int | str) -> list[str]:
    # Fields after the command name, which may itself hold spaces or parentheses.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _group_cpu_seconds(pgid: int) -> float:
    """The same, summed over the live processes of process group `pgid` (torchserve's tree)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(entry.name)
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _mid(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summarise(pairs: Sequence[Pair], load: Load, use_redis: bool,
              client: str) -> dict[str, Any]:
    middle = sorted(pairs, key=lambda p: p.gateway.requests_per_s / p.direct.requests_per_s)
    typical = middle[len(middle) // 2]
    ts_cpu = _mid([p.torchserve_cpu_ms for p in pairs])
    gw_cpu = _mid([p.gateway_cpu_ms for p in pairs])
    return {
        "load": {"requests": load.requests, "time_limit_s": load.time_limit_s,
                 "concurrency": CONCURRENCY, "pairs": len(pairs), "client": client},
        "limiter": "redis" if use_redis else "memory",
        "direct": typical.direct.to_json(),
        "gateway": typical.gateway.to_json(),
        "throughput_ratio": round(_mid([p.gateway.requests_per_s / p.direct.requests_per_s
                                        for p in pairs]), 3),
        "added_p50_ms": round(_mid([p.gateway.p50_ms - p.direct.p50_ms for p in pairs]), 1),
        "added_p99_ms": round(_mid([p.gateway.p99_ms - p.direct.p99_ms for p in pairs]), 1),
        "torchserve_cpu_ms_per_request": round(ts_cpu, 2),
        "gateway_cpu_ms_per_request": round(gw_cpu, 2),
        "cpu_overhead_ratio": round(gw_cpu / ts_cpu, 3) if ts_cpu else None,
        "pairs": [{"direct": p.direct.to_json(), "gateway": p.gateway.to_json(),
                   "torchserve_cpu_ms": round(p.torchserve_cpu_ms, 2),
                   "gateway_cpu_ms": round(p.gateway_cpu_ms, 2)} for p in pairs],
        "cpus": os.cpu_count(),
    }


def report(summary: dict[str, Any]) -> str:
    d, g = summary["direct"], summary["gateway"]
    rows = [
        "| path (median pair) | req/s | p50 ms | p99 ms | failed | non-2xx |",
        "|---|---|---|---|---|---|",
        f"| TorchServe directly | {d['requests_per_s']:.1f} | {d['p50_ms']:.0f} | "
        f"{d['p99_ms']:.0f} | {d['failed']} | {d['non_2xx']} |",
        f"| through the gateway ({summary['limiter']} limiter, {summary['load']['client']}) | "
        f"{g['requests_per_s']:.1f} | "
        f"{g['p50_ms']:.0f} | {g['p99_ms']:.0f} | {g['failed']} | {g['non_2xx']} |",
    ]
    return "\n".join(rows) + (
        f"\n\noverhead ratio (gateway req/s / direct req/s, median of {summary['load']['pairs']}"
        f" pairs): {summary['throughput_ratio']:.3f}; added latency p50 "
        f"{summary['added_p50_ms']:+.1f} ms, p99 {summary['added_p99_ms']:+.1f} ms"
        f"\nCPU per request: TorchServe {summary['torchserve_cpu_ms_per_request']:.2f} ms, "
        f"gateway {summary['gateway_cpu_ms_per_request']:.2f} ms "
        f"(gateway / TorchServe = {summary['cpu_overhead_ratio']})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_ROUNDS} pairs of {QUICK_LOAD.requests} requests")
    parser.add_argument("--rounds", type=int, help=f"pairs of runs (default {ROUNDS})")
    parser.add_argument("--redis", action="store_true", help="Redis limiter (real redis-server)")
    parser.add_argument("--client", choices=["keepalive", "ab"], default="keepalive",
                        help="HTTP/1.1 keep-alive load (default) or ApacheBench (HTTP/1.0)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    load = QUICK_LOAD if args.quick else LOAD
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        summary = measure(max(1, rounds), load, args.redis, args.client, Path(tmp))
    print()
    print(report(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2), "utf-8")
    return 0 if summary["gateway"]["failed"] == 0 and summary["gateway"]["non_2xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
