"""STEP (N:M under Adam/AdamW): the frozen second moment against an independent reference, AutoSwitch, λ from the
budget, and SRSTECallback(recipe="step") under Lightning's machinery (resume, 16-mixed, accumulation, compile,
LR schedules, several param groups, SparsityScheduler, DominoSearch schemes, DDP)."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from test_crash_resume import Crash, SameBatchNet, _assert_identical, _state

from nm_lightning import SparsityScheduler, SRSTECallback, sparse_layers
from nm_lightning.optim import (
    AutoSwitch,
    FrozenSecondMoment,
    StepRecipe,
    auto_decay,
    check_adam,
    peak_lr,
    resolve_switch_step,
)

# ---------------------------------------------------------------------------------------------- the pure core


def _reference(p0, grads, cfg, switch, frozen, lrs, floor=0.0):
    """Adam/AdamW written out from the paper's formulas, in float64, with ``v`` of the params in ``frozen`` fixed
    from step ``switch`` on (bias correction of ``v`` at the switch; sqrt(v̂) floored at ``floor`` x its mean)."""
    params = [p.double().clone() for p in p0]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vs, ts = {}, {}
    for t, (gs, lr_scale) in enumerate(zip(grads, lrs, strict=True), start=1):
        for i, (p, g) in enumerate(zip(params, gs, strict=True)):
            lr, wd, decoupled = cfg[i]["lr"] * lr_scale, cfg[i]["wd"], cfg[i]["decoupled"]
            b1, b2, eps = 0.9, 0.999, 1e-8
            g = g.double()
            if wd and not decoupled:
                g = g + wd * p
            if wd and decoupled:
                p.mul_(1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * g
            if i in frozen and t > switch:
                if i not in vs:
                    vs[i], ts[i] = v[i].clone(), switch
                root = (vs[i] / (1 - b2 ** ts[i])).sqrt()
                root = torch.maximum(root, floor * root.mean())
            else:
                v[i] = b2 * v[i] + (1 - b2) * g * g
                root = (v[i] / (1 - b2**t)).sqrt()
            p.sub_(lr * (m[i] / (1 - b1**t)) / (root + eps))
    return params


def _run(cls, impl, groups, decoupled_cfg, steps=9, switch=4, frozen=(0, 2), lrs=None, wd=0.05, floor=0.0):
    torch.manual_seed(0)
    shapes = [(8, 16), (4,), (16, 8), (32,)]
    p0 = [torch.randn(s) for s in shapes]
    params = [torch.nn.Parameter(p.clone()) for p in p0]
    kw = {"foreach": False} if impl == "single" else {impl: True}
    if groups:
        spec = [{"params": params[:2], "lr": 0.01}, {"params": params[2:], "lr": 0.003, "weight_decay": 0.2}]
        cfg = [{"lr": 0.01, "wd": wd}] * 2 + [{"lr": 0.003, "wd": 0.2}] * 2
    else:
        spec, cfg = params, [{"lr": 0.01, "wd": wd}] * 4
    opt = cls(spec, lr=0.01, weight_decay=wd, **kw)
    cfg = [{**c, "decoupled": decoupled_cfg} for c in cfg]
    base = [g["lr"] for g in opt.param_groups]
    lrs = lrs or [1.0] * steps
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    fsm = FrozenSecondMoment(opt, floor_ratio=floor)
    frozen_v: dict[int, torch.Tensor] = {}
    for t in range(steps):
        if t == switch:
            fsm.freeze([params[i] for i in frozen])
            frozen_v = {i: opt.state[params[i]]["exp_avg_sq"].clone() for i in frozen}
        for g, b in zip(opt.param_groups, base, strict=True):
            g["lr"] = b * lrs[t]
        for p, g in zip(params, grads[t], strict=True):
            p.grad = g.clone()
        opt.step()
        for i, v in frozen_v.items():  # EXACTLY the value at the switch, after every step
            assert torch.equal(opt.state[params[i]]["exp_avg_sq"], v)
    ref = _reference(p0, grads, cfg, switch, set(frozen), lrs, floor)
    return params, ref, opt, fsm, _reference(p0, grads, cfg, switch, set(), lrs)


@pytest.mark.parametrize("impl", ["single", "foreach", "fused"])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("groups", [False, True], ids=["one_group", "two_groups"])
@pytest.mark.parametrize("floor", [0.0, 0.8], ids=["step_formula", "floored"])
def test_frozen_second_moment_matches_an_independent_reference(cls, impl, groups, floor):
    """Every implementation, Adam (L2) and AdamW (decoupled), weight decay, several steps before and after the
    switch: the frozen params follow "Adam with v frozen", the others plain Adam; v is bit-identical throughout."""
    got, ref, opt, fsm, plain = _run(cls, impl, groups, decoupled_cfg=cls is torch.optim.AdamW, floor=floor)
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        torch.testing.assert_close(a.detach().double(), b, rtol=1e-5, atol=1e-6, msg=f"param {i}")
    assert fsm.frozen_share() == pytest.approx((8 * 16 * 2) / (8 * 16 * 2 + 4 + 32))
    # the test can fail: plain Adam (v not frozen) ends elsewhere for the frozen params, the same for the others
    for i, (a, b) in enumerate(zip(got, plain, strict=True)):
        assert torch.allclose(a.detach().double(), b, rtol=1e-5, atol=1e-6) == (i not in (0, 2)), i


def test_frozen_second_moment_under_an_lr_schedule():
    """The lr of each step (a scheduler's) is used for the frozen params' update too."""
    lrs = [min(1.0, (t + 1) / 3) * 0.5 ** (t // 4) for t in range(10)]
    got, ref, _, _, _ = _run(torch.optim.AdamW, "foreach", True, True, steps=10, switch=3, lrs=lrs)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.detach().double(), b, rtol=1e-5, atol=1e-6)


def test_frozen_second_moment_resumes_from_its_state_dict():
    """Optimizer state dict + FrozenSecondMoment state dict, loaded into fresh objects, continue bit for bit."""
    torch.manual_seed(0)
    mk = lambda: [torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8))]  # noqa: E731
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(4, 8, generator=gen), torch.randn(8, generator=gen)] for _ in range(8)]

    def steps(params, opt, ts):
        for t in ts:
            for p, g in zip(params, grads[t], strict=True):
                p.grad = g.clone()
            opt.step()

    full = mk()
    opt = torch.optim.AdamW(full, lr=0.01, fused=True)
    fsm = FrozenSecondMoment(opt)
    steps(full, opt, range(3))
    fsm.freeze([full[0]])
    steps(full, opt, range(3, 5))
    saved_opt, saved_fsm = copy.deepcopy(opt.state_dict()), fsm.state_dict()  # state_dict() shares tensors
    saved_params = [p.detach().clone() for p in full]
    steps(full, opt, range(5, 8))

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = torch.optim.AdamW(resumed, lr=0.01, fused=True)
    opt2.load_state_dict(saved_opt)
    fsm2 = FrozenSecondMoment(opt2)
    fsm2.load_state_dict(saved_fsm)
    steps(resumed, opt2, range(5, 8))
    for a, b in zip(full, resumed, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state[full[0]]["exp_avg_sq"], opt2.state[resumed[0]]["exp_avg_sq"])
    with pytest.raises(ValueError, match=r"entry \[3, 0, 2\] is not a \[group, index, step\]"):
        fsm2.load_state_dict({"version": 1, "frozen": [[3, 0, 2]]})


@pytest.mark.parametrize(("floor", "bounded"), [(0.0, False), (0.1, True)])
def test_the_floor_bounds_the_step_of_a_weight_without_gradient_before_the_switch(floor, bounded):
    """An entry with v = 0 at the switch (no gradient in the dense phase) would move by lr·m/eps afterwards."""
    p = torch.nn.Parameter(torch.zeros(8))
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0)
    fsm = FrozenSecondMoment(opt, floor_ratio=floor)
    for t in range(6):
        if t == 3:
            fsm.freeze([p])
        p.grad = torch.ones(8) if t >= 3 else torch.tensor([1.0] * 7 + [0.0])
        opt.step()
    assert float(opt.state[p]["exp_avg_sq"][7]) == 0.0
    assert (float(p.detach().abs().max()) < 0.1) == bounded


def test_a_step_the_optimizer_skips_is_skipped_for_the_frozen_params_too():
    """A param without grad at a step (Adam skips it) keeps its value and its frozen v; detach restores plain Adam."""
    p = torch.nn.Parameter(torch.ones(4))
    q = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([p, q], lr=0.1)
    p.grad, q.grad = torch.ones(4), torch.ones(4)
    opt.step()
    fsm = FrozenSecondMoment(opt)
    assert fsm.freeze([p]) == [p]
    before, v = p.detach().clone(), opt.state[p]["exp_avg_sq"].clone()
    p.grad, q.grad = None, torch.ones(4)
    opt.step()
    assert torch.equal(p, before) and torch.equal(opt.state[p]["exp_avg_sq"], v)
    fsm.detach()
    p.grad = torch.full((4,), 3.0)
    opt.step()
    assert not torch.equal(opt.state[p]["exp_avg_sq"], v)  # hooks removed: v moves again


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda ps: torch.optim.SGD(ps, lr=0.1),
            TypeError,
            r"supports torch.optim.Adam and torch.optim.AdamW only.*SGD",
        ),
        (lambda ps: torch.optim.Adafactor(ps), TypeError, r"got torch.optim.Adafactor\. Use recipe=.srste."),
        (lambda ps: type("MyAdam", (torch.optim.Adam,), {})(ps), TypeError, r"got .*MyAdam"),
        (lambda ps: torch.optim.AdamW(ps, amsgrad=True), ValueError, r"param group 0 of AdamW has amsgrad=True"),
    ],
    ids=["sgd", "adafactor", "subclass", "amsgrad"],
)
def test_unsupported_optimizers_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        check_adam(make([torch.nn.Parameter(torch.ones(2))]))


def test_auto_decay_and_its_checks():
    assert auto_decay(0.2, 1e-3, 1000) == pytest.approx(0.2)
    assert auto_decay(0.0, 1e-3, 10) == 0.0
    with pytest.raises(ValueError, match="lr must be > 0"):
        auto_decay(0.2, 0.0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        auto_decay(0.2, 1e-3, 0)
    with pytest.raises(ValueError, match="c"):
        auto_decay(-1.0, 1e-3, 10)
    with pytest.raises(TypeError, match="total_steps"):
        auto_decay(0.2, 1e-3, 10.5)


def test_peak_lr_reads_the_schedulers_base_lr():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.01}, {"params": [q], "lr": 0.5}])
    torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0)  # a warm-up starting at 0
    assert opt.param_groups[0]["lr"] == 0.0 and peak_lr(opt, [p]) == 0.01 and peak_lr(opt, [p, q]) == 0.5


def test_switch_step_resolution():
    assert (
        resolve_switch_step(7, 100) == 7
        and resolve_switch_step(0.15, 100) == 15
        and resolve_switch_step(0.001, 10) == 1
    )
    with pytest.raises(ValueError, match="fraction of the budget"):
        resolve_switch_step(0.5, None)
    for bad, error in ((0, ValueError), (1.5, ValueError), (True, TypeError), ("soon", TypeError)):
        with pytest.raises(error, match="switch_at"):
            StepRecipe(bad)


def _moments(scale: float) -> list[torch.Tensor]:
    return [torch.full((10,), scale)]


def test_autoswitch_decides_when_the_relative_change_is_small_for_patience_checks():
    auto = AutoSwitch(threshold=0.1, window=2, patience=2, min_fraction=0.1, max_fraction=0.9)
    auto.bind(100)
    scales = {2: 1.0, 4: 0.5, 6: 0.3, 8: 0.29, 10: 0.3, 12: 0.31, 14: 0.3}
    decided = [auto.update(step, _moments(scales.get(step, 9.0))) for step in range(1, 15)]  # odd steps: no check
    # r: 0.5 at step 4, 0.4 at 6, 0.033 at 8 (settled once), 0.034 at 10 (twice, and 10 >= min 10): switch at 10
    assert decided == [None] * 9 + [10] * 5
    assert [s for s, _ in auto.history] == [4, 6, 8, 10]
    assert auto.history[2][1] == pytest.approx(0.01 / 0.3, rel=1e-5)


def test_autoswitch_bounds_and_resume():
    auto = AutoSwitch(threshold=0.0, window=1, patience=1, min_fraction=0.2, max_fraction=0.3)
    auto.bind(50)
    assert auto.bounds() == (10, 15)
    for step in range(1, 15):
        assert auto.update(step, _moments(1.0 + step)) is None
    state = auto.state_dict()
    assert auto.update(15, _moments(1.0)) == 15  # forced at max_fraction
    again = AutoSwitch(threshold=0.0, window=1, patience=1, min_fraction=0.2, max_fraction=0.3)
    again.bind(50)
    again.load_state_dict(state)
    assert again.update(15, _moments(1.0)) == 15 and again.history == auto.history
    settled = AutoSwitch(threshold=0.5, window=1, patience=1, min_fraction=0.2, max_fraction=0.9)
    settled.bind(50)
    assert [settled.update(s, _moments(1.0)) for s in range(1, 11)][-2:] == [None, 10]  # not before min_fraction
    with pytest.raises(ValueError, match="max_fraction=0.1 is below min_fraction=0.2"):
        AutoSwitch(min_fraction=0.2, max_fraction=0.1)
    with pytest.raises(ValueError, match="unsupported AutoSwitch state"):
        again.load_state_dict({"version": 9})


# ---------------------------------------------------------------------------------------------- under Lightning


class AdamNet(TinyNet):
    """TinyNet under Adam/AdamW: ``impl`` single/foreach/fused, optional second param group and LR schedule."""

    def __init__(self, opt: str = "adamw", impl: str = "foreach", groups: bool = False, sched: str | None = None,
                 batch_size: int = 16, lr: float = 3e-3) -> None:  # fmt: skip
        super().__init__(lr=lr, batch_size=batch_size)
        self.opt_kind, self.impl, self.groups, self.sched = opt, impl, groups, sched

    def configure_optimizers(self):
        cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[self.opt_kind]
        kw = {} if cls is torch.optim.SGD else ({"foreach": False} if self.impl == "single" else {self.impl: True})
        lr = self.hparams.lr
        if self.groups:
            params = [{"params": [*self.conv1.parameters(), *self.fc2.parameters()], "lr": lr / 3},
                      {"params": [*self.conv2.parameters(), *self.fc1.parameters()], "weight_decay": 0.0}]  # fmt: skip
        else:
            params = self.parameters()
        opt = cls(params, lr=lr, weight_decay=0.01, **kw)
        if self.sched is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 3) * 0.7 ** (t // 2))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class SameBatchAdam(AdamNet):
    train_dataloader = SameBatchNet.train_dataloader


class Snapshot(pl.Callback):
    """Records, after every optimizer step, v of the N:M weights and of the other params, and the lr."""

    def __init__(self) -> None:
        self.v: list[dict[str, torch.Tensor]] = []
        self.lr: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        opt = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.v.append({names[id(p)]: s["exp_avg_sq"].clone() for p, s in opt.state.items() if "exp_avg_sq" in s})
        self.lr.append(opt.param_groups[0]["lr"])


def _fit(root, model, callbacks, **over):
    kw = trainer_kwargs(root, max_epochs=3, callbacks=callbacks, limit_val_batches=0)
    trainer = pl.Trainer(**{**kw, **over})
    trainer.fit(model)
    return trainer


def _nm_keys(model) -> set[str]:
    return {f"{la.module_name}.parametrizations.{la.param_name}.original" for la in sparse_layers(model).values()}


@pytest.mark.parametrize(
    ("impl", "groups", "sched"),
    [("foreach", False, None), ("fused", True, None), ("single", True, "warmup_decay")],
    ids=["foreach", "fused_two_groups", "single_two_groups_lr_schedule"],
)
def test_step_recipe_freezes_only_the_nm_weights_v(tmp_path, impl, groups, sched):
    """Dense before the switch, N:M after; from the switch on the N:M weights' v never changes (bit for bit) while
    the other parameters' v does; an LR scheduler keeps running during the frozen phase."""
    pl.seed_everything(0)
    model = AdamNet(impl=impl, groups=groups, sched=sched)
    snap = Snapshot()
    cb = SRSTECallback(2, 4, decay=0.0, recipe="step", switch_at=5, verbose=False)
    trainer = _fit(tmp_path, model, [cb, snap])
    assert trainer.global_step == 12 and cb._step.switched and cb._step.switch_step == 5
    nm = _nm_keys(model)
    at_switch = snap.v[4]  # after step 5 (index 4) = the v frozen before step 6... the switch is before step index 5
    for t in range(5, 12):
        for k in nm:
            assert torch.equal(snap.v[t][k], at_switch[k]), (t, k)
    others = set(at_switch) - nm
    assert others and all(not torch.equal(snap.v[11][k], at_switch[k]) for k in others)
    assert all(not torch.equal(snap.v[4][k], snap.v[3][k]) for k in nm)  # dense phase: v moves
    assert {la.state.n for la in sparse_layers(model).values()} == {2}
    if sched:
        assert len(set(snap.lr[5:])) > 2
    m = cb.metrics()
    assert m["nm/step/switched"] == 1.0 and m["nm/step/switch_step"] == 5.0
    assert 0.9 < m["nm/step/frozen_share"] < 1.0  # the biases are not N:M


def test_dense_phase_is_dense(tmp_path):
    """Before the switch every layer computes with its dense weight (n = m)."""
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            seen.append({la.state.n for la in sparse_layers(pl_module).values()})

    pl.seed_everything(0)
    _fit(tmp_path, AdamNet(), [SRSTECallback(1, 4, recipe="step", switch_at=0.5, verbose=False), Probe()])
    assert seen[:6] == [{4}] * 6 and seen[6:] == [{1}] * 6


def test_sgd_is_refused_with_a_clear_error(tmp_path):
    pl.seed_everything(0)
    with pytest.raises(
        TypeError, match=r"supports torch.optim.Adam and torch.optim.AdamW only .*got torch.optim.sgd.SGD"
    ):
        _fit(tmp_path, AdamNet(opt="sgd"), [SRSTECallback(recipe="step", switch_at=2, verbose=False)])


CASES = {
    "fixed": lambda: SRSTECallback(2, 4, decay=0.01, recipe="step", switch_at=6, verbose=False),
    "auto": lambda: SRSTECallback(
        2,
        4,
        decay=0.01,
        recipe="step",
        verbose=False,
        switch_at=AutoSwitch(threshold=10.0, window=1, patience=2, min_fraction=0.45, max_fraction=0.6),
    ),  # fmt: skip
}


@pytest.mark.parametrize("crash_at", [6, 7, 9], ids=["before", "at", "after"])
@pytest.mark.parametrize("case", list(CASES))
def test_crash_then_resume_is_bit_identical_around_the_switch(tmp_path, case, crash_at):
    """Checkpoint every step, crash at crash_at: the run resumes from step crash_at - 1 = 5 (before the switch
    decision), 6 (decided, switch at the next batch) or 8 (after); the switch is before optimizer step 6 (fixed, or
    AutoSwitch's earliest step) and the resumed run equals the uninterrupted one exactly."""

    def fit(root, extra=(), ckpt_path=None):
        pl.seed_everything(0, workers=True)
        model = SameBatchAdam(impl="fused")
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
        kw = trainer_kwargs(root, max_epochs=3, callbacks=[CASES[case](), *extra, ckpt], enable_checkpointing=True)
        trainer = pl.Trainer(**kw)
        trainer.fit(model, ckpt_path=ckpt_path)
        return trainer, model

    full_trainer, full_model = fit(tmp_path / "full")
    step_cb = next(c for c in full_trainer.callbacks if isinstance(c, SRSTECallback))
    assert step_cb._step.switch_step == 6
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "run", [Crash(at=crash_at)])
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == crash_at - 1
    trainer, model = fit(tmp_path / "run", ckpt_path=last)
    _assert_identical(_state(full_trainer, full_model), _state(trainer, model), case)


