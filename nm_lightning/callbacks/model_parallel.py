"""What the N:M callbacks need under Lightning's ``ModelParallelStrategy``: which sharding is used (FSDP2 alone,
tensor parallelism alone, or both on a 2-D mesh), checkpoint translation between sharded layers and full or
sharded files, and the gathered export.

FSDP2 (``tensor_parallel_size=1``): N:M is attached in the callback's ``setup``, before ``configure_model``
applies ``fully_shard``, and the row shards are bound after it. Tensor parallelism (``data_parallel_size=1``):
N:M is attached right after ``configure_model`` applied ``parallelize_module`` (torch's parallel styles cannot
shard a parametrized layer), on the placed ``DTensor`` weights, whose placements are checked then
(``RowwiseParallel`` needs per-rank input slices that are multiples of M). 2-D mesh (both sizes above 1,
``configure_model`` applies ``parallelize_module`` then ``fully_shard``): N:M must be attached between the two, so
``configure_model`` calls :func:`attach_pending` there, which runs the attaches the callbacks registered in
``setup`` (on the tensor-parallel placed weights, placements checked); FSDP2 then shards
``parametrizations.<param>.original`` on the data-parallel mesh and hands the parametrization the tensor-parallel
``DTensor`` in each forward. The mechanism (masks of each rank's
part, all-gathered bool masks) is :mod:`nm_lightning.distributed`; :class:`~nm_lightning.callbacks.base.NMCallback`
calls these helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import nm_lightning.distributed as distributed
from nm_lightning.export.artifacts import check_formats, export_artifacts
from nm_lightning.masks import nm_mask
from nm_lightning.sparsify import SparseLayer
from nm_lightning.sparsify.state_dict import check_mask, nm_keys

__all__ = [
    "attach_pending",
    "export_gathered",
    "is_model_parallel",
    "load_full_into_shards",
    "mesh_sizes",
    "missing_attach_error",
    "model_parallel_mode",
    "register_pending",
    "sharded_plain_weights",
]


def is_model_parallel(strategy: Strategy) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallelism)."""
    return isinstance(strategy, ModelParallelStrategy)


_PENDING = "_nm_lightning_pending_attach"


def model_parallel_mode(strategy: ModelParallelStrategy, who: str) -> Literal["fsdp2", "tensor_parallel", "2d"]:
    """Which sharding the callbacks follow under ``ModelParallelStrategy``: ``"fsdp2"`` (``tensor_parallel_size=1``:
    attach before ``configure_model``, bind row shards after it), ``"tensor_parallel"`` (``data_parallel_size=1``:
    attach after ``configure_model``, on the placed weights) or ``"2d"`` (both above 1: attach inside
    ``configure_model``, where it calls :func:`attach_pending` between ``parallelize_module`` and ``fully_shard``).
    ``who`` names the callback in errors."""
    del who
    mesh = strategy.device_mesh
    names = mesh.mesh_dim_names or ()
    tp = mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
    dp = mesh["data_parallel"].size() if "data_parallel" in names else 1
    if tp == 1:
        return "fsdp2"
    if dp == 1:
        return "tensor_parallel"
    return "2d"


def mesh_sizes(strategy: ModelParallelStrategy) -> tuple[int, int]:
    """``(data_parallel_size, tensor_parallel_size)`` of the strategy's device mesh."""
    mesh = strategy.device_mesh
    names = mesh.mesh_dim_names or ()
    return tuple(mesh[n].size() if n in names else 1 for n in ("data_parallel", "tensor_parallel"))  # type: ignore[return-value]


def register_pending(module: torch.nn.Module, attach_fn: Callable[[], None]) -> None:
    """Register an N:M attach to run when ``configure_model`` calls :func:`attach_pending` (2-D mesh only)."""
    module.__dict__.setdefault(_PENDING, []).append(attach_fn)


def drop_pending(module: torch.nn.Module) -> bool:
    """Forget the attaches still pending on ``module``; whether there were any."""
    return bool(module.__dict__.pop(_PENDING, None))


def attach_pending(module: torch.nn.Module) -> None:
    """Attach the N:M sparsity of every N:M callback to ``module`` now; call it in ``configure_model`` under a 2-D
    mesh (``ModelParallelStrategy`` with ``data_parallel_size > 1`` and ``tensor_parallel_size > 1``), right after
    ``parallelize_module(...)`` and before ``fully_shard(...)``::

        def configure_model(self):
            parallelize_module(self, self.device_mesh["tensor_parallel"], plan)
            nm_lightning.attach_pending(self)  # N:M on the tensor-parallel weights, before FSDP2 shards them
            for layer in self.layers:
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self, mesh=self.device_mesh["data_parallel"])

    torch's parallel styles cannot shard a parametrized layer, and ``fully_shard`` needs the parametrization
    attached before it, so the attach must happen between the two. Each callback attaches on the placed weights
    and checks their placements (``RowwiseParallel`` slices must be multiples of M). Without a 2-D mesh (FSDP2
    alone, tensor parallelism alone, no mesh) it does nothing: the callbacks attach by themselves, so one
    ``configure_model`` serves every layout. Forgetting it under a 2-D mesh is an error right after
    ``configure_model``, naming this line.
    """
    from torch.distributed.fsdp import FSDPModule

    pending = module.__dict__.pop(_PENDING, None)
    if not pending:
        return
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        raise MisconfigurationException(
            "nm_lightning.attach_pending was called after fully_shard; under a 2-D mesh call it in configure_model "
            "right after parallelize_module(...) and before fully_shard(...)"
        )
    for attach_fn in pending:
        attach_fn()


