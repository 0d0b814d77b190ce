"""End to end: our handler vs TorchServe's stock `image_classifier` under a real TorchServe.

    /tmp/venv/bin/python benchmarks/bench_e2e.py [--quick] [--models tiny,resnet18] [--json F]

Setup, identical for both sides: one worker, batchSize 8, maxBatchDelay 5 ms, the hardened
config.properties from `secure_handler.deploy.tsconfig` (loopback, token auth on), one 500x375 JPEG
(quality 90, from corpus.py) POSTed by ApacheBench at concurrency 16 with keep-alive (`-k`:
without it ab hangs against TorchServe) and `Authorization: Bearer <inference key>` read from
the server's key_file.json.

* ours: a one-class `handler.py` subclassing `SecureImageClassifier`, served by this venv's
  `torchserve`.
* stock: `--handler image_classifier`, archived and served by the stock venv
  (benchmarks/.venv-stock, torch 2.14.1 + torchvision 0.29.1; `bash benchmarks/stock_venv.sh`).

Models (same TorchScript file for both sides):
* tiny: per-channel means (inference is free, so the server is handler-bound);
* resnet18: ResNet-18 architecture with random weights, 224x224 input. Its own batch-8 forward
  rate is measured in each venv (best of channels-last and contiguous input) and the script
  prints e2e req/s / forward img/s.

Reported per run: req/s, p50 and p99 latency (ms, from ab's percentile CSV), failures.
Servers run one at a time and are always stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from _ab import AbResult, Load, check_prediction, run_ab  # noqa: E402
from corpus import KINDS, make_image  # noqa: E402
from models import TinyModel, resnet18, save_scripted  # noqa: E402

from secure_handler.deploy.launcher import TorchServe, free_port  # noqa: E402
from secure_handler.deploy.tsconfig import ModelSpec, Ports, hardened_properties, render_properties  # noqa: E402

DEFAULT_STOCK_VENV = HERE / ".venv-stock"
BATCH = 8
MAX_BATCH_DELAY_MS = 5
TARGET_TINY_VS_STOCK = 2.0
TARGET_RESNET_VS_FORWARD = 0.87

OUR_HANDLER = '''"""Benchmark handler: the library's classifier, unchanged."""

from secure_handler import SecureImageClassifier


class BenchHandler(SecureImageClassifier):
    """Exactly what a user writes."""
