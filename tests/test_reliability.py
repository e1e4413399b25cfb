"""Reliability: torch.compile with each callback, the sharded-strategy guard, 16-mixed loss scaling."""

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


@pytest.mark.parametrize("base", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_are_refused_at_setup(base):
    """Refused by type: a user's subclass of a sharded strategy (any name) is refused too."""
    import lightning.pytorch.strategies as strategies

    user_cls = type(f"My{base}", (getattr(strategies, base),), {})
    fake = types.SimpleNamespace(strategy=user_cls.__new__(user_cls))  # no __init__: only its type matters
    for cb in (SRSTECallback(), DominoSearchCallback(target_sparsity=0.5, m=4)):
        with pytest.raises(MisconfigurationException, match=rf"does not support My{base} .*use ModelParallelStrategy"):
            cb.setup(fake, TinyNet(), "fit")


def test_a_strategy_named_like_a_sharded_one_is_judged_by_type():
    """The old check compared class names; a DDP subclass that happens to be called "FSDPStrategy" is fine."""
    from lightning.pytorch.strategies import DDPStrategy

    from nm_lightning.callbacks.base import check_strategy

    lookalike = type("FSDPStrategy", (DDPStrategy,), {})
    check_strategy(lookalike.__new__(lookalike), "SRSTECallback")  # no error


def _fit_16_mixed(tmp_path, device: str, callbacks, scale: float) -> dict[str, torch.Tensor]:
    from lightning.pytorch.plugins.precision import MixedPrecision

    pl.seed_everything(0)
    model = TinyNet()
    # a real loss-scaling run: Lightning's 16-mixed plugin with a GradScaler (on CPU too, where the Trainer flag
    # itself refuses fp16 AMP); the growth interval keeps the scale fixed so two scales can be compared
    scaler = torch.amp.GradScaler(device, init_scale=scale, growth_interval=10**6)
    plugin = MixedPrecision("16-mixed", device, scaler=scaler)
    kw = trainer_kwargs(tmp_path, callbacks=callbacks, plugins=[plugin], accelerator=device)
    pl.Trainer(**{**kw, "deterministic": False}).fit(model)
    assert scaler.get_scale() == scale  # no overflow: every step was taken
    return {k: v.original.detach().cpu().clone() for k, v in sparse_layers(model).items()}


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


def _srste(strength: float) -> list[pl.Callback]:
    return [SRSTECallback(2, 4, decay=strength, verbose=False)]


def _scheduled(strength: float) -> list[pl.Callback]:
    return [SRSTECallback(1, 4, decay=strength, verbose=False), SparsityScheduler("linear", end=4, plot=False)]


def _domino(strength: float) -> list[pl.Callback]:
    return [
        DominoSearchCallback(target_sparsity=0.6, m=4, check_every=2, penalty_every=1, penalty=strength, plot=False,
                             save_dense=False, verbose=False)
    ]  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("make", [_srste, _scheduled, _domino], ids=["srste", "scheduler", "domino"])
def test_16_mixed_loss_scale_does_not_leak_into_decay_or_penalty(tmp_path, device, make):
    """The SR-STE decay and the DominoSearch penalty are added after unscaling: loss scales 2^4 and 2^12 train the
    same weights, while the decay / penalty itself does change them."""
    low = _fit_16_mixed(tmp_path / "a", device, make(0.05), 2.0**4)
    high = _fit_16_mixed(tmp_path / "b", device, make(0.05), 2.0**12)
    without = _fit_16_mixed(tmp_path / "c", device, make(0.0), 2.0**4)
    for k in low:
        torch.testing.assert_close(low[k], high[k], rtol=1e-4, atol=1e-5)
    assert any(float((low[k] - without[k]).abs().max()) > 1e-3 for k in low)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_training_with_low_precision_weights(tmp_path, precision):
    """Weights held in bf16 / fp16 (``*-true`` precision): masks, decay and checkpoints work in that dtype."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    model = TinyNet()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    kw = trainer_kwargs(tmp_path, callbacks=[SRSTECallback(2, 4, decay=0.01), ckpt], precision=precision)
    pl.Trainer(**{**kw, "enable_checkpointing": True}).fit(model)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float16
    for name, layer in sparse_layers(model).items():
        w = layer.module.weight
        assert w.dtype == dtype and torch.isfinite(layer.original).all(), name
        assert torch.equal(w != 0, nm_mask(layer.original, 2, 4) & (w != 0)), name
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert state["fc1.weight"].dtype == dtype
