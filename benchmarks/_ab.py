"""ApacheBench helpers shared by the end-to-end and gateway benchmarks (loopback only)."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONCURRENCY = 16


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
    raw: str = field(repr=False, default="")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "raw"}


def check_prediction(url: str, token: str, body: bytes) -> str:
    """One request before timing: the model must answer 200."""
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", "image/jpeg")
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # loopback only
            text: str = resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        with err:
            raise RuntimeError(f"{url}: HTTP {err.code}: {err.read()[:300]!r}") from err
    return text[:160].replace("\n", " ")


def run_ab(url: str, token: str, image: Path, load: Load, workdir: Path,
           concurrency: int = CONCURRENCY) -> AbResult:
    """ApacheBench with keep-alive (`-k`: without it ab hangs against TorchServe)."""
    ab = shutil.which("ab")
    if ab is None:
        raise RuntimeError("ApacheBench missing: apt-get install -y apache2-utils")
    pct = workdir / "ab-percentiles.csv"
    # -t before -n: ab's -t resets the request count, a later -n sets it again.
    cmd = [ab, "-k", "-q", "-l", "-s", "60", "-c", str(concurrency), "-t", str(load.time_limit_s),
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
    """req/s and failure counts from ab's report; p50/p99 from its `-e` percentile CSV."""
    pct = {int(float(row[0])): float(row[1])
           for row in csv.reader(percentiles_csv.splitlines()[1:]) if len(row) == 2}
    return AbResult(
        requests_per_s=_field(r"Requests per second:\s+([\d.]+)", stdout),
        p50_ms=pct[50], p99_ms=pct[99],
        complete=int(_field(r"Complete requests:\s+(\d+)", stdout)),
        failed=int(_field(r"Failed requests:\s+(\d+)", stdout)),
        non_2xx=int(_field(r"Non-2xx responses:\s+(\d+)", stdout)),
        raw=stdout,
    )
