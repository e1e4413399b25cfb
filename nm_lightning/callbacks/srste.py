"""SRSTECallback: N:M sparse training (SR-STE, STE, fixed mask) on any LightningModule."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nm_lightning.callbacks.base import NMCallback, export_gathered, selection_args
from nm_lightning.callbacks.calibration import one_shot_at_fit_start
from nm_lightning.distributed import decay_operands, is_dtensor, local_part, local_view
from nm_lightning.export.artifacts import FORMATS, check_formats
from nm_lightning.masks import validate_nm
from nm_lightning.metrics import mask_flips, nonzero_count
from nm_lightning.oneshot import METHODS as ONE_SHOT_METHODS
from nm_lightning.oneshot import OneShotReport
from nm_lightning.optim import AUTO_DECAY_C, AutoSwitch, StepRecipe, auto_decay, optimizer_holding, peak_lr
from nm_lightning.report import coverage
from nm_lightning.scheme import NMScheme
from nm_lightning.sparsify import freeze_layers, load_plain_weights, plan_layers
from nm_lightning.srste import add_decay_, recompute_masked_weights
from nm_lightning.validation import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_path,
    check_writable_dir,
)

__all__ = ["SRSTECallback"]


class SRSTECallback(NMCallback):
    """Train N:M sparse weights with SR-STE (Zhou et al., ICLR 2021); no change to the model code.

    In ``setup`` (or right after ``configure_model`` when the module builds its layers there) every selected
    Linear/Conv1d/2d/3d/MultiheadAttention weight gets an N:M parametrization (same Parameter objects). Each
    training forward keeps the ``n`` largest-|w| weights of every group of ``m``; the dense weight gets
    the straight-through gradient plus ``decay·(1−E)⊙W``, added once per optimizer step on the unscaled,
    reduced gradient. ``decay=0`` is plain STE. ``mode="fixed"`` computes the mask once (ASP-style
    fine-tuning: pruned weights are zeroed and get no gradient); ``freeze_at_step`` or :meth:`freeze`
    fixes the mask mid-run.

    Setting λ (``decay``): its effect grows with learning rate × number of steps, so set
    ``decay = c / (lr · total_steps)``. The paper's 2e-4 at lr 0.1 for ~600k ImageNet steps is c ≈ 12; on
    MNIST-1D the validation optimum was c ≈ 0.1–0.3 (``benchmarks/RESULTS.md``). Pick c on a validation
    split, and watch ``nm/flip_rate``: it should fall towards zero as training ends.

    Checkpoints hold the *plain* model's keys with masked weights (``Model.load_from_checkpoint`` works
    on the never-sparsified class with ``strict=True``); the dense weights, masks and per-layer N:M go to
    ``checkpoint["nm_lightning"]``, from which a resumed run continues bit for bit.

    Args:
        n: weights kept in every group.
        m: group size.
        decay: SR-STE λ on pruned weights (0 = STE).
        layout: ``"input_channel"`` (hardware 2:4 pattern) or ``"flat"`` (reference code grouping).
        include: name globs of layers to cover (default: all of the selected types).
        exclude: name globs of layers to leave dense.
        include_types: layer types to cover (default Linear, Conv1d/2d/3d, MultiheadAttention).
        exclude_types: layer types to leave dense.
        scheme: per-layer ``{name: [n, m]}``, or a scheme file (JSON, YAML or DominoSearch text, e.g. the
            output of :class:`DominoSearchCallback`); then only these layers are covered.
        mode: ``"dynamic"`` (mask recomputed every step) or ``"fixed"`` (mask computed once at setup).
        freeze_at_step: optimizer step at which the dynamic mask becomes fixed.
        strict: raise instead of reporting when a selected layer cannot be made N:M.
        log_layers: also log per-layer metrics (``nm/layer/<name>/...``).
        verbose: print the coverage table at fit start.
        name: distinguishes several SRSTECallbacks on one Trainer (part of the checkpoint state key).
        init_weights: a plain state dict file (e.g. the dense weights a DominoSearch started from) loaded
            into the model with ``strict=True`` before sparsifying, at the start of ``fit``.
        export_dir: at ``on_fit_end`` write the deployable artifacts there (relative to the log dir):
            dense-with-zeros state dict, packed N:M file, CUTLASS 2:4 file and ``scheme.json``
            (:func:`nm_lightning.export_artifacts`; rank 0 writes, barriers around the I/O).
        export_formats: subset of ``["dense", "packed", "semi_structured"]`` (default: all).
        one_shot: prune the plain model once at the start of ``fit``, before SR-STE (or ``mode="fixed"``) takes
            over: ``"sparsegpt"`` (Frantar & Alistarh 2023: OBS weight update from the layers' input Hessians),
            ``"wanda"`` (|W|·‖X‖) or ``"magnitude"`` (:func:`nm_lightning.prune_one_shot`), on exactly the layers
            this callback covers, each at its own n:m. Not run when resuming from a checkpoint. The model is on the
            CPU at that point (Lightning moves it to the device later), so calibrate on a few batches.
        calibration_batches: how many of the first training batches calibrate the one-shot pruning (taken from
            the module's or datamodule's ``train_dataloader``, the same on every rank).
        calibration_input: a function ``batch -> model input``; by default a tensor batch is the input, a
            ``(x, y, ...)`` tuple gives ``x``, a dict is passed as keyword arguments without its label keys.
            The model is called as ``pl_module(input)`` (``*input`` for a tuple, ``**input`` for a dict).
        recompute_masked: between forward and backward keep only the bool mask (1 byte per weight) instead
            of the 4-byte masked weight, and rebuild it exactly in backward (saved-tensor hooks active
            during each training batch). Layers placed by tensor parallelism keep their masked weight (autograd
            saves it as a ``DTensor``, which the hooks leave as is): the saving applies to the other layers.
        recipe: ``"srste"`` (N:M from the start) or ``"step"`` (STEP, for Adam/AdamW: dense until the switch,
            then N:M with the N:M weights' Adam second moment frozen; :mod:`nm_lightning.optim`).
        switch_at: with ``recipe="step"``: an optimizer step (>= 1), a fraction of the budget in (0, 1),
            ``"auto"`` (default; :class:`~nm_lightning.optim.AutoSwitch` defaults) or an ``AutoSwitch``.
        decay_c: compute λ at fit start as ``decay_c / (lr · total_steps)`` from the trainer's budget
            (``estimated_stepping_batches``) and the peak lr (``initial_lr`` of an LR scheduler, else ``lr``)
            of the optimizer holding the N:M weights; ``decay="auto"`` is ``decay_c=0.2``.
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        decay: float | Literal["auto"] = 2e-4,
        layout: Literal["input_channel", "flat"] = "input_channel",
        include: list[str] | str | None = None,
        exclude: list[str] | str | None = None,
        include_types: list[str] | str | None = None,
        exclude_types: list[str] | str | None = None,
        scheme: dict[str, tuple[int, int]] | str | None = None,
        mode: Literal["dynamic", "fixed"] = "dynamic",
        freeze_at_step: int | None = None,
        strict: bool = False,
        log_layers: bool = True,
        verbose: bool = True,
        name: str | None = None,
        init_weights: str | None = None,
        export_dir: str | None = None,
        export_formats: list[str] | None = None,
        recompute_masked: bool = True,
        one_shot: Literal["sparsegpt", "wanda", "magnitude"] | None = None,
        calibration_batches: int = 8,
        calibration_input: Callable[[Any], Any] | None = None,
        recipe: Literal["srste", "step"] = "srste",
        switch_at: int | float | str | AutoSwitch | None = None,
        decay_c: float | None = None,
    ) -> None:
        super().__init__()
        who = "SRSTECallback"
        self.recipe = check_choice(who, "recipe", recipe, ("srste", "step"))
        if decay == "auto" or decay_c is not None:
            if decay not in ("auto", 2e-4):
                raise ValueError(f"{who}: give decay={decay!r} or decay_c={decay_c!r}, not both")
            self.decay_c: float | None = check_number(who, "decay_c", AUTO_DECAY_C if decay_c is None else decay_c,
                                                      minimum=0.0)  # fmt: skip
            decay = 0.0  # set at fit start from the budget
        else:
            self.decay_c = None
        self._step = self._step_recipe(who, recipe, switch_at, mode)
        # the request: read once, when the layers' N:M states are created (they own n from then on)
        self.n, self.m, self.layout = validate_nm(n, m, layout)
        self.decay = check_number(who, "decay", decay, minimum=0.0)
        self.mode = check_choice(who, "mode", mode, ("dynamic", "fixed"))
        self.freeze_at_step = check_int(who, "freeze_at_step", freeze_at_step, minimum=0, optional=True)
        self.strict = check_bool(who, "strict", strict)
        self.log_layers = check_bool(who, "log_layers", log_layers)
        self.verbose = check_bool(who, "verbose", verbose)
        self.recompute_masked = check_bool(who, "recompute_masked", recompute_masked)
        self.selection = selection_args(who, include, exclude, include_types, exclude_types)
        self.include, self.exclude = self.selection["include"], self.selection["exclude"]
        self.include_types, self.exclude_types = self.selection["include_types"], self.selection["exclude_types"]
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{who} name must be a string or None, got {name!r}")
        self.name = name
        self.scheme_arg = scheme
        self.scheme: NMScheme | None = None
        if isinstance(scheme, (str, Path)):
            if not Path(scheme).is_file():
                raise FileNotFoundError(f"{who} scheme file not found: {scheme}")
            # a file is read in setup: the DominoSearch format needs the model to map its names
        elif isinstance(scheme, Mapping):
            self.scheme = NMScheme(scheme)
        elif scheme is not None:
            raise TypeError(
                f"{who} scheme must be a mapping {{layer: (n, m)}} or a scheme file path (JSON, YAML or DominoSearch "
                f"text), got {scheme!r} ({type(scheme).__name__})"
            )
        init = check_path(who, "init_weights", init_weights)
        if init is not None and not init.is_file():
            raise FileNotFoundError(f"{who} init_weights file not found: {init}")
        self.init_weights = init_weights
        self.export_dir = check_path(who, "export_dir", export_dir)
        self.export_formats = None if export_formats is None else check_formats(export_formats)
        self.one_shot = None if one_shot is None else check_choice(who, "one_shot", one_shot, ONE_SHOT_METHODS)
        self.calibration_batches = check_int(who, "calibration_batches", calibration_batches, minimum=1)
        if calibration_input is not None and not callable(calibration_input):
            raise TypeError(
                f"{who} calibration_input must be a function batch -> model input, got {calibration_input!r}"
            )
        self.calibration_input = calibration_input
        self.one_shot_report: OneShotReport | None = None
        self._saved_hooks: Any = None
        self._first_masks: dict[str, torch.Tensor] | None = None
        self._prev_masks: dict[str, torch.Tensor] | None = None
        self._last_step = -1

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, include=self.include, exclude=self.exclude)

    @staticmethod
    def _step_recipe(who: str, recipe: str, switch_at: Any, mode: str) -> StepRecipe | None:
        if recipe == "srste":
            if switch_at is not None:
                raise ValueError(f"{who} switch_at={switch_at!r} needs recipe='step'")
            return None
        if mode == "fixed":
            raise ValueError(f"{who}: recipe='step' trains dense first; it cannot use mode='fixed'")
        if switch_at is None or switch_at == "auto":
            switch_at = AutoSwitch()
        elif isinstance(switch_at, str):
            raise ValueError(f"{who} switch_at must be an int step, a float fraction or 'auto', got {switch_at!r}")
        return StepRecipe(switch_at)

    def state_dict(self) -> dict[str, Any]:
        out = {"version": 2, "first_masks": self._first_masks, "prev_masks": self._prev_masks}
        return out if self._step is None else {**out, "step": self._step.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") not in (1, 2):
            raise ValueError(f"unsupported SRSTECallback state version {state_dict.get('version')!r}")
        self._first_masks = state_dict.get("first_masks")
        self._prev_masks = state_dict.get("prev_masks")
        if self._step is not None and "step" in state_dict:
            self._step.load_state_dict(state_dict["step"])
        elif self._step is not None:
            raise ValueError("SRSTECallback(recipe='step'): the checkpoint was written without recipe='step'")

    def layer_nm(self) -> dict[str, tuple[int, int]]:
        """Current ``(n, m)`` of every attached layer (read from the layers' states)."""
        return {k: (v.state.n, v.state.m) for k, v in self.layers.items()}

    def current_decay(self) -> float:
        """The λ the next optimizer step applies: ``decay`` times the layers' schedule factor (1 without one)."""
        scales = {layer.state.decay_scale for layer in self.layers.values()} or {1.0}
        return self.decay * max(scales)

    # ------------------------------------------------------------------ attach
    def setup_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.export_dir is not None:
            check_writable_dir("SRSTECallback", "export_dir", self._export_path(trainer))
        if self.init_weights is not None and stage == "fit" and not self.layers:
            load_plain_weights(pl_module, self.init_weights)
        if isinstance(self.scheme_arg, (str, Path)) and self.scheme is None:
            self.scheme = NMScheme.load(self.scheme_arg, model=pl_module)
        if self.one_shot is not None and stage == "fit" and not self.layers and trainer.ckpt_path is None:
            # prune exactly the layers SR-STE will cover, each at its own n:m, before attaching
            plans = plan_layers(pl_module, self.n, self.m, self.layout, scheme=self.scheme, **self.selection)
            covered = {p.name: (p.n, p.m) for p in plans if p.state is not None}
            self.one_shot_report = one_shot_at_fit_start(
                trainer, pl_module, method=self.one_shot, count=self.calibration_batches,
                to_input=self.calibration_input, n=self.n, m=self.m, scheme=covered, layout=self.layout,
            )  # fmt: skip
        self.attach_layers(
            trainer, pl_module, stage, n=self.n, m=self.m, layout=self.layout, selection=self.selection,
            scheme=self.scheme, strict=self.strict, verbose=self.verbose,
            title=f"SR-STE (λ={self.decay:g}, {self.mode} mask)",
        )  # fmt: skip
        if self.mode == "fixed":
            self.freeze()

    def _export_path(self, trainer: pl.Trainer) -> Path:
        assert self.export_dir is not None
        out = self.export_dir
        return out if out.is_absolute() else Path(trainer.log_dir or trainer.default_root_dir) / out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is None:
            return
        export_gathered(trainer, pl_module, self._export_path(trainer), self.export_formats or FORMATS)

    # ------------------------------------------------------------------ mask freeze
    def freeze(self, trainer: pl.Trainer | None = None) -> None:
        """Fix every layer's current mask: pruned weights become exactly zero and get no gradient.

        Optimizer state of pruned entries (momentum, Adam moments) is zeroed too, so nothing revives
        them; pass the ``trainer`` when its optimizers already exist.
        """
        freeze_layers(self.layers.values(), trainer.optimizers if trainer is not None else ())
        rank_zero_info(f"SRSTECallback: masks of {len(self.layers)} layers are now fixed")

    @property
    def frozen(self) -> bool:
        return bool(self.layers) and all(layer.sparsity.frozen for layer in self.layers.values())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        driven = sorted({layer.state.driver for layer in self.layers.values() if layer.state.driver})
        if driven and (self.mode == "fixed" or self.freeze_at_step is not None):
            raise MisconfigurationException(
                f"{', '.join(driven)} decides when masks become fixed (its `freeze` argument): use "
                "SRSTECallback(mode='dynamic', freeze_at_step=None) with it"
            )
        super().on_train_start(trainer, pl_module)
        self._start_budget(trainer)

    # ------------------------------------------------------------------ λ from the budget, STEP (nm_lightning.optim)
    def _start_budget(self, trainer: pl.Trainer) -> None:
        if self.decay_c is None and self._step is None:
            return
        params = [layer.original for layer in self.layers.values()]
        opt, total = optimizer_holding(trainer.optimizers, params), trainer.estimated_stepping_batches
        if self.decay_c is not None:
            lr = peak_lr(opt, params)
            self.decay = auto_decay(self.decay_c, lr, int(total) if total != float("inf") else 0)
            rank_zero_info(f"SRSTECallback: λ = {self.decay_c:g} / (lr {lr:g} · {int(total)} steps) = {self.decay:.4g}")
            self.log_metrics(trainer, {"nm/lambda": self.decay})
        if self._step is not None:
            self._step.bind(opt, total, [layer.state for layer in self.layers.values()], params)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.recompute_masked and self._saved_hooks is None:
            self._saved_hooks = recompute_masked_weights()
            self._saved_hooks.__enter__()  # left in on_train_batch_end, after this batch's backward
        if self._step is not None and self._step.before_step(
            trainer.global_step, [x.state for x in self.layers.values()], [x.original for x in self.layers.values()]
        ):
            rank_zero_info(f"SRSTECallback: STEP switch at step {trainer.global_step} (Adam second moment frozen)")
            self.log_metrics(trainer, self._step.metrics())
        if self.freeze_at_step is not None and trainer.global_step >= self.freeze_at_step and not self.frozen:
            self.freeze(trainer)

    # ------------------------------------------------------------------ SR-STE decay, once per optimizer step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.decay == 0.0:
            return
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for layer in self.layers.values():
            w = layer.original
            if layer.state.frozen or w.grad is None or id(w) not in in_opt:
                continue
            add_decay_(*decay_operands(w.grad, w, layer.sparsity.mask), self.decay * layer.state.decay_scale)

    def _leave_saved_hooks(self) -> None:
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._leave_saved_hooks()
        if self._step is not None:
            self._step.detach()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._step is not None:
            self._step.detach()  # the optimizer's step hooks go; the state stays for a later fit

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._leave_saved_hooks()
        if trainer.global_step == self._last_step:
            return  # accumulating: no optimizer step yet
        self._last_step = trainer.global_step
        if self._step is not None:
            self._step.observe(trainer.global_step)
        with torch.no_grad():
            for layer in self.layers.values():
                if layer.sparsity.frozen:  # whatever the optimizer did, pruned weights stay exactly zero
                    mask = local_part(layer.sparsity.mask, layer.original)
                    local_view(layer.original).masked_fill_(~mask, 0)
        if self._first_masks is None:
            self._first_masks = {k: v.sparsity.mask.detach().cpu().clone() for k, v in self.layers.items()}
        every = max(1, trainer.log_every_n_steps)
        if trainer.global_step % every == 0 and trainer.loggers:
            self._log(trainer)
        # the next logged step compares against the masks of this step
        if (trainer.global_step + 1) % every == 0:
            self._prev_masks = {k: v.sparsity.mask.detach().cpu().clone() for k, v in self.layers.items()}

    # ------------------------------------------------------------------ telemetry
    def metrics(self) -> dict[str, float]:
        """Current sparsity, flip-rate and λ metrics (the values logged under ``nm/``).

        Local counts only (no collective call): every rank holds the same masks, and this runs on rank 0 alone.
        """
        out: dict[str, float] = {}
        nnz = total = 0
        flips = {"flip_rate": 0, "flip_rate_since_start": 0}
        for name, layer in self.layers.items():
            mask = layer.sparsity.mask.detach().cpu()
            # a sharded weight's other parts live on other ranks: count the kept entries of the replicated mask
            sharded = layer.sparsity.shard is not None or is_dtensor(layer.original)
            layer_nnz = int(mask.sum()) if sharded else nonzero_count(layer.original.detach().cpu(), mask)
            numel = mask.numel()
            nnz, total = nnz + layer_nnz, total + numel
            if self.log_layers:
                out[f"nm/layer/{name}/sparsity"] = 1.0 - layer_nnz / numel
                out[f"nm/layer/{name}/n"] = float(layer.state.n)
            for store, key in ((self._prev_masks, "flip_rate"), (self._first_masks, "flip_rate_since_start")):
                if store is not None and name in store:
                    changed = mask_flips(store[name], mask)
                    flips[key] += changed
                    if self.log_layers:
                        out[f"nm/layer/{name}/{key}"] = changed / numel
        out["nm/sparsity"] = 1.0 - nnz / total if total else 0.0
        out["nm/covered_share"] = coverage(self.plans, self._model_params)["covered_share"]
        if self._prev_masks is not None:
            out["nm/flip_rate"] = flips["flip_rate"] / max(1, total)
        if self._first_masks is not None:
            out["nm/flip_rate_since_start"] = flips["flip_rate_since_start"] / max(1, total)
        out["nm/frozen"] = float(self.frozen)
        out["nm/lambda"] = self.current_decay()
        if self._step is not None:
            out.update(self._step.metrics())
        return out

    def _log(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:
            self.log_metrics(trainer, self.metrics())
