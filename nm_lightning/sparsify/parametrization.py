"""The N:M parametrization ``W -> W ⊙ E`` and attaching/detaching it (no Lightning).

Mechanism: a ``torch.nn.utils.parametrize`` parametrization (:class:`NMSparsity`) on the weight. It keeps the
*same* ``Parameter`` object (as ``parametrizations.<param>.original``), so optimizers and DDP hooks built before
or after attaching stay valid, and every read of ``module.weight`` — including direct reads such as
``nn.MultiheadAttention`` reading ``out_proj.weight`` — returns the masked weight.

The parametrization holds the layer's :class:`~nm_lightning.state.NMLayerState` (the one record of its N:M) and
a bool ``mask`` buffer; the state is its extra state, so it travels with ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

import nm_lightning.distributed as distributed
from nm_lightning.masks import nm_mask
from nm_lightning.sparsify.state_dict import accept_plain, check_mask
from nm_lightning.srste import fixed_mask, ste_nm, tag_masked_weight
from nm_lightning.state import NMLayerState, fqn_of, layer_name

__all__ = [
    "NMSparsity",
    "SparseLayer",
    "attach_state",
    "bind_shards",
    "bind_tensor_parallel",
    "detach",
    "freeze_layers",
    "get_param",
    "nm_state",
    "our_parametrization",
    "sparse_layers",
]


class NMSparsity(nn.Module):
    """Parametrization ``W -> W ⊙ E`` with ``E`` the N:M mask of the layer's :class:`NMLayerState`.

    Dynamic mode (SR-STE/STE): ``E`` is recomputed from ``W`` on every forward and the gradient passes
    straight through to all of ``W``. Fixed mode (``state.frozen``, after :meth:`freeze`): ``E`` is the stored
    mask, the pruned weights are zero and receive no gradient.
    """

    def __init__(self, state: NMLayerState) -> None:
        super().__init__()
        if not isinstance(state, NMLayerState):
            raise TypeError(f"NMSparsity needs an NMLayerState, got {type(state).__name__}")
        self.state = state
        self.register_buffer("mask", torch.ones(state.shape, dtype=torch.bool))
        self.mask: torch.Tensor
        # set by bind_shards once FSDP2 shards the weight's rows: the forward then masks the local rows only
        self.shard: distributed.RowShard | None = None
        # set by bind_tensor_parallel once a parallel style placed the weight: the forward then receives the DTensor
        self.tensor_parallel = False

    # read-only views of the state (the state is the one owner)
    n = property(lambda self: self.state.n, doc="current N (``state.n``)")
    m = property(lambda self: self.state.m, doc="group size (``state.m``)")
    layout = property(lambda self: self.state.layout, doc="grouping (``state.layout``)")
    frozen = property(lambda self: self.state.frozen, doc="fixed mask (``state.frozen``)")
    straight_through = property(lambda self: self.state.straight_through, doc="``state.straight_through``")

    def extra_repr(self) -> str:
        s = self.state
        return f"{s.n}:{s.m}, layout={s.layout!r}, frozen={s.frozen}, straight_through={s.straight_through}"

    def compute_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The N:M mask of ``weight`` at the current N (ignores the stored mask).

        ``weight`` may be the sharded ``original`` (a ``DTensor``: FSDP2 rows, a tensor-parallel placement): then
        every rank computes the mask of its own part and the mask is all-gathered, so every rank must call it (a
        collective).
        """
        s = self.state
        if distributed.is_dtensor(weight):
            return distributed.placed_mask(weight, s)[0]
        return nm_mask(weight, s.n, s.m, s.layout, input_dim=s.input_dim)

    def current_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The mask the next forward would use: the fixed mask, or the one computed from ``weight``."""
        return self.mask if self.state.frozen else self.compute_mask(weight)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.state
        if self.shard is not None:
            return self._sharded_forward(weight)
        if distributed.is_dtensor(weight):
            if not self.tensor_parallel:
                raise distributed.ShardingError(
                    f"layer {s.name!r}: the N:M parametrization received a sharded weight that is not bound to its "
                    "shards; under FSDP2 attach N:M before fully_shard and call bind_shards(model) after it; under "
                    "tensor parallelism attach after parallelize_module and call bind_tensor_parallel(model)"
                )
            return self._placed_forward(weight)
        if s.frozen:  # pruned weights are +0 here, so W ⊙ E can be rebuilt exactly in backward
            out, mask = fixed_mask(weight, self.mask), self.mask
        elif s.straight_through:
            out, mask = ste_nm(weight, s.n, s.m, s.layout, input_dim=s.input_dim)
        else:  # the DominoSearch rule: pruned weights get no gradient
            mask = self.compute_mask(weight)
            out = fixed_mask(weight, mask)
        if (s.frozen or s.straight_through) and not torch.compiler.is_compiling():
            tag_masked_weight(out, weight, mask)
        if self.training and not s.frozen:
            # recorded for the SR-STE decay term and the flip-rate metrics of this step
            self.mask.copy_(mask)
        return out

    def _sharded_forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The forward under FSDP2: ``weight`` is the unsharded weight; only this rank's rows are masked here."""
        s, shard = self.state, self.shard
        assert shard is not None
        if s.frozen:
            mask = self.mask
            out = fixed_mask(weight, mask)
        else:
            mask, _ = distributed.sharded_mask(weight, s, shard)
            out = distributed.masked_straight_through(weight, mask) if s.straight_through else fixed_mask(weight, mask)
        if (s.frozen or s.straight_through) and not torch.compiler.is_compiling():
            tag_masked_weight(out, weight, mask)
        if self.training and not s.frozen:
            self.mask.copy_(mask)
        return out

    def _placed_forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The forward under tensor parallelism: ``weight`` is the placed ``DTensor``; the local shard is masked here
        and ``W ⊙ E`` keeps its placement; the full bool mask is all-gathered for the record."""
        s = self.state
        if s.frozen:
            mask, local = self.mask, distributed.local_part(self.mask, weight)
        else:
            mask, local = distributed.placed_mask(weight, s)
        # no tag_masked_weight: autograd saves the DTensor, which the recompute hooks cannot rebuild
        out = distributed.placed_masked(weight, local, straight_through=s.straight_through and not s.frozen)
        if self.training and not s.frozen:
            self.mask.copy_(mask)
        return out

    @torch.no_grad()
    def freeze(self, weight: torch.Tensor) -> torch.Tensor:
        """Fix the mask to the current one and zero the pruned entries of ``weight`` in place.

        Sharded (``weight`` the ``DTensor`` ``original``) every rank must call it (the mask is all-gathered).
        """
        if not self.state.frozen:
            self.mask.copy_(self.compute_mask(weight))
            local, mask = distributed.local_view(weight), distributed.local_part(self.mask, weight)
            local.masked_fill_(~mask, 0)
            self.state.frozen = True
        return self.mask

    def unfreeze(self) -> None:
        """Back to a dynamic mask (pruned weights were zeroed by :meth:`freeze` and may regrow)."""
        self.state.frozen = False

    def set_nm(self, n: int, m: int) -> None:
        """Change the current N (a schedule lowering N, a search); ``m`` must stay the layer's M."""
        if m != self.state.m:
            raise ValueError(f"layer {self.state.name!r}: m is fixed at {self.state.m}, got m={m!r}")
        self.state.set_n(n)

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        return self.state.to_dict()

    def set_extra_state(self, state: Any) -> None:
        if _is_dcp_placeholder(state):
            return  # torch.distributed.checkpoint loading a state dict without this entry: keep the current state
        loaded = NMLayerState.from_dict(self.state.fqn, state, shape=tuple(self.mask.shape))
        for key in ("m", "target_n", "n", "layout", "input_dim", "frozen", "straight_through"):
            setattr(self.state, key, getattr(loaded, key))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        check_mask(self.mask, self.state)  # a checkpoint is input: refuse a mask that does not fit the state


