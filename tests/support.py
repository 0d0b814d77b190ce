"""Test support: tiny real models, real archives, a real torchserve on loopback.

Everything here uses the real components (torch.jit, torch-model-archiver, torchserve); only
the models are tiny so the suite stays fast on two cores.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

from secure_handler.deploy.launcher import TorchServe, free_port
from secure_handler.deploy.tsconfig import ModelSpec, Ports, hardened_properties, render_properties
from secure_handler.serving.loading import save_torchscript

__all__ = [
    "ServerInfo", "archive_mar", "build_tiny_classifier", "image_bytes", "post",
    "running_server", "write_image_handler",
]


class ChannelMeanClassifier(torch.nn.Module):
    """Class = the dominant colour channel: red → 0, green → 1, blue → 2 (3 never wins)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3))
        other = means.min(dim=1, keepdim=True).values - 1.0
        return torch.cat([means, other], dim=1) * 4.0


def script_and_save(module: torch.nn.Module, path: Path) -> Path:
    save_torchscript(module, path)
    return path


def build_tiny_classifier(out_dir: Path) -> Path:
    """A TorchScript classifier whose right answer tests know (see ChannelMeanClassifier)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return script_and_save(ChannelMeanClassifier().eval(), out_dir / "model.pt")


LABELS = {"0": "red", "1": "green", "2": "blue", "3": "none"}
COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def image_bytes(colour: str = "red", size: tuple[int, int] = (320, 240), fmt: str = "JPEG",
                mode: str = "RGB", **save: Any) -> bytes:
    """A solid image of a known colour, encoded as `fmt`."""
    img = Image.new("RGB", size, COLOURS[colour])
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def write_image_handler(directory: Path, name: str = "handler.py",
                        base: str = "SecureImageClassifier", body: str = "pass") -> Path:
    """A user's one-class handler file, as the README tells users to write it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(
        f"from secure_handler import {base}\n\n\n"
        f"class TestHandler({base}):\n    \"\"\"Test handler.\"\"\"\n\n    {body}\n"
    )
    return path


def archive_mar(store: Path, name: str, serialized: Path, handler: Path,
                extra_files: Sequence[Path] = (), config: Mapping[str, Any] | None = None,
                version: str = "1.0") -> Path:
    """Build `<store>/<name>.mar` with the real torch-model-archiver."""
    store.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("torch-model-archiver")
    cmd = [str(exe), "--model-name", name, "--version", version, "--serialized-file",
           str(serialized), "--handler", str(handler), "--export-path", str(store), "-f"]
    if extra_files:
        cmd += ["--extra-files", ",".join(str(p) for p in extra_files)]
    if config is not None:
        cfg = handler.parent / f"{name}-model-config.yaml"
        cfg.write_text(yaml.safe_dump(dict(config)))
        cmd += ["--config-file", str(cfg)]
    subprocess.run(cmd, check=True, capture_output=True)
    return store / f"{name}.mar"


def classifier_mar(tmp: Path, store: Path, name: str = "tiny",
                   handler_config: Mapping[str, Any] | None = None, **kw: Any) -> Path:
    """The tiny classifier archived with a one-class handler and labels."""
    src = tmp / f"src-{name}"
    model = build_tiny_classifier(src)
    labels = src / "index_to_name.json"
    labels.write_text(json.dumps(LABELS))
    handler = write_image_handler(src)
    config = {"handler": dict(handler_config or {})}
    return archive_mar(store, name, model, handler, [labels], config, **kw)


@dataclass
class ServerInfo:
    inference_url: str
    management_url: str
    metrics_url: str
    tokens: dict[str, str]
    server: TorchServe


@contextmanager
def running_server(workdir: Path, store: Path, models: Sequence[ModelSpec],
                   env: Mapping[str, str] | None = None,
                   overrides: Mapping[str, str] | None = None,
                   wait: bool = True) -> Iterator[ServerInfo]:
    """A real torchserve on free loopback ports; READY before yielding; always stopped."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = Ports(*(free_port() for _ in range(6)))
    props = hardened_properties(store, ports, tuple(models))
    props.update(overrides or {})
    config = workdir / "config.properties"
    config.write_text(render_properties(props))
    server = TorchServe(config, store, workdir, env=dict(env or {}))
    try:
        server.start()
        mgmt = f"http://127.0.0.1:{ports.management}"
        if wait:
            for model in models:
                server.wait_ready(mgmt, model.name)
        yield ServerInfo(f"http://127.0.0.1:{ports.inference}", mgmt,
                         f"http://127.0.0.1:{ports.metrics}", server.keys(), server)
    finally:
        server.stop()


def post(url: str, body: bytes, content_type: str = "application/octet-stream",
         token: str | None = None, headers: Mapping[str, str] | None = None,
         timeout: float = 30.0) -> tuple[int, Any]:
    """POST and return (status, parsed JSON body or raw text)."""
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        with err:  # an HTTPError holds the response's socket until closed
            status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")
