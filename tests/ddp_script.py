"""Run by ``tests/test_distributed.py`` as a script: Lightning's ``ddp`` strategy relaunches this file once per
extra rank (its subprocess launcher), which cannot happen inside pytest itself.

    python tests/ddp_script.py OUT_DIR {srste,configure_model,domino} DEVICES BATCH_SIZE

Every rank writes ``OUT_DIR/rank{r}.pt`` with its final weights and masks; callbacks write their files (export,
scheme) under ``OUT_DIR/run``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import OrderedNet, RankCheck  # noqa: E402

from nm_lightning import DominoSearchCallback, SparsityScheduler, SRSTECallback, sparse_layers  # noqa: E402


class LateNet(OrderedNet):
    """The layers are built in ``configure_model``: N:M is attached after DDP wrapped the module."""

    def __init__(self, batch_size: int) -> None:
        super().__init__(batch_size=batch_size)
        self.built = False
        for name in ("conv1", "conv2", "fc1", "fc2"):
            delattr(self, name)

    def configure_model(self) -> None:
        if not self.built:
            self.built = True
            torch.manual_seed(1)
            donor = OrderedNet()
            self.conv1, self.conv2, self.fc1, self.fc2 = donor.conv1, donor.conv2, donor.fc1, donor.fc2


def main(out: Path, mode: str, devices: int, batch_size: int) -> None:
    pl.seed_everything(0, workers=True)
    if mode in ("srste", "configure_model"):
        callbacks = [
            SRSTECallback(1, 4, decay=0.05, export_dir="export", export_formats=["dense", "packed"], verbose=False),
            SparsityScheduler(start=0, end=6, schedule="linear", decay_schedule="linear", plot=False),
        ]
        model = (OrderedNet if mode == "srste" else LateNet)(batch_size=batch_size)
        epochs = 3
    else:
        callbacks = [
            DominoSearchCallback(
                target_sparsity=0.6, m=4, check_every=2, penalty_every=1, penalty=2.0, output="found.json",
                plot=False, verbose=False,
            )
        ]  # fmt: skip
        model = OrderedNet(lr=0.01, momentum=0.0, batch_size=batch_size)
        epochs = 30
    if devices > 1:
        callbacks.append(RankCheck())
    trainer = pl.Trainer(
        default_root_dir=out / "run", accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_epochs=epochs, callbacks=callbacks, logger=CSVLogger(out / "run", name="logs"), log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(model)
    layers = sparse_layers(model)
    # reading the parametrized weight recomputes the mask from the final weights (the buffer holds the mask of
    # the last forward, taken before the last optimizer step)
    effective = {k: getattr(v.module, v.param_name).detach().clone() for k, v in layers.items()}
    state = {
        "step": trainer.global_step,
        "weights": {k: v.original.detach().clone() for k, v in layers.items()},
        "effective": effective,
        "masks": {k: v.sparsity.mask.clone() for k, v in layers.items()},
        "nm": {k: (v.sparsity.n, v.sparsity.m) for k, v in layers.items()},
    }
    torch.save(state, out / f"rank{trainer.global_rank}_of_{devices}.pt")
    if torch.distributed.is_initialized():
        # leave together: a rank exiting while the other still holds the gloo group can abort at interpreter exit
        trainer.strategy.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