def _is_dcp_placeholder(value: Any) -> bool:
    """torch.distributed.checkpoint's ``set_model_state_dict`` passes an ``_EXTRA_STATE`` placeholder to every
    ``set_extra_state`` whose key the loaded dict lacks (e.g. Lightning loading a full file into FSDP2 shards)."""
    cls = type(value)
    return cls.__name__ == "_EXTRA_STATE" and cls.__module__ == "torch.distributed.checkpoint.state_dict"


@dataclass
class SparseLayer:
    """An attached layer: the module, the name of its weight and the parametrization (whose ``state`` is the
    layer's N:M)."""

    name: str
    module_name: str
    module: nn.Module
    param_name: str
    sparsity: NMSparsity

    @property
    def state(self) -> NMLayerState:
        return self.sparsity.state

    @property
    def fqn(self) -> str:
        return self.sparsity.state.fqn

    @property
    def original(self) -> nn.Parameter:
        """The dense trained Parameter (the same object the model had before attaching)."""
        return getattr(self.module.parametrizations, self.param_name).original

    def effective(self) -> torch.Tensor:
        """The weight the model computes with, without side effects on the recorded mask.

        A sharded weight (a ``DTensor``) is gathered: the full tensor on every rank, a collective.
        """
        with torch.no_grad():
            w = self.original
            mask = self.sparsity.current_mask(w)
            if distributed.is_dtensor(w):
                w = w.full_tensor()
            return torch.where(mask, w, w.new_zeros(()))


