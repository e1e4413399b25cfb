"""Optimizer-aware N:M training under Adam/AdamW (STEP, Lu et al., ICML 2023): a frozen second moment, the switch
criterion (AutoSwitch) and λ from the training budget.

Why: under Adam, the straight-through gradients that pruned weights receive once the model is N:M sparse keep
feeding Adam's second-moment estimate ``v`` (``exp_avg_sq``), which then no longer describes the sparse model's
curvature. STEP trains dense first, then freezes ``v`` (the preconditioner) and trains N:M with it fixed.

Pure code (torch only, no Lightning): :class:`FrozenSecondMoment` works with any loop that calls
``optimizer.step()``; :class:`AutoSwitch` and :class:`StepRecipe` are plain state machines with
``state_dict``/``load_state_dict``.

Bias correction of the frozen ``v``: the preconditioner is the one at the switch, ``v̂ = v_s / (1 − β2^s)`` with
``s`` the parameter's Adam step count at the switch (as STEP does); the first moment keeps its usual bias
correction ``1 − β1^t`` with the running ``t``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nm_lightning.validation import check_int, check_number

__all__ = [
    "AUTO_DECAY_C",
    "AutoSwitch",
    "FrozenSecondMoment",
    "StepRecipe",
    "auto_decay",
    "check_adam",
    "optimizer_holding",
    "peak_lr",
    "resolve_switch_step",
    "second_moments",
]

SUPPORTED = (torch.optim.Adam, torch.optim.AdamW)
AUTO_DECAY_C = 0.2  # decay="auto": the validation optimum range c ≈ 0.1–0.3 measured on MNIST-1D


def check_adam(optimizer: Any, who: str = "recipe='step'") -> torch.optim.Optimizer:
    """Return ``optimizer`` if the frozen second moment can drive it, else raise ``TypeError``/``ValueError``.

    Supported: exactly ``torch.optim.Adam`` and ``torch.optim.AdamW`` (single-tensor, ``foreach`` or ``fused``,
    any number of param groups), without ``amsgrad`` (its running maximum of ``v`` would be a second, unfrozen
    preconditioner) and without ``differentiable``. Subclasses are refused: they may change ``step``.
    """
    if type(optimizer) not in SUPPORTED:
        raise TypeError(
            f"{who} freezes Adam's second moment and supports torch.optim.Adam and torch.optim.AdamW only "
            f"(foreach, fused, any param groups); got {type(optimizer).__module__}.{type(optimizer).__qualname__}. "
            "Use recipe='srste' with this optimizer"
        )
    for i, group in enumerate(optimizer.param_groups):
        for flag in ("amsgrad", "differentiable"):
            if group.get(flag, False):
                raise ValueError(
                    f"{who}: param group {i} of {type(optimizer).__name__} has {flag}=True, which the frozen second "
                    f"moment does not support; use {flag}=False"
                )
    return optimizer


def auto_decay(c: float, lr: float, total_steps: int) -> float:
    """SR-STE λ from the budget: ``c / (lr · total_steps)`` (λ's effect grows with lr × number of steps).

    Raises ``ValueError`` for c < 0, lr <= 0 or total_steps < 1 (naming the value), ``TypeError`` for non-numbers.
    """
    c = check_number("auto_decay", "c", c, minimum=0.0)
    lr = check_number("auto_decay", "lr", lr, minimum=0.0)
    if lr <= 0:
        raise ValueError(f"auto_decay lr must be > 0, got {lr!r}")
    total = check_int("auto_decay", "total_steps", total_steps, minimum=1)
    return c / (lr * total)


def optimizer_holding(optimizers: Iterable[torch.optim.Optimizer], params: Iterable[torch.Tensor]) -> Any:
    """The one optimizer that holds ``params`` (the N:M weights); ``ValueError`` if none or several do."""
    ids = {id(p) for p in params}
    found = [o for o in optimizers if any(id(p) in ids for g in o.param_groups for p in g["params"])]
    if len(found) != 1:
        names = [type(o).__name__ for o in found]
        raise ValueError(f"decay_c/recipe='step' need exactly one optimizer holding the N:M weights, found {names}")
    return found[0]


def peak_lr(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> float:
    """The largest base lr of the param groups holding ``params``: ``initial_lr`` (what an LR scheduler scales
    from, so a warm-up starting near 0 does not inflate λ), else ``lr``."""
    ids = {id(p) for p in params}
    lrs = [
        float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])
    ]
    if not lrs:
        raise ValueError(f"none of the N:M weights is in this {type(optimizer).__name__}")
    return max(lrs)


def resolve_switch_step(switch_at: int | float, total_steps: int | None) -> int:
    """Turn ``switch_at`` (an optimizer step >= 1, or a fraction of the budget in (0, 1)) into a step >= 1."""
    if isinstance(switch_at, bool):
        raise TypeError(f"switch_at must be an int step, a float fraction or 'auto', got {switch_at!r}")
    if isinstance(switch_at, int):
        return switch_at
    if total_steps is None or not math.isfinite(total_steps) or total_steps < 1:
        raise ValueError(f"switch_at={switch_at!r} is a fraction of the budget, but the budget is {total_steps!r}")
    return max(1, round(switch_at * int(total_steps)))


def _param_positions(optimizer: torch.optim.Optimizer) -> dict[int, tuple[int, int]]:
    return {id(p): (gi, pi) for gi, g in enumerate(optimizer.param_groups) for pi, p in enumerate(g["params"])}


def second_moments(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Bias-corrected second moments ``v / (1 − β2^t)`` of ``params`` (those with Adam state only), detached."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p in params:
        st = optimizer.state.get(p, {})
        if "exp_avg_sq" not in st or id(p) not in groups:
            continue
        t = float(st["step"])
        beta2 = float(groups[id(p)]["betas"][1])
        out.append(st["exp_avg_sq"].detach() / (1.0 - beta2**t))
    return out


@dataclass
class _Frozen:
    switch_step: int  # the parameter's Adam step count at the switch (bias correction of v)
    v: torch.Tensor | None = None  # the frozen exp_avg_sq (taken lazily from the optimizer state after a resume)
    root: torch.Tensor | None = None  # max(sqrt(v̂_s), floor): the frozen preconditioner without eps


class FrozenSecondMoment:
    """Freeze Adam/AdamW's ``exp_avg_sq`` of chosen parameters; every other part of the update stays the optimizer's.

    Mechanism (the same for the single-tensor, ``foreach`` and ``fused`` implementations): optimizer step hooks.
    The pre-step hook keeps a copy of each frozen parameter and its step count. The optimizer then steps as usual
    (its first moment, step count, lr, weight decay and the other parameters are untouched by this class). The
    post-step hook puts the frozen ``v`` back (bit for bit) and recomputes the frozen parameters' update from the
    saved value with Adam's formula and the frozen preconditioner::

        p ← p_before · (1 − lr·wd)            (AdamW / decoupled weight decay only; Adam's L2 term is in m)
        p ← p − lr / (1 − β1^t) · m / (max(sqrt(v̂_s), floor) + eps),   v̂_s = v_s / (1 − β2^s)

    ``m`` and ``t`` are the optimizer's own, after its step; ``lr``, ``eps`` and ``wd`` are the param group's
    values at this step (an LR scheduler works as usual). A step the optimizer skipped for a parameter (no grad,
    or a ``fused`` step with ``found_inf`` from a GradScaler) leaves the step count unchanged and is skipped here
    too; a GradScaler that skips ``optimizer.step()`` altogether runs neither hook.

    ``floor`` (default ``0.1 · mean(sqrt(v̂_s))`` of each tensor; ``floor_ratio=0`` is STEP's formula exactly): a
    weight whose gradient was (almost) zero during the dense phase (a dead unit, an fp16 gradient that underflowed)
    has ``v_s ≈ 0``; when it gets a gradient after the switch its step ``lr · m / eps`` would be unbounded (measured:
    a ``16-mixed`` run diverged one step after the switch). The floor bounds it at ``lr · m / floor``; the stored
    ``v`` is still exactly the frozen one.

    Call :meth:`attach` to register the hooks (:meth:`freeze` does it), :meth:`detach` to remove them.
    ``state_dict()`` holds the frozen parameters' positions and step counts; their ``v`` lives in the optimizer's
    own state (restored after every step), so a checkpoint of both resumes exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, floor_ratio: float = 0.1) -> None:
        self.optimizer = check_adam(optimizer)
        self.floor_ratio = check_number("FrozenSecondMoment", "floor_ratio", floor_ratio, minimum=0.0)
        self._frozen: dict[torch.Tensor, _Frozen] = {}
        self._before: dict[torch.Tensor, tuple[torch.Tensor, float]] = {}
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ freezing
    def freeze(self, params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Freeze ``v`` of ``params`` now; returns those frozen (a parameter without Adam state yet is skipped).

        Raises ``ValueError`` for a parameter that is not in the optimizer.
        """
        positions = _param_positions(self.optimizer)
        frozen = []
        for i, p in enumerate(params):
            if id(p) not in positions:
                raise ValueError(f"FrozenSecondMoment.freeze: parameter {i} (shape {list(p.shape)}) is not optimized "
                                 f"by this {type(self.optimizer).__name__}")  # fmt: skip
            st = self.optimizer.state.get(p, {})
            if "exp_avg_sq" not in st or p in self._frozen:
                continue
            self._frozen[p] = _Frozen(int(float(st["step"])), st["exp_avg_sq"].detach().clone())
            frozen.append(p)
        self.attach()
        return frozen

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self._frozen)

    def frozen_share(self) -> float:
        """Share of the optimizer's parameter elements whose ``v`` is frozen."""
        total = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        return sum(p.numel() for p in self._frozen) / total if total else 0.0

    def frozen_value(self, p: torch.Tensor) -> torch.Tensor:
        """The frozen ``exp_avg_sq`` of ``p`` (what the optimizer state holds after every step)."""
        entry = self._frozen[p]
        return entry.v if entry.v is not None else self.optimizer.state[p]["exp_avg_sq"]

    def _group(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.optimizer.param_groups if any(q is p for q in g["params"]))

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        if not self._handles and self._frozen:
            self._handles = [
                self.optimizer.register_step_pre_hook(self._pre_step),
                self.optimizer.register_step_post_hook(self._post_step),
            ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._before.clear()

    @torch.no_grad()
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._before.clear()
        for p, entry in self._frozen.items():
            st = optimizer.state.get(p, {})
            if "exp_avg_sq" not in st:
                continue
            if entry.v is None:  # after a resume: the optimizer state holds the frozen v
                entry.v = st["exp_avg_sq"].detach().clone()
            if entry.root is None:
                beta2 = float(self._group(p)["betas"][1])
                root = entry.v.sqrt() / math.sqrt(1 - beta2**entry.switch_step)
                entry.root = root.clamp_(min=float(root.mean()) * self.floor_ratio) if self.floor_ratio else root
            self._before[p] = (p.detach().clone(), float(st["step"]))

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        groups = {p: g for g in optimizer.param_groups for p in g["params"] if p in self._before}
        for p, (before, step_before) in self._before.items():
            st = optimizer.state[p]
            entry = self._frozen[p]
            assert entry.v is not None
            st["exp_avg_sq"].copy_(entry.v)
            t = float(st["step"])
            if t == step_before:  # the optimizer did not step this parameter
                p.copy_(before)
                continue
            g = groups[p]
            lr, eps, wd, beta1 = float(g["lr"]), float(g["eps"]), float(g["weight_decay"]), float(g["betas"][0])
            p.copy_(before)
            if wd != 0 and g.get("decoupled_weight_decay", False):
                p.mul_(1 - lr * wd)
            assert entry.root is not None
            p.addcdiv_(st["exp_avg"], entry.root + eps, value=-lr / (1 - beta1**t))
        self._before.clear()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        positions = _param_positions(self.optimizer)
        return {"version": 1, "frozen": [[*positions[id(p)], e.switch_step] for p, e in self._frozen.items()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Re-freeze the parameters at the saved positions; their ``v`` is read from the optimizer state at the
        next step (load the optimizer's state dict too). Raises ``ValueError`` for a malformed state."""
        if not isinstance(state, Mapping) or state.get("version") != 1 or not isinstance(state.get("frozen"), list):
            raise ValueError(f"unsupported FrozenSecondMoment state: {str(state)[:200]}")
        self.detach()
        self._frozen.clear()
        groups = self.optimizer.param_groups
        for row in state["frozen"]:
            ok = isinstance(row, (list, tuple)) and len(row) == 3 and all(type(x) is int for x in row)
            if not ok or not (0 <= row[0] < len(groups) and 0 <= row[1] < len(groups[row[0]]["params"])):
                raise ValueError(f"FrozenSecondMoment state: entry {row!r} is not a [group, index, step] of this "
                                 f"optimizer ({[len(g['params']) for g in groups]} params per group)")  # fmt: skip
            self._frozen[groups[row[0]]["params"][row[1]]] = _Frozen(row[2])
        self.attach()


class AutoSwitch:
    """When Adam's second-moment estimate has settled: STEP's AutoSwitch idea, as a pure state machine.

    Statistic: every ``window`` optimizer steps, the relative L1 change of the bias-corrected second moment
    ``v̂ = v / (1 − β2^t)`` of the N:M weights since the previous check,
    ``r = Σ|v̂_t − v̂_{t−window}| / Σ|v̂_{t−window}|``. The switch is decided at the first check with
    ``r < threshold`` on ``patience`` consecutive checks, but not before ``min_fraction`` of the budget; at
    ``max_fraction`` of the budget it is forced. The decided step is the step after the deciding check.

    Args:
        threshold: relative change per window below which ``v̂`` counts as settled.
        window: steps between checks (default: 2% of the budget, at least 1).
        patience: consecutive settled checks needed.
        min_fraction, max_fraction: earliest and latest switch as fractions of the budget.

    Caveat: ``r`` falls as the gradient scale stops drifting; a loss that plateaus late, or an LR warm-up longer
    than ``min_fraction``, can make an early ``v̂`` look settled while it is still inflated by early gradients.
    """

    def __init__(
        self,
        threshold: float = 0.1,
        window: int | None = None,
        patience: int = 2,
        min_fraction: float = 0.05,
        max_fraction: float = 0.5,
    ) -> None:
        who = "AutoSwitch"
        self.threshold = check_number(who, "threshold", threshold, minimum=0.0)
        self.window = check_int(who, "window", window, minimum=1, optional=True)
        self.patience = check_int(who, "patience", patience, minimum=1)
        self.min_fraction = check_number(who, "min_fraction", min_fraction, minimum=0.0, maximum=1.0)
        self.max_fraction = check_number(who, "max_fraction", max_fraction, minimum=0.0, maximum=1.0)
        if self.max_fraction < self.min_fraction:
            raise ValueError(f"AutoSwitch max_fraction={max_fraction} is below min_fraction={min_fraction}")
        self.total_steps: int | None = None
        self.reference: list[torch.Tensor] | None = None
        self.reference_step = -1
        self.settled = 0
        self.history: list[tuple[int, float]] = []
        self.decided: int | None = None

    def bind(self, total_steps: int) -> None:
        """Set the budget (optimizer steps); raises ``ValueError`` for a budget that is not a positive int."""
        self.total_steps = check_int("AutoSwitch", "total_steps", total_steps, minimum=1)

    def _every(self) -> int:
        assert self.total_steps is not None, "AutoSwitch.bind(total_steps) first"
        return self.window if self.window is not None else max(1, round(0.02 * self.total_steps))

    def bounds(self) -> tuple[int, int]:
        """The earliest and latest switch steps (>= 1)."""
        assert self.total_steps is not None, "AutoSwitch.bind(total_steps) first"
        lo = max(1, math.ceil(self.min_fraction * self.total_steps))
        return lo, max(lo, math.ceil(self.max_fraction * self.total_steps))

    @torch.no_grad()
    def update(self, step: int, moments: Sequence[torch.Tensor]) -> int | None:
        """Feed the bias-corrected second moments after optimizer step ``step`` (the new ``global_step``).

        Returns the decided switch step once decided (and from then on), else ``None``.
        """
        if self.decided is not None:
            return self.decided
        lo, hi = self.bounds()
        if step >= hi:
            self.decided = step
            return self.decided
        if step % self._every() != 0 or not moments:
            return None
        current = [v.detach().float().clone() for v in moments]
        if self.reference is not None and len(self.reference) == len(current):
            change = sum(float((a - b).abs().sum()) for a, b in zip(current, self.reference, strict=True))
            base = sum(float(b.abs().sum()) for b in self.reference)
            r = change / base if base > 0 else math.inf
            self.history.append((step, r))
            self.settled = self.settled + 1 if r < self.threshold else 0
            if self.settled >= self.patience and step >= lo:
                self.decided = step
        self.reference, self.reference_step = current, step
        return self.decided

    def last_change(self) -> float | None:
        return self.history[-1][1] if self.history else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1, "reference": self.reference, "reference_step": self.reference_step, "settled": self.settled,
            "history": [list(h) for h in self.history], "decided": self.decided,
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != 1:
            raise ValueError(f"unsupported AutoSwitch state: {str(state)[:200]}")
        ref = state.get("reference")
        if ref is not None and not (isinstance(ref, list) and all(isinstance(t, torch.Tensor) for t in ref)):
            raise ValueError("AutoSwitch state: 'reference' must be a list of tensors or None")
        decided = state.get("decided")
        if decided is not None and type(decided) is not int:
            raise ValueError(f"AutoSwitch state: 'decided' must be an int or None, got {decided!r}")
        self.reference = ref
        self.reference_step = int(state.get("reference_step", -1))
        self.settled = int(state.get("settled", 0))
        self.history = [(int(s), float(r)) for s, r in state.get("history", [])]
        self.decided = decided


class StepRecipe:
    """STEP's schedule over N:M layer states: dense (``n = m``) until the switch, then each layer's target N with
    the N:M weights' Adam second moment frozen.

    ``switch_at``: an optimizer step (>= 1), a fraction of the budget in (0, 1), or an :class:`AutoSwitch`.
    ``drive_n=False`` leaves ``n`` to another driver (e.g. a sparsity schedule whose ramp starts at the switch);
    then :meth:`check_dense` reports a layer made sparse before the switch.
    """

    def __init__(self, switch_at: int | float | AutoSwitch, floor_ratio: float = 0.1) -> None:
        self.floor_ratio = floor_ratio
        if isinstance(switch_at, AutoSwitch):
            self.auto: AutoSwitch | None = switch_at
            self.switch_at: int | float | None = None
        else:
            if isinstance(switch_at, bool) or not isinstance(switch_at, (int, float)):
                raise TypeError(f"switch_at must be an int step >= 1, a float fraction in (0, 1) or 'auto', "
                                f"got {switch_at!r}")  # fmt: skip
            if isinstance(switch_at, int) and switch_at < 1:
                raise ValueError(f"switch_at={switch_at} must be >= 1: STEP needs a dense Adam phase before the switch")
            if isinstance(switch_at, float) and not 0.0 < switch_at < 1.0:
                raise ValueError(f"switch_at={switch_at!r} as a fraction of the budget must be in (0, 1)")
            self.auto, self.switch_at = None, switch_at
        self.switch_step: int | None = None  # the step at which the switch happened (or will, when fixed)
        self.switched = False
        self.frozen: FrozenSecondMoment | None = None
        self._watched: list[torch.Tensor] = []
        self._pending_frozen: dict[str, Any] | None = None

    def bind(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | float | None,
        states: Iterable[Any] = (),
        params: Iterable[torch.Tensor] = (),
    ) -> None:
        """Check the optimizer, resolve the switch step from the budget (optimizer steps; ``inf`` if unknown) and,
        before the switch, make the ``states`` dense unless another driver moves their ``n``. ``params``: the N:M
        weights AutoSwitch watches."""
        self.frozen = FrozenSecondMoment(optimizer, self.floor_ratio)
        self._watched = list(params)
        if total_steps is not None and not math.isfinite(total_steps):
            total_steps = None
        if self.auto is not None:
            if total_steps is None:
                raise ValueError("switch_at='auto' needs a finite training budget (max_steps or max_epochs)")
            self.auto.bind(int(total_steps))
            if self.auto.decided is not None:
                self.switch_step = self.auto.decided
        elif self.switch_step is None or not self.switched:
            self.switch_step = resolve_switch_step(self.switch_at, total_steps)  # type: ignore[arg-type]
        if self._pending_frozen is not None:
            self.frozen.load_state_dict(self._pending_frozen)
            self._pending_frozen = None
        states = list(states)
        if not self.switched and not any(s.driver for s in states):
            self.dense_states(states)

    def before_step(self, step: int, states: Sequence[Any], params: Sequence[torch.Tensor]) -> bool:
        """Before optimizer step ``step``: switch when due (returns True then). When another driver moves ``n``
        (``state.driver``), only ``v`` is frozen here and the layers must stay dense until the switch."""
        driven = any(s.driver for s in states)
        if self.due(step):
            if driven and self.auto is not None:
                raise ValueError("recipe='step' with switch_at='auto' cannot tell a sparsity schedule when to start; "
                                 "give switch_at the step where the schedule starts")  # fmt: skip
            self.switch(step, states, params, drive_n=not driven)
            return True
        if not self.switched and driven:
            self.check_dense(states, step)
        return False

    def due(self, step: int) -> bool:
        """Whether the switch happens before optimizer step ``step``."""
        return not self.switched and self.switch_step is not None and step >= self.switch_step

    def switch(self, step: int, states: Iterable[Any], params: Iterable[torch.Tensor], drive_n: bool = True) -> None:
        """Move each state to its target N (``drive_n``) and freeze ``v`` of ``params``."""
        assert self.frozen is not None, "StepRecipe.bind(optimizer, total_steps) first"
        if drive_n:
            for state in states:
                state.set_n(state.target_n)
        self.frozen.freeze(params)
        self.switched, self.switch_step = True, step

    def observe(self, step: int) -> None:
        """After optimizer step ``step`` (the new step count): feed AutoSwitch the N:M weights' ``v̂`` (needs the
        params given to :meth:`switch` earlier or :meth:`watch`)."""
        if self.auto is not None and not self.switched and self.frozen is not None:
            decided = self.auto.update(step, second_moments(self.frozen.optimizer, self._watched))
            if decided is not None:
                self.switch_step = decided

    @staticmethod
    def dense_states(states: Iterable[Any]) -> None:
        for state in states:
            if not state.frozen:
                state.set_n(state.m)

    @staticmethod
    def check_dense(states: Iterable[Any], step: int) -> None:
        sparse = [f"{s.name} ({s.n}:{s.m})" for s in states if s.n != s.m]
        if sparse:
            raise RuntimeError(
                f"recipe='step': layers are sparse at step {step}, before the switch: {', '.join(sparse)}; the "
                "dense phase needs them dense (start the sparsity schedule at the switch step)"
            )

    def metrics(self) -> dict[str, float]:
        out = {"nm/step/switched": float(self.switched)}
        if self.switch_step is not None:
            out["nm/step/switch_step"] = float(self.switch_step)
        if self.frozen is not None:
            out["nm/step/frozen_share"] = self.frozen.frozen_share()
        if self.auto is not None and self.auto.last_change() is not None:
            out["nm/step/variance_change"] = float(self.auto.last_change())  # type: ignore[arg-type]
        return out

    def detach(self) -> None:
        if self.frozen is not None:
            self.frozen.detach()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1, "switched": self.switched, "switch_step": self.switch_step,
            "frozen": self.frozen.state_dict() if self.frozen is not None else self._pending_frozen,
            "auto": self.auto.state_dict() if self.auto is not None else None,
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != 1:
            raise ValueError(f"unsupported STEP recipe state: {str(state)[:200]}")
        switched, step = state.get("switched"), state.get("switch_step")
        if not isinstance(switched, bool) or (step is not None and type(step) is not int):
            raise ValueError(f"STEP recipe state: switched={switched!r}, switch_step={step!r} are malformed")
        if (state.get("auto") is None) != (self.auto is None):
            raise ValueError("STEP recipe state: the checkpoint was written with a different switch_at kind "
                             "('auto' vs a fixed step)")  # fmt: skip
        if self.auto is not None:
            self.auto.load_state_dict(state["auto"])
        self.switched, self.switch_step = switched, step
        self._pending_frozen = state.get("frozen") if switched else None
        if self.frozen is not None and self._pending_frozen is not None:
            self.frozen.load_state_dict(self._pending_frozen)
            self._pending_frozen = None