def missing_attach_error(who: str, strategy: ModelParallelStrategy) -> MisconfigurationException:
    """The error when ``configure_model`` did not call :func:`attach_pending` under a 2-D mesh."""
    dp, tp = mesh_sizes(strategy)
    return MisconfigurationException(
        f"{who}: under a 2-D mesh (data_parallel_size={dp}, tensor_parallel_size={tp}) N:M must be attached between "
        "parallelize_module and fully_shard, and configure_model did not do it: add "
        "`nm_lightning.attach_pending(self)` in configure_model right after `parallelize_module(...)` and before "
        "the first `fully_shard(...)`"
    )


def export_gathered(
    trainer: pl.Trainer, pl_module: pl.LightningModule, out_dir: Path, formats: Sequence[str], **kwargs: Any
) -> dict[str, Any] | None:
    """Write the export files once (rank 0); call it on every rank from ``on_fit_end``.

    Under ``ModelParallelStrategy`` the full state dict is gathered first (``get_model_state_dict`` with
    ``full_state_dict=True, cpu_offload=True``: a collective; the full tensors land on rank 0's CPU only), then
    rank 0 writes the same files as a single-process run; elsewhere :func:`~nm_lightning.export_artifacts`.
    ``kwargs`` go to :func:`~nm_lightning.export_artifacts` (``extra=``). Returns the metadata on rank 0, ``None`` on
    the other ranks.
    """
    if not is_model_parallel(trainer.strategy):
        return export_artifacts(trainer, pl_module, out_dir, formats, **kwargs)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    formats = check_formats(formats)
    full = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return export_artifacts(trainer, _FullState(full), out_dir, formats, **kwargs)


class _FullState(torch.nn.Module):
    """A gathered state dict seen as a module (what :func:`~nm_lightning.export.write_artifacts` reads)."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        super().__init__()
        self._state = dict(state)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return dict(self._state)


def sharded_plain_weights(layers: Iterable[SparseLayer], sd: Mapping[str, Any]) -> dict[str, Any]:
    """The plain keys of a sharded state dict's N:M layers with their masked weights (``DTensor`` s placed like
    the originals: FSDP2 rows or a tensor-parallel placement; plain tensors for the layers a tensor-parallel plan
    leaves whole), computed on each rank's part without
    communication; a dynamic mask is recomputed from the current weights, as
    :func:`~nm_lightning.sparsify.split_state_dict` does."""
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    for layer in layers:
        keys = nm_keys(layer.fqn)
        original = sd.get(keys.original)
        if not isinstance(original, torch.Tensor):
            continue
        state = layer.state
        if not distributed.is_dtensor(original):  # a layer outside the tensor-parallel plan: whole on every rank
            mask = sd[keys.mask] if state.frozen else nm_mask(original, state.n, state.m, state.layout,
                                                               input_dim=state.input_dim)  # fmt: skip
            out[layer.fqn] = torch.where(mask.to(original.device), original, original.new_zeros(()))
            continue
        local = original.to_local()
        mask = (
            distributed.local_part(sd[keys.mask], original).to(local.device)
            if state.frozen
            else nm_mask(local, state.n, state.m, state.layout, input_dim=state.input_dim)
        )
        masked = torch.where(mask, local, local.new_zeros(()))
        out[layer.fqn] = DTensor.from_local(
            masked, original.device_mesh, original.placements, run_check=False,
            shape=original.shape, stride=original.stride(),
        )  # fmt: skip
    return out


def load_full_into_shards(layers: Iterable[SparseLayer], saved: Mapping[str, Any]) -> None:
    """Load full-file N:M entries (dense weight, mask, state) into possibly sharded layers (FSDP2 rows, tensor
    parallel placements): each rank copies its own part; the mask is checked against the state first."""
    with torch.no_grad():
        for layer in layers:
            keys = nm_keys(layer.fqn)
            layer.sparsity.set_extra_state(saved[keys.extra])
            mask = saved[keys.mask]
            check_mask(mask, layer.state)
            layer.sparsity.mask.copy_(mask)
            original = layer.original
            distributed.local_view(original).copy_(distributed.local_part(saved[keys.original], original))