def test_resume_with_another_recipe_is_refused(tmp_path):
    pl.seed_everything(0)
    root = tmp_path
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    kw = trainer_kwargs(root, max_epochs=1, enable_checkpointing=True, limit_val_batches=0)
    pl.Trainer(**{**kw, "callbacks": [SRSTECallback(2, 4, verbose=False), ckpt]}).fit(AdamNet())
    cb = SRSTECallback(2, 4, recipe="step", switch_at=2, verbose=False)
    with pytest.raises(ValueError, match="checkpoint was written without recipe='step'"):
        pl.Trainer(**{**kw, "max_epochs": 2, "callbacks": [cb]}).fit(AdamNet(), ckpt_path=root / "ckpt" / "last.ckpt")


def _fit_16_mixed(root, scale):
    from lightning.pytorch.plugins.precision import MixedPrecision

    pl.seed_everything(0)
    model = AdamNet(impl="fused")
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)
    cb = SRSTECallback(2, 4, decay=0.01, recipe="step", switch_at=4, verbose=False)
    snap = Snapshot()
    _fit(root, model, [cb, snap], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], deterministic=False)
    assert scaler.get_scale() == scale
    return {k: v.detach().clone() for k, v in model.named_parameters()}, snap.v[-1]


def test_16_mixed_freezes_the_unscaled_v_and_two_loss_scales_agree(tmp_path):
    """The frozen v is the unscaled one: loss scales 2^10 and 2^14 train the same weights (to fp16 rounding: Adam
    normalizes gradients, so small scales, where fp16 gradients underflow, are not comparable) and v has the
    full-precision run's magnitude, not scale² times it."""
    low, v_low = _fit_16_mixed(tmp_path / "a", 2.0**10)
    high, v_high = _fit_16_mixed(tmp_path / "b", 2.0**14)
    for k in low:
        torch.testing.assert_close(low[k], high[k], rtol=1e-3, atol=2e-4)
        torch.testing.assert_close(v_low[k], v_high[k], rtol=5e-2, atol=1e-12)
    pl.seed_everything(0)
    model = AdamNet(impl="fused")
    snap = Snapshot()
    _fit(tmp_path / "c", model, [SRSTECallback(2, 4, decay=0.01, recipe="step", switch_at=4, verbose=False), snap])
    for k, v in snap.v[-1].items():
        ratio = float(v_high[k].sum() / v.sum())
        assert 0.5 < ratio < 2.0, (k, ratio)


