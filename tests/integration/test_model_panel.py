"""No false refusals: a panel of real architectures passes the TorchScript inspection and loads.

Every architecture is written here (no torchvision: it does not import beside this torch) and
exported twice, `torch.jit.script` and `torch.jit.trace`; dynamic quantisation (int8 Linear and
LSTM) is in the panel too, and so are the three examples, built by their own build_model.py as
a user runs it. For each file: the inspection finds nothing, `load_torchscript` (inspection
first, then `torch.jit.load`) loads it, and the loaded model computes what the exported one
does. End to end under a real TorchServe the examples are served by the existing integration
tests (test_image_server.py, test_text_detector_server.py) and examples/demo.py, whose workers
now run the same inspection.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor, nn

from secure_handler.serving.loading import load_torchscript, save_torchscript
from secure_handler.serving.torchscript import inspect_torchscript

pytestmark = [
    pytest.mark.slow,  # 12 exports and 5 example builds, minutes on 2 cores
    # torch 2.13 deprecates quantised tensors; int8 weights are made, traced and loaded here.
    pytest.mark.filterwarnings(
        "ignore:torch.quantize_per_tensor, torch.quantize_per_channel:UserWarning"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.down(x))


class ResNetStyle(nn.Module):
    """Stem, three residual stages, global pooling, dropout, linear head."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.ModuleList([BasicBlock(8, 8, 1), BasicBlock(8, 16, 2),
                                     BasicBlock(16, 32, 2)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


class RecurrentText(nn.Module):
    """Embedding, 2-layer bidirectional LSTM or GRU, masked mean pooling, linear head."""

    def __init__(self, cell: str, vocab: int = 100, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 16, padding_idx=0)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(16, 24, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(48, classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out, _ = self.rnn(self.emb(input_ids))
        mask = attention_mask.unsqueeze(-1).to(out.dtype)
        return self.head((out * mask).sum(1) / mask.sum(1).clamp(min=1.0))


class TransformerText(nn.Module):
    """nn.TransformerEncoder over token and learned position embeddings, [CLS]-style head."""

    def __init__(self, vocab: int = 100, classes: int = 3, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(64, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.scale = math.sqrt(d)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.emb(input_ids) * self.scale + self.pos[: input_ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        return self.head(self.norm(x[:, 0]))


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-6)


def greedy_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Keep the best box, drop those overlapping it, repeat (torchvision.ops.nms semantics)."""
    order = scores.argsort(descending=True)
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool)
    ious = box_iou(boxes, boxes)
    keep: list[int] = []
    for i in range(order.shape[0]):
        idx = int(order[i])
        if bool(suppressed[idx]):
            continue
        keep.append(idx)
        suppressed = suppressed | (ious[idx] > iou_threshold)
    return torch.tensor(keep, dtype=torch.long)


class DetectorHead(nn.Module):
    """Conv backbone, per-anchor class logits and box deltas, anchor decoding, top-k, NMS."""

    def __init__(self, classes: int = 3, topk: int = 10) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.cls = nn.Conv2d(16, 3 * classes, 1)
        self.reg = nn.Conv2d(16, 3 * 4, 1)
        self.classes = classes
        self.topk = topk
        self.register_buffer("sizes", torch.tensor([8.0, 16.0, 32.0]))

    def decode(self, deltas: Tensor, h: int, w: int, stride: int) -> Tensor:
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cx = (xs.reshape(-1, 1).float() + 0.5) * stride
        cy = (ys.reshape(-1, 1).float() + 0.5) * stride
        size = self.sizes.reshape(1, -1)
        pcx = cx + deltas[..., 0] * size
        pcy = cy + deltas[..., 1] * size
        pw = size * torch.exp(deltas[..., 2].clamp(max=4.0))
        ph = size * torch.exp(deltas[..., 3].clamp(max=4.0))
        corners = [pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2]
        return torch.stack(corners, dim=-1).reshape(-1, 4)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = self.backbone(images)
        b, _, h, w = feats.shape
        stride = images.shape[-1] // w
        logits = self.cls(feats).permute(0, 2, 3, 1).reshape(b, h * w * 3, self.classes)
        deltas = self.reg(feats).permute(0, 2, 3, 1).reshape(b, h * w, 3, 4)
        boxes_out: list[Tensor] = []
        scores_out: list[Tensor] = []
        labels_out: list[Tensor] = []
        for i in range(b):
            scores, labels = logits[i].sigmoid().max(dim=1)
            boxes = self.decode(deltas[i], h, w, stride)
            top = scores.topk(min(self.topk * 4, scores.shape[0])).indices
            sel = top[greedy_nms(boxes[top], scores[top], 0.5)[: self.topk]]
            pad = self.topk - sel.shape[0]
            boxes_out.append(nn.functional.pad(boxes[sel], (0, 0, 0, pad)))
            scores_out.append(nn.functional.pad(scores[sel], (0, pad)))
            labels_out.append(nn.functional.pad(labels[sel], (0, pad)))
        return torch.stack(boxes_out), torch.stack(scores_out), torch.stack(labels_out)


def quantised_lstm() -> nn.Module:
    """Dynamic int8 quantisation of the LSTM text model's Linear and LSTM layers."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch 2.13 deprecates torch.ao.quantization; silence exactly that message.
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated",
                                category=DeprecationWarning)
        return quantize_dynamic(RecurrentText("lstm").eval(), {nn.Linear, nn.LSTM},
                                dtype=torch.qint8)


IMAGES = (torch.rand(2, 3, 64, 64),)
TOKENS = (torch.randint(1, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long))
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], tuple[Tensor, ...]]] = {
    "resnet_cnn": (ResNetStyle, IMAGES),
    "lstm_text": (lambda: RecurrentText("lstm"), TOKENS),
    "gru_text": (lambda: RecurrentText("gru"), TOKENS),
    "transformer_encoder": (TransformerText, TOKENS),
    "detector_head_nms": (DetectorHead, IMAGES),
    "dynamic_int8_linear_lstm": (quantised_lstm, TOKENS),
}


