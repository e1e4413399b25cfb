"""CPU inference speed of N:M sparse models: dense vs torch CSR vs nm_lightning's per-layer choice.

Usage: python benchmarks/cpu_inference.py [--threads T] [--repeats R] [--batch B] [--hidden H]

1. MLP (hidden 4096, four hidden Linear layers at 2:16 / 1:16 alternately, dense 10-way head), batch 32:
   per-layer table from ``to_cpu_sparse`` (with its own end-to-end check, which reverts layers until the
   whole model is not slower) and end-to-end medians of the dense model (masked weights), a CSR-only
   conversion, and ``to_cpu_sparse``'s choice, measured side by side (interleaved repetitions).
2. A small CNN (four 3x3 convs at 2:8, 1x1 conv, Linear) to show the fallback: never slower than dense.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from torch import nn

from nm_lightning import attach, plan_layers
from nm_lightning.export import dense_state_dict, to_cpu_sparse
from nm_lightning.export.cpu import time_interleaved


def mlp(hidden: int, layers: int = 4) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(hidden, 10))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(16, 64, 3, padding=1)
        self.c2 = nn.Conv2d(64, 128, 3, padding=1, stride=2)
        self.c3 = nn.Conv2d(128, 128, 3, padding=1)
        self.c4 = nn.Conv2d(128, 256, 3, padding=1, stride=2)
        self.pw = nn.Conv2d(256, 256, 1)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.c1, self.c2, self.c3, self.c4, self.pw):
            x = F.relu(conv(x))
        return self.fc(x.mean((2, 3)))


def plain_copy(factory, sparse_model: nn.Module) -> nn.Module:
    plain = factory()
    plain.load_state_dict(dense_state_dict(sparse_model), strict=True)
    return plain.eval()


def end_to_end(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    return time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats=repeats, warmup=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")

    # ------------------------------------------------------------------ MLP
    h = args.hidden
    scheme = {str(2 * i): ((2, 16) if i % 2 == 0 else (1, 16)) for i in range(4)}
    sparse = mlp(h)
    attach(sparse, plan_layers(sparse, scheme=scheme))
    x = torch.randn(args.batch, h)
    dense = plain_copy(lambda: mlp(h), sparse)
    csr = plain_copy(lambda: mlp(h), sparse)
    to_cpu_sparse(
        csr, x, kernels=("csr",), min_speedup=0.0, end_to_end_min_speedup=0.0, max_density=0.2, repeats=3, verbose=False
    )
    report = to_cpu_sparse(sparse, x, repeats=args.repeats)
    with torch.inference_mode():
        ref = dense(x)
        for name, m in (("csr", csr), ("ours", sparse)):
            diff = float((m(x) - ref).abs().max())
            print(f"MLP {name}: max |out - dense| = {diff:.3g} (max |dense| {float(ref.abs().max()):.3g})")
    print(f"to_cpu_sparse's own check: {report.end_to_end.summary() if report.end_to_end else 'nothing converted'}")
    t = end_to_end({"dense": dense, "csr": csr, "ours": sparse}, x, args.repeats)
    print(f"\nMLP hidden {h}, batch {args.batch}, layers {', '.join(f'{n}:{m}' for n, m in scheme.values())}")
    print("| model | median ms | speedup vs dense |\n|---|---|---|")
    for k, v in t.items():
        print(f"| {k} | {v:.2f} | {t['dense'] / v:.2f}x |")

    # ------------------------------------------------------------------ CNN
    cnn = SmallCNN()
    attach(cnn, plan_layers(cnn, 2, 8, exclude=["fc"]))
    xc = torch.randn(16, 16, 32, 32)
    dense_cnn = plain_copy(SmallCNN, cnn)
    rep_cnn = to_cpu_sparse(cnn, xc, repeats=max(5, args.repeats // 3))
    tc = end_to_end({"dense": dense_cnn, "ours": cnn}, xc, max(5, args.repeats // 2))
    print(f"\nSmall CNN 2:8 (batch 16, 16x32x32): choices {rep_cnn.choices}; output OK: {rep_cnn.ok}")
    print(f"to_cpu_sparse's own check: {rep_cnn.end_to_end.summary() if rep_cnn.end_to_end else 'nothing converted'}")
    print("| model | median ms | speedup vs dense |\n|---|---|---|")
    for k, v in tc.items():
        print(f"| {k} | {v:.2f} | {tc['dense'] / v:.2f}x |")
    if not report.ok or not rep_cnn.ok:
        raise SystemExit("output check FAILED")


if __name__ == "__main__":
    main()
