"""What sharded training needs: N:M masks computed on each rank's part of a weight, and the local parts of
full-shape tensors.

Two ways of sharding a weight are supported under Lightning's ``ModelParallelStrategy``, each on a 1-D mesh, and
both together on a 2-D mesh:

FSDP2 (``torch.distributed.fsdp.fully_shard``, ``tensor_parallel_size=1``) shards every parameter along dim 0
(output rows) with ``torch.chunk`` semantics: rank ``r`` of ``w`` ranks holds rows ``[r·c, min((r+1)·c, rows))``
with ``c = ceil(rows / w)`` (a trailing rank may hold fewer rows, or none). Every N:M group runs along the input
dimension of one row (the ``input_channel`` layout; in the ``flat`` layout when a row's size is a multiple of M),
so a rank holds whole groups and computes their mask with no communication. The contract with the N:M
parametrization (:class:`~nm_lightning.sparsify.NMSparsity`):

* the N:M parametrization is attached *before* ``fully_shard`` (FSDP2 then shards
  ``parametrizations.<param>.original`` like any other parameter and hands the parametrization the unsharded
  weight inside its forward; attached after, the parametrization would read the sharded ``DTensor``);
* :func:`bind_shards <nm_lightning.sparsify.bind_shards>`, called once after ``fully_shard``, gives each such
  parametrization its :class:`RowShard`;
* in each forward the parametrization computes the mask of the local rows only (the mask work per rank scales
  with 1/world size) and all-gathers the bool mask (1 byte per weight, a quarter of the float32 gather FSDP2
  already does for the weight); no weight is gathered beyond FSDP2's own gather.

Tensor parallelism (``parallelize_module``, ``data_parallel_size=1``): ``ColwiseParallel`` shards a Linear's
output dim (``Shard(0)``: whole groups per rank), ``RowwiseParallel`` its input dim (``Shard(1)``: valid only when
every rank's slice is a multiple of M, so no group straddles ranks; :func:`check_placements` names the layer, the
slice size and M otherwise); layers outside the plan stay plain tensors (or ``Replicate``). torch's parallel styles
cannot shard a parametrized layer, so here the parametrization is attached *after* ``parallelize_module`` and
its forward receives the ``DTensor`` weight: it masks the local shard (:func:`placed_mask`, no communication for
the mask itself) and returns ``W ⊙ E`` as a ``DTensor`` placed like ``W`` (:func:`placed_masked`).

2-D mesh (``parallelize_module`` on the tensor-parallel mesh, then ``fully_shard`` on the data-parallel one): the
parametrization is attached between the two, as under tensor parallelism; FSDP2 then shards its ``original``
(dim 0 on the data-parallel mesh over the tensor-parallel placement) and hands the forward the tensor-parallel
``DTensor``, masked as above. Outside the forward a weight is a ``DTensor`` on the 2-D mesh; its local part holds
whole groups (:func:`check_placements` checks every mesh dim).

In every case the recorded ``mask`` buffer stays a plain, replicated bool tensor of the full shape (the bool
mask is all-gathered in every training forward, which every rank runs): identical on every rank, so metrics and
flip rates read it on rank 0 alone, and checkpoints carry it as is. Gradients, weights and optimizer states
outside the forward are ``DTensor`` s: :func:`local_view` gives the plain local tensor, :func:`local_part` the
matching part of a full-shape tensor (the mask, a full checkpoint's weight) for any placement on a 1-D or 2-D mesh, and
:func:`gather_full` the inverse (a collective), for element-wise work such as the SR-STE decay
(:func:`decay_operands`).

Pure torch (no Lightning); imports only :mod:`nm_lightning.masks` and :mod:`nm_lightning.state`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nm_lightning.masks import nm_mask
from nm_lightning.state import NMLayerState

__all__ = [
    "RowShard",
    "ShardingError",
    "check_placements",
    "decay_operands",
    "gather_full",
    "gather_rows",
    "is_dtensor",
    "local_part",
    "local_rows",
    "local_view",
    "masked_straight_through",
    "placed_mask",
    "placed_masked",
    "row_shard",
    "sum_over",
]


class ShardingError(ValueError):
    """A sharded N:M layer whose groups would straddle ranks, or a placement this module cannot mask."""


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def local_view(t: torch.Tensor) -> torch.Tensor:
    """The plain local tensor of a ``DTensor`` (the rank's shard, a view: writes reach the parameter); any
    other tensor unchanged."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class RowShard:
    """This rank's rows of a weight sharded along dim 0 with ``torch.chunk`` semantics.

    Attributes:
        group: the process group the rows are sharded over (FSDP2's data-parallel group).
        rank: this rank's index in ``group``.
        world: the size of ``group``.
        rows: the full size of dim 0.
    """

    group: Any
    rank: int
    world: int
    rows: int

    @property
    def chunk(self) -> int:
        """Rows per rank before the last (``ceil(rows / world)``): the padded shard size."""
        return math.ceil(self.rows / self.world)

    @property
    def start(self) -> int:
        return min(self.rows, self.rank * self.chunk)

    @property
    def stop(self) -> int:
        return min(self.rows, (self.rank + 1) * self.chunk)


def check_placements(state: NMLayerState, param: torch.Tensor) -> None:
    """Check that a (possibly sharded) weight keeps whole N:M groups on every rank; raise :class:`ShardingError`
    naming the layer, the shard size and M otherwise.

    Allowed: ``Shard(0)`` (FSDP2, ``ColwiseParallel``) when each row holds whole groups; ``Shard(d)`` along the
    group dimension (``RowwiseParallel`` shards a Linear's input dim) when every rank's slice is a multiple of M;
    ``Replicate``; on a 2-D mesh (FSDP2 over tensor parallelism) each mesh dim is checked so (FSDP2's
    ``_StridedShard`` of dim 0 included). Anything else (another dim, ``Partial``) is refused.
    """
    if not is_dtensor(param):
        return
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    shape = tuple(param.shape)
    group_dim = state.input_dim if state.layout == "input_channel" else None
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        size = param.device_mesh.size(mesh_dim)
        if not isinstance(placement, (Shard, _StridedShard)):
            raise ShardingError(f"layer {state.name!r}: placement {placement} is not supported for N:M sparsity")
        dim = placement.dim % len(shape)
        if isinstance(placement, _StridedShard) and dim != 0:  # FSDP2 over tensor parallelism strides dim 0 only
            raise ShardingError(f"layer {state.name!r}: placement {placement} is not supported for N:M sparsity")
        if dim == 0 and group_dim != 0:
            if state.layout == "flat" and math.prod(shape[1:]) % state.m:
                raise ShardingError(
                    f"layer {state.name!r}: sharding rows of {list(shape)} would split flat groups of m={state.m} "
                    f"(a row has {math.prod(shape[1:])} elements); use layout='input_channel'"
                )
            continue
        if dim == group_dim:
            slice_size = math.ceil(shape[dim] / size)
            if shape[dim] % size or slice_size % state.m:
                raise ShardingError(
                    f"layer {state.name!r}: dim {dim} (the N:M group dim, size {shape[dim]}) is sharded over {size} "
                    f"ranks into slices of {slice_size}, not a multiple of m={state.m}: N:M groups would straddle "
                    f"ranks; shard it so that every slice is a multiple of {state.m}"
                )
            continue
        raise ShardingError(
            f"layer {state.name!r}: dim {dim} of {list(shape)} is sharded ({placement}); N:M supports sharding "
            f"dim 0 (FSDP2, ColwiseParallel) or the group dim {group_dim} in multiples of m={state.m}"
        )


def row_shard(param: torch.Tensor) -> RowShard | None:
    """The :class:`RowShard` of a parameter that FSDP2 shards along dim 0 on a 1-D mesh, else ``None``."""
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        return None
    mesh = param.device_mesh
    return RowShard(group=mesh.get_group(), rank=mesh.get_local_rank(), world=mesh.size(), rows=param.shape[0])


def local_rows(t: torch.Tensor, shard: RowShard | None) -> torch.Tensor:
    """Rows ``[start, stop)`` of the unsharded weight FSDP2 hands to the forward (a view), or ``t`` itself when
    unsharded. For the local part of a full-shape tensor matching a ``DTensor`` use :func:`local_part`."""
    return t if shard is None else t[shard.start : shard.stop]


def _placement(like: Any, mesh: Any, placements: Any) -> tuple[Any, tuple[Any, ...]] | None:
    if like is not None:
        return (like.device_mesh, tuple(like.placements)) if is_dtensor(like) else None
    return None if mesh is None else (mesh, tuple(placements))


def local_part(
    full: torch.Tensor, like: torch.Tensor | None = None, *, mesh: Any = None, placements: Any = None
) -> torch.Tensor:
    """This rank's part (a view) of the full-shape tensor ``full``, placed like the ``DTensor`` ``like`` (or on
    ``mesh`` with ``placements``); ``full`` itself when ``like`` is a plain tensor.

    Any placement on a 1-D mesh: ``Shard(d)`` with ``torch.chunk`` semantics (what FSDP2 and the parallel styles
    use), ``Replicate`` (the whole tensor); on a 2-D mesh (FSDP2 over tensor parallelism, ``_StridedShard`` when
    both shard dim 0) the block torch's ``compute_local_shape_and_global_offset`` gives. In place writes to the
    result reach ``full``.
    """
    placed = _placement(like, mesh, placements)
    if placed is None:
        return full
    if like is not None and tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"local_part: a full tensor of shape {list(full.shape)} for a DTensor of shape "
                         f"{list(like.shape)}")  # fmt: skip
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tuple(full.shape), *placed)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


