"""Throughput of one pod and of two pods sharing one Redis (the scale-out recipe, on one box).

    .venv/bin/python benchmarks/bench_scale.py [--seconds 20] [--clients 16] [--json F]

A pod is what deploy/ runs: one TorchServe (one worker, batchSize 8, maxBatchDelay 20 ms, the
hardened config) and one `secure-handler gateway` process holding its tokens, the gateways'
per-key limits in a shared real redis-server (tests/scale_support.py). The model is the tiny
TorchScript classifier of the tests, so the figures are the serving path's own cost. The load
generator runs `--clients` keep-alive HTTP clients on threads for `--seconds`, round robin over
the pods, each POSTing one 320x240 PNG with a gateway key; it counts only 200 answers.

Bounded and loopback only: every server binds 127.0.0.1, each phase has a time limit, and every
process is stopped at the end. On a machine with fewer cores than two pods need, the two pods
share the same cores: the ratio printed says how much a second pod adds HERE, not in a cluster
where each pod has its own CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(1, str(HERE.parent))

from scale_support import Balancer, Pod, pods, send, tiny_store  # noqa: E402
from support import (  # noqa: E402
    image_bytes,
)

from secure_handler.deploy.tsconfig import ModelSpec  # noqa: E402
from secure_handler.gateway.keys import generate_key  # noqa: E402

RATE = {"per_second": 1_000_000, "burst": 1_000_000}



def drive(targets: list[Pod], key: str, clients: int, seconds: float) -> dict[str, Any]:
    """Closed-loop load over `targets` for `seconds`; req/s of 200 answers and the rest."""
    balancer = Balancer(targets)
    body = image_bytes("red", fmt="PNG")
    statuses: Counter[int] = Counter()
    per_pod: Counter[str] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client_loop() -> None:
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < stop:
                outcome = send(client, balancer.pick(), "/predictions/tiny", body,
                               "image/png", key)
                with lock:
                    statuses[outcome.status] += 1
                    if outcome.status == 200:
                        per_pod[outcome.pod] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    elapsed = time.monotonic() - started
    return {"pods": len(targets), "seconds": round(elapsed, 2),
            "ok_per_s": round(statuses[200] / elapsed, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "per_pod": dict(per_pod)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    key = generate_key()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        store = tiny_store(tmp)
        spec = ModelSpec("tiny", "tiny.mar", batch_size=8, max_batch_delay_ms=20)
        with pods(2, tmp, store, [spec], {"bench": {"key": key, "rate": RATE}}) as (both, _):
            drive(both, key, args.clients, min(5.0, args.seconds))  # warm-up, not counted
            one = drive(both[:1], key, args.clients, args.seconds)
            two = drive(both, key, args.clients, args.seconds)
    report = {"cpus": os.cpu_count(), "clients": args.clients, "one_pod": one, "two_pods": two,
              "ratio": round(two["ok_per_s"] / max(one["ok_per_s"], 1e-9), 2)}
    print(f"cpus={report['cpus']} clients={args.clients} seconds/phase={args.seconds:g}")
    for name in ("one_pod", "two_pods"):
        row = report[name]
        print(f"  {name:9} {row['ok_per_s']:8.1f} req/s  statuses={row['statuses']}  "
              f"per pod={row['per_pod']}")
    print(f"  two pods / one pod = {report['ratio']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
