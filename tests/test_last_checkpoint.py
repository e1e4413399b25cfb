"""LastCheckpoint: last.ckpt is the state the run ended with, whatever the monitored metric did."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from nm_lightning import SRSTECallback
from nm_lightning.callbacks.last_checkpoint import LastCheckpoint


class WorseningNet(TinyNet):
    """Logs ``score`` = -epoch: the best epoch is the first, every later one is worse."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("score", -float(self.current_epoch))


def _fit(tmp_path, callbacks, **over):
    pl.seed_everything(0)
    model = WorseningNet()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, enable_checkpointing=True, callbacks=callbacks, **over))
    trainer.fit(model)
    return trainer


def test_last_is_the_final_epoch_when_the_metric_got_worse(tmp_path):
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="best", monitor="score", mode="max", save_top_k=1)
    last = LastCheckpoint(dirpath=str(tmp_path / "ckpt"))
    trainer = _fit(tmp_path, [best, last, SRSTECallback(2, 4, verbose=False)], max_epochs=3)
    assert last.path == str(tmp_path / "ckpt" / "last.ckpt") == last.last_model_path
    ckpt = torch.load(last.path, weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (2, trainer.global_step) == (2, 12)
    assert "nm_lightning" in ckpt  # the N:M state travels with it
    assert torch.load(best.best_model_path, weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.ckpt", "last.ckpt"]
    # Lightning's own save_last with the same monitor stays at the best epoch (why LastCheckpoint exists)
    theirs = ModelCheckpoint(dirpath=tmp_path / "theirs", monitor="score", mode="max", save_top_k=1, save_last=True)
    _fit(tmp_path, [theirs], max_epochs=3)
    assert torch.load(tmp_path / "theirs" / "last.ckpt", weights_only=True)["epoch"] == 0


def test_written_at_fit_end_when_stopped_mid_epoch(tmp_path):
    last = LastCheckpoint(dirpath=str(tmp_path / "ckpt"))
    trainer = _fit(tmp_path, [last], max_epochs=3, max_steps=6)  # 4 batches per epoch: stops in epoch 1
    assert trainer.global_step == 6
    assert torch.load(last.path, weights_only=True)["global_step"] == 6


def test_nothing_under_fast_dev_run(tmp_path):
    last = LastCheckpoint(dirpath=str(tmp_path / "ckpt"))
    _fit(tmp_path, [last], fast_dev_run=True)
    assert last.path == "" and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"filename": "last.ckpt"}, "filename"), ({"filename": "a/b"}, "filename"), ({"filename": ""}, "filename"),
     ({"every_n_epochs": 0}, "every_n_epochs"), ({"every_n_epochs": True}, "every_n_epochs")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"LastCheckpoint {match}"):
        LastCheckpoint(**kwargs)
