"""Preprocessing throughput: decode floor vs TorchServe's stock ImageClassifier vs ours.

    /tmp/venv/bin/python benchmarks/bench_preprocess.py [--quick] [--json out.json]

All three run in this one invocation on the same generated images (see corpus.py):

* floor: `Image.open(BytesIO(b))` + `.load()` (full-size decode) + `.convert("RGB")` only when
  the mode is not RGB (never, for this corpus). No resize, no tensor: the cost of pixels alone.
* stock: TorchServe 0.12.0 `ImageClassifier.preprocess` in its own venv (torch 2.14.1,
  torchvision 0.29.1; build it with `bash benchmarks/stock_venv.sh`), via _stock_preprocess.py.
* ours: `SecureImageClassifier`'s preprocessing path with every check on (`measure_ours`).

Every figure is images/s, the MEDIAN of `--repeats` timed passes after one warm-up pass,
batches of 8 rows `{"body": bytearray}` as TorchServe delivers them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from _timing import Rate, batched, measure  # noqa: E402
from corpus import KINDS, make_corpus, mixed  # noqa: E402

DEFAULT_STOCK_VENV = HERE / ".venv-stock"
TARGET_STOCK_MIXED = 3.0
TARGET_FLOOR_SMALL = 0.7
SMALL = "jpeg_500x375"
MIXED = "mixed"
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png"}

#: (distinct images, images per timed pass) per kind; --quick divides the pass sizes by 4.
PLAN: dict[str, tuple[int, int]] = {
    "jpeg_500x375": (8, 64),
    "jpeg_1280x960": (8, 32),
    "jpeg_4032x3024": (3, 8),
    "png_256x256": (8, 64),
}
MIXED_PER_KIND = 8  # the mixed pass: 8 of each kind, interleaved (32 images, 4 batches)


def build_sets(quick: bool) -> dict[str, list[bytes]]:
    """Per-kind lists (distinct images cycled to the pass size) plus the mixed list."""
    corpus = make_corpus({name: distinct for name, (distinct, _) in PLAN.items()})
    div = 4 if quick else 1
    sets = {
        name: [imgs[i % len(imgs)] for i in range(max(8, PLAN[name][1] // div))]
        for name, imgs in corpus.items()
    }
    sets[MIXED] = mixed(corpus, max(2, MIXED_PER_KIND // div))
    return sets


def content_type(data: bytes) -> str:
    return "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"


# --- (a) the floor ----------------------------------------------------------------------------


def _decode_all(batch: Sequence[bytes]) -> None:
    for data in batch:
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.mode != "RGB":
            img.convert("RGB")


def measure_floor(sets: Mapping[str, Sequence[bytes]], batch: int, repeats: int) -> dict[str, Rate]:
    return {name: measure(_decode_all, batched(imgs, batch), len(imgs), repeats)
            for name, imgs in sets.items()}


# --- (b) stock, in its own venv ---------------------------------------------------------------


def write_files(tmp: Path, sets: Mapping[str, Sequence[bytes]]) -> dict[str, list[str]]:
    """Each distinct image once as a file; returns the sets as lists of paths."""
    files: dict[bytes, str] = {}
    for imgs in sets.values():
        for data in imgs:
            if data not in files:
                path = tmp / f"img{len(files)}"
                path.write_bytes(data)
                files[data] = str(path)
    return {name: [files[d] for d in imgs] for name, imgs in sets.items()}


StockResult = tuple[dict[str, Rate], dict[str, Any]] | str


def run_stock_job(venv: Path, job: Mapping[str, Any], sets: Mapping[str, Sequence[bytes]],
                  batch_of: Callable[[str], int]) -> StockResult:
    """Run _stock_preprocess.py in the stock venv: rates and versions, or why it was skipped.

    Each set becomes one run named like the set, in batches of `batch_of(name)`.
    """
    python = venv / "bin" / "python"
    if not python.exists():
        return f"stock skipped: no venv at {venv} (build it: bash benchmarks/stock_venv.sh)"
    with tempfile.TemporaryDirectory(prefix="bench-stock-") as tmp:
        runs = [{"name": name, "batch": batch_of(name), "paths": paths}
                for name, paths in write_files(Path(tmp), sets).items()]
        Path(tmp, "job.json").write_text(json.dumps({**job, "runs": runs}), "utf-8")
        proc = subprocess.run(
            [str(python), str(HERE / "_stock_preprocess.py"), str(Path(tmp, "job.json"))],
            capture_output=True, text=True, timeout=1800, check=False,
        )
    if proc.returncode != 0:
        return f"stock failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: Rate(**r) for name, r in out["rates"].items()}, out["versions"]


def measure_stock(sets: Mapping[str, Sequence[bytes]], batch: int, repeats: int, venv: Path,
                  torch_threads: int | None = None) -> StockResult:
    """Stock `ImageClassifier.preprocess` rates per set, in batches of `batch`."""
    job = {"mode": "preprocess", "repeats": repeats, "warmup": 1, "torch_threads": torch_threads}
    return run_stock_job(venv, job, sets, lambda _: batch)


# --- (c) ours ---------------------------------------------------------------------------------


def _ours_handler(tmp: Path, batch: int,
                  config: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """A `SecureImageClassifier` initialised through TorchServe's real Context, tiny model."""
    from models import TinyModel, save_scripted

    from secure_handler.serving.image.classifier import SecureImageClassifier
    from secure_handler.testing import make_context

    save_scripted(TinyModel(), tmp / "model.pt")
    manifest = {"runtime": "python", "model": {
        "modelName": "ours", "serializedFile": "model.pt", "handler": "handler.py",
        "modelVersion": "1.0"}}
    ctx = make_context(tmp, manifest=manifest, model_yaml_config={"handler": dict(config or {})},
                       batch_size=batch, model_name="ours")
    handler = SecureImageClassifier()
    handler.initialize(ctx)
    return handler, ctx


