"""Speed of ``nm_mask`` on a 4096x4096 weight, relative to a memory copy of the same tensor.

For 2:4, 4:8, 2:16 and 4:16 (layout ``"input_channel"``: for a 2-D weight the groups are ``m`` consecutive
entries of a row, the same grouping as the reference's flat reshape) it times:

* ``nm_mask`` (the public function: argument checks, the native CPU kernel when built, the NaN/Inf check),
* ``_mask_generic`` (the sort-free PyTorch path: the fallback without a C compiler or with
  ``NM_LIGHTNING_NATIVE=0``, and the path on every non-CPU device),
* ``stable sort`` (the previous PyTorch path: a stable descending sort, kept for comparison),
* the reference approach (``argsort`` of ``|w|.reshape(-1, M)``, then ``ones(...).scatter_(..., 0)``: a
  float32 mask, as in the reference ``Sparse.forward``), fp32 only,
* ``nm_mask`` on bfloat16 and float16 weights,

and two baselines per dtype: ``w.clone()`` (a fresh copy, allocation included: like ``nm_mask`` it must
produce a new tensor) and ``dst.copy_(w)`` into a preallocated buffer (pure bandwidth), plus, for
information, ``w > 0``: one elementwise pass that reads ``w`` and allocates a new bool tensor, i.e. exactly
the memory traffic of a mask (the floor for any mask kernel). Calls are
interleaved round by round and medians reported (shared, noisy machine). Targets (issue 18): native
``nm_mask`` fp32 2:4 <= 2x ``copy_``; ``_mask_generic`` fp32 2:4 <= 4x ``clone``.

Run: ``python benchmarks/mask_speed.py [--quick] [--size 4096]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, median, now, print_table  # noqa: E402

from nm_lightning import _native  # noqa: E402
from nm_lightning.masks import _mask_generic, group_view, nm_mask  # noqa: E402

PATTERNS = ((2, 4), (4, 8), (2, 16), (4, 16))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The mask computation of the reference ``Sparse.forward`` (written out, without the autograd wrapper)."""
    w = weight.detach().abs().reshape(-1, m)
    index = torch.argsort(w, dim=1)[:, : m - n]
    return torch.ones(w.shape, device=w.device).scatter_(1, index, 0).reshape(weight.shape)


def sort_mask(weight: torch.Tensor, n: int, m: int, gv) -> torch.Tensor:
    """The previous PyTorch path: a stable descending sort (ties to the lower index), then a scatter."""
    w = weight.detach().reshape(gv.outer, gv.length // m, m, gv.inner).abs()
    keep_idx = torch.sort(w, dim=2, descending=True, stable=True).indices.narrow(2, 0, n)
    return torch.zeros(w.shape, dtype=torch.bool).scatter_(2, keep_idx, True).reshape(weight.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="rounds for fast variants (default 21, quick 5)")
    parser.add_argument("--slow-rounds", type=int, default=None,
                        help="rounds for the sort-based variants (default 5, quick 2)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 21)
    slow_rounds = args.slow_rounds or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = torch.randn(args.size, args.size)
    weights = {k: base.to(dt) for k, dt in DTYPES.items()}
    dsts = {k: torch.empty_like(w) for k, w in weights.items()}
    gv = group_view(base.shape, "input_channel")

    fast: dict[str, Callable[[], object]] = {}
    slow: dict[str, Callable[[], object]] = {}
    for k, w in weights.items():
        fast[f"clone {k}"] = w.clone
        fast[f"copy_ {k}"] = lambda w=w, d=dsts[k]: d.copy_(w)
        fast[f"gt0 {k}"] = lambda w=w: torch.gt(w, 0)
    for n, m in PATTERNS:
        for k, w in weights.items():
            fast[f"nm_mask {n}:{m} {k}"] = lambda w=w, n=n, m=m: nm_mask(w, n, m)
        fast[f"_mask_generic {n}:{m} fp32"] = lambda n=n, m=m: _mask_generic(weights["fp32"], n, m, gv)
        slow[f"stable sort {n}:{m} fp32"] = lambda n=n, m=m: sort_mask(weights["fp32"], n, m, gv)
        slow[f"reference argsort {n}:{m} fp32"] = lambda n=n, m=m: reference_mask(weights["fp32"], n, m)

    # correctness guard: the three fp32 implementations keep the same count per group
    for n, m in PATTERNS:
        a = nm_mask(weights["fp32"], n, m)
        b = _mask_generic(weights["fp32"], n, m, gv)
        assert torch.equal(a, b), f"native and torch masks differ for {n}:{m}"
        assert torch.equal(a, sort_mask(weights["fp32"], n, m, gv)), f"sort and native masks differ for {n}:{m}"
        assert int(a.sum()) == base.numel() // m * n

    for fn in (*fast.values(), *slow.values()):  # warm-up (also builds/loads the native kernel)
        fn()
    times: dict[str, list[float]] = {k: [] for k in (*fast, *slow)}
    for r in range(rounds):
        items = list(fast.items())
        if r < slow_rounds:
            items += list(slow.items())
        shift = r % len(items)
        for name, fn in items[shift:] + items[:shift]:
            t0 = now()
            out = fn()
            times[name].append(now() - t0)
            del out

    med = {k: median(v) for k, v in times.items()}
    print(f"# nm_mask on a {args.size}x{args.size} tensor; {machine_line()}")
    print(f"native kernel available: {_native.available()}; rounds: {rounds} (sort-based: {slow_rounds})")
    print("\n## baselines (median ms)")
    print_table(
        ["dtype", "bytes", "clone ms", "copy_ ms", "w > 0 ms"],
        [[k, f"{weights[k].numel() * weights[k].element_size() / 2**20:.0f} MiB",
          f"{med[f'clone {k}'] * 1e3:.2f}", f"{med[f'copy_ {k}'] * 1e3:.2f}",
          f"{med[f'gt0 {k}'] * 1e3:.2f}"] for k in DTYPES],
    )
    print("\n## masks: median ms and ratio to the same dtype's copy")
    print("targets: nm_mask (native) fp32 2:4 <= 2x copy_; _mask_generic fp32 2:4 <= 4x clone")
    rows = []
    for n, m in PATTERNS:
        for impl, k in [("nm_mask", "fp32"), ("nm_mask", "bf16"), ("nm_mask", "fp16"),
                        ("_mask_generic", "fp32"), ("stable sort", "fp32"), ("reference argsort", "fp32")]:
            key = f"{impl} {n}:{m} {k}"
            t = med[key]
            ratio = t / med[f"clone {k}"]
            target = ""
            if (n, m) == (2, 4) and k == "fp32" and impl == "nm_mask":
                target = "yes" if t / med[f"copy_ {k}"] <= 2 else "NO"
            elif (n, m) == (2, 4) and impl == "_mask_generic":
                target = "yes" if ratio <= 4 else "NO"
            rows.append([f"{n}:{m}", impl, k, f"{t * 1e3:.2f}", f"{ratio:.2f}", f"{t / med[f'copy_ {k}']:.2f}",
                         f"{t / med[f'gt0 {k}']:.2f}", target])
    print_table(["N:M", "implementation", "dtype", "median ms", "/clone", "/copy_", "/(w > 0)", "target met?"], rows)


if __name__ == "__main__":
    main()
