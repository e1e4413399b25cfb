"""What every N:M callback shares: attaching (in ``setup``, or after ``configure_model``), plain-key checkpoints,
exact resume, logging."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.nn.parameter import is_lazy

from nm_lightning.masks import Layout
from nm_lightning.report import print_layer_table
from nm_lightning.sparsify import (
    LayerPlan,
    SparseLayer,
    attach,
    detach,
    materialize_lazy,
    plan_layers,
    saved_nm_layers,
    sparse_layers,
    split_state_dict,
)

__all__ = ["CHECKPOINT_KEY", "NMCallback"]

CHECKPOINT_KEY = "nm_lightning"
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


class NMCallback(Callback):
    """Base of the N:M callbacks. Subclasses implement :meth:`setup_layers` and call :meth:`attach_layers` there.

    Lightning calls the callbacks' ``setup`` before the module's ``configure_model``, so for a module that
    overrides ``configure_model`` (layers built there) attaching waits until right after it: before the
    strategy wraps the module, the optimizers are built and a checkpoint is restored.
    """

    plans: list[LayerPlan]
    layers: dict[str, SparseLayer]

    def __init__(self) -> None:
        super().__init__()
        self.plans = []
        self.layers = {}
        self._model_params = 0
        self._table_shown = False

    @property
    def owner(self) -> str:
        return self.state_key

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if is_overridden("configure_model", pl_module):
            self._attach_after_configure_model(trainer, pl_module, stage)  # its layers may not exist yet
        else:
            self._setup_now(trainer, pl_module, stage)

    def _attach_after_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Run the attach right after the module's ``configure_model`` and before the strategy wraps the module.

        Registering a parametrization resets the Parameter's gradient accumulator (``set_``), so attaching after
        DDP has wrapped the module would silently disconnect DDP's gradient all-reduce from those weights.
        The wrapper is an instance attribute that removes itself when called.
        """
        inner = pl_module.configure_model

        def configure_model() -> None:
            pl_module.__dict__.pop("configure_model", None)
            inner()
            self._setup_now(trainer, pl_module, stage)

        pl_module.configure_model = configure_model  # type: ignore[method-assign]

    def setup_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Plan and attach this callback's layers (called once the model is complete)."""
        raise NotImplementedError

    def _setup_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        example = pl_module.example_input_array
        if example is not None:
            lazy = materialize_lazy(pl_module, move_data_to_device(example, pl_module.device))
            if lazy:
                rank_zero_info(f"{type(self).__name__}: initialized lazy modules {lazy} with `example_input_array`")
        self.setup_layers(trainer, pl_module, stage)

    def attach_layers(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: str,
        *,
        n: int,
        m: int,
        layout: Layout,
        include: list[str] | None,
        exclude: list[str] | None,
        include_types: list[str] | None,
        exclude_types: list[str] | None,
        scheme: Mapping[str, tuple[int, int]] | None = None,
        strict: bool = False,
        straight_through: bool = True,
        title: str = "N:M sparsity",
        verbose: bool = True,
    ) -> None:
        """Plan and attach N:M to ``pl_module`` (idempotent across stages), report what was skipped and why."""
        name = type(self).__name__
        strategy = type(trainer.strategy).__name__
        if strategy in _SHARDED:
            raise MisconfigurationException(
                f"{name} does not support {strategy} yet (sharded parameters hide whole N:M groups); "
                "use 'ddp', 'ddp_spawn' or a single device"
            )
        self.plans = plan_layers(
            pl_module, n, m, layout, include=include, exclude=exclude, include_types=include_types,
            exclude_types=exclude_types, scheme=scheme, owner=self.owner,
        )  # fmt: skip
        skipped = [p for p in self.plans if p.status == "skipped"]
        if skipped and strict:
            detail = "; ".join(f"{p.name}: {p.reason}" for p in skipped)
            raise MisconfigurationException(f"{name}(strict=True): layers cannot be made N:M: {detail}")
        self.layers = attach(pl_module, self.plans, layout, owner=self.owner, straight_through=straight_through)
        if not self.layers:
            raise MisconfigurationException(
                f"{name} found no layer to sparsify "
                f"({len(skipped)} skipped, {sum(p.status == 'excluded' for p in self.plans)} excluded); "
                "check include/exclude/include_types/scheme"
            )
        for p in skipped:
            rank_zero_warn(f"{name}: {p.name} ({p.type_name} {p.shape}) stays dense: {p.reason}")
        self._model_params = sum(p.numel() for p in pl_module.parameters() if not is_lazy(p))
        if stage == "fit" and verbose and not self._table_shown:
            self._table_shown = True
            rank_zero_only(print_layer_table)(self.plans, title, self._model_params)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Under a multiprocessing launcher (``ddp_spawn``, ``ddp_fork``) hand the masked weights back.

        The launcher copies the worker's ``state_dict`` into the caller's (never sparsified) model with
        ``strict=False``, which would silently drop every parametrized weight. Detaching in the worker at the
        end of fit leaves plain keys with the N:M-masked weights, so the caller's model receives the sparse
        model (resume from the checkpoints, which keep the full N:M state).
        """
        if stage == "fit" and isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            detach(pl_module, owner=self.owner)
            self.layers = {}

    @staticmethod
    def log_metrics(trainer: pl.Trainer, values: Mapping[str, float]) -> None:
        """Straight to the Trainer's loggers (allowed in every hook, unlike ``pl_module.log``)."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(dict(values), step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keep the plain model's keys (masked weights) in ``state_dict``; the exact N:M state goes aside."""
        plain, nm_entries = split_state_dict(checkpoint["state_dict"])
        checkpoint["state_dict"] = plain
        entry = checkpoint.setdefault(CHECKPOINT_KEY, {"version": 1, "state": {}})
        entry["state"].update(nm_entries)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore dense weights, masks and per-layer N:M of this callback's layers exactly."""
        entry = checkpoint.get(CHECKPOINT_KEY)
        name = type(self).__name__
        if entry is None:
            rank_zero_warn(
                f"{name}: the checkpoint has no N:M state (a plain/dense checkpoint); "
                "weights were loaded and masks recomputed from them"
            )
            return
        if entry.get("version") != 1:
            raise ValueError(f"unsupported nm_lightning checkpoint version {entry.get('version')!r}")
        self._check_resume_matches(trainer, pl_module, saved_nm_layers(entry["state"]))
        prefixes = tuple(_state_prefix(layer) for layer in self.layers.values())
        mine = {k: v for k, v in entry["state"].items() if k.startswith(prefixes)}
        result = pl_module.load_state_dict(mine, strict=False)
        missing = [k for k in result.missing_keys if k.startswith(prefixes)]
        if missing:
            layers = sorted({k.split(".parametrizations")[0] for k in missing})
            raise RuntimeError(
                f"{name}: the checkpoint lacks N:M state for {layers}; was it written with the same layers sparsified?"
            )


    def expected_n(self, trainer: pl.Trainer, name: str) -> int | None:
        """The N a resumed layer must have, or ``None`` when N legitimately changes during the run."""
        return None

    def _check_resume_matches(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, saved: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Refuse, naming layer and values, a checkpoint written with another N:M configuration.

        Loading it would silently switch layers to the checkpoint's N:M (or fail deep inside with a shape
        error); to start a new run from its weights, load them as plain weights instead.
        """
        name = type(self).__name__
        hint = (
            "resume with the configuration the checkpoint was written with, or start a new run from its weights "
            "(SRSTECallback(init_weights=...) or `Model.load_from_checkpoint`)"
        )
        dense_here = sorted(set(saved) - set(sparse_layers(pl_module)))
        if dense_here:
            raise RuntimeError(f"{name}: the checkpoint has N:M state for {dense_here}, which are dense here; {hint}")
        problems = []
        for key, layer in self.layers.items():
            if key not in saved:
                continue  # reported below as missing state
            old, sp = saved[key], layer.sparsity
            if (old["m"], old["layout"]) != (sp.m, sp.layout):
                problems.append(f"{key}: m={old['m']}, layout={old['layout']!r} in the checkpoint, "
                                f"m={sp.m}, layout={sp.layout!r} here")  # fmt: skip
            n = self.expected_n(trainer, key)
            if n is not None and old["n"] != n:
                problems.append(f"{key}: {old['n']}:{old['m']} in the checkpoint, {n}:{sp.m} here")
            if sp.frozen and not old["frozen"]:
                problems.append(f"{key}: a dynamic mask in the checkpoint, a fixed mask here (mode='fixed')")
        if problems:
            raise RuntimeError(f"{name}: the checkpoint's N:M state does not match: {'; '.join(problems)}; {hint}")


def _state_prefix(layer: SparseLayer) -> str:
    head = f"{layer.module_name}." if layer.module_name else ""
    return f"{head}parametrizations.{layer.param_name}."
