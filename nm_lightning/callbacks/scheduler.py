"""SparsityScheduler: when and how fast N:M sparsity arrives, and when masks become fixed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nm_lightning.callbacks.base import log_metrics
from nm_lightning.schedules import decay_at, n_at, ramp_fraction, validate_schedule
from nm_lightning.sparsify import SparseLayer, freeze_layers, sparse_layers
from nm_lightning.validation import check_bool, check_choice, check_int, check_int_list, check_number

__all__ = ["SparsityScheduler"]


class SparsityScheduler(Callback):
    """Drive the N:M layers attached by an SR-STE callback (or :func:`nm_lightning.attach`) over time.

    It works one way, on the layers' shared N:M state (as ``torch.ao.pruning``'s scheduler drives a sparsifier):
    in ``setup`` (or at fit start, when the layers are built in ``configure_model``) it marks the layers it drives
    (``state.driver``), then moves each layer's current ``n`` and its λ factor (``state.decay_scale``). It never
    reads or writes another callback's attributes, and no callback imports it.

    Before ``start`` the layers are dense (N = M: a dense warm-up with the same parametrization); from
    ``start`` to ``end`` each layer walks from M down to its own target N (``state.target_n``: the callback's
    ``n`` or its per-layer scheme, e.g. a DominoSearch result) along the ``schedule`` shape; N never increases.
    The SR-STE λ is the callback's ``decay`` times the factor of ``decay_schedule``. From ``freeze`` on the
    masks are fixed: pruned weights are zeroed and get no gradient, so the model that ends training is the
    model that is exported.

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
        decay_start, decay_end, decay_milestones, decay_factor, decay_initial: the λ schedule's knobs, as a factor
            on the SR-STE callback's ``decay`` (``decay_initial=0.1`` starts the ramp at a tenth of it; the
            ``step`` schedule multiplies by ``decay_factor`` at each milestone).
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
        who = "SparsityScheduler"
        check_choice(who, "unit", unit, ("step", "epoch"))
        validate_schedule(schedule, start, end, milestones)
        check_int(who, "update_every", update_every, minimum=1)
        reach = self._reach_time(schedule, start, end, milestones)
        check_int(who, "freeze", freeze, minimum=0, optional=True)
        if freeze is not None and freeze < reach:
            raise ValueError(
                f"SparsityScheduler freeze={freeze} comes before the target is reached at {reach}: "
                "a fixed mask could not become sparser"
            )
        check_int_list(who, "levels", levels, minimum=1)
        check_choice(who, "decay_schedule", decay_schedule, ("constant", "linear", "step"))
        check_number(who, "decay_factor", decay_factor, minimum=0.0)
        check_number(who, "decay_initial", decay_initial, minimum=0.0)
        check_bool(who, "plot", plot)
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
        self.layers: dict[str, SparseLayer] = {}
        self._plotted = False

    @staticmethod
    def _reach_time(schedule: str, start: int, end: int | None, milestones: list[int] | None) -> int:
        if schedule == "step":
            return max(milestones or [0])
        return start if schedule == "constant" else int(end or 0)

    # ------------------------------------------------------------------ wiring
    @property
    def name(self) -> str:
        return type(self).__name__

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Mark the layers this scheduler drives (when they exist already; else at fit start)."""
        if stage == "fit":
            self._wire(pl_module)

    def _wire(self, pl_module: pl.LightningModule) -> None:
        # layers trained with the straight-through rule (SR-STE/STE); a DominoSearch drives its own
        self.layers = {k: v for k, v in sparse_layers(pl_module).items() if v.state.straight_through}
        owners = sorted({str(v.state.owner) for v in self.layers.values() if v.state.owner is not None})
        if len(owners) > 1:
            raise MisconfigurationException(
                f"SparsityScheduler drives one SR-STE callback; found several ({owners}): use one callback with a "
                "per-layer scheme"
            )
        for layer in self.layers.values():
            if layer.state.driver not in (None, self.name):
                raise MisconfigurationException(f"layer {layer.name} is already driven by {layer.state.driver}")
            layer.state.driver = self.name

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """All callbacks' ``setup`` and the module's ``configure_model`` ran: wire, validate, apply time 0."""
        self._wire(pl_module)
        if not self.layers:
            raise MisconfigurationException(
                "SparsityScheduler found no N:M layers: add an SRSTECallback to the Trainer (or attach N:M "
                "to the model with nm_lightning.attach) before fitting"
            )
        for name, layer in self.layers.items():
            n, m = layer.state.target_n, layer.state.m
            if layer.state.frozen and n != m:
                raise MisconfigurationException(
                    f"SparsityScheduler decides when masks become fixed (its `freeze` argument), but layer {name} is "
                    "fixed already: use SRSTECallback(mode='dynamic', freeze_at_step=None) with it"
                )
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

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hand the layers back: the λ factor returns to 1 and nothing is marked as driven any more."""
        for layer in self.layers.values():
            layer.state.decay_scale = 1.0
            if layer.state.driver == self.name:
                layer.state.driver = None

    def _now(self, trainer: pl.Trainer) -> int:
        return trainer.global_step if self.unit == "step" else trainer.current_epoch

    # ------------------------------------------------------------------ the schedule
    def fraction(self, t: int) -> float:
        return ramp_fraction(t, self.schedule, self.start, self.end, self.milestones)  # type: ignore[arg-type]

    def n_at(self, name: str, t: int) -> int:
        """The scheduled N of layer ``name`` at time ``t`` (only boundaries of ``update_every`` count)."""
        state = self.layers[name].state
        n, m = state.target_n, state.m
        t_eff = t - (t % self.update_every) if t >= self.start else t
        return n_at(self.fraction(t_eff), m, n, m, self.levels)

    def decay_at(self, t: int) -> float:
        """The factor on the SR-STE λ at time ``t``."""
        return decay_at(
            t, 1.0, self.decay_schedule, self.decay_start, self.decay_end,  # type: ignore[arg-type]
            self.decay_milestones, self.decay_factor, self.decay_initial,
        )  # fmt: skip

    def density_at(self, t: int) -> float:
        total = sum(layer.original.numel() for layer in self.layers.values())
        kept = sum(layer.original.numel() * self.n_at(k, t) / layer.state.m for k, layer in self.layers.items())
        return kept / total if total else 1.0

    def _apply(self, trainer: pl.Trainer, t: int, force: bool = False) -> None:
        changed = {}
        factor = self.decay_at(t)
        for name, layer in self.layers.items():
            layer.state.decay_scale = factor
            if layer.state.frozen:
                continue
            n = self.n_at(name, t)
            if n != layer.state.n:
                layer.state.set_n(n)
                changed[name] = n
        if (
            self.freeze_at is not None
            and t >= self.freeze_at
            and not all(layer.sparsity.frozen for layer in self.layers.values())
        ):
            freeze_layers(self.layers.values(), trainer.optimizers)
            rank_zero_info(f"SparsityScheduler: masks fixed at {self.unit} {t}")
        if changed or force:
            values = {"nm/schedule/density": self.density_at(t), "nm/schedule/fraction": self.fraction(t),
                      "nm/schedule/decay_factor": factor}  # fmt: skip
            values.update({f"nm/layer/{k}/n": float(v.state.n) for k, v in self.layers.items()})
            log_metrics(trainer, values)

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
        # everything it needs lives in the layers' N:M states (in the checkpoint) or is a function of time
        return {"version": 2}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") not in (1, 2):
            raise ValueError(f"unsupported SparsityScheduler state version {state_dict.get('version')!r}")

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
        ax2 = ax.twinx()
        ax2.plot(ts, [self.decay_at(t) for t in ts], color="tab:red", label="λ factor (× SR-STE decay)")
        ax2.set_ylabel("λ / decay")
        ax2.legend(loc="upper center")
        ax.legend(loc="upper right")
        ax.set_title(f"SparsityScheduler: {self.schedule} from {self.start} to {self.end or self.milestones}")
        fig.tight_layout()
        path = Path(trainer.log_dir or trainer.default_root_dir) / "sparsity_schedule.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