def test_gradient_accumulation_switches_on_optimizer_steps(tmp_path):
    """2 x batch 8 accumulated == batch 16: the switch and the frozen v count optimizer steps."""
    pl.seed_everything(0)
    one = AdamNet(batch_size=16)
    cb1 = SRSTECallback(2, 4, decay=0.01, recipe="step", switch_at=5, verbose=False)
    _fit(tmp_path / "a", one, [cb1])
    pl.seed_everything(0)
    acc = AdamNet(batch_size=8)
    cb2 = SRSTECallback(2, 4, decay=0.01, recipe="step", switch_at=5, verbose=False)
    trainer = _fit(tmp_path / "b", acc, [cb2], accumulate_grad_batches=2)
    assert trainer.global_step == 12 and cb2._step.switch_step == 5
    for (k, a), b in zip(one.named_parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


class QuietAdam(AdamNet):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)


def test_compiled_model_trains_like_the_eager_one(tmp_path):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    pl.seed_everything(0)
    eager = QuietAdam()
    _fit(tmp_path / "a", eager, [SRSTECallback(2, 4, decay=0.01, recipe="step", switch_at=5, verbose=False)])
    pl.seed_everything(0)
    model = QuietAdam()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    _fit(tmp_path / "b", compiled, [SRSTECallback(2, 4, decay=0.01, recipe="step", switch_at=5, verbose=False)])
    assert 1 <= counter.frame_count <= 3  # dense graph, then the 2:4 one
    for (k, a), b in zip(eager.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_sparsity_scheduler_ramp_starts_at_the_switch(tmp_path):
    """With a SparsityScheduler the schedule moves n; the recipe freezes v at its switch and checks that the
    layers were dense until then."""
    pl.seed_everything(0)
    model = AdamNet()
    cb = SRSTECallback(1, 4, decay=0.0, recipe="step", switch_at=4, verbose=False)
    snap = Snapshot()
    _fit(tmp_path / "a", model, [cb, SparsityScheduler("linear", start=4, end=8, plot=False), snap])
    assert cb._step.switched and {la.state.n for la in sparse_layers(model).values()} == {1}
    for k in _nm_keys(model):
        assert torch.equal(snap.v[-1][k], snap.v[3][k])
    pl.seed_everything(0)
    early = [SRSTECallback(1, 4, recipe="step", switch_at=4, verbose=False), SparsityScheduler("linear", end=4)]
    with pytest.raises(RuntimeError, match=r"layers are sparse at step 3, before the switch: conv1 \(3:4\)"):
        _fit(tmp_path / "b", AdamNet(), early)
    pl.seed_everything(0)
    auto = SRSTECallback(1, 4, recipe="step", switch_at=AutoSwitch(max_fraction=0.2), verbose=False)
    with pytest.raises(ValueError, match="switch_at='auto' cannot tell a sparsity schedule"):
        _fit(tmp_path / "c", AdamNet(), [auto, SparsityScheduler("constant", start=100, plot=False)])


def test_domino_scheme_finetuning_switches_each_layer_to_its_own_n(tmp_path):
    pl.seed_everything(0)
    model = AdamNet()
    scheme = {"conv2": (1, 4), "fc1": (2, 8), "fc2": (2, 4)}
    cb = SRSTECallback(scheme=scheme, decay=0.0, recipe="step", switch_at=3, verbose=False)
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            seen.append({k: la.state.n for k, la in sparse_layers(pl_module).items()})

    _fit(tmp_path, model, [cb, Probe()])
    assert seen[0] == {"conv2": 4, "fc1": 8, "fc2": 4} and seen[3] == seen[-1] == {"conv2": 1, "fc1": 2, "fc2": 2}


def test_decay_auto_uses_the_budget_and_the_peak_lr(tmp_path):
    pl.seed_everything(0)
    cb = SRSTECallback(2, 4, decay="auto", verbose=False)
    _fit(tmp_path / "a", AdamNet(sched="warmup"), [cb], accumulate_grad_batches=2)  # 12 batches -> 6 steps
    assert cb.decay == pytest.approx(0.2 / (3e-3 * 6))
    cb = SRSTECallback(2, 4, decay_c=0.05, recipe="step", switch_at=0.5, verbose=False)
    _fit(tmp_path / "b", AdamNet(), [cb], max_steps=10)
    assert cb.decay == pytest.approx(0.05 / (3e-3 * 10)) and cb._step.switch_step == 5
    with pytest.raises(ValueError, match="give decay=0.1 or decay_c=0.3, not both"):
        SRSTECallback(decay=0.1, decay_c=0.3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"switch_at": 5}, ValueError, r"switch_at=5 needs recipe='step'"),
        (
            {"recipe": "step", "mode": "fixed"},
            ValueError,
            r"recipe='step' trains dense first; it cannot use mode='fixed'",
        ),
        (
            {"recipe": "step", "switch_at": "soon"},
            ValueError,
            r"switch_at must be an int step, a float fraction or 'auto'",
        ),
        ({"recipe": "step", "switch_at": 0}, ValueError, r"switch_at=0 must be >= 1"),
        (
            {"recipe": "step", "switch_at": 1.0},
            ValueError,
            r"switch_at=1.0 as a fraction of the budget must be in \(0, 1\)",
        ),
        ({"recipe": "sr-ste"}, ValueError, r"recipe must be 'srste' or 'step'"),
        ({"decay_c": -1.0}, ValueError, r"decay_c"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        SRSTECallback(**kwargs)


@pytest.mark.slow
def test_ddp_spawn_ranks_identical_and_logged(tmp_path):
    """Two processes (ddp_spawn, gloo): identical weights and masks on both ranks after the switch (RankCheck), the
    switch logged by rank 0 with a CSVLogger at every step."""
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from test_distributed import RankCheck

    pl.seed_everything(0, workers=True)
    model = AdamNet(batch_size=8)
    cb = SRSTECallback(2, 4, decay=0.01, recipe="step", switch_at=3, verbose=False)
    kw = trainer_kwargs(tmp_path, max_epochs=1, callbacks=[cb, RankCheck()], devices=2, strategy="ddp_spawn",
                        deterministic=False, logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1,
                        limit_val_batches=0)  # fmt: skip
    pl.Trainer(**kw).fit(model)
    (metrics,) = list(tmp_path.rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    switched = [r for r in rows if r.get("nm/step/switched") == "1.0"]
    assert switched and float(switched[0]["nm/step/switch_step"]) == 3.0
    assert any(r.get("nm/step/frozen_share") for r in rows)
    assert not math.isnan(float(switched[-1]["nm/step/frozen_share"]))
