"""Coverage-guided fuzzing of the request path: `read_payload` + `decode` of a secure handler.

    pip install atheris            # not in any extra; wheels exist for CPython 3.8-3.11 on Linux
    python fuzz/fuzz_handlers.py --target image --runs 20000
    python fuzz/fuzz_handlers.py --target text --seconds 300 --out build/fuzz-text
    python fuzz/fuzz_handlers.py --target image --engine random --runs 5000   # no atheris

The property fuzzed is the one the property tests check with Hypothesis: whatever bytes
arrive, the handler yields an item or one of our typed `RequestError`s. Anything else is a
crash: atheris prints the traceback and saves the input under `--out` (`crash-*`), which
replays with `python fuzz/fuzz_handlers.py --target image --replay FILE`.

Each input's first byte picks the envelope (raw bytes under one of several content types,
base64 text, or a JSON object), as the TorchServe worker would deliver it. Python code
(secure_handler, Pillow's Python plugins) is instrumented for coverage; Pillow's C decoders
are exercised but not coverage-guided (that needs a sanitizer build of Pillow).

The run stops by itself after `--runs` inputs or `--seconds`, whichever comes first, and
prints one JSON report: iterations, seconds, inputs/s and the outcome counts.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

try:  # optional: only `--engine atheris` needs it
    import atheris
except ImportError:  # pragma: no cover - depends on the environment
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        from PIL import Image

        from secure_handler import (
            RequestError,
            SecureBaseHandler,
            SecureImageClassifier,
            SecureTextClassifier,
        )
        from secure_handler.testing import Request, make_context
else:
    from PIL import Image

    from secure_handler import (
        RequestError,
        SecureBaseHandler,
        SecureImageClassifier,
        SecureTextClassifier,
    )
    from secure_handler.testing import Request, make_context

from ts.context import RequestProcessor

from secure_handler.serving.loading import save_torchscript

CONTENT_TYPES = ("application/octet-stream", "image/jpeg", "image/png", "text/plain",
                 "application/json", "image/webp", "")
VOCAB = {"<pad>": 0, "<unk>": 1, "good": 2, "bad": 3}


# --- tiny TorchScript models (scripted from this file, which torch.jit.script needs) -----------


class ChannelMeans(torch.nn.Module):
    """`[B, 3, H, W]` → `[B, 3]` logits: the per-channel means."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class TokenCounts(torch.nn.Module):
    """`(ids [B, T], mask [B, T])` → `[B, 2]` logits."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        good = ((input_ids == 2) & (attention_mask > 0)).sum(dim=1)
        bad = ((input_ids == 3) & (attention_mask > 0)).sum(dim=1)
        return torch.stack([good, bad], dim=1).to(torch.float32)


def _save_scripted(module: torch.nn.Module, path: Path) -> None:
    save_torchscript(module, path)


def build_handler(target: str, model_dir: Path) -> tuple[SecureBaseHandler, Any]:
    """A handler initialised on TorchServe's real Context, with a tiny model in `model_dir`."""
    manifest = {"model": {"modelName": target, "serializedFile": "model.pt",
                          "handler": "handler.py", "modelVersion": "1.0"}}
    config: dict[str, Any]
    if target == "image":
        _save_scripted(ChannelMeans(), model_dir / "model.pt")
        cls: type[SecureBaseHandler] = SecureImageClassifier
        config = {"allowed_formats": ["PNG", "JPEG", "GIF"], "max_image_side": 2048,
                  "max_image_pixels": 2048 * 2048, "max_request_bytes": 1 << 20}
    else:
        _save_scripted(TokenCounts(), model_dir / "model.pt")
        (model_dir / "vocab.json").write_text(json.dumps(VOCAB))
        cls = SecureTextClassifier
        config = {}
    with warnings.catch_warnings():  # ts 0.12's metrics cache leaves metrics.yaml open
        warnings.filterwarnings("ignore", category=ResourceWarning)
        ctx = make_context(model_dir, manifest, {"handler": config}, batch_size=1)
    handler = cls()
    handler.initialize(ctx)
    return handler, ctx


# --- inputs -------------------------------------------------------------------------------------


def to_request(data: bytes) -> Request:
    """First byte: envelope and content type; the rest: the payload."""
    if not data:
        return Request.as_worker(b"", "application/octet-stream")
    selector, payload = data[0], data[1:]
    shape = selector % 4
    if shape == 0:
        return Request.as_worker(payload, CONTENT_TYPES[(selector >> 2) % len(CONTENT_TYPES)])
    text = base64.b64encode(payload).decode()
    if shape == 1:
        return Request.as_worker(text.encode(), "text/plain")
    if shape == 2:
        key = ("data", "image", "text")[(selector >> 2) % 3]
        return Request.as_worker(json.dumps({key: text}).encode(), "application/json")
    return Request.as_worker(payload, "text/plain")  # raw bytes as text: the text path


