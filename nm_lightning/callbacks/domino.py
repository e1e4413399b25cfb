"""DominoSearchCallback: search a per-layer N:M scheme for a model-size or FLOPs target during fit."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

import nm_lightning.distributed as distributed
from nm_lightning.accounting import measure_macs
from nm_lightning.callbacks.base import NMCallback, is_model_parallel, selection_args
from nm_lightning.report import print_scheme_table, save_scheme_figure
from nm_lightning.scheme import NMScheme
from nm_lightning.search.domino import DominoLayer, DominoSearch, checks_needed, group_thresholds, powers_of_two
from nm_lightning.sparsify import plain_state_dict
from nm_lightning.validation import (
    check_bool,
    check_choice,
    check_int,
    check_int_list,
    check_number,
    check_path,
    check_writable_dir,
)

__all__ = ["DominoSearchCallback"]

_DOUBLING = (30_000, 40_000, 50_000, 60_000, 70_000, 80_000)


class DominoSearchCallback(NMCallback):
    """DominoSearch (Sun et al., NeurIPS 2021): find a layer-wise N:M scheme from a dense model.

    Add it to a Trainer fitting a pretrained (or briefly trained) dense model, ideally with the paper's
    search recipe (SGD, constant lr 0.01, no momentum, no weight decay). Every covered layer starts at M:M;
    the forward keeps the top ``N_int`` weights per group (pruned ones get no gradient); every
    ``penalty_every`` optimizer steps the kept weights get an L2 shrink ``λ(t)·η_i``; every ``check_every``
    steps each layer votes on lowering ``N_int``; powers of two are committed. When the committed scheme
    meets the target the scheme is written (``output``), shown as a table and a figure in the log dir, and
    fit stops (``trainer.should_stop``). If training ends first, the best scheme so far is written and a
    warning says how far the search got.

    The penalty is added once per optimizer step on the unscaled, averaged gradient (not ×world size, not
    per micro-batch). Checks count optimizer steps (the reference counts batches within an epoch).

    Under FSDP2 (``ModelParallelStrategy``) every rank keeps the thresholds of its own rows, votes on them and
    the vote counts are summed over the ranks, so every rank takes the same decisions as one process would;
    the callback's ``state_dict`` gathers the thresholds (a collective: Lightning calls it on every rank).

    Args:
        target_sparsity: model-size target, fraction of the covered weights removed (e.g. 0.8).
        target_flops: FLOPs-reduction target (0.875 = 8x fewer MACs). Exactly one target.
        m: group size, a power of two (16; 32 for the 93.75% points).
        vote_ratio: fraction of groups that must vote to lower N.
        check_every: optimizer steps between votes (K_c).
        penalty_every: optimizer steps between penalties (k_p).
        penalty: λ at the start; it doubles at ``penalty_doubling`` steps.
        beta_flops: weight of the FLOPs term of η (default 0.5 for a size target, 0.8 for FLOPs).
        erk_sparsity: overall sparsity for the ERK guidance (default: the target value).
        penalty_doubling: optimizer steps at which λ doubles (a safety ramp).
        tolerance: the target counts as met within this margin.
        output: scheme file (.txt DominoSearch format, .json or .yaml); relative to the log dir.
        save_dense: also write ``<output>.dense.pt``, the dense weights the search started from (the
            paper fine-tunes from them: ``SRSTECallback(scheme=..., init_weights=...)``).
        layout, include, exclude, include_types, exclude_types, strict: as in :class:`SRSTECallback`.
        plot: write a figure of the scheme into the log dir.
        verbose: print the coverage and result tables.
        name: distinguishes several instances (state key).
    """

    def __init__(
        self,
        target_sparsity: float | None = None,
        target_flops: float | None = None,
        m: int = 16,
        vote_ratio: float = 0.75,
        check_every: int = 100,
        penalty_every: int = 5,
        penalty: float = 0.1,
        beta_flops: float | None = None,
        erk_sparsity: float | None = None,
        penalty_doubling: list[int] | None = None,
        tolerance: float = 1e-3,
        output: str = "scheme.txt",
        save_dense: bool = True,
        layout: Literal["input_channel", "flat"] = "input_channel",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        include_types: list[str] | None = None,
        exclude_types: list[str] | None = None,
        strict: bool = False,
        plot: bool = True,
        verbose: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        who = "DominoSearchCallback"
        # types here; the ranges of the targets, vote ratio and betas are the search core's (DominoSearch)
        check_number(who, "target_sparsity", target_sparsity, optional=True)
        check_number(who, "target_flops", target_flops, optional=True)
        check_int(who, "m", m, minimum=1)
        powers_of_two(m)
        check_number(who, "vote_ratio", vote_ratio)
        check_int(who, "check_every", check_every, minimum=1)
        check_int(who, "penalty_every", penalty_every, minimum=1)
        check_number(who, "penalty", penalty, minimum=0.0)
        check_number(who, "beta_flops", beta_flops, optional=True)
        check_number(who, "erk_sparsity", erk_sparsity, minimum=0.0, maximum=1.0, optional=True)
        check_int_list(who, "penalty_doubling", penalty_doubling, minimum=0)
        check_number(who, "tolerance", tolerance, minimum=0.0, maximum=1.0)
        if check_path(who, "output", output, optional=False).suffix not in (".txt", ".json", ".yaml", ".yml"):
            raise ValueError(f"DominoSearchCallback output must end in .txt, .json, .yaml or .yml, got {output!r}")
        for flag, value in (("save_dense", save_dense), ("strict", strict), ("plot", plot), ("verbose", verbose)):
            check_bool(who, flag, value)
        self.selection = selection_args(who, include, exclude, include_types, exclude_types)
        self.target_sparsity, self.target_flops = target_sparsity, target_flops
        self.m, self.vote_ratio, self.beta_flops, self.erk_sparsity = m, vote_ratio, beta_flops, erk_sparsity
        self.check_every, self.penalty_every, self.penalty = check_every, penalty_every, float(penalty)
        self.penalty_doubling = sorted(penalty_doubling if penalty_doubling is not None else _DOUBLING)
        self.tolerance, self.output, self.save_dense = tolerance, str(output), save_dense
        self.layout = check_choice(who, "layout", layout, ("input_channel", "flat"))
        self.include, self.exclude = self.selection["include"], self.selection["exclude"]
        self.include_types, self.exclude_types = self.selection["include_types"], self.selection["exclude_types"]
        self.strict, self.plot, self.verbose, self.name = strict, plot, verbose, name
        # validate the targets and betas now, on an empty search
        DominoSearch({}, target_sparsity, target_flops, vote_ratio, beta_flops, erk_sparsity, tolerance)
        self.search: DominoSearch | None = None
        self._initialized = False
        self._finished = False
        self.scheme_path: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, include=self.include, exclude=self.exclude)

    def setup_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = f"size {self.target_sparsity}" if self.target_sparsity is not None else f"FLOPs {self.target_flops}"
        if stage == "fit":
            check_writable_dir("DominoSearchCallback", "output", self._path(trainer, create=False).parent)
        self.attach_layers(
            trainer, pl_module, stage, n=self.m, m=self.m, layout=self.layout, selection=self.selection,
            strict=self.strict, straight_through=False, verbose=self.verbose,
            title=f"DominoSearch N:{self.m} ({target})",
        )  # fmt: skip
        for layer in self.layers.values():
            if layer.state.target_n == layer.state.m:  # a search may take any layer down to 1:M
                layer.state.target_n = 1
        if self.search is None:
            layers = {
                k: DominoLayer(
                    m=self.m, params=v.original.numel(), macs=0.0, n_int=self.m, n_committed=self.m,
                    input_dim=v.state.input_dim,
                )
                for k, v in self.layers.items()
            }
            self.search = DominoSearch(
                layers, self.target_sparsity, self.target_flops, self.vote_ratio, self.beta_flops,
                self.erk_sparsity, self.tolerance,
            )  # fmt: skip

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        assert self.search is not None or not self._initialized
        search = self.search.state_dict() if self._initialized and self.search is not None else None
        if search is not None:
            for name, entry in search["layers"].items():
                entry["thresholds"] = self._full_thresholds(name, entry["thresholds"])
        return {"version": 1, "initialized": self._initialized, "finished": self._finished, "search": search}

    def _thresholds_shape(self, name: str) -> tuple[int, ...]:
        from nm_lightning.masks import group_view

        state = self.layers[name].state
        gv = group_view(state.shape, state.layout)
        return (gv.outer, gv.length // state.m, 1, gv.inner)

    def _group_shape(self, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
        """The weight ``shape`` with the group dim counted in groups: thresholds viewed this way are placed like the
        weight itself (a rank's part of the weight holds whole groups, ``check_placements``)."""
        state = self.layers[name].state
        if state.layout == "flat" or len(shape) <= 1:  # whole rows hold whole groups when dim 0 may be sharded
            row = math.prod(shape[1:])
            if len(shape) > 1 and row % state.m == 0:
                return (shape[0], row // state.m)
            return (math.prod(shape) // state.m,)
        d = state.input_dim
        return (*shape[:d], shape[d] // state.m, *shape[d + 1 :])

    def _full_thresholds(self, name: str, local: torch.Tensor | None) -> torch.Tensor | None:
        """A sharded layer's thresholds gathered from every rank's part (a collective), else unchanged."""
        weight = self.layers[name].original if name in self.layers else None
        if local is None or not distributed.is_dtensor(weight):
            return local
        local_view = local.reshape(self._group_shape(tuple(weight.to_local().shape), name))
        full = distributed.gather_full(
            local_view, mesh=weight.device_mesh, placements=weight.placements,
            shape=self._group_shape(tuple(weight.shape), name),
        )  # fmt: skip
        return full.reshape(self._thresholds_shape(name))

    def _local_thresholds(self, name: str, full: torch.Tensor | None) -> torch.Tensor | None:
        weight = self.layers[name].original if name in self.layers else None
        if full is None or not distributed.is_dtensor(weight):
            return full
        from nm_lightning.masks import group_view

        state, local_shape = self.layers[name].state, tuple(weight.to_local().shape)
        grouped = full.reshape(self._group_shape(tuple(weight.shape), name))
        part = distributed.local_part(grouped, mesh=weight.device_mesh, placements=weight.placements)
        gv = group_view(local_shape, state.layout, state.input_dim)
        return part.reshape(gv.outer, gv.length // state.m, 1, gv.inner).clone()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != 1:
            raise ValueError(f"unsupported DominoSearchCallback state version {state_dict.get('version')!r}")
        self._initialized = bool(state_dict["initialized"])
        self._finished = bool(state_dict["finished"])
        if state_dict["search"] is not None:
            assert self.search is not None, "setup runs before the callback state is restored"
            self.search.load_state_dict(state_dict["search"])
            for name, layer in self.search.layers.items():
                layer.thresholds = self._local_thresholds(name, layer.thresholds)

    # ------------------------------------------------------------------ search
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Thresholds, MACs from a real forward, ERK and the initial η, from the weights at fit start."""
        assert self.search is not None
        example = pl_module.example_input_array
        if example is None:
            example = batch[0] if isinstance(batch, (list, tuple)) else batch
            if not isinstance(example, torch.Tensor):
                raise ValueError(
                    "DominoSearchCallback measures MACs with one forward pass: set `example_input_array` on the "
                    "LightningModule, or make the first element of a training batch the model input"
                )
        example = move_data_to_device(example, pl_module.device)
        macs = measure_macs(pl_module, example, list(self.layers))
        for name, layer in self.layers.items():
            state = self.search.layers[name]
            state.macs = macs[name]
            # this rank's rows under FSDP2 (the whole weight otherwise)
            state.thresholds = group_thresholds(
                distributed.local_view(layer.original), self.m, self.layout, layer.state.input_dim
            )
        self.search.init_erk({k: tuple(v.original.shape) for k, v in self.layers.items()})
        self._initialized = True
        if self.save_dense:
            path = self._path(trainer, suffix=".dense.pt")
            if is_model_parallel(trainer.strategy):  # gather (every rank), rank 0 writes
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                options = StateDictOptions(full_state_dict=True, cpu_offload=True)
                full = get_model_state_dict(pl_module, options=options)
                if trainer.is_global_zero:
                    torch.save(plain_state_dict(full), path)
            else:
                rank_zero_only(torch.save)(plain_state_dict(pl_module), path)
            rank_zero_info(f"DominoSearchCallback: dense starting weights saved to {path}")

    def lam(self, step: int) -> float:
        """λ at optimizer step ``step``: doubled at every passed doubling point."""
        return self.penalty * 2 ** sum(step >= s for s in self.penalty_doubling)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn now when the training budget cannot reach the target (rather than finding nothing at the end)."""
        if self._finished or self.search is None:
            return
        steps = trainer.estimated_stepping_batches
        needed = checks_needed(self.search.target, self.m, self.tolerance)
        if needed is None or not math.isfinite(steps):
            return
        done = sum(layer.m - layer.n_int for layer in self.search.layers.values()) if self._initialized else 0
        available = math.ceil(max(0, int(steps) - trainer.global_step) / self.check_every)
        if available < needed and done == 0:
            what = "sparsity" if self.target_sparsity is not None else "FLOPs reduction"
            rank_zero_warn(
                f"DominoSearchCallback: the budget cannot reach the target: {what} {self.search.target} at m={self.m} "
                f"needs at least {needed} vote rounds (N drops by one per round and only powers of two are committed),"
                f" i.e. >= {needed * self.check_every} optimizer steps at check_every={self.check_every}, but this fit "
                f"has {int(steps)} steps ({available} rounds). Raise max_steps/max_epochs or lower check_every; "
                "otherwise the search ends with fewer commits than the target needs (possibly none)."
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._initialized:
            self._start(trainer, pl_module, batch)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        search = self.search
        if search is None or self._finished:
            return
        step = trainer.global_step
        if step % self.penalty_every == 0 and self.penalty > 0:
            lam = self.lam(step)
            with torch.no_grad():
                for name, layer in self.layers.items():
                    w = layer.original
                    if w.grad is not None and search.layers[name].eta != 0.0:
                        # a bool-mask multiply: several times faster than torch.where on CPU; local rows under FSDP2
                        grad, weight, mask = distributed.decay_operands(w.grad, w, layer.sparsity.mask)
                        grad.add_(weight * mask, alpha=lam * search.layers[name].eta)
        if step % self.check_every == 0:
            weights = {k: distributed.local_view(v.original) for k, v in self.layers.items()}
            reduce = self._reduce()
            if reduce is None:
                changed = search.check(weights, self.layout, step)
            else:  # sharded rows: vote counts summed over the ranks
                changed = search.check(weights, self.layout, step, reduce=reduce)
            for name in changed:
                self.layers[name].state.set_n(search.layers[name].n_int)
            self.log_metrics(trainer, self.metrics(step))
            if search.done:
                self._finish(trainer, pl_module, reached=True)

    def _reduce(self) -> Any:
        """The vote-count reduction over the ranks holding parts of the layers (``None`` when nothing is sharded).

        Under tensor parallelism a layer outside the plan is whole on every rank: summing its counts over the ranks
        multiplies both counts by the world size, which leaves the vote fraction exactly unchanged.
        """
        shards = {layer.sparsity.shard for layer in self.layers.values()}
        if shards != {None}:
            if None in shards or len({(s.group, s.world) for s in shards if s is not None}) != 1:
                raise RuntimeError("DominoSearchCallback: all searched layers must be sharded over one process group")
            return distributed.sum_over(next(s for s in shards if s is not None))
        placed = [layer.original for layer in self.layers.values() if distributed.is_dtensor(layer.original)]
        meshes = {w.device_mesh for w in placed}
        if not meshes:
            return None
        if any(mesh.ndim > 1 for mesh in meshes):
            # a 2-D mesh: a layer's parts are spread over all the ranks (a layer outside the tensor-parallel plan,
            # sharded on the data-parallel mesh only, counts tensor_parallel_size times: the fraction is unchanged)
            return distributed.sum_over(None)
        if len(meshes) != 1:
            raise RuntimeError("DominoSearchCallback: all searched layers must be placed on one device mesh")
        return distributed.sum_over(next(iter(meshes)).get_group())

    def metrics(self, step: int) -> dict[str, float]:
        """Search progress at optimizer step ``step`` (logged at every check)."""
        assert self.search is not None
        out = {
            "nm/domino/sparsity": self.search.sparsity(),
            "nm/domino/flops_reduction": self.search.flops_reduction(),
            "nm/domino/target": self.search.target,
            "nm/domino/lambda": self.lam(step),
        }
        for name, layer in self.search.layers.items():
            out[f"nm/layer/{name}/n_int"] = float(layer.n_int)
            out[f"nm/layer/{name}/n"] = float(layer.n_committed)
            out[f"nm/layer/{name}/eta"] = layer.eta
        return out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._finished and self._initialized:
            assert self.search is not None
            rank_zero_warn(
                f"DominoSearchCallback: training ended before the target was met: reached "
                f"{self.search.progress():.4f} of {self.search.target} "
                f"({'sparsity' if self.target_sparsity is not None else 'FLOPs reduction'}) after "
                f"{len(self.search.commits)} commits; writing the best scheme so far"
            )
            self._finish(trainer, pl_module, reached=False)

    def _path(self, trainer: pl.Trainer, suffix: str | None = None, create: bool = True) -> Path:
        path = Path(self.output)
        if not path.is_absolute():
            path = Path(trainer.log_dir or trainer.default_root_dir) / path
        if suffix is not None:
            path = path.with_suffix(suffix)
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reached: bool) -> None:
        assert self.search is not None
        self._finished = True
        scheme = NMScheme(self.search.scheme())
        path = self._path(trainer)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            scheme.save(path, model=pl_module)
            if self.verbose:
                print_scheme_table(self.search, f"DominoSearch result ({'target met' if reached else 'best so far'})")
            if self.plot:
                save_scheme_figure(self.search, path.with_suffix(".png"))
        trainer.strategy.barrier()
        self.scheme_path = path
        rank_zero_info(
            f"DominoSearchCallback: scheme with sparsity {self.search.sparsity():.4f}, FLOPs reduction "
            f"{self.search.flops_reduction():.4f} written to {path}"
        )
        if reached:
            trainer.should_stop = True
