"""SparsityScheduler: when and how fast N:M sparsity arrives, and when masks become fixed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nm_lightning.callbacks.base import NMCallback
from nm_lightning.callbacks.srste import SRSTECallback
from nm_lightning.schedules import decay_at, n_at, ramp_fraction, validate_schedule
from nm_lightning.sparsify import SparseLayer, freeze_layers, sparse_layers

__all__ = ["SparsityScheduler"]


class SparsityScheduler(Callback):
    """Drive the N:M layers of an :class:`SRSTECallback` (or any attached N:M layers) over time.

    Before ``start`` the layers are dense (N = M: a dense warm-up with the same parametrization); from
    ``start`` to ``end`` each layer walks from M down to its own target N (the callback's ``n`` or its
    per-layer scheme, e.g. a DominoSearch result) along the ``schedule`` shape; N never increases. The
    SR-STE λ follows ``decay_schedule``. From ``freeze`` on the masks are fixed: pruned weights are zeroed
    and get no gradient, so the model that ends training is the model that is exported.

    Changes happen only at the boundaries chosen by ``unit`` and ``update_every`` (in ``on_train_batch_start``
    for steps, ``on_train_epoch_start`` for epochs). Every distinct N is a new shape for ``torch.compile``
    guards: a layer recompiles once per N it walks through (2:4 from dense: 4→3→2, 3 graphs); use
    ``levels`` (e.g. ``[8, 4, 2]``) to keep that number small.

    Args:
        schedule: ``"constant"``, ``"step"``, ``"linear"`` or ``"cubic"``.
        start: step/epoch where sparsification begins (dense before).
        end: step/epoch where every layer reaches its target (linear/cubic).
        unit: ``"step"`` (optimizer steps) or ``"epoch"``.
        milestones: for ``"step"``: the times at which N drops a level.
        freeze: step/epoch from which masks are fixed (>= the time the target is reached), or None.
        update_every: only change N every this many steps/epochs.
        levels: allowed intermediate N values (the target N is always allowed).
        decay_schedule: ``"constant"``, ``"linear"`` (ramp from ``decay_initial``) or ``"step"``.
        decay_start, decay_end, decay_milestones, decay_factor, decay_initial: the λ schedule's knobs
            (λ's final/base value is the SRSTECallback's ``decay``).
        plot: write a plot of density and λ over time into the log dir at fit start.
    """

    def __init__(
        self,
        schedule: Literal["constant", "step", "linear", "cubic"] = "cubic",
        start: int = 0,
        end: int | None = None,
        unit: Literal["step", "epoch"] = "step",
        milestones: list[int] | None = None,
        freeze: int | None = None,
        update_every: int = 1,
        levels: list[int] | None = None,
        decay_schedule: Literal["constant", "linear", "step"] = "constant",
        decay_start: int | None = None,
        decay_end: int | None = None,
        decay_milestones: list[int] | None = None,
        decay_factor: float = 2.0,
        decay_initial: float = 0.0,
        plot: bool = True,
    ) -> None:
        super().__init__()
        if unit not in ("step", "epoch"):
            raise ValueError(f"SparsityScheduler unit must be 'step' or 'epoch', got {unit!r}")
        validate_schedule(schedule, start, end, milestones)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"SparsityScheduler update_every must be an int >= 1, got {update_every!r}")
        reach = self._reach_time(schedule, start, end, milestones)
        if freeze is not None:
            if isinstance(freeze, bool) or not isinstance(freeze, int) or freeze < 0:
                raise ValueError(f"SparsityScheduler freeze must be an int >= 0 or None, got {freeze!r}")
            if freeze < reach:
                raise ValueError(
                    f"SparsityScheduler freeze={freeze} comes before the target is reached at {reach}: "
                    "a fixed mask could not become sparser"
                )
        if levels is not None and any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in levels):
            raise ValueError(f"SparsityScheduler levels must be ints >= 1, got {levels}")
        if decay_schedule not in ("constant", "linear", "step"):
            raise ValueError(
                f"SparsityScheduler decay_schedule must be 'constant', 'linear' or 'step', got {decay_schedule!r}"
            )
        d_start = start if decay_start is None else decay_start
        d_end = (end if end is not None else reach) if decay_end is None else decay_end
        if decay_schedule == "linear":
            validate_schedule("linear", d_start, d_end, None, what="decay schedule")
        if decay_schedule == "step":
            validate_schedule("step", d_start, None, decay_milestones, what="decay schedule")
        self.schedule, self.start, self.end, self.unit = schedule, start, end, unit
        self.milestones, self.freeze_at, self.update_every, self.levels = milestones, freeze, update_every, levels
        self.decay_schedule, self.decay_start, self.decay_end = decay_schedule, d_start, d_end
        self.decay_milestones, self.decay_factor, self.decay_initial = decay_milestones, decay_factor, decay_initial
        self.plot = plot
        self.targets: dict[str, tuple[int, int]] = {}
        self.srste: SRSTECallback | None = None
        self.layers: dict[str, SparseLayer] = {}
        self._base_decay = 0.0
        self._plotted = False

    @staticmethod
    def _reach_time(schedule: str, start: int, end: int | None, milestones: list[int] | None) -> int:
        if schedule == "step":
            return max(milestones or [0])
        return start if schedule == "constant" else int(end or 0)

    # ------------------------------------------------------------------ wiring
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """All callbacks' ``setup`` ran: find the N:M layers, their targets, and validate them."""
        found = [cb for cb in trainer.callbacks if isinstance(cb, SRSTECallback)]  # type: ignore[attr-defined]
        if len(found) > 1:
            raise MisconfigurationException(
                "SparsityScheduler drives one SRSTECallback; found several "
                f"({[cb.state_key for cb in found]}): use one callback with a per-layer scheme"
            )
        if found:
            self.srste = found[0]
            if self.srste.mode == "fixed" or self.srste.freeze_at_step is not None:
                raise MisconfigurationException(
                    "SparsityScheduler decides when masks become fixed (its `freeze` argument): use "
                    "SRSTECallback(mode='dynamic', freeze_at_step=None) with it"
                )
            self.layers = dict(self.srste.layers)
            self.targets = {p.name: (p.n, p.m) for p in self.srste.plans if p.status == "covered"}
            self._base_decay = self.srste.decay
        else:
            self.layers = sparse_layers(pl_module)
            if not self.targets:  # restored from a checkpoint otherwise
                self.targets = {k: (v.sparsity.n, v.sparsity.m) for k, v in self.layers.items()}
        if not self.layers:
            raise MisconfigurationException(
                "SparsityScheduler found no N:M layers: add an SRSTECallback to the Trainer (or attach N:M "
                "to the model with nm_lightning.attach) before fitting"
            )
        for name, (n, m) in self.targets.items():
            if n == m:
                raise MisconfigurationException(f"SparsityScheduler: layer {name} targets {n}:{m}, which is dense")
            bad = [x for x in self.levels or [] if not n <= x <= m]
            if bad:
                raise MisconfigurationException(
                    f"SparsityScheduler levels {bad} are not reachable for layer {name} ({n}:{m}): "
                    f"allowed N are {n}..{m}"
                )
        self._apply(trainer, self._now(trainer), force=True)
        if self.plot and not self._plotted:
            self._plotted = True
            rank_zero_only(self._save_plot)(trainer)

    def _now(self, trainer: pl.Trainer) -> int:
        return trainer.global_step if self.unit == "step" else trainer.current_epoch

    # ------------------------------------------------------------------ the schedule
    def fraction(self, t: int) -> float:
        return ramp_fraction(t, self.schedule, self.start, self.end, self.milestones)  # type: ignore[arg-type]

    def n_at(self, name: str, t: int) -> int:
        """The scheduled N of layer ``name`` at time ``t`` (only boundaries of ``update_every`` count)."""
        n, m = self.targets[name]
        t_eff = t - (t % self.update_every) if t >= self.start else t
        return n_at(self.fraction(t_eff), m, n, m, self.levels)

    def decay_at(self, t: int) -> float:
        return decay_at(
            t, self._base_decay, self.decay_schedule, self.decay_start, self.decay_end,  # type: ignore[arg-type]
            self.decay_milestones, self.decay_factor, self.decay_initial,
        )  # fmt: skip

    def density_at(self, t: int) -> float:
        total = sum(self.layers[k].original.numel() for k in self.targets)
        kept = sum(self.layers[k].original.numel() * self.n_at(k, t) / m for k, (_, m) in self.targets.items())
        return kept / total if total else 1.0

    def _apply(self, trainer: pl.Trainer, t: int, force: bool = False) -> None:
        changed = {}
        for name, layer in self.layers.items():
            if name not in self.targets or layer.sparsity.frozen:
                continue
            n = self.n_at(name, t)
            if n != layer.sparsity.n:
                layer.sparsity.set_nm(n, layer.sparsity.m)
                changed[name] = n
        if self.srste is not None:
            self.srste.decay = self.decay_at(t)
        if (
            self.freeze_at is not None
            and t >= self.freeze_at
            and not all(layer.sparsity.frozen for layer in self.layers.values())
        ):
            freeze_layers(self.layers.values(), trainer.optimizers)
            rank_zero_info(f"SparsityScheduler: masks fixed at {self.unit} {t}")
        if changed or force:
            values = {"nm/schedule/density": self.density_at(t), "nm/schedule/fraction": self.fraction(t)}
            if self.srste is not None:
                values["nm/schedule/lambda"] = self.srste.decay
            values.update({f"nm/layer/{k}/n": float(v.sparsity.n) for k, v in self.layers.items()})
            NMCallback.log_metrics(trainer, values)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.unit == "step":
            self._apply(trainer, trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch":
            self._apply(trainer, trainer.current_epoch)

    # ------------------------------------------------------------------ state and plot
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "targets": {k: list(v) for k, v in self.targets.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != 1:
            raise ValueError(f"unsupported SparsityScheduler state version {state_dict.get('version')!r}")
        self.targets = {k: (int(v[0]), int(v[1])) for k, v in state_dict["targets"].items()}

    def _horizon(self, trainer: pl.Trainer) -> int:
        reach = self._reach_time(self.schedule, self.start, self.end, self.milestones)
        horizon = max(reach, self.freeze_at or 0) + 1
        if self.unit == "epoch" and trainer.max_epochs and trainer.max_epochs > 0:
            horizon = max(horizon, trainer.max_epochs)
        elif self.unit == "step":
            try:
                horizon = max(horizon, int(trainer.estimated_stepping_batches))
            except Exception:  # noqa: BLE001 - an infinite or unknown length only shortens the plot
                pass
        return horizon

    def _save_plot(self, trainer: pl.Trainer) -> Path:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        ts = list(range(self._horizon(trainer) + 1))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(ts, [self.density_at(t) for t in ts], color="tab:blue", label="density of covered weights")
        ax.set_xlabel(self.unit)
        ax.set_ylabel("density")
        ax.set_ylim(0, 1.05)
        if self.freeze_at is not None:
            ax.axvline(self.freeze_at, color="gray", linestyle="--", label="masks fixed")
        if self.srste is not None:
            ax2 = ax.twinx()
            ax2.plot(ts, [self.decay_at(t) for t in ts], color="tab:red", label="λ (SR-STE decay)")
            ax2.set_ylabel("λ")
            ax2.legend(loc="upper center")
        ax.legend(loc="upper right")
        ax.set_title(f"SparsityScheduler: {self.schedule} from {self.start} to {self.end or self.milestones}")
        fig.tight_layout()
        path = Path(trainer.log_dir or trainer.default_root_dir) / "sparsity_schedule.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