def gather_full(
    local: torch.Tensor,
    like: torch.Tensor | None = None,
    *,
    mesh: Any = None,
    placements: Any = None,
    shape: Any = None,
) -> torch.Tensor:
    """The full tensor (plain, on every rank) from each rank's part placed like ``like`` (or on ``mesh`` with
    ``placements``, of global ``shape``): a collective over the mesh, every rank must call it. The inverse of
    :func:`local_part`; a bool tensor travels as ``uint8`` (gloo has no bool all-gather)."""
    placed = _placement(like, mesh, placements)
    if placed is None:
        return local
    from torch.distributed.tensor import DTensor

    shape = tuple(like.shape) if like is not None else tuple(shape)
    wire = torch.uint8 if local.dtype == torch.bool else local.dtype
    stride = torch.empty(shape, device="meta").stride()
    spread = DTensor.from_local(local.to(wire), *placed, run_check=False, shape=shape, stride=stride)
    return spread.full_tensor().to(local.dtype)


def gather_rows(local: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """All-gather per-rank row blocks into the full tensor (a collective over ``shard.group``).

    Each rank contributes its ``stop - start`` rows; blocks are padded to ``shard.chunk`` rows. A bool mask is sent
    as ``uint8`` (1 byte per weight), so every backend (gloo included) can carry it.
    """
    if local.shape[0] != shard.stop - shard.start:
        raise ValueError(
            f"gather_rows needs this rank's {shard.stop - shard.start} rows, got a tensor of shape {list(local.shape)}"
        )
    wire = torch.uint8 if local.dtype == torch.bool else local.dtype
    block = local.new_zeros((shard.chunk, *local.shape[1:]), dtype=wire)
    block[: local.shape[0]] = local
    out = block.new_empty((shard.chunk * shard.world, *local.shape[1:]))
    dist.all_gather_into_tensor(out, block, group=shard.group)
    return out[: shard.rows].to(local.dtype)


def sum_over(group: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function summing a tensor over the ranks of the process ``group`` (a collective: every rank must call
    it). A :class:`RowShard` stands for its group."""
    if isinstance(group, RowShard):
        group = group.group

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return reduce


class _MaskedStraightThrough(torch.autograd.Function):
    """Forward ``W ⊙ E`` (+0 where pruned, as :func:`nm_lightning.srste.ste_nm`); backward passes the gradient to
    all of ``W``."""

    @staticmethod
    def forward(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.where(mask, weight, weight.new_zeros(()))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def masked_straight_through(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight ⊙ mask`` with a straight-through gradient (the SR-STE/STE rule for a given mask)."""
    return _MaskedStraightThrough.apply(weight, mask)


def sharded_mask(weight: torch.Tensor, state: NMLayerState, shard: RowShard) -> tuple[torch.Tensor, torch.Tensor]:
    """``(full mask, local rows of it)`` for the unsharded ``weight`` FSDP2 hands to the forward: this rank
    computes the N:M mask of its own rows only, then the bool mask is all-gathered."""
    if is_dtensor(weight):
        raise ShardingError(
            f"layer {state.name!r}: the N:M parametrization received a sharded DTensor weight; attach N:M before "
            "fully_shard (the callbacks do so in setup) and read the weight inside the FSDP2 forward"
        )
    local = nm_mask(local_rows(weight, shard), state.n, state.m, state.layout, input_dim=state.input_dim)
    return gather_rows(local, shard), local


def placed_mask(weight: torch.Tensor, state: NMLayerState) -> tuple[torch.Tensor, torch.Tensor]:
    """``(full mask, local mask)`` of a ``DTensor`` weight (any placement that :func:`check_placements` accepts):
    this rank computes the N:M mask of its own part only (whole groups: no communication), then the bool mask is
    all-gathered into the full, replicated one (a collective: every rank must call it)."""
    local = nm_mask(weight.to_local().detach(), state.n, state.m, state.layout, input_dim=state.input_dim)
    return gather_full(local, weight), local


def placed_masked(weight: torch.Tensor, local_mask: torch.Tensor, straight_through: bool) -> torch.Tensor:
    """``W ⊙ E`` for a ``DTensor`` weight, computed on the local shard and placed like ``W`` (no communication).

    Bit for bit the unsharded forward (``+0.0`` where pruned, a kept ``-0.0`` stays ``-0.0``); the gradient passes
    straight through to all of ``W`` (SR-STE/STE) or only to the kept entries (the fixed-mask rule).
    """
    from torch.distributed.tensor import DTensor

    local = weight.to_local()
    if straight_through:
        out = masked_straight_through(local, local_mask)
    else:
        out = torch.where(local_mask, local, torch.zeros((), dtype=local.dtype, device=local.device))
    return DTensor.from_local(
        out, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape, stride=weight.stride()
    )


def decay_operands(
    grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain local ``(grad, weight, mask)`` for element-wise work on a possibly sharded weight (the SR-STE
    decay :func:`nm_lightning.srste.add_decay_`, the DominoSearch penalty).

    ``grad`` and ``weight`` are ``DTensor`` s (FSDP2's ``Shard(0)``, a parallel style's placement) or plain tensors;
    ``mask`` is the full-shape replicated mask. In place updates of the returned ``grad`` reach the real gradient.
    """
    return local_view(grad), local_view(weight), local_part(mask, weight)
