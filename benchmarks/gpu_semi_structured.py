"""2:4 semi-structured Linear speed on a CUDA GPU: dense vs cuSPARSELt vs CUTLASS (fp16/bf16).

Usage: python benchmarks/gpu_semi_structured.py [--quick] [--dtypes float16 bfloat16]

Per shape (batch 32..4096, features 1024..16384, square weights): median of CUDA-event-timed
``F.linear`` calls, dense and with ``to_sparse_semi_structured`` weights from each available backend,
interleaved. Then one end-to-end MLP converted with ``nm_lightning.export.to_semi_structured``.
Without CUDA (or on a GPU below sm80) it prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from nm_lightning import attach, nm_mask, plan_layers
from nm_lightning.export.semi_structured import _force_cutlass, cuda_reason, to_semi_structured


def cuda_ms(fn, repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def interleaved(fns: dict, rounds: int = 3) -> dict[str, float]:
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            out[k].append(cuda_ms(f))
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"no CUDA: {cuda_reason('cusparselt')}; nothing to benchmark")
        return 0
    backends = [b for b in ("cusparselt", "cutlass") if cuda_reason(b) is None]
    for b in ("cusparselt", "cutlass"):
        if b not in backends:
            print(f"skipping {b}: {cuda_reason(b)}")
    if not backends:
        return 0
    from torch.sparse import to_sparse_semi_structured

    print(
        f"{torch.cuda.get_device_name()} (sm{''.join(map(str, torch.cuda.get_device_capability()))}), "
        f"torch {torch.__version__}"
    )
    batches = [32, 256, 4096] if args.quick else [32, 128, 512, 1024, 4096]
    features = [1024, 4096, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384]
    cols = " | ".join(f"{b} ms | {b} x" for b in backends)
    print(f"\n| dtype | batch | features | dense ms | {cols} |\n|" + "---|" * (4 + 2 * len(backends)))
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for feat in features:
            w = torch.randn(feat, feat, device="cuda", dtype=dtype)
            w = torch.where(nm_mask(w, 2, 4), w, torch.zeros((), device="cuda", dtype=dtype))
            sparse = {}
            for b in backends:
                with _force_cutlass(b == "cutlass"):
                    sparse[b] = to_sparse_semi_structured(w)
            for batch in batches:
                x = torch.randn(batch, feat, device="cuda", dtype=dtype)
                fns = {"dense": lambda x=x, w=w: F.linear(x, w)}
                fns.update({b: (lambda x=x, s=s: F.linear(x, s)) for b, s in sparse.items()})
                t = interleaved(fns)
                cells = " | ".join(f"{t[b]:.3f} | {t['dense'] / t[b]:.2f}" for b in backends)
                print(f"| {dname} | {batch} | {feat} | {t['dense']:.3f} | {cells} |")
            torch.cuda.empty_cache()

    # end to end: an MLP block stack, 2:4 on the hidden layers
    for b in backends:
        torch.manual_seed(0)

        def make() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(4096, 16384),
                nn.GELU(),
                nn.Linear(16384, 4096),
                nn.GELU(),
                nn.Linear(4096, 16384),
                nn.GELU(),
                nn.Linear(16384, 4096),
            )

        model = make()
        attach(model, plan_layers(model, 2, 4))
        dense = make()
        from nm_lightning.export import dense_state_dict

        dense.load_state_dict(dense_state_dict(model))
        dense = dense.to("cuda", torch.float16).eval()
        x = torch.randn(2048, 4096)
        report = to_semi_structured(model, x, backend=b, dtype=torch.float16)  # converts only what wins
        xh = x.to("cuda", torch.float16)
        with torch.inference_mode():
            t = interleaved({"dense": lambda d=dense, x=xh: d(x), "sparse": lambda m=model, x=xh: m(x)})
        print(
            f"\nend to end MLP 4096-16384 x2, batch 2048, fp16, {b}: dense {t['dense']:.3f} ms, "
            f"2:4 {t['sparse']:.3f} ms, {t['dense'] / t['sparse']:.2f}x; output check ok={report.ok}; "
            f"converted {report.converted}; to_semi_structured's own check: "
            f"{report.end_to_end.summary() if report.end_to_end else 'nothing converted'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
