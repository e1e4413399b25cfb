"""The Python sections of ``benchmarks/gpu_check.sh``: what a GPU must confirm, with ratios measured in one run.

Usage: python benchmarks/gpu_check.py SECTION [SECTION ...] [--dry-run]

Sections:
  gpu    the device: name, compute capability, torch and cuSPARSELt versions
  amp    ``16-mixed`` training with a real ``torch.amp.GradScaler`` and SR-STE 2:4 (Lightning Trainer on one GPU):
         the scaler is live, every step finite, the masks stay 2:4
  mask   mask speed on the GPU: ``nm_mask`` (the device-generic path) vs ``torch._sparse_semi_structured_tile``
         (torch's 2:4 tile pruner, a reference) vs ``clone``, CUDA events, interleaved, medians
  mlp    ``to_semi_structured`` of a transformer MLP block (d -> 4d -> d, GELU) at a prefill-sized and a
         decode-sized batch: per-layer table, end-to-end ratio, output check

``--dry-run`` runs every requested section on the CPU at toy sizes (stand-in kernels and the CPU timer where
CUDA is needed), to check the script without a GPU. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nm_lightning import SRSTECallback, attach, nm_mask, plan_layers
from nm_lightning.export import to_semi_structured
from nm_lightning.export._convert import cpu_timer, cuda_timer

SECTIONS = ("gpu", "amp", "mask", "mlp")


def _timer(dry: bool) -> Callable[..., dict[str, float]]:
    return cpu_timer if dry else cuda_timer


def section_gpu(dry: bool) -> bool:
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    if dry:
        print("dry run: no GPU queried")
        return True
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return False
    major, minor = torch.cuda.get_device_capability()
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {torch.cuda.get_device_name()} (sm{major}{minor}, {props.total_memory / 2**30:.0f} GiB)")
    has_lt = torch.backends.cusparselt.is_available()
    print(f"cuSPARSELt: {torch.backends.cusparselt.version() if has_lt else 'not available'}")
    return True


def section_amp(dry: bool) -> bool:
    """A few hundred steps of SR-STE 2:4 under 16-mixed with a real GradScaler."""
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision
    from torch.utils.data import DataLoader, TensorDataset

    from nm_lightning.sparsify import sparse_layers

    device = "cpu" if dry else "cuda"

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

        def training_step(self, batch, _):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss {loss}")
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(4096, 256), torch.randint(0, 10, (4096,)))
    steps = 4 if dry else 300
    scaler = torch.amp.GradScaler(device, init_scale=2.0**16)
    model = Net()
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        plugins=[MixedPrecision("16-mixed", device, scaler=scaler)],
        max_steps=steps,
        callbacks=[SRSTECallback(2, 4, decay=2e-4, verbose=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=64, shuffle=True))
    ok = trainer.global_step == steps and scaler.get_scale() > 0 and scaler.is_enabled()
    for name, layer in sparse_layers(model).items():
        w = layer.module.weight.detach()
        nm = bool(torch.equal(w != 0, nm_mask(layer.original.detach(), 2, 4) & (w != 0)))
        finite = bool(torch.isfinite(layer.original).all())
        ok &= nm and finite
        print(f"  {name}: 2:4 held {nm}, finite {finite}")
    print(f"16-mixed on {device}: {trainer.global_step} steps, final loss scale {scaler.get_scale():.0f} -> "
          f"{'OK' if ok else 'FAILED'}")  # fmt: skip
    return bool(ok)


def section_mask(dry: bool) -> bool:
    """nm_mask on the device vs torch's 2:4 tile pruner vs clone, one interleaved run per shape and dtype."""
    device = "cpu" if dry else "cuda"
    shapes = [(256, 256)] if dry else [(4096, 4096), (8192, 8192), (16384, 4096)]
    timer = _timer(dry)
    ok = True
    print("| shape | dtype | clone ms | nm_mask 2:4 ms | x clone | torch tile ms | nm_mask / tile | nm_mask 2:16 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            w = torch.randn(shape, device=device, dtype=dtype)
            fns: dict[str, Callable[[], object]] = {
                "clone": lambda w=w: w.clone(),
                "nm_mask": lambda w=w: nm_mask(w, 2, 4),
                "nm_mask_16": lambda w=w: nm_mask(w, 2, 16),
            }
            if not dry and dtype != torch.float32:
                fns["tile"] = lambda w=w: torch._sparse_semi_structured_tile(w)
            t = timer(fns, repeats=10 if dry else 30, warmup=2 if dry else 5, context=None)
            mask = nm_mask(w, 2, 4)
            ok &= bool((mask.reshape(shape[0], -1, 4).sum(-1) == 2).all())
            tile = f"{t['tile']:.3f} | {t['nm_mask'] / t['tile']:.2f}" if "tile" in t else "- | -"
            print(
                f"| {shape[0]}x{shape[1]} | {str(dtype)[6:]} | {t['clone']:.3f} | {t['nm_mask']:.3f} | "
                f"{t['nm_mask'] / t['clone']:.1f} | {tile} | {t['nm_mask_16']:.3f} |"
            )
    return ok


class MLPBlock(nn.Module):
    """A transformer MLP block: LayerNorm, d -> 4d, GELU, 4d -> d, residual."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


def section_mlp(dry: bool) -> bool:
    d = 128 if dry else 4096
    ok = True
    for batch, seq in ((2, 16), (1, 1)) if dry else ((8, 512), (16, 1)):
        torch.manual_seed(0)
        block = MLPBlock(d)
        attach(block, plan_layers(block, 2, 4))
        x = torch.randn(batch, seq, d)
        kwargs: dict = {"repeats": 5, "warmup": 1} if dry else {"repeats": 30, "warmup": 10}
        if dry:  # stand-in kernels on the CPU: the dense weight itself
            kwargs["kernels"] = {"cusparselt": lambda w: w.clone(), "cutlass": lambda w: w.clone()}
        print(f"\nMLP block d={d}, tokens {batch}x{seq}, fp16:")
        report = to_semi_structured(block, x, dtype=torch.float16, **kwargs)
        ok &= bool(report.ok) if report.ok is not None else bool(report.reason)
        e2e = report.end_to_end
        summary = e2e.summary() if e2e else (report.reason or "no layer converted: the block stays dense")
        print(f"converted {report.converted or 'nothing'}; {summary}")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="+", choices=SECTIONS)
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (no GPU needed)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device (use --dry-run to check the script on a CPU)")
        return 1
    results = {}
    for name in args.sections:
        print(f"\n--- {name}{' (dry run)' if args.dry_run else ''}")
        results[name] = globals()[f"section_{name}"](args.dry_run)
    print("\n" + ", ".join(f"{k}: {'OK' if v else 'FAILED'}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
