"""Reliability: torch.compile with each callback, the sharded-strategy guard."""

from __future__ import annotations

import types

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, trainer_kwargs
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch._dynamo.testing import CompileCounter

from nm_lightning import DominoSearchCallback, SparsityScheduler, SRSTECallback, nm_mask, sparse_layers


class QuietNet(TinyNet):
    """``self.log`` inside a compiled ``training_step`` trips dynamo in this Lightning version (also dense)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)


@pytest.mark.parametrize(
    ("make", "max_frames"),
    [
        # train and eval graphs only
        (lambda: [SRSTECallback(2, 4, decay=0.01)], 2),
        # plus one per distinct N the layers walk through (4 -> 2 -> 1 with levels=[2])
        (lambda: [SRSTECallback(1, 4), SparsityScheduler("linear", start=0, end=4, levels=[2])], 4),
        # plus one per intermediate N of the search (4 -> 3 -> 2 ...), until it stops
        (
            lambda: [
                DominoSearchCallback(
                    target_sparsity=0.6, m=4, check_every=2, penalty_every=1, penalty=2.0, plot=False, save_dense=False
                )
            ],
            8,
        ),
    ],
    ids=["srste", "scheduler", "domino"],
)
def test_fit_compiled_model_without_per_step_recompiles(tmp_path, make, max_frames):
    torch._dynamo.reset()
    pl.seed_everything(0)
    model = QuietNet()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=make(), limit_val_batches=0))
    trainer.fit(compiled)
    assert trainer.global_step >= 5
    assert 1 <= counter.frame_count <= max_frames, counter.frame_count
    for layer in sparse_layers(model).values():
        if layer.sparsity.straight_through and not layer.sparsity.frozen:
            eff = layer.module.weight
            assert torch.equal(
                eff != 0, nm_mask(layer.original, layer.sparsity.n, layer.sparsity.m) & (layer.original != 0)
            )


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharded_strategies_are_refused_at_setup(strategy):
    fake = types.SimpleNamespace(strategy=type(strategy, (), {})())
    for cb in (SRSTECallback(), DominoSearchCallback(target_sparsity=0.5, m=4)):
        with pytest.raises(MisconfigurationException, match=rf"does not support {strategy} yet"):
            cb.setup(fake, TinyNet(), "fit")
