"""Packed N:M file size relative to the dense-with-zeros file, on one large Linear.

Usage: python benchmarks/export_sizes.py [--features 4096]
Ratios are file bytes (torch.save zip of the Linear's weight + bias) packed / dense, for both index codings,
and for a weight pruned with ``w.mul_(mask)`` (-0.0 in pruned positions, as ASP and torch.ao leave it): the
packed size must not depend on the sign of pruned zeros.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from nm_lightning import nm_mask
from nm_lightning.export import load_packed, save_dense, save_packed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--features", type=int, default=4096)
    args = ap.parse_args()
    f = args.features
    print(f"Linear {f}x{f} (+ bias), torch {torch.__version__}")
    print(
        "| N:M | dtype | dense MB | packed MB (bits) | ratio (bits) | ratio (combinatorial) | "
        "ratio (mul_ mask, -0.0) | save s | load s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for n, m in [(2, 4), (4, 8), (2, 16), (1, 16)]:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                torch.manual_seed(0)
                lin = nn.Linear(f, f).to(dtype)
                with torch.no_grad():
                    lin.weight.copy_(torch.where(nm_mask(lin.weight, n, m), lin.weight, 0))
                dense = save_dense(lin, d / "dense.pt").stat().st_size
                sizes = {}
                for coding in ("bits", "combinatorial"):
                    t0 = time.perf_counter()
                    path = save_packed(lin, d / f"{coding}.pt", scheme={"weight": (n, m)}, coding=coding)
                    t_save = time.perf_counter() - t0
                    sizes[coding] = path.stat().st_size
                neg = nn.Linear(f, f).to(dtype)
                with torch.no_grad():
                    neg.weight.copy_(torch.randn(f, f).to(dtype))
                    neg.weight.mul_(nm_mask(neg.weight, n, m))  # pruned entries: -0.0 where negative
                signed = save_packed(neg, d / "neg.pt", scheme={"weight": (n, m)}).stat().st_size
                t0 = time.perf_counter()
                sd = load_packed(d / "combinatorial.pt")
                t_load = time.perf_counter() - t0
                assert torch.equal(sd["weight"], lin.weight.detach())
                name = str(dtype).removeprefix("torch.")
                bits, comb = sizes["bits"], sizes["combinatorial"]
                print(
                    f"| {n}:{m} | {name} | {dense / 2**20:.1f} | {bits / 2**20:.1f} | {bits / dense:.4f} | "
                    f"{comb / dense:.4f} | {signed / dense:.4f} | {t_save:.2f} | {t_load:.2f} |"
                )


if __name__ == "__main__":
    main()
