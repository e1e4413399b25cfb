"""Shared pieces of the benchmark scripts: a CIFAR ResNet-18, the reference loader and timing helpers.

Not part of the package; the scripts import it as a sibling module (``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import autograd, nn

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_README = REPO_ROOT.parent / "shared" / "seeds" / "000_1242d90759803034.txt"

ConvFactory = Callable[..., nn.Module]


# ---------------------------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, conv: ConvFactory, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            down = conv(cin, cout, 1, stride=stride, padding=0, bias=False)
            self.shortcut = nn.Sequential(down, nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem (64 ch, no maxpool), BasicBlocks [2, 2, 2, 2], avg pool, fc."""

    def __init__(self, conv: ConvFactory = nn.Conv2d, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = conv(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(conv, cin, cout, stride), BasicBlock(conv, cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# ---------------------------------------------------------------------------------------------- reference
def load_reference(readme: str | Path) -> dict:
    """Exec the ```python blocks of the reference README; return the namespace (``Sparse``, ``SparseConv``)."""
    text = Path(readme).read_text(encoding="utf-8")
    blocks = re.findall(r"```python\s*\n(.*?)```", text, flags=re.S)
    if not blocks:
        raise SystemExit(f"no ```python code blocks found in {readme}")
    namespace: dict = {"torch": torch, "nn": nn, "F": F, "autograd": autograd, "__name__": "nm_reference"}
    for block in blocks:
        exec(compile(block, f"{readme}:python-block", "exec"), namespace)  # noqa: S102 - the point of the script
    missing = [k for k in ("Sparse", "SparseConv") if k not in namespace]
    if missing:
        raise SystemExit(f"the reference README did not define {missing}")
    return namespace


def reference_conv_factory(namespace: dict, n: int = 2, m: int = 4) -> ConvFactory:
    sparse_conv = namespace["SparseConv"]

    def make(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, bias: bool = True) -> nn.Module:
        return sparse_conv(cin, cout, k, stride=stride, padding=padding, bias=bias, N=n, M=m)

    return make


# ---------------------------------------------------------------------------------------------- timing
def now() -> float:
    return time.perf_counter()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine_line() -> str:
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"python {platform.python_version()}, {platform.processor() or platform.machine()}"
    )


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
