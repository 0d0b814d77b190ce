"""Models for the benchmarks, built locally (no downloads, no torchvision).

* `TinyModel`: per-channel means as logits. Inference costs next to nothing, so a server
  running it is bound by its handler: the e2e benchmark's "handler-bound" case.
* `resnet18()`: the ResNet-18 architecture (He et al. 2015, torchvision's layout: 11.7 M
  parameters, 1.8 GFLOPs at 224x224) with random weights. Only the shape matters for timing.

`save_scripted(module, path)` writes TorchScript, the only format the secure handler loads.
This file must stay importable from a FILE: `torch.jit.script` reads the model source.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from torch import nn

from secure_handler.serving.loading import save_torchscript

__all__ = [
    "BasicBlock", "ResNet18", "TinyModel", "forward_rate", "load_scripted", "resnet18",
    "save_scripted",
]


class TinyModel(nn.Module):
    """Logits [B, 10] from the per-channel means of [B, 3, H, W] (argmax = dominant colour).

    Ten classes, not three: stock's ImageClassifier always asks `topk(5)`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3))
        return torch.cat([means, means[:, :1].repeat(1, 7) * 0.0 - 10.0], dim=1)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = nn.Sequential()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu(out + self.down(x))
        return result


class ResNet18(nn.Module):
    """Stem, four stages of two BasicBlocks (64, 128, 256, 512), global pool, linear head."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.layers(self.stem(x))
        logits: torch.Tensor = self.fc(torch.flatten(self.pool(features), 1))
        return logits


def resnet18(num_classes: int = 1000, seed: int = 0) -> ResNet18:
    """A ResNet-18 with deterministic random weights, in eval mode."""
    torch.manual_seed(seed)  # benchmark scripts only; the library never touches global RNG
    return ResNet18(num_classes).eval()


def save_scripted(module: nn.Module, path: Path) -> Path:
    """Script and save `module` (TorchScript is the only format the handlers load)."""
    save_torchscript(module, path)
    return path


def load_scripted(path: Path) -> torch.jit.ScriptModule:
    """`torch.jit.load` on a file this script just wrote (trusted; never a user's file)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings("ignore", message=".*TorchScript.*", category=DeprecationWarning)
        loaded: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]
            str(path), map_location="cpu")
    return loaded.eval()


def forward_rate(model: torch.nn.Module, batch: int = 8, side: int = 224, seconds: float = 5.0,
                 channels_last: bool = True) -> float:
    """Images/s of `model` alone on random [batch, 3, side, side] input (median of passes)."""
    x = torch.randn(batch, 3, side, side)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(2):
            model(x)  # warm-up: TorchScript profiling runs, allocator
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 5:
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    times.sort()
    return batch / times[len(times) // 2]


def _main(argv: list[str]) -> int:
    """`python models.py FORWARD_RATE MODEL.pt [BATCH]`: print the best-layout img/s as JSON.

    Lets the e2e benchmark measure a model's forward rate under the STOCK venv's torch too.
    """
    import json
    import sys

    if len(argv) < 3 or argv[1] != "forward-rate":
        print("usage: models.py forward-rate MODEL.pt [BATCH]", file=sys.stderr)
        return 2
    model = load_scripted(Path(argv[2]))
    batch = int(argv[3]) if len(argv) > 3 else 8
    rates = {layout: forward_rate(model, batch, channels_last=layout == "channels_last")
             for layout in ("channels_last", "contiguous")}
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), **rates}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv))