def _ours_preprocess(handler: Any, ctx: Any) -> Callable[[list[dict[str, Any]]], object]:
    """Our preprocessing, exactly as `handle()` runs it: `decode_rows` (every check, on the
    decode pool when `decode_threads` is set), then `assemble` of the valid items."""
    from secure_handler.errors import SecureHandlerError

    def preprocess(rows: list[dict[str, Any]]) -> object:
        handler.context = ctx
        items = [o for o in handler.decode_rows(rows) if not isinstance(o, SecureHandlerError)]
        return handler.assemble(items)

    return preprocess


def _setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    return key, yaml.safe_load(value)


def measure_ours(
    sets: Mapping[str, Sequence[bytes]], batch: int = 8, repeats: int = 5,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Rate] | str:
    """Rates of our preprocessing (all validation on), or a note saying why it was skipped."""
    try:
        from ts.context import RequestProcessor

        from secure_handler.testing import Request
    except ImportError as exc:
        return f"ours skipped: {exc}"
    results: dict[str, Rate] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as tmp:
        try:
            handler, ctx = _ours_handler(Path(tmp), batch, config)
        except (ImportError, AttributeError, TypeError) as exc:
            return f"ours skipped: handler not available ({type(exc).__name__}: {exc})"
        preprocess = _ours_preprocess(handler, ctx)
        for name, imgs in sets.items():
            batches = []
            for chunk in batched(imgs, batch):
                reqs = [Request(bytearray(d), content_type(d)) for d in chunk]
                batches.append(([r.row() for r in reqs],
                                [RequestProcessor(r.header_map()) for r in reqs]))

            def run(b: tuple[list[dict[str, Any]], list[Any]]) -> object:
                ctx.request_processor = b[1]  # per-batch headers, as the worker sets them
                return preprocess(b[0])

            shape = tuple(getattr(run(batches[0]), "shape", ()))
            if shape != (len(batches[0][0]), 3, 224, 224):
                return f"ours skipped: preprocessing gave shape {shape}, not [B, 3, 224, 224]"
            results[name] = measure(run, batches, len(imgs), repeats)
    return results


# --- report -----------------------------------------------------------------------------------


def _fmt(rates: Mapping[str, Rate] | str, name: str) -> str:
    return f"{rates[name].median:9.1f}" if not isinstance(rates, str) and name in rates else (
        f"{'-':>9}")


