"""Crash and resume: for every callback, a run that dies mid-epoch and resumes from the last checkpoint with a
fresh model and fresh callbacks ends bit-identical to the run that never stopped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, make_data, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from nm_lightning import DominoSearchCallback, SparsityScheduler, SRSTECallback


class SameBatchNet(TinyNet):
    """Every batch is the same, so the resumed run cannot differ through how the data loop fast-forwards."""

    def train_dataloader(self):
        x, y = make_data(16)[:]
        return DataLoader(TensorDataset(x.repeat(4, 1, 1), y.repeat(4)), batch_size=16)  # 4 steps per epoch


class Crash(pl.Callback):
    """Dies (like a killed job) at the end of optimizer step ``at``, before that step's checkpoint is written."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def _srste() -> list[pl.Callback]:
    return [SRSTECallback(2, 4, decay=0.02, freeze_at_step=9)]  # the freeze happens after the crash


def _srste_fixed() -> list[pl.Callback]:
    return [SRSTECallback(1, 4, mode="fixed")]


def _srste_scheme() -> list[pl.Callback]:
    return [SRSTECallback(scheme={"conv2": (1, 4), "fc1": (2, 8), "fc2": (2, 4)}, decay=0.01)]


def _domino() -> list[pl.Callback]:
    # commits happen before and after the crash; the target is met at the end
    return [
        DominoSearchCallback(
            target_sparsity=0.6, m=4, check_every=2, penalty_every=1, penalty=2.0, output="found.json", plot=False,
            verbose=False,
        )
    ]  # fmt: skip


def _scheduler() -> list[pl.Callback]:
    # gradual 4:4 -> 1:4 over steps 0..12 with a λ ramp: the checkpoint (step 6, 3:4) is in the middle of the ramp
    return [
        SRSTECallback(1, 4, decay=0.02, verbose=False),
        SparsityScheduler(start=0, end=12, schedule="linear", decay_schedule="linear", plot=False),
    ]


CASES: dict[str, Callable[[], list[pl.Callback]]] = {
    "srste": _srste,
    "srste_fixed": _srste_fixed,
    "srste_scheme": _srste_scheme,
    "domino": _domino,
    "scheduler": _scheduler,
}


def _fit(root, callbacks, ckpt_path=None, max_epochs=4):
    pl.seed_everything(0, workers=True)
    model = SameBatchNet(lr=0.05 if callbacks and isinstance(callbacks[0], DominoSearchCallback) else 0.1)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_last=True, save_top_k=-1)
    trainer = pl.Trainer(
        **trainer_kwargs(root, max_epochs=max_epochs, callbacks=[*callbacks, ckpt], enable_checkpointing=True)
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def _state(trainer: pl.Trainer, model: pl.LightningModule) -> dict[str, Any]:
    """Everything that must match: all parameters and buffers (with the N:M state), optimizer and callback states."""
    return {
        "model": model.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict()["state"],
        "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks if not isinstance(cb, ModelCheckpoint)},
        "step": trainer.global_step,
    }


def _assert_identical(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {set(a) ^ set(b)}"
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_crash_mid_epoch_then_resume_is_bit_identical(tmp_path, case):
    make = CASES[case]
    full_trainer, full_model = _fit(tmp_path / "full", make())

    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "run", [*make(), Crash(at=7)])  # step 7 is in the middle of epoch 1 (4 steps per epoch)
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6  # the newest checkpoint, mid-epoch

    trainer, model = _fit(tmp_path / "run", make(), ckpt_path=last)  # fresh model, fresh callbacks
    assert trainer.global_step == full_trainer.global_step
    _assert_identical(_state(full_trainer, full_model), _state(trainer, model), case)
    if case == "domino":
        assert (tmp_path / "run" / "found.json").read_text() == (tmp_path / "full" / "found.json").read_text()


@pytest.mark.parametrize(
    ("callback", "match"),
    [
        (lambda: SRSTECallback(1, 4), r"conv2: 2:4 in the checkpoint, 1:4 here"),
        (lambda: SRSTECallback(2, 8), r"N:M state for \['conv1'\], which are dense here"),
        (lambda: SRSTECallback(2, 4, mode="fixed"), r"fc1: a dynamic mask in the checkpoint, a fixed mask here"),
        (lambda: SRSTECallback(2, 4, exclude=["fc2"]), r"N:M state for \['fc2'\], which are dense here"),
        (lambda: SRSTECallback(2, 4, layout="flat"), r"fc1: m=4, layout='input_channel' in the checkpoint, m=4, lay"),
    ],
    ids=["other_n", "other_m", "fixed_vs_dynamic", "fewer_layers", "other_layout"],
)
def test_resume_with_another_configuration_is_refused(tmp_path, callback, match):
    """A checkpoint from a run with other N:M settings is refused with the layer and both values, instead of
    silently switching the layers to the checkpoint's N:M."""
    _fit(tmp_path / "run", [SRSTECallback(2, 4, decay=0.01)], max_epochs=1)
    with pytest.raises(RuntimeError, match=match):
        _fit(tmp_path / "other", [callback()], ckpt_path=tmp_path / "run" / "ckpt" / "last.ckpt", max_epochs=2)