'''


LOADS = {"tiny": Load(3000, 60), "resnet18": Load(400, 120)}
QUICK_LOADS = {"tiny": Load(600, 30), "resnet18": Load(80, 60)}


@dataclass
class StockTorchServe(TorchServe):
    """The same runner, but the stock venv's `torchserve`, so its workers use that venv."""

    venv: Path = DEFAULT_STOCK_VENV

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[0] = str(self.venv / "bin" / "torchserve")
        return cmd


# --- artefacts --------------------------------------------------------------------------------


def build_models(src: Path, names: Sequence[str]) -> dict[str, Path]:
    builders: dict[str, Callable[[], torch.nn.Module]] = {"tiny": TinyModel, "resnet18": resnet18}
    out = {}
    for name in names:
        (src / name).mkdir(parents=True, exist_ok=True)
        out[name] = save_scripted(builders[name](), src / name / "model.pt")
    return out


def archive(archiver: Path, store: Path, name: str, model: Path, handler: str,
            labels: Path) -> str:
    """Run the real torch-model-archiver; returns the MAR's file name."""
    cmd = [str(archiver), "--model-name", name, "--version", "1.0", "--serialized-file",
           str(model), "--handler", handler, "--extra-files", str(labels),
           "--export-path", str(store), "-f"]
    subprocess.run(cmd, check=True, capture_output=True)
    return f"{name}.mar"


def labels_file(src: Path, model: str) -> Path:
    classes = CLASSES[model]
    path = src / f"labels{classes}" / "index_to_name.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(i): f"class_{i}" for i in range(classes)}), "utf-8")
    return path


CLASSES = {"tiny": 10, "resnet18": 1000}


# --- forward throughput -----------------------------------------------------------------------


def forward_rates(python: Path, model: Path, env: dict[str, str]) -> dict[str, Any]:
    """The model's own batch-8 img/s under `python`'s torch (runs models.py in a child)."""
    proc = subprocess.run([str(python), str(HERE / "models.py"), "forward-rate", str(model),
                           str(BATCH)], capture_output=True, text=True, check=True, timeout=600,
                          env={**os.environ, **env})
    rates: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    rates["best"] = max(rates["channels_last"], rates["contiguous"])
    return rates


# --- server + load ----------------------------------------------------------------------------


@contextmanager
def serve(kind: str, workdir: Path, store: Path, mars: dict[str, str],
          stock_venv: Path, env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """A running server with every model READY; yields (inference URL, inference token)."""
    ports = Ports(*(free_port() for _ in range(6)))
    specs = tuple(ModelSpec(name, mar, workers=1, batch_size=BATCH,
                            max_batch_delay_ms=MAX_BATCH_DELAY_MS) for name, mar in mars.items())
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.properties"
    config.write_text(render_properties(hardened_properties(store, ports, specs)), "utf-8")
    server: TorchServe = (StockTorchServe(config, store, workdir, env=env, venv=stock_venv)
                          if kind == "stock" else TorchServe(config, store, workdir, env=env))
    with server:
        mgmt = f"http://127.0.0.1:{ports.management}"
        for spec in specs:
            server.wait_ready(mgmt, spec.name, timeout=300)
        yield f"http://127.0.0.1:{ports.inference}", server.keys()["inference"]


# --- main -------------------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything one run shares: the artefacts, the load and the workers' environment."""

    tmp: Path
    store: Path
    image: Path
    models: dict[str, Path]
    loads: dict[str, Load]
    stock_venv: Path
    env: dict[str, str]
    forward: dict[str, dict[str, Any]] = field(default_factory=dict)


def measure_side(bench: Bench, kind: str, python: Path, mars: dict[str, str]
                 ) -> dict[str, AbResult]:
    """Serve `mars` with one side's torchserve and load each model in turn.

    The ResNet's forward rate is measured right before its load run, under the same
    torch, while the server sits idle: on a shared CPU, figures taken minutes apart
    are not comparable.
    """
    results: dict[str, AbResult] = {}
    workdir = bench.tmp / f"server-{kind}"
    with serve(kind, workdir, bench.store, mars, bench.stock_venv, bench.env) as (base, token):
        for model in mars:
            url = f"{base}/predictions/{model}"
            print(f"  {kind}/{model}: {check_prediction(url, token, bench.image.read_bytes())}")
            load = bench.loads[model]
            run_ab(url, token, bench.image, Load(min(200, load.requests), 30), bench.tmp)  # warm
            if model == "resnet18":
                bench.forward[f"{kind}/{model}"] = fwd = forward_rates(
                    python, bench.models[model], bench.env)
                print(f"  {kind}/{model}: forward batch {BATCH}: {fwd['best']:.1f} img/s")
            results[model] = r = run_ab(url, token, bench.image, load, bench.tmp)
            print(f"  {kind}/{model}: {r.requests_per_s:.1f} req/s, p50 {r.p50_ms:.0f} ms, "
                  f"p99 {r.p99_ms:.0f} ms, failed {r.failed}, non-2xx {r.non_2xx}", flush=True)
    return results


def report(ours: dict[str, AbResult], stock: dict[str, AbResult] | str,
           forward: dict[str, dict[str, Any]]) -> dict[str, Any]:
    print(f"\n{'model':<10}{'side':<7}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'fwd img/s':>11}"
          f"{'e2e/fwd':>9}")
    summary: dict[str, Any] = {}
    for model, ours_r in ours.items():
        sides = [("ours", ours_r)] + ([] if isinstance(stock, str) else [("stock", stock[model])])
        for side, r in sides:
            fwd = forward.get(f"{side}/{model}", {}).get("best")
            ratio = f"{r.requests_per_s / fwd:9.2f}" if fwd else f"{'-':>9}"
            fwd_s = f"{fwd:11.1f}" if fwd else f"{'-':>11}"
            print(f"{model:<10}{side:<7}{r.requests_per_s:9.1f}{r.p50_ms:9.0f}{r.p99_ms:9.0f}"
                  f"{fwd_s}{ratio}")
            if fwd:
                summary[f"{side}/{model}/e2e_vs_forward"] = r.requests_per_s / fwd
    if isinstance(stock, str):
        print(f"note: {stock}")
    elif "tiny" in ours:
        speedup = ours["tiny"].requests_per_s / stock["tiny"].requests_per_s
        summary["tiny/ours_vs_stock"] = speedup
        p99_ok = ours["tiny"].p99_ms <= stock["tiny"].p99_ms
        print(f"tiny: ours/stock req/s = {speedup:.2f}x (target >= {TARGET_TINY_VS_STOCK}x); "
              f"p99 ours {ours['tiny'].p99_ms:.0f} ms vs stock {stock['tiny'].p99_ms:.0f} ms "
              f"({'no worse' if p99_ok else 'WORSE'})")
    if "ours/resnet18/e2e_vs_forward" in summary:
        print(f"resnet18: ours e2e/forward = {summary['ours/resnet18/e2e_vs_forward']:.2f} "
              f"(target >= {TARGET_RESNET_VS_FORWARD})")
    return summary


def prepare(tmp: Path, names: Sequence[str], loads: dict[str, Load], stock_venv: Path,
            env: dict[str, str]) -> Bench:
    store = tmp / "store"
    store.mkdir()
    image = tmp / "request.jpg"
    image.write_bytes(make_image(KINDS[0], 0))  # the 500x375 JPEG, quality 90
    return Bench(tmp, store, image, build_models(tmp / "src", names), loads, stock_venv, env)


def _setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    if not key.isidentifier():
        raise argparse.ArgumentTypeError(f"not a limit name: {key!r}")
    return key, yaml.safe_load(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke test)")
    parser.add_argument("--models", default="tiny,resnet18")
    parser.add_argument("--stock-venv", type=Path, default=DEFAULT_STOCK_VENV)
    parser.add_argument("--skip", action="append", default=[], choices=["stock", "ours"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--omp-threads", type=int, default=None,
                        help="OMP_NUM_THREADS for both servers' workers (default: unset, "
                             "torch's own choice, as a stock deployment has)")
    parser.add_argument("--ours", action="append", type=_setting, default=[],
                        metavar="KEY=VALUE",
                        help="limit set on our handler class, e.g. resampler=torch")
    args = parser.parse_args(argv)
    env = {"OMP_NUM_THREADS": str(args.omp_threads)} if args.omp_threads else {}
    names = [n for n in args.models.split(",") if n]
    loads = QUICK_LOADS if args.quick else LOADS
    stock_python = args.stock_venv / "bin" / "python"
    venv_bin = Path(sys.executable).parent

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp_s:
        tmp = Path(tmp_s)
        bench = prepare(tmp, names, loads, args.stock_venv, env)
        handler = tmp / "src" / "handler.py"
        overrides = "".join(f"    {k} = {v!r}\n" for k, v in args.ours)
        handler.write_text(OUR_HANDLER + ("\n" + overrides if overrides else ""), "utf-8")
        ours: dict[str, AbResult] = {}
        if "ours" not in args.skip:
            print("ours ...", flush=True)
            mars = {n: archive(venv_bin / "torch-model-archiver", bench.store, f"ours_{n}",
                               bench.models[n], str(handler), labels_file(tmp / "src", n))
                    for n in names}
            ours = measure_side(bench, "ours", Path(sys.executable), mars)
        stock: dict[str, AbResult] | str = (
            f"stock skipped: no venv at {args.stock_venv} (bash benchmarks/stock_venv.sh)")
        if "stock" in args.skip:
            stock = "stock skipped (--skip stock)"
        elif stock_python.exists():
            print("stock ...", flush=True)
            mars = {n: archive(args.stock_venv / "bin" / "torch-model-archiver", bench.store,
                               f"stock_{n}", bench.models[n], "image_classifier",
                               labels_file(tmp / "src", n)) for n in names}
            stock = measure_side(bench, "stock", stock_python, mars)
        summary = report(ours, stock, bench.forward) if ours else {}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "loadavg_at_end": os.getloadavg(), "forward": bench.forward, "summary": summary,
            "ours": {k: v.to_json() for k, v in ours.items()},
            "stock": (stock if isinstance(stock, str)
                      else {k: v.to_json() for k, v in stock.items()}),
        }, indent=2), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