def _ratio(num: Mapping[str, Rate] | str, den: Mapping[str, Rate] | str, name: str) -> float | None:
    if isinstance(num, str) or isinstance(den, str) or name not in num or name not in den:
        return None
    return num[name].median / den[name].median


def report(sets: Mapping[str, Sequence[bytes]], floor: Mapping[str, Rate],
           stock: Mapping[str, Rate] | str, ours: Mapping[str, Rate] | str) -> dict[str, Any]:
    print(f"\n{'images/s (median)':<18}{'floor':>9}{'stock':>9}{'ours':>9}"
          f"{'ours/stock':>12}{'ours/floor':>12}{'stock/floor':>13}")
    for name in sets:
        cells = [_ratio(ours, stock, name), _ratio(ours, floor, name), _ratio(stock, floor, name)]
        ratios = "".join(f"{c:>{w}.2f}" if c is not None else f"{'-':>{w}}"
                         for c, w in zip(cells, (12, 12, 13), strict=True))
        print(f"{name:<18}{_fmt(floor, name)}{_fmt(stock, name)}{_fmt(ours, name)}{ratios}")
    for note in (stock, ours):
        if isinstance(note, str):
            print(f"note: {note}")
    vs_stock, vs_floor = _ratio(ours, stock, MIXED), _ratio(ours, floor, SMALL)
    for label, value, target in ((f"ours/stock on {MIXED}", vs_stock, TARGET_STOCK_MIXED),
                                 (f"ours/floor on {SMALL}", vs_floor, TARGET_FLOOR_SMALL)):
        shown = "n/a" if value is None else f"{value:.2f}x"
        verdict = "" if value is None else ("  (met)" if value >= target else "  (NOT met)")
        print(f"{label}: {shown}  target >= {target}x{verdict}")
    return {"ours_vs_stock_mixed": vs_stock, "ours_vs_floor_500x375": vs_floor}


def _environment() -> dict[str, Any]:
    import numpy
    import PIL
    import torch

    return {"python": platform.python_version(), "pillow": PIL.__version__,
            "numpy": numpy.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller passes (smoke test)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per figure")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--stock-venv", type=Path, default=DEFAULT_STOCK_VENV)
    parser.add_argument("--skip", action="append", default=[], choices=["stock", "ours"])
    parser.add_argument("--ours", action="append", type=_setting, default=[],
                        metavar="KEY=VALUE",
                        help="handler config for ours, e.g. resampler=torch decode_threads=2")
    parser.add_argument("--json", type=Path, help="also write all figures here")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads for stock and ours (default: torch's, "
                             "as in a TorchServe worker); 1 avoids OpenMP collapse on a busy CPU")
    args = parser.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    env = _environment()
    print(f"corpus: generating ({', '.join(k.name for k in KINDS)}) ...", flush=True)
    sets = build_sets(args.quick)
    print("sizes: " + ", ".join(f"{n}: {len(s)} imgs/pass" for n, s in sets.items()))
    print("floor ...", flush=True)
    floor = measure_floor(sets, args.batch, args.repeats)
    print("stock ...", flush=True)
    stock_out = ("stock skipped (--skip stock)" if "stock" in args.skip
                 else measure_stock(sets, args.batch, args.repeats, args.stock_venv,
                                   args.torch_threads))
    stock, stock_versions = (stock_out if not isinstance(stock_out, str) else (stock_out, {}))
    print("ours ...", flush=True)
    ours = ("ours skipped (--skip ours)" if "ours" in args.skip
            else measure_ours(sets, args.batch, args.repeats, dict(args.ours)))
    print(f"environment: {env}; stock: {stock_versions}")
    ratios = report(sets, floor, stock, ours)
    if args.json:
        def dump(r: Mapping[str, Rate] | str) -> Any:
            return r if isinstance(r, str) else {k: v.to_json() for k, v in r.items()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "environment": env, "stock_versions": stock_versions, "ratios": ratios,
            "floor": dump(floor), "stock": dump(stock), "ours": dump(ours),
            "images_per_pass": {n: len(s) for n, s in sets.items()},
        }, indent=2), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