def export(model: nn.Module, how: str, inputs: tuple[Tensor, ...], path: Path) -> Any:
    model = model.eval()
    if how == "script":
        return save_torchscript(model, path)
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript; silence exactly that message. Tracing a
        # data-dependent loop (NMS) warns that the trace may not generalise: it is exported
        # for the inspection, which must pass it all the same.
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=r"`torch\.jit\.(trace|trace_method|script)` is deprecated")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, inputs, check_trace=False)  # type: ignore[no-untyped-call]
    traced.save(str(path))
    return traced


def same_outputs(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return bool(torch.allclose(a.float(), b.float(), atol=1e-5))
    return len(a) == len(b) and all(same_outputs(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_passes_inspection_and_loads(tmp_path: Path, arch: str, how: str) -> None:
    make, inputs = ARCHITECTURES[arch]
    torch.manual_seed(0)
    path = tmp_path / f"{arch}.pt"
    exported = export(make(), how, inputs, path)
    assert inspect_torchscript(path) == []
    loaded = load_torchscript(path, torch.device("cpu"))
    with torch.inference_mode():
        assert same_outputs(loaded(*inputs), exported(*inputs))


class Scored(NamedTuple):
    logits: Tensor
    label: int


class Counter:
    """A TorchScript class (not a module), built inside forward: compiled along with it."""

    def __init__(self, start: int) -> None:
        self.n = start

    def bump(self) -> int:
        self.n += 1
        return self.n


class LinearScorer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def double(x: Tensor) -> Tensor:
    return x * 2


class LanguageFeatures(nn.Module):
    """What scripted models use besides layers: a TorchScript class, a NamedTuple result, ModuleDict/ModuleList loops, a comprehension, Optional, an f-string,
    an `inf` default, an assert, and `torch.jit.fork`/`wait` (printed as a
    closure)."""

    def __init__(self) -> None:
        super().__init__()
        self.scorer = LinearScorer()
        self.table = {"offset": 1}
        self.acts = nn.ModuleDict({"relu": nn.ReLU(), "tanh": nn.Tanh()})
        self.more = nn.ModuleList([nn.Identity(), nn.ReLU()])

    def forward(self, x: Tensor, scale: float = float("inf")) -> Scored:
        counter = Counter(0)
        counter.bump()
        future = torch.jit.fork(double, x)
        y = self.scorer.forward(torch.jit.wait(future))
        for _, act in self.acts.items():
            y = act(y)
        for layer in self.more:
            y = layer(y)
        rows = [y[i] for i in range(y.shape[0])]
        z: Tensor | None = torch.stack(rows) if len(rows) > 0 else None
        if z is None:
            z = y
        label = int(torch.argmax(z[0]).item())
        assert label >= 0, f"v{counter.n}"
        return Scored(z * min(scale, 1.0), label + self.table["offset"])


def test_language_features_pass_inspection_and_load(tmp_path: Path) -> None:
    path = tmp_path / "features.pt"
    torch.manual_seed(0)
    exported = save_torchscript(LanguageFeatures(), path)
    with zipfile.ZipFile(path) as zf:
        code = b"".join(zf.read(n) for n in zf.namelist() if n.endswith(".py"))
    assert b"def __forked_function():" in code  # the closure form is what is inspected
    assert inspect_torchscript(path) == []
    loaded = load_torchscript(path, torch.device("cpu"))
    x = torch.randn(3, 4)
    with torch.inference_mode():
        got, want = loaded(x), exported(x)
    assert torch.equal(got[0], want[0])
    assert got[1] == want[1]


EXAMPLE_BUILDS = [
    ("image_classifier", ()),
    ("text_classifier", ("--contract", "ids_mask")),
    ("text_classifier", ("--contract", "bag")),
    ("object_detector", ("--contract", "tensor")),
    ("object_detector", ("--contract", "list")),
]


@pytest.mark.parametrize(("folder", "flags"), EXAMPLE_BUILDS,
                         ids=["-".join((f, *fl[1:])) for f, fl in EXAMPLE_BUILDS])
def test_example_passes_inspection_and_loads(tmp_path: Path, folder: str,
                                             flags: tuple[str, ...]) -> None:
    script = EXAMPLES / folder / "build_model.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--quick", *flags],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = tmp_path / "model.pt"
    assert inspect_torchscript(path) == []
    loaded = load_torchscript(path, torch.device("cpu"))
    assert not loaded.training
