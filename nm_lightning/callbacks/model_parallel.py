"""What the N:M callbacks need under Lightning's ``ModelParallelStrategy`` (FSDP2): the setup check, checkpoint
translation between sharded layers and full or sharded files, and the gathered export.

The mechanism (attach before ``fully_shard``, masks of local rows, all-gathered bool masks) is
:mod:`nm_lightning.distributed`; :class:`~nm_lightning.callbacks.base.NMCallback` calls these helpers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

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
    "check_tensor_parallel",
    "export_gathered",
    "is_model_parallel",
    "load_full_into_shards",
    "sharded_plain_weights",
]


def is_model_parallel(strategy: Strategy) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallelism)."""
    return isinstance(strategy, ModelParallelStrategy)


def check_tensor_parallel(strategy: ModelParallelStrategy, who: str) -> None:
    """Refuse a ``ModelParallelStrategy`` whose device mesh has a tensor-parallel dim larger than 1.

    torch's parallel styles (``ColwiseParallel``, ``RowwiseParallel``) re-register a layer's parameters by name and
    cannot shard a parametrized layer (its weight lives at ``parametrizations.weight.original``); N:M under
    ``ModelParallelStrategy`` is FSDP2 only (``tensor_parallel_size=1``).
    """
    mesh = strategy.device_mesh
    names = mesh.mesh_dim_names or ()
    tp = mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
    if tp > 1:
        raise MisconfigurationException(
            f"{who} supports ModelParallelStrategy with FSDP2 only (data_parallel_size=world size, "
            f"tensor_parallel_size=1); got a tensor-parallel mesh of size {tp}: parallelize_module cannot shard "
            "N:M-parametrized layers"
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
    the originals), computed on each rank's rows without communication; a dynamic mask is recomputed from the
    current weights, as :func:`~nm_lightning.sparsify.split_state_dict` does."""
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    for layer in layers:
        keys = nm_keys(layer.fqn)
        original = sd.get(keys.original)
        if not distributed.is_dtensor(original):
            continue
        state = layer.state
        local = original.to_local()
        shard = distributed.row_shard(original)
        mask = (
            distributed.local_rows(sd[keys.mask], shard).to(local.device)
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
    """Load full-file N:M entries (dense weight, mask, state) into possibly FSDP2-sharded layers: each rank copies
    its own rows; the mask is checked against the state first."""
    with torch.no_grad():
        for layer in layers:
            keys = nm_keys(layer.fqn)
            layer.sparsity.set_extra_state(saved[keys.extra])
            mask = saved[keys.mask]
            check_mask(mask, layer.state)
            layer.sparsity.mask.copy_(mask)
            original = layer.original
            shard = distributed.row_shard(original)
            distributed.local_view(original).copy_(distributed.local_rows(saved[keys.original], shard))