def get_param(module: nn.Module, name: str) -> torch.Tensor | None:
    """The real Parameter ``name`` of ``module`` (the original under a parametrization), or ``None``."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return module._parameters.get(name)  # noqa: SLF001 - only real Parameters, not properties


def our_parametrization(module: nn.Module, name: str) -> NMSparsity | None:
    if not parametrize.is_parametrized(module, name):
        return None
    found = [p for p in getattr(module.parametrizations, name) if isinstance(p, NMSparsity)]
    return found[0] if found else None


def attach_state(module: nn.Module, param_name: str, state: NMLayerState) -> NMSparsity:
    """Parametrize ``module.<param_name>`` with ``state`` (or return its existing N:M parametrization)."""
    sp = our_parametrization(module, param_name)
    if sp is not None:
        return sp
    weight = get_param(module, param_name)
    if weight is None:
        raise ValueError(f"layer {state.name!r}: the module has no parameter {param_name!r}")
    if tuple(weight.shape) != state.shape:
        raise ValueError(f"layer {state.name!r}: the state is for shape {list(state.shape)}, the weight has "
                         f"{list(weight.shape)}")  # fmt: skip
    sp = NMSparsity(state).to(weight.device)
    parametrize.register_parametrization(module, param_name, sp, unsafe=True)

    def _hook(mod: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, _p: str = param_name) -> None:
        found = our_parametrization(mod, _p)
        if found is not None:
            accept_plain(found, state_dict, prefix, _p)

    module.register_load_state_dict_pre_hook(_hook)
    return sp


def sparse_layers(model: nn.Module, owner: str | None = None) -> dict[str, SparseLayer]:
    """All N:M layers attached to ``model`` (optionally only those of one owner), by layer name."""
    found: dict[str, SparseLayer] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name in list(module.parametrizations.keys()):
            sp = our_parametrization(module, param_name)
            if sp is None or (owner is not None and sp.state.owner != owner):
                continue
            name = layer_name(fqn_of(module_name, param_name))
            found[name] = SparseLayer(name, module_name, module, param_name, sp)
    return found


def nm_state(model: nn.Module) -> dict[str, NMLayerState]:
    """The N:M state of every sparsified tensor of ``model``, keyed by its fully qualified name."""
    return {layer.fqn: layer.state for layer in sparse_layers(model).values()}


def freeze_layers(layers: Iterable[SparseLayer], optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Fix each layer's current mask, zero its pruned weights and their optimizer state (momentum, Adam
    moments), so that nothing revives them: the weights that end training are the ones exported."""
    optimizers = list(optimizers)
    for layer in layers:
        if layer.sparsity.frozen:
            continue
        mask = layer.sparsity.freeze(layer.original)
        for opt in optimizers:
            for value in opt.state.get(layer.original, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    distributed.local_view(value).masked_fill_(~distributed.local_part(mask, value), 0)


def detach(model: nn.Module, owner: str | None = None) -> list[str]:
    """Remove the N:M parametrizations, leaving the masked weights in the same Parameters.

    Returns the names of the layers detached. The model is then a plain model with zeros.
    """
    names = []
    for name, layer in sparse_layers(model, owner).items():
        parametrize.remove_parametrizations(layer.module, layer.param_name, leave_parametrized=True)
        names.append(name)
    return names


def bind_shards(model: nn.Module) -> dict[str, distributed.RowShard | None]:
    """After ``fully_shard``: give every N:M parametrization the :class:`~nm_lightning.distributed.RowShard` of its
    weight, so its forward masks only this rank's rows; returns them by layer name (``None``: not sharded).

    Raises :class:`~nm_lightning.distributed.ShardingError` naming the layer when a weight is sharded so that N:M
    groups would straddle ranks, or placed outside FSDP2 (tensor parallelism: :func:`bind_tensor_parallel`).
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp_managed = {name for name, mod in model.named_modules() if isinstance(mod, FSDPModule)}
    out: dict[str, distributed.RowShard | None] = {}
    for name, layer in sparse_layers(model).items():
        weight = layer.original
        distributed.check_placements(layer.state, weight)
        shard = distributed.row_shard(weight)
        path = layer.module_name.split(".") if layer.module_name else []
        ancestors = {".".join(path[:i]) for i in range(len(path) + 1)}
        if distributed.is_dtensor(weight) and (shard is None or not ancestors & fsdp_managed):
            raise distributed.ShardingError(
                f"layer {name!r}: weight sharded with placements {tuple(weight.placements)} outside FSDP2; N:M "
                "training supports FSDP2 (fully_shard, rows sharded on a 1-D data-parallel mesh) only"
            )
        layer.sparsity.shard = shard
        out[name] = shard
    return out


def bind_tensor_parallel(model: nn.Module) -> list[str]:
    """After ``parallelize_module`` *and* attaching N:M (tensor parallelism, no FSDP2): check every N:M weight's
    placement and mark the placed ones, so their forward masks the local shard of the ``DTensor``; returns the
    names of the placed layers.

    Raises :class:`~nm_lightning.distributed.ShardingError` naming the layer when a placement would split N:M
    groups across ranks (``RowwiseParallel`` with a per-rank input slice that is not a multiple of M), or when a
    weight is placed on a mesh with more than one dim.
    """
    placed = []
    for name, layer in sparse_layers(model).items():
        weight = layer.original
        if not distributed.is_dtensor(weight):
            continue
        if weight.device_mesh.ndim != 1:
            raise distributed.ShardingError(
                f"layer {name!r}: weight placed on a {weight.device_mesh.ndim}-D mesh {tuple(weight.placements)}; "
                "attach N:M on the 1-D tensor-parallel placement: under a 2-D mesh call "
                "nm_lightning.attach_pending(self) in configure_model after parallelize_module and before fully_shard"
            )
        distributed.check_placements(layer.state, weight)
        layer.sparsity.tensor_parallel = True
        placed.append(name)
    return placed
