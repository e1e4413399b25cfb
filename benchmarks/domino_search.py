"""DominoSearch benchmark: search-step time vs a dense step, and steps to reach a size target on MNIST-1D.

(1) Step time: the same Lightning fit (MNIST-1D 1D CNN, batch 128) with and without ``DominoSearchCallback``,
    interleaved over several rounds; each round times the optimizer steps with a callback and reports the
    median. Target: search step / dense step <= 1.15.
(2) Steps to target: dense pre-training, then the search for ``--target`` (default 0.8) model size at M=16
    with the paper's recipe (SGD, constant lr 0.01, no momentum, no weight decay), for the default
    ``check_every=100`` and a faster ``check_every=10``; prints the optimizer steps until the callback stopped
    fit and the scheme it found.

    python benchmarks/domino_search.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from nm_lightning import DominoSearchCallback
from nm_lightning.data import MNIST1DDataModule
from nm_lightning.models import Classifier, cnn1d


class StepTimer(pl.Callback):
    """Wall time of every training batch (forward, backward, hooks, optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.perf_counter() - self._t)


def _trainer(root: Path, callbacks: list[pl.Callback], **kw: object) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks, **kw,
    )  # fmt: skip


def _model(lr: float, momentum: float, weight_decay: float) -> Classifier:
    net = cnn1d(in_channels=1, num_classes=10, length=40, channels=[32, 64, 128], kernel_size=5, hidden=128)
    return Classifier(net=net, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False, min_lr_ratio=1.0)


def step_ratio(dm: MNIST1DDataModule, root: Path, rounds: int, steps: int) -> None:
    dense_t, search_t = [], []
    for r in range(rounds):
        for variant in ("dense", "search") if r % 2 == 0 else ("search", "dense"):
            pl.seed_everything(r)
            timer = StepTimer()
            cbs: list[pl.Callback] = [timer]
            if variant == "search":  # a target it cannot reach in `steps`: every step is a search step
                cbs.append(DominoSearchCallback(target_sparsity=0.9, m=16, verbose=False, plot=False, save_dense=False))
            _trainer(root / variant, cbs, max_steps=steps).fit(_model(0.01, 0.0, 0.0), datamodule=dm)
            times = timer.times[3:]  # skip warm-up (and the MACs measurement on the first batch)
            (search_t if variant == "search" else dense_t).append(statistics.median(times))
    d, s = statistics.median(dense_t), statistics.median(search_t)
    print("\n(1) step time, MNIST-1D CNN, batch 128 (median of per-round medians)")
    print(f"    dense {d * 1e3:.2f} ms | search {s * 1e3:.2f} ms | search/dense = {s / d:.3f} (target <= 1.15)")


def steps_to_target(dm: MNIST1DDataModule, root: Path, target: float, pretrain_epochs: int, max_epochs: int) -> None:
    pl.seed_everything(0)
    dense = _model(0.1, 0.9, 5e-4)
    _trainer(root / "pre", [], max_epochs=pretrain_epochs).fit(dense, datamodule=dm)
    print(f"\n(2) steps to reach size {target} (M=16), after {pretrain_epochs} dense epochs")
    # the reference defaults (K_c=100, k_p=5, λ=0.1 doubling from 30k steps) were set for ~30k ImageNet steps;
    # on a small data set the checks and the penalty must come more often to finish in a few thousand steps
    for check_every, penalty_every, penalty in ((100, 5, 0.1), (10, 5, 0.1), (10, 5, 1.0), (10, 1, 1.0)):
        model = _model(0.01, 0.0, 0.0)
        model.load_state_dict(dense.state_dict())
        cb = DominoSearchCallback(
            target_sparsity=target, m=16, check_every=check_every, penalty_every=penalty_every, penalty=penalty,
            verbose=False, plot=False, output=str(root / f"scheme_k{check_every}.json"),
        )  # fmt: skip
        trainer = _trainer(root / f"k{check_every}_{penalty}", [cb], max_epochs=max_epochs)
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        assert cb.search is not None
        scheme = ", ".join(f"{k.removeprefix('net.')}={n}:{m}" for k, (n, m) in cb.search.scheme().items())
        state = "reached" if cb.search.done else "NOT reached"
        print(
            f"    check_every={check_every:>3}, penalty_every={penalty_every}, penalty={penalty:g}: {state} after "
            f"{trainer.global_step} steps "
            f"({trainer.global_step / trainer.num_training_batches:.1f} epochs, {time.perf_counter() - t0:.0f} s); "
            f"sparsity {cb.search.sparsity():.4f}, FLOPs reduction {cb.search.flops_reduction():.4f}\n"
            f"      scheme: {scheme}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--target", type=float, default=0.8)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dm = MNIST1DDataModule(data_dir=str(root / "data"), batch_size=128)
        step_ratio(dm, root, rounds=2 if args.quick else 6, steps=30 if args.quick else 80)
        steps_to_target(dm, root, args.target, pretrain_epochs=3 if args.quick else 10,
                        max_epochs=30 if args.quick else 120)  # fmt: skip


if __name__ == "__main__":
    main()
