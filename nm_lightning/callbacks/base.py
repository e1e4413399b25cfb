"""What every N:M callback shares: attaching (in ``setup``, or after ``configure_model``), plain-key checkpoints,
exact and validated resume, the fit-start table, logging; FSDP2 or tensor parallelism through
``ModelParallelStrategy`` (alone or both on a 2-D mesh)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.nn.parameter import is_lazy

import nm_lightning.distributed as distributed
from nm_lightning.callbacks.checkpoint_guard import guard_checkpoint_loading
from nm_lightning.callbacks.model_parallel import (
    drop_pending,
    export_gathered,
    is_model_parallel,
    load_full_into_shards,
    missing_attach_error,
    model_parallel_mode,
    register_pending,
    sharded_plain_weights,
)
from nm_lightning.masks import Layout
from nm_lightning.report import print_layer_table, table_title
from nm_lightning.sparsify import (
    LayerPlan,
    SparseLayer,
    as_patterns,
    attach,
    bind_shards,
    bind_tensor_parallel,
    detach,
    materialize_lazy,
    plan_layers,
    saved_states,
    sparse_layers,
    split_state_dict,
)
from nm_lightning.sparsify.state_dict import nm_keys

__all__ = [
    "CHECKPOINT_KEY",
    "NMCallback",
    "check_strategy",
    "export_gathered",
    "is_model_parallel",
    "log_metrics",
    "selection_args",
]

CHECKPOINT_KEY = "nm_lightning"
# strategies that flatten parameters into shards: an N:M group would straddle ranks
_FLATTENING: tuple[type[Strategy], ...] = (FSDPStrategy, DeepSpeedStrategy)


def check_strategy(strategy: Strategy, who: str, model_parallel: bool = True) -> None:
    """Refuse (by type, subclasses included) the strategies whose flattened shards split N:M groups across ranks
    (FSDP1 and DeepSpeed ZeRO), and ``ModelParallelStrategy`` when ``model_parallel`` is false."""
    if isinstance(strategy, _FLATTENING):
        raise MisconfigurationException(
            f"{who} does not support {type(strategy).__name__} (it flattens parameters into shards in which N:M "
            "groups straddle ranks); use ModelParallelStrategy with fully_shard applied per layer in "
            "configure_model (FSDP2: rows are sharded, groups stay whole), 'ddp', 'ddp_spawn' or a single device"
        )
    if isinstance(strategy, ModelParallelStrategy) and not model_parallel:
        raise MisconfigurationException(
            f"{who} does not support {type(strategy).__name__} yet; use 'ddp', 'ddp_spawn' or a single device"
        )


def log_metrics(trainer: pl.Trainer, values: Mapping[str, float]) -> None:
    """Straight to the Trainer's loggers (allowed in every hook, unlike ``pl_module.log``).

    Values must already be computed on every rank; this does no collective call, so it may run on rank 0 alone.
    """
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(dict(values), step=trainer.global_step)


def selection_args(owner: str, include: Any, exclude: Any, include_types: Any, exclude_types: Any) -> dict[str, Any]:
    """The layer-selection arguments, checked at construction (one string is one pattern)."""
    return {
        "include": as_patterns(include, f"{owner} include"),
        "exclude": as_patterns(exclude, f"{owner} exclude"),
        "include_types": as_patterns(include_types, f"{owner} include_types"),
        "exclude_types": as_patterns(exclude_types, f"{owner} exclude_types"),
    }


class NMCallback(Callback):
    """Base of the N:M callbacks. Subclasses implement :meth:`setup_layers` and call :meth:`attach_layers` there.

    Lightning calls the callbacks' ``setup`` before the module's ``configure_model``, so for a module that
    overrides ``configure_model`` (layers built there) attaching waits until right after it: before the
    strategy wraps the module, the optimizers are built and a checkpoint is restored.

    Under ``ModelParallelStrategy`` with FSDP2 (``tensor_parallel_size=1``) the layers are attached in ``setup``,
    *before* ``configure_model`` applies ``fully_shard`` (FSDP2 then shards the parametrization's ``original`` and
    hands the parametrization the unsharded weight in each forward); right after ``configure_model`` each layer is
    bound to its row shard (:func:`nm_lightning.sparsify.parametrization.bind_shards`). A selectable layer that
    only appears in ``configure_model`` is an error there.

    With tensor parallelism (``data_parallel_size=1``, ``configure_model`` applies ``parallelize_module``) the
    order is the opposite: torch's parallel styles cannot shard a parametrized layer, so the layers are attached
    right after ``configure_model``, on the placed ``DTensor`` weights (``Shard(0)``: ``ColwiseParallel``,
    ``Shard(1)``: ``RowwiseParallel``, plain or ``Replicate``: outside the plan); every placement is checked then
    (a ``RowwiseParallel`` slice that is not a multiple of M is an error naming the layer, the slice and M), and
    each forward masks the local shard (:func:`nm_lightning.sparsify.parametrization.bind_tensor_parallel`). The
    Parameter objects stay the same, so the optimizers built later are unaffected.

    On a 2-D mesh (``parallelize_module`` on the tensor-parallel mesh, then ``fully_shard`` on the data-parallel
    one) the attach must happen between the two: ``setup`` registers it on the module and ``configure_model`` runs
    it by calling :func:`nm_lightning.attach_pending` (as under tensor parallelism: placed weights, placements
    checked); right after ``configure_model`` a missing call is an error naming the line to add, and the 2-D
    placements are checked. FSDP2 hands the parametrization the tensor-parallel ``DTensor`` in each forward.
    """

    plans: list[LayerPlan]
    layers: dict[str, SparseLayer]
    #: whether the callback supports ``ModelParallelStrategy`` (FSDP2)
    supports_model_parallel: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.plans = []
        self.layers = {}
        self._model_params = 0
        self._plan_args: dict[str, Any] = {}
        self._requested: dict[str, Any] = {}
        self._show_table = False
        self._title = "N:M sparsity"

    @property
    def owner(self) -> str:
        return self.state_key

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, type(self).__name__, self.supports_model_parallel)
        if is_model_parallel(trainer.strategy):
            mode = model_parallel_mode(trainer.strategy, type(self).__name__)
            # a sharded checkpoint folder is unpickled by torch.distributed.checkpoint: check it before it is read
            guard_checkpoint_loading(trainer.strategy)
            # the checkpoint's state_dict has the plain keys; the N:M entries are loaded in on_load_checkpoint
            pl_module.strict_loading = False
            if mode == "2d":
                # parallelize_module, attach, fully_shard: configure_model calls nm_lightning.attach_pending between
                self._pending_ran = False
                register_pending(pl_module, lambda: self._attach_pending(trainer, pl_module, stage))
                self._after_configure_model(pl_module, lambda: self._bind_2d(trainer, pl_module))
                return
            if mode == "tensor_parallel":
                # parallelize_module cannot shard a parametrized layer: attach on the placed weights after it
                self._after_configure_model(pl_module, lambda: self._attach_placed(trainer, pl_module, stage))
                return
            # FSDP2: attach before fully_shard (configure_model), bind the shards right after it
            self._setup_now(trainer, pl_module, stage)
            self._after_configure_model(pl_module, lambda: self._bind_shards(trainer, pl_module, stage))
        elif is_overridden("configure_model", pl_module):
            # its layers may not exist yet
            self._after_configure_model(pl_module, lambda: self._setup_now(trainer, pl_module, stage))
        else:
            self._setup_now(trainer, pl_module, stage)

    @staticmethod
    def _after_configure_model(pl_module: pl.LightningModule, then: Any) -> None:
        """Run ``then()`` right after the module's ``configure_model`` and before the strategy wraps the module.

        Registering a parametrization resets the Parameter's gradient accumulator (``set_``), so attaching after
        DDP has wrapped the module would silently disconnect DDP's gradient all-reduce from those weights.
        The wrapper is an instance attribute that removes itself when called.
        """
        inner = pl_module.configure_model

        def configure_model() -> None:
            pl_module.__dict__.pop("configure_model", None)
            inner()
            then()

        pl_module.configure_model = configure_model  # type: ignore[method-assign]

    def _bind_shards(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After ``configure_model`` under ``ModelParallelStrategy``: refuse layers built there, bind row shards."""
        late = [
            p.name for p in plan_layers(pl_module, owner=self.owner, **self._plan_args)
            if p.status == "covered" and p.name not in self.layers and not self._planned(p.name)
        ]  # fmt: skip
        if late:
            raise MisconfigurationException(
                f"{type(self).__name__}: layers {late} were built in configure_model; under ModelParallelStrategy "
                "N:M must be attached before fully_shard: build the layers in __init__ and only apply fully_shard "
                "in configure_model"
            )
        try:
            bind_shards(pl_module)
        except distributed.ShardingError as err:
            raise MisconfigurationException(f"{type(self).__name__}: {err}") from None
        # the configuration a sharded-folder resume is checked against (the folder's states replace these on load)
        self._requested = {layer.fqn: dataclasses.replace(layer.state) for layer in self.layers.values()}

    def _attach_placed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After ``configure_model`` under tensor parallelism: attach on the placed weights, check the placements."""
        self._setup_now(trainer, pl_module, stage)
        try:
            bind_tensor_parallel(pl_module)
        except distributed.ShardingError as err:
            raise MisconfigurationException(f"{type(self).__name__}: {err}") from None
        self._requested = {layer.fqn: dataclasses.replace(layer.state) for layer in self.layers.values()}

    def _attach_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Under a 2-D mesh, from ``nm_lightning.attach_pending`` in ``configure_model``: attach on the
        tensor-parallel placed weights (before ``fully_shard``), check the placements."""
        self._attach_placed(trainer, pl_module, stage)
        self._pending_ran = True

    def _bind_2d(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After ``configure_model`` under a 2-D mesh: the attach must have run; check the 2-D placements."""
        if not self._pending_ran:
            drop_pending(pl_module)
            raise missing_attach_error(type(self).__name__, trainer.strategy)
        try:
            for layer in self.layers.values():
                distributed.check_placements(layer.state, layer.original)
        except distributed.ShardingError as err:
            raise MisconfigurationException(f"{type(self).__name__}: {err}") from None

    def _planned(self, name: str) -> bool:
        return any(p.name == name for p in self.plans)

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
        selection: Mapping[str, Any],
        scheme: Mapping[str, tuple[int, int]] | None = None,
        strict: bool = False,
        straight_through: bool = True,
        title: str = "N:M sparsity",
        verbose: bool = True,
    ) -> None:
        """Plan and attach N:M to ``pl_module`` (idempotent across stages), report what was skipped and why.

        The table is printed at ``on_train_start``, once every callback has set the layers' current N (a schedule
        starts dense), so its title says what the run really starts with.
        """
        name = type(self).__name__
        self._plan_args = {"n": n, "m": m, "layout": layout, "scheme": scheme, **selection}
        self.plans = plan_layers(pl_module, n, m, layout, scheme=scheme, owner=self.owner, **selection)
        skipped = [p for p in self.plans if p.status == "skipped"]
        if skipped and strict:
            detail = "; ".join(f"{p.name}: {p.reason}" for p in skipped)
            raise MisconfigurationException(f"{name}(strict=True): layers cannot be made N:M: {detail}")
        self.layers = attach(pl_module, self.plans, owner=self.owner, straight_through=straight_through)
        if not self.layers:
            why = "; ".join(f"{p.name} ({p.type_name}): {p.reason}" for p in self.plans) or "the model has no weights"
            where = (
                " (under ModelParallelStrategy with FSDP2 N:M is attached in setup, before configure_model: build "
                "the layers in __init__ and only apply fully_shard in configure_model)"
                if is_model_parallel(trainer.strategy) and model_parallel_mode(trainer.strategy, name) == "fsdp2"
                else ""
            )  # fmt: skip
            raise MisconfigurationException(
                f"{name} found no layer to sparsify ({len(skipped)} skipped, "
                f"{sum(p.status == 'excluded' for p in self.plans)} excluded): {why[:2000]}; "
                f"check include/exclude/include_types/scheme{where}"
            )
        for p in skipped:
            rank_zero_warn(f"{name}: {p.name} ({p.type_name} {p.shape}) stays dense: {p.reason}")
        self._model_params = sum(p.numel() for p in pl_module.parameters() if not is_lazy(p))
        self._title = title
        self._show_table = self._show_table or (stage == "fit" and verbose)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._show_table:
            self._show_table = False
            title = table_title(self._title, [layer.state for layer in self.layers.values()])
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

    log_metrics = staticmethod(log_metrics)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keep the plain model's keys (masked weights) in ``state_dict``; the exact N:M state goes aside.

        A sharded state dict (``ModelParallelStrategy(save_distributed_checkpoint=True)``: ``DTensor`` values, saved
        by torch.distributed.checkpoint as a folder) keeps the module's own keys, which the folder must hold for the
        strategy to restore the model, and gains the plain keys with the masked weights (as ``DTensor`` s).
        """
        sd = checkpoint["state_dict"]
        entry = checkpoint.setdefault(CHECKPOINT_KEY, {"version": 1, "state": {}})
        if any(distributed.is_dtensor(v) for v in sd.values()):
            sd.update(sharded_plain_weights(self.layers.values(), sd))
            entry["sharded"] = True
            return
        plain, nm_entries = split_state_dict(sd)
        checkpoint["state_dict"] = plain
        entry["state"].update(nm_entries)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore dense weights, masks and N:M states of this callback's layers exactly, after checking them."""
        entry = checkpoint.get(CHECKPOINT_KEY)
        name = type(self).__name__
        if entry is None:
            rank_zero_warn(
                f"{name}: the checkpoint has no N:M state (a plain/dense checkpoint); "
                "weights were loaded and masks recomputed from them"
            )
            return
        if not isinstance(entry, Mapping) or entry.get("version") != 1 or not isinstance(entry.get("state"), Mapping):
            raise ValueError(f"{name}: unsupported nm_lightning checkpoint entry (version {_version(entry)!r})")
        if entry.get("sharded"):
            # a sharded folder: the strategy restored the module's own keys (N:M states included) already
            loaded = {layer.fqn: layer.state for layer in self.layers.values()}
            self._check_resume_matches(pl_module, loaded, requested=self._requested)
            return
        self._check_resume_matches(pl_module, saved_states(entry["state"]))
        keys = [k for layer in self.layers.values() for k in nm_keys(layer.fqn)[1:]]
        missing = sorted({layer.name for layer in self.layers.values() for k in nm_keys(layer.fqn)[1:]
                          if k not in entry["state"]})  # fmt: skip
        if missing:
            raise RuntimeError(
                f"{name}: the checkpoint lacks N:M state for {missing}; was it written with the same layers sparsified?"
            )
        if is_model_parallel(trainer.strategy):
            load_full_into_shards(self.layers.values(), entry["state"])
        else:
            pl_module.load_state_dict({k: entry["state"][k] for k in keys}, strict=False)

    def _check_resume_matches(
        self, pl_module: pl.LightningModule, saved: Mapping[str, Any], requested: Mapping[str, Any] | None = None
    ) -> None:
        """Refuse, naming layer and values, a checkpoint written with another N:M configuration.

        Loading it would silently switch layers to the checkpoint's N:M (or fail deep inside with a shape
        error); to start a new run from its weights, load them as plain weights instead. The current N may
        differ (a schedule or a search moves it); the target, M, layout and mode may not. ``requested`` holds the
        configured states when the layers' own states were replaced by the checkpoint's already (a sharded folder).
        """
        name = type(self).__name__
        hint = (
            "resume with the configuration the checkpoint was written with, or start a new run from its weights "
            "(SRSTECallback(init_weights=...) or `Model.load_from_checkpoint`)"
        )
        here = {layer.fqn for layer in sparse_layers(pl_module).values()}
        dense_here = sorted(saved[fqn].name for fqn in set(saved) - here)
        if dense_here:
            raise RuntimeError(f"{name}: the checkpoint has N:M state for {dense_here}, which are dense here; {hint}")
        problems = []
        for layer in self.layers.values():
            old, now = saved.get(layer.fqn), (requested or {}).get(layer.fqn, layer.state)
            if old is None:
                continue  # reported as missing state
            if (old.m, old.layout, old.input_dim) != (now.m, now.layout, now.input_dim):
                problems.append(f"{layer.name}: m={old.m}, layout={old.layout!r} in the checkpoint, "
                                f"m={now.m}, layout={now.layout!r} here")  # fmt: skip
            if old.target_n != now.target_n:
                problems.append(f"{layer.name}: {old.target_n}:{old.m} in the checkpoint, {now.target_n}:{now.m} here")
            if now.frozen and not old.frozen:
                problems.append(f"{layer.name}: a dynamic mask in the checkpoint, a fixed mask here (mode='fixed')")
        if problems:
            raise RuntimeError(f"{name}: the checkpoint's N:M state does not match: {'; '.join(problems)}; {hint}")


def _version(entry: Any) -> Any:
    return entry.get("version") if isinstance(entry, Mapping) else type(entry).__name__