def seed_corpus() -> list[bytes]:
    """Valid images of each mode and a few texts, each behind every envelope selector."""
    rgb = Image.new("RGB", (40, 30), (200, 40, 40))
    images = []
    for mode, fmt, save in (("RGB", "JPEG", {}), ("RGB", "JPEG", {"progressive": True}),
                            ("CMYK", "JPEG", {}), ("RGB", "PNG", {}), ("P", "PNG", {}),
                            ("LA", "PNG", {}), ("I;16", "PNG", {}), ("P", "GIF", {})):
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, format=fmt, **save)
        images.append(buf.getvalue())
    texts = [b"good movie", "caf\u00e9 \u202e bad".encode(), b"bad " * 50]
    return [bytes([selector]) + body for body in images + texts for selector in (0, 1, 2, 3, 4)]


# --- the target ---------------------------------------------------------------------------------


class Target:
    """Counts outcomes; raises (a crash) on anything but an item or a typed RequestError."""

    def __init__(self, handler: SecureBaseHandler, ctx: Any, runs: int, seconds: float,
                 report: Callable[[Target], None]) -> None:
        self.handler, self.ctx = handler, ctx
        self.runs, self.seconds, self.report = runs, seconds, report
        self.outcomes: Counter[str] = Counter()
        self.iterations = 0
        self.started = time.perf_counter()

    def __call__(self, data: bytes) -> None:
        request = to_request(data)
        self.ctx.request_processor = [RequestProcessor(request.header_map())]
        try:
            self.handler.decode(self.handler.read_payload(request.row(), 0), 0)
            self.outcomes["ok"] += 1
        except RequestError as err:
            self.outcomes[err.code] += 1
        self.iterations += 1
        if self.iterations >= self.runs or self.elapsed() >= self.seconds:
            self.report(self)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def summary(target: Target, name: str, engine: str) -> dict[str, Any]:
    seconds = target.elapsed()
    return {"target": name, "engine": engine, "iterations": target.iterations,
            "seconds": round(seconds, 2),
            "inputs_per_s": round(target.iterations / seconds, 1) if seconds else None,
            "outcomes": dict(target.outcomes.most_common()), "crashes": 0}


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A small random edit (the fallback engine's stand-in for libFuzzer's mutators)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(out) + 1)
        op = rng.randrange(4)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            del out[pos:]
        elif op == 2:
            out[pos:pos] = rng.randbytes(rng.randint(1, 16))
        else:
            out[pos:pos + 4] = rng.choice([b"\x00\x00\x00\x00", b"\xff\xff\xff\xff",
                                           b"\x7f\xff\xff\xff", b"\x00\x00\xff\xff"])
    return bytes(out)


def run_random(target: Target, corpus: Sequence[bytes], seed: int) -> None:
    rng = random.Random(seed)
    while target.iterations < target.runs and target.elapsed() < target.seconds:
        target(mutate(rng, rng.choice(corpus)))


def _corpus_dir(out: Path) -> Path:
    seeds = out / "seeds"
    seeds.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(seed_corpus()):
        (seeds / f"seed-{i:03d}").write_bytes(data)
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("image", "text"), default="image")
    parser.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    parser.add_argument("--runs", type=int, default=10_000, help="stop after this many inputs")
    parser.add_argument("--seconds", type=float, default=600.0, help="... or after this long")
    parser.add_argument("--out", type=Path, default=None,
                        help="working directory: seeds, corpus, crash-* files (default: temp)")
    parser.add_argument("--warnings", choices=("error", "default"), default="error",
                        help="turn warnings into exceptions (as the test suite does), so a "
                             "decoder warning that escapes the handler is found")
    parser.add_argument("--seed", type=int, default=0, help="random engine seed")
    parser.add_argument("--replay", type=Path, help="run one saved input and show its outcome")
    args = parser.parse_args(argv)

    out = args.out or Path(tempfile.mkdtemp(prefix=f"fuzz-{args.target}-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "model").mkdir(exist_ok=True)
    handler, ctx = build_handler(args.target, out / "model")
    if args.warnings == "error":
        warnings.simplefilter("error")

    def report(target: Target) -> None:
        print(json.dumps(summary(target, args.target, args.engine)), flush=True)
        os._exit(0)  # libFuzzer would otherwise keep going; atexit never runs under it

    target = Target(handler, ctx, args.runs, args.seconds, report)
    if args.replay:
        target.runs = 1
        target(args.replay.read_bytes())
        return 0
    if args.engine == "random":
        run_random(target, seed_corpus(), args.seed)
        report(target)
        return 0
    if atheris is None:
        print("atheris is not installed: pip install atheris (or use --engine random)",
              file=sys.stderr)
        return 2
    corpus = out / "corpus"
    corpus.mkdir(exist_ok=True)
    libfuzzer = [sys.argv[0], str(corpus), str(_corpus_dir(out)), "-rss_limit_mb=4096",
                 f"-artifact_prefix={out}/", "-print_final_stats=1"]
    atheris.Setup(libfuzzer, target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
