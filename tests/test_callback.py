"""SRSTECallback inside a real Trainer (CPU, tiny model)."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, make_data, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from nm_lightning import SRSTECallback, nm_mask, sparse_layers


def _fit(tmp_path, callbacks, max_epochs=2, model=None, ckpt_path=None, **kw):
    pl.seed_everything(0, workers=True)
    if model is None or isinstance(model, type):  # build after seeding: same init in every run
        model = (model or TinyNet)(batch_size=kw.pop("batch_size", 16))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=max_epochs, callbacks=callbacks, **kw))
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def _group_counts(w: torch.Tensor, m: int) -> torch.Tensor:
    if w.dim() == 3:
        w = w.permute(0, 2, 1)
    return w.reshape(-1, m).ne(0).sum(-1)


def test_fit_keeps_nm_and_parameters(tmp_path):
    model = TinyNet()
    ids = {id(p) for p in model.parameters()}
    cb = SRSTECallback(2, 4, decay=2e-4)
    trainer, model = _fit(tmp_path, [cb], model=model)
    assert {id(p) for p in model.parameters()} == ids
    opt_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_ids == ids
    assert set(cb.layers) == {"conv1", "conv2", "fc1", "fc2"}
    for layer in sparse_layers(model).values():
        w = layer.module.weight
        assert bool((_group_counts(w, 4) <= 2).all())
        assert torch.equal(w, layer.original * nm_mask(layer.original, 2, 4))
    # pruned dense weights kept learning (SR-STE), so the dense weights are not sparse
    assert bool((model.fc1.parametrizations.weight.original != 0).all())


def test_logs_sparsity_and_flip_rate(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    cb = SRSTECallback(2, 4)
    _fit(tmp_path, [cb], logger=logger, log_every_n_steps=1)
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    logged = [r for r in rows if r.get("nm/sparsity")]
    assert len(logged) == 8  # 4 steps x 2 epochs, every step
    assert all(float(r["nm/sparsity"]) == pytest.approx(0.5) for r in logged)
    assert all(float(r["nm/layer/fc1/sparsity"]) == pytest.approx(0.5) for r in logged)
    assert all(float(r["nm/covered_share"]) == pytest.approx(cb.metrics()["nm/covered_share"]) for r in logged)
    flips = [float(r["nm/flip_rate"]) for r in logged if r["nm/flip_rate"]]
    since = [float(r["nm/flip_rate_since_start"]) for r in logged]
    assert len(flips) == 7 and all(0 <= f <= 1 for f in flips) and max(flips) > 0  # lr 0.1 moves masks
    assert since[0] == 0.0 and max(since) > 0
    assert "nm/layer/conv2/flip_rate" in logged[-1]


def test_flip_rate_is_exact_count():
    cb = SRSTECallback(2, 4)
    layer = nn.Linear(4, 1, bias=False)
    from nm_lightning.sparsify import attach, plan_layers

    cb.plans = plan_layers(layer, 2, 4)
    cb.layers = attach(layer, cb.plans)
    cb._model_params = 4
    cb.layers["weight"].sparsity.mask.copy_(torch.tensor([[True, True, False, False]]))
    cb._prev_masks = {"weight": torch.tensor([[True, False, True, False]])}
    cb._first_masks = {"weight": torch.tensor([[True, True, False, False]])}
    values = cb.metrics()
    assert values["nm/flip_rate"] == 0.5 and values["nm/flip_rate_since_start"] == 0.0


def _run_resume(tmp_path, cb_factory):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    _, full = _fit(full_dir, [cb_factory()], max_epochs=4)
    ckpt = ModelCheckpoint(dirpath=part_dir, save_top_k=-1, every_n_epochs=1)
    _fit(part_dir, [cb_factory(), ckpt], max_epochs=2, enable_checkpointing=True)
    path = part_dir / "epoch=1-step=8.ckpt"
    resumed_cb = cb_factory()
    _, resumed = _fit(tmp_path / "resumed", [resumed_cb], max_epochs=4, ckpt_path=path, model=TinyNet())
    for name, layer in sparse_layers(full).items():
        other = sparse_layers(resumed)[name]
        assert torch.equal(layer.original, other.original), name
        assert torch.equal(layer.sparsity.mask, other.sparsity.mask), name
        assert layer.sparsity.frozen == other.sparsity.frozen
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    return path, resumed_cb


def test_resume_is_bit_exact(tmp_path):
    path, cb = _run_resume(tmp_path, lambda: SRSTECallback(2, 4, decay=0.01))
    ckpt = torch.load(path, weights_only=True)
    assert "nm_lightning" in ckpt and not any(".parametrizations." in k for k in ckpt["state_dict"])
    assert cb._first_masks is not None


def test_resume_bit_exact_after_freeze(tmp_path):
    _run_resume(tmp_path, lambda: SRSTECallback(1, 4, decay=0.01, freeze_at_step=6))


def test_checkpoint_loads_into_plain_model(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _, model = _fit(tmp_path, [SRSTECallback(2, 4), ckpt], enable_checkpointing=True)
    plain = TinyNet.load_from_checkpoint(tmp_path / "last.ckpt")  # strict=True by default
    assert not any(".parametrizations." in k for k in plain.state_dict())
    x = torch.randn(5, 4, 16)
    model.eval()
    plain.eval()
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    # test(ckpt_path=...) on a sparsified model (setup runs again for the test stage)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[SRSTECallback(2, 4)]))
    trainer.validate(TinyNet(), ckpt_path=tmp_path / "last.ckpt", verbose=False)


def test_gradient_accumulation_equals_large_batch(tmp_path):
    _, big = _fit(tmp_path / "a", [SRSTECallback(2, 4, decay=0.05)], max_epochs=1, batch_size=16)
    _, acc = _fit(
        tmp_path / "b", [SRSTECallback(2, 4, decay=0.05)], max_epochs=1, batch_size=8, accumulate_grad_batches=2
    )
    for name, layer in sparse_layers(big).items():
        torch.testing.assert_close(layer.original, sparse_layers(acc)[name].original, rtol=1e-5, atol=1e-6)


def test_decay_changes_training_and_zero_is_ste(tmp_path):
    _, ste = _fit(tmp_path / "a", [SRSTECallback(1, 4, decay=0.0)], max_epochs=1)
    _, sr = _fit(tmp_path / "b", [SRSTECallback(1, 4, decay=0.5)], max_epochs=1)
    w_ste = ste.fc1.parametrizations.weight.original
    w_sr = sr.fc1.parametrizations.weight.original
    pruned = ~sr.fc1.parametrizations.weight[0].mask
    assert not torch.equal(w_ste, w_sr)
    assert w_sr[pruned].abs().mean() < w_ste[pruned].abs().mean()  # the decay pulls pruned weights down


def test_bf16_mixed(tmp_path):
    cb = SRSTECallback(2, 4)
    _, model = _fit(tmp_path, [cb], precision="bf16-mixed")
    assert bool((_group_counts(model.fc1.weight, 4) <= 2).all())


def test_fixed_mode_keeps_pruned_zero(tmp_path):
    pl.seed_everything(0)
    model = TinyNet()
    masks = {n: nm_mask(getattr(model, n).weight, 1, 4) for n in ["conv1", "conv2", "fc1", "fc2"]}
    cb = SRSTECallback(1, 4, mode="fixed")
    _, model = _fit(tmp_path, [cb], model=model)
    for name, mask in masks.items():
        layer = sparse_layers(model)[name]
        assert layer.sparsity.frozen and torch.equal(layer.sparsity.mask, mask)
        assert bool((layer.original[~mask] == 0).all())
        assert bool((layer.original[mask] != 0).all())


def test_freeze_at_step(tmp_path):
    cb = SRSTECallback(2, 4, freeze_at_step=3)
    logger = CSVLogger(tmp_path, name="logs")
    _, model = _fit(tmp_path, [cb], logger=logger, log_every_n_steps=1)
    assert cb.frozen
    rows = [r for r in csv.DictReader(open(logger.log_dir + "/metrics.csv")) if r.get("nm/frozen")]
    # steps 0..2 dynamic, fixed from step 3 on (rows are logged after steps 0, 1, 2, ...)
    assert [float(r["nm/frozen"]) for r in rows][:5] == [0.0, 0.0, 0.0, 1.0, 1.0]
    after = [float(r["nm/flip_rate"]) for r in rows[4:] if r["nm/flip_rate"]]
    assert after and all(f == 0.0 for f in after)
    for layer in sparse_layers(model).values():
        assert bool((layer.original[~layer.sparsity.mask] == 0).all())


def test_table_printed(tmp_path, capsys):
    _fit(tmp_path, [SRSTECallback(2, 8)], max_epochs=1)
    out = capsys.readouterr().out
    assert "conv1" in out and "skipped" in out and "not divisible by m=8" in out and "2:8" in out


def test_strict_raises_on_skipped_layer(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"conv1: input channels per group .* = 4 is not divisible"):
        _fit(tmp_path, [SRSTECallback(2, 8, strict=True)], max_epochs=1)


def test_no_layer_is_a_clear_error(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"no layer to sparsify.*include/exclude"):
        _fit(tmp_path, [SRSTECallback(2, 4, include=["nothing*"])], max_epochs=1)
    # every layer is listed with the reason it was not covered
    with pytest.raises(MisconfigurationException, match=r"conv1 \(Conv1d\): matched exclude '\*'; conv2 \(Conv1d\)"):
        _fit(tmp_path, [SRSTECallback(2, 4, exclude="*")], max_epochs=1)


def test_scheme_mixed_nm(tmp_path, capsys):
    cb = SRSTECallback(scheme={"conv2": (1, 8), "fc1": (2, 16), "fc2": (4, 4)})
    _, model = _fit(tmp_path, [cb], max_epochs=1)
    assert cb.layer_nm() == {"conv2": (1, 8), "fc1": (2, 16)}
    assert bool((_group_counts(model.fc1.weight, 16) <= 2).all())
    assert type(model.conv1) is nn.Conv1d  # not in the scheme: untouched


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 5, "m": 4}, r"n=5, m=4"),
        ({"decay": -1.0}, r"decay must be a float >= 0, got -1.0"),
        ({"mode": "static"}, r"mode must be 'dynamic' or 'fixed', got 'static'"),
        ({"freeze_at_step": -2}, r"freeze_at_step must be an int >= 0 or None, got -2"),
        ({"layout": "nhwc"}, r"layout must be one of"),
        ({"scheme": {"fc1": (3, 2)}}, r"scheme entry 'fc1'.*n=3, m=2"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SRSTECallback(**kwargs)


def test_state_key_distinguishes_named_callbacks():
    a, b = SRSTECallback(name="convs", include=["conv*"]), SRSTECallback(name="fcs", include=["fc*"])
    assert a.state_key != b.state_key


def test_two_callbacks_cover_disjoint_layers(tmp_path):
    a = SRSTECallback(2, 4, include=["conv*"], name="convs")
    b = SRSTECallback(1, 4, include=["fc*"], name="fcs")
    _, model = _fit(tmp_path, [a, b], max_epochs=1)
    assert set(a.layers) == {"conv1", "conv2"} and set(b.layers) == {"fc1", "fc2"}
    assert bool((_group_counts(model.fc1.weight, 4) <= 1).all())


class SameBatchNet(TinyNet):
    """Every batch is the same, so a mid-epoch resume does not depend on how the data loop fast-forwards."""

    def train_dataloader(self):
        from torch.utils.data import DataLoader, TensorDataset

        x, y = make_data(16)[:]
        return DataLoader(TensorDataset(x.repeat(4, 1, 1), y.repeat(4)), batch_size=16)


def test_resume_mid_epoch_is_bit_exact(tmp_path):
    """A checkpoint taken in the middle of an epoch (step 6 of 4-step epochs) resumes exactly."""
    factory = lambda: SRSTECallback(2, 4, decay=0.01)  # noqa: E731
    _, full = _fit(tmp_path / "full", [factory()], max_epochs=3, model=SameBatchNet)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "part", save_top_k=-1, every_n_train_steps=6)
    _fit(tmp_path / "part", [factory(), ckpt], max_epochs=2, enable_checkpointing=True, model=SameBatchNet)
    path = tmp_path / "part" / "epoch=1-step=6.ckpt"
    trainer, resumed = _fit(tmp_path / "resumed", [factory()], max_epochs=3, ckpt_path=path, model=SameBatchNet)
    assert trainer.global_step == 12
    for name, layer in sparse_layers(full).items():
        assert torch.equal(layer.original, sparse_layers(resumed)[name].original), name


def test_export_at_fit_end(tmp_path):
    from nm_lightning import load_packed

    cb = SRSTECallback(2, 4, export_dir="export", export_formats=["dense", "packed"])
    _, model = _fit(tmp_path, [cb], max_epochs=1)
    out = tmp_path / "export"
    dense = torch.load(out / "model_dense.pt", weights_only=True)
    plain = TinyNet()
    plain.load_state_dict(dense, strict=True)
    assert torch.equal(plain.fc1.weight, model.fc1.weight)
    packed = load_packed(out / "model_packed.pt")
    assert all(torch.equal(packed[k], dense[k]) for k in dense)
    assert (out / "scheme.json").exists() and not (out / "model_2to4_cutlass.pt").exists()
    with pytest.raises(ValueError, match=r"export formats must be a non-empty subset"):
        SRSTECallback(export_formats=["onnx"])


def test_recompute_masked_does_not_change_training(tmp_path):
    _, a = _fit(tmp_path / "a", [SRSTECallback(2, 4, decay=0.01, recompute_masked=True)], max_epochs=1)
    _, b = _fit(tmp_path / "b", [SRSTECallback(2, 4, decay=0.01, recompute_masked=False)], max_epochs=1)
    for name, layer in sparse_layers(a).items():
        assert torch.equal(layer.original, sparse_layers(b)[name].original), name
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # hooks left after each batch
