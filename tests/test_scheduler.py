"""SparsityScheduler: schedule shapes against their formulas, mixed schemes, freeze, resume, bad config."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nm_lightning import NMScheme, SparsityScheduler, SRSTECallback, sparse_layers
from nm_lightning.schedules import decay_at, n_at, ramp_fraction


def test_ramp_shapes_match_formulas():
    for t in range(0, 30):
        x = min(1.0, max(0.0, (t - 5) / 20))
        assert ramp_fraction(t, "linear", 5, 25) == pytest.approx(x if t >= 5 else 0.0)
        # Zhu & Gupta / torch.ao.pruning CubicSL: s_f + (s_i - s_f)(1 - x)^3 with s_i = 0, s_f = 1
        assert ramp_fraction(t, "cubic", 5, 25) == pytest.approx(1 + (0 - 1) * (1 - x) ** 3 if t >= 5 else 0.0)
        assert ramp_fraction(t, "constant", 5) == (1.0 if t >= 5 else 0.0)
        assert ramp_fraction(t, "step", milestones=[4, 10, 20]) == pytest.approx(sum(t >= m for m in [4, 10, 20]) / 3)


def test_n_at_walks_down_monotonically_to_target():
    fractions = [i / 100 for i in range(101)]
    for n_final, m in [(2, 4), (1, 16), (4, 16), (1, 4)]:
        ns = [n_at(f, m, n_final, m) for f in fractions]
        assert ns[0] == m and ns[-1] == n_final
        assert all(a >= b for a, b in zip(ns, ns[1:], strict=False))
        # never sparser than the schedule: n/m >= interpolated density
        assert all(n / m >= 1 - f * (m - n_final) / m - 1e-12 for n, f in zip(ns, fractions, strict=True))
    assert {n_at(f, 16, 2, 16, levels=[8, 4]) for f in fractions} == {16, 8, 4, 2}


def test_decay_schedules():
    assert decay_at(7, 0.1) == 0.1
    assert decay_at(0, 0.1, "linear", 0, 10) == 0.0
    assert decay_at(5, 0.1, "linear", 0, 10) == pytest.approx(0.05)
    assert decay_at(20, 0.1, "linear", 0, 10) == pytest.approx(0.1)
    assert decay_at(25, 0.1, "step", milestones=[10, 20]) == pytest.approx(0.4)


def _fit(tmp_path, callbacks, max_epochs=4, ckpt_path=None, logger=False, **kw):
    pl.seed_everything(0, workers=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=max_epochs, callbacks=callbacks, logger=logger, **kw))
    model = TinyNet()
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def _rows(logger, key):
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def test_cubic_schedule_drives_n_per_step(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    srste = SRSTECallback(1, 4, decay=0.01)
    sched = SparsityScheduler("cubic", start=2, end=10, decay_schedule="linear")
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen[trainer.global_step - 1] = (pl_module.fc1.parametrizations.weight[0].n, srste.current_decay())

    trainer, model = _fit(tmp_path, [srste, sched, Spy()], logger=logger, log_every_n_steps=1)
    for step, (n, lam) in seen.items():
        assert n == n_at(ramp_fraction(step, "cubic", 2, 10), 4, 1, 4), step
        assert lam == pytest.approx(decay_at(step, 0.01, "linear", 2, 10))
    assert seen[0][0] == 4 and seen[1][0] == 4 and seen[15][0] == 1  # dense warm-up, then the target
    assert srste.decay == 0.01  # the scheduler supplies a factor; the callback's own λ is never overwritten
    assert [n for _, (n, _) in sorted(seen.items())] == sorted((n for n, _ in seen.values()), reverse=True)
    logged = dict(_rows(logger, "nm/schedule/density"))
    assert logged and min(logged.values()) == pytest.approx(0.25, abs=0.01)
    assert (tmp_path / "logs" / "version_0" / "sparsity_schedule.png").exists()


def test_mixed_scheme_from_domino_file_each_walks_to_own_target(tmp_path):
    scheme_file = NMScheme({"conv2": (1, 8), "fc1": (2, 16), "fc2": (4, 8)}).save(tmp_path / "s.txt", model=TinyNet())
    srste = SRSTECallback(scheme=str(scheme_file))
    sched = SparsityScheduler("linear", start=0, end=8, update_every=2)
    history: list[dict[str, int]] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            history.append({k: v.sparsity.n for k, v in sparse_layers(pl_module).items()})

    _fit(tmp_path, [srste, sched, Spy()], max_epochs=3)
    assert history[-1] == {"conv2": 1, "fc1": 2, "fc2": 4}
    assert history[0] == {"conv2": 8, "fc1": 16, "fc2": 8}
    for a, b in zip(history, history[1:], strict=False):
        assert all(b[k] <= a[k] for k in a)
    assert history[1] == history[0]  # update_every=2: N changes only on even steps


def test_freeze_fixes_masks_and_zeros(tmp_path):
    srste = SRSTECallback(2, 4)
    sched = SparsityScheduler("linear", start=0, end=4, freeze=6)
    _, model = _fit(tmp_path, [srste, sched])
    for layer in sparse_layers(model).values():
        assert layer.sparsity.frozen and layer.sparsity.n == 2
        assert bool((layer.original[~layer.sparsity.mask] == 0).all())


def test_epoch_unit(tmp_path):
    srste = SRSTECallback(1, 4)
    sched = SparsityScheduler("step", unit="epoch", milestones=[1, 2, 3])
    per_epoch = {}

    class Spy(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            per_epoch[trainer.current_epoch] = pl_module.fc1.parametrizations.weight[0].n

    _fit(tmp_path, [srste, sched, Spy()])
    assert per_epoch == {0: 4, 1: 3, 2: 2, 3: 1}


def test_resume_mid_ramp_is_bit_exact(tmp_path):
    def cbs():
        return [SRSTECallback(1, 4, decay=0.01), SparsityScheduler("cubic", start=1, end=12, freeze=14)]

    _, full = _fit(tmp_path / "full", cbs())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "part", save_top_k=-1, every_n_epochs=1)
    _fit(tmp_path / "part", [*cbs(), ckpt], max_epochs=2, enable_checkpointing=True)
    _, resumed = _fit(tmp_path / "res", cbs(), ckpt_path=tmp_path / "part" / "epoch=1-step=8.ckpt")
    for name, layer in sparse_layers(full).items():
        other = sparse_layers(resumed)[name]
        assert torch.equal(layer.original, other.original) and torch.equal(layer.sparsity.mask, other.sparsity.mask)
        assert (layer.sparsity.n, layer.sparsity.frozen) == (other.sparsity.n, other.sparsity.frozen)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "linear", "start": 10, "end": 5}, r"end must be after start, got start=10, end=5"),
        ({"schedule": "cubic"}, r"a cubic schedule needs end"),
        ({"schedule": "step", "milestones": [5, 3]}, r"milestones must be strictly increasing, got \[5, 3\]"),
        ({"schedule": "step"}, r"a step schedule needs milestones"),
        ({"schedule": "expo", "end": 3}, r"schedule must be 'constant', 'step', 'linear' or 'cubic', got 'expo'"),
        ({"end": 10, "freeze": 5}, r"freeze=5 comes before the target is reached at 10"),
        ({"end": 10, "unit": "batch"}, r"unit must be 'step' or 'epoch', got 'batch'"),
        ({"end": 10, "update_every": 0}, r"update_every must be an int >= 1, got 0"),
        ({"end": 10, "decay_schedule": "step"}, r"a step decay schedule needs milestones"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityScheduler(**kwargs)


def test_setup_errors(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"found no N:M layers: add an SRSTECallback"):
        _fit(tmp_path, [SparsityScheduler(end=4)], max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"levels \[12\] are not reachable for layer conv2 \(1:8\)"):
        _fit(tmp_path, [SRSTECallback(scheme={"conv2": (1, 8)}), SparsityScheduler(end=4, levels=[12])], max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"use SRSTECallback\(mode='dynamic'"):
        _fit(tmp_path, [SRSTECallback(2, 4, mode="fixed"), SparsityScheduler(end=4)], max_epochs=1)


def test_compile_recompiles_once_per_distinct_n():
    """Each N a layer walks through is one compiled graph; repeated steps at the same N reuse it."""
    from torch._dynamo.testing import CompileCounter

    from nm_lightning import attach, plan_layers

    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    layers = attach(model, plan_layers(model, 4, 4))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(8, 16)
    for n in [4, 4, 3, 3, 3, 2, 2, 2, 2]:
        for layer in layers.values():
            layer.sparsity.set_nm(n, 4)
        compiled(x).sum().backward()
    assert counter.frame_count == 3
