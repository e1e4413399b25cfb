"""N:M mask math: pure tensor code, no Lightning, no modules.

In every group of ``m`` weights the ``n`` of largest magnitude are kept. Two groupings ("layouts"):

* ``"input_channel"`` (default): groups run along the input dimension, dim ``input_dim`` of the weight
  (default 1). For a Linear ``[out, in]`` that is along ``in``; for a Conv1d/2d/3d ``[out, in, *k]`` the
  group is ``m`` consecutive input channels at a fixed (out, kernel position). This is the pattern NVIDIA
  sparse tensor cores, apex ASP, cuSPARSELt and TensorRT accelerate. ``input_dim=0`` serves weights
  stored ``[in, out]`` (e.g. the ``Conv1D`` of transformers' GPT-2): ``nm_mask(w, n, m, input_dim=0)``
  equals ``nm_mask(w.t(), n, m).t()``.
* ``"flat"``: ``m`` consecutive elements of the flattened weight (the SR-STE reference code). For a
  conv this is the im2col order ``weight.view(out, -1)``, i.e. 2:4 along K of an unfold-based GEMM.

Ties are broken by position: among equal magnitudes the element with the lower index inside its group
is kept (an element is kept iff fewer than ``n`` members of its group beat it, where ``b`` beats ``a``
when ``|b| > |a|``, or ``|b| == |a|`` and ``b`` comes first; ``-0.0`` and ``+0.0`` tie). The result is
therefore a pure function of the weight values, identical on every run, every DDP rank and every backend
(the native CPU kernel and the device-generic PyTorch path agree bit for bit).

Masked weights (:func:`nm_masked`, and :func:`nm_lightning.srste.ste_nm`/``fixed_mask``) are exact:
a kept entry keeps its bits (a kept ``-0.0`` stays ``-0.0``) and a pruned entry is ``+0.0``, on every
path (native, PyTorch, ``n == m``, the backward rebuild).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from nm_lightning import _native

__all__ = [
    "Layout",
    "LAYOUTS",
    "GroupView",
    "group_view",
    "nm_mask",
    "nm_masked",
    "apply_mask",
    "check_nm",
    "check_input_dim",
    "validate_nm",
]

Layout = Literal["input_channel", "flat"]
LAYOUTS: tuple[str, ...] = ("input_channel", "flat")


@dataclass(frozen=True)
class GroupView:
    """How a weight of a given shape splits into groups.

    The contiguous weight is viewed as ``[outer, length, inner]``; groups are ``m`` consecutive entries
    along ``length`` at a fixed (outer, inner) position. In the input-channel layout with input dim ``d``:
    ``outer = prod(shape[:d])``, ``length = shape[d]``, ``inner = prod(shape[d+1:])`` (for ``d = 1``:
    1 for a Linear, the number of kernel positions for a conv). The flat layout is ``[1, numel, 1]``.
    """

    outer: int
    length: int
    inner: int


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"N:M {name} must be an int, got {value!r} ({type(value).__name__})")
    return value


def validate_nm(n: object, m: object, layout: object = "input_channel") -> tuple[int, int, Layout]:
    """Check ``n``, ``m`` and ``layout`` and return them typed; raise a message naming the bad value."""
    n_i, m_i = _check_int("n", n), _check_int("m", m)
    if m_i < 1:
        raise ValueError(f"N:M m must be >= 1, got m={m_i}")
    if not 1 <= n_i <= m_i:
        raise ValueError(f"N:M n must satisfy 1 <= n <= m, got n={n_i}, m={m_i}")
    if layout not in LAYOUTS:
        raise ValueError(f"N:M layout must be one of {LAYOUTS}, got {layout!r}")
    return n_i, m_i, layout  # type: ignore[return-value]


def check_input_dim(input_dim: object, shape: torch.Size | tuple[int, ...]) -> int:
    """Check ``input_dim`` for a weight of ``shape`` (an int in ``[0, ndim)``); return it, or raise naming both."""
    if isinstance(input_dim, bool) or not isinstance(input_dim, int):
        raise TypeError(f"N:M input_dim must be an int, got {input_dim!r} ({type(input_dim).__name__})")
    ndim = len(shape)
    if not 0 <= input_dim < max(ndim, 1):
        raise ValueError(
            f"N:M input_dim must be in [0, {ndim - 1}] for a weight of shape {tuple(shape)}, got input_dim={input_dim}"
        )
    return input_dim


def group_view(shape: torch.Size | tuple[int, ...], layout: Layout, input_dim: int = 1) -> GroupView:
    """Return the ``[outer, length, inner]`` view of a weight shape for ``layout`` (no divisibility check).

    ``input_dim`` is the dim the groups run along in the input-channel layout (validated there; ignored
    for ``"flat"`` and 1-D shapes, which are viewed flat).
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if layout == "flat" or len(shape) <= 1:
        return GroupView(outer=1, length=numel, inner=1)
    d = check_input_dim(input_dim, shape)
    return GroupView(outer=math.prod(shape[:d]), length=shape[d], inner=math.prod(shape[d + 1 :]))


def check_nm(
    shape: torch.Size | tuple[int, ...], n: int, m: int, layout: Layout = "input_channel", input_dim: int = 1
) -> str | None:
    """Why a weight of ``shape`` cannot be made ``n:m`` in ``layout``, or ``None`` if it can.

    Raises for an invalid ``input_dim`` (see :func:`check_input_dim`).
    """
    if len(shape) == 0:
        return "a scalar has no groups"
    if layout == "input_channel" and len(shape) > 1:
        check_input_dim(input_dim, shape)
    if any(s == 0 for s in shape):
        return f"shape {tuple(shape)} is empty"
    gv = group_view(shape, layout, input_dim)
    if gv.length % m != 0:
        if layout == "flat":
            return f"numel {gv.length} of shape {tuple(shape)} is not divisible by m={m} (layout 'flat')"
        if input_dim == 1:
            what = "input features" if len(shape) == 2 else "input channels per group"
        else:
            what = "input features" if len(shape) == 2 else "input channels"
        return (
            f"{what} (dim {input_dim} of shape {tuple(shape)}) = {gv.length} is not divisible by m={m} "
            "(layout 'input_channel')"
        )
    return None


_BITS: dict[torch.dtype, tuple[torch.dtype, int]] = {  # float dtype -> (same-width int dtype, |x| bit mask)
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}
_PAIRWISE_MAX_M = 8  # up to here m(m-1)/2 comparisons; above, a top-n threshold (measured faster there)


def _magnitude(weight: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """A tensor whose order (and ties) equals that of ``|weight|`` for finite values: the bit pattern with
    the sign cleared, as a same-width signed int (NaN above Inf, as ``sort`` places NaN); any other
    floating dtype: ``abs``. ``transpose``: of ``weight.transpose(0, 1)``, written contiguous in the same
    pass (the read is strided, the tensor is written once)."""
    bits = _BITS.get(weight.dtype)
    src = weight.transpose(0, 1) if transpose else weight
    if bits is None:
        return src.abs().contiguous() if transpose else src.abs()
    out = torch.empty(src.shape, dtype=bits[0], device=weight.device)
    return torch.bitwise_and(src.view(bits[0]), bits[1], out=out)


def _mask_generic(weight: torch.Tensor, n: int, m: int, gv: GroupView) -> torch.Tensor:
    """Device-generic mask without sorting (CPU fallback and every non-CPU device).

    Rank by comparison: element ``i`` of a group is kept iff fewer than ``n`` members beat it, where ``j``
    beats ``i`` when ``|w_j| > |w_i|``, or ``|w_j| == |w_i|`` and ``j < i``; the same masks as a stable
    descending sort, bit for bit. For ``m <= 8`` the ``m(m-1)/2`` pairs are compared once each on the
    group-major transpose (contiguous rows), each pair adding to one count and subtracting from the
    other. For larger ``m``: the n-th largest magnitude per group (``topk``) is a threshold; everything
    above it is kept, plus the first ties in index order until ``n`` are kept.
    """
    groups = gv.outer * (gv.length // m)
    grouped = weight.detach().reshape(groups, m, gv.inner)
    if m <= _PAIRWISE_MAX_M:
        rows = _magnitude(grouped, transpose=True)  # [m, groups, inner], contiguous
        beaten = torch.zeros(rows.shape, dtype=torch.int8, device=weight.device)  # count - i for element i
        gt = torch.empty(rows.shape[1:], dtype=torch.bool, device=weight.device)
        gt_i8 = gt.view(torch.int8)
        for i in range(m):
            for j in range(i + 1, m):
                torch.gt(rows[j], rows[i], out=gt)  # j beats i; otherwise i beats j (ties go to i < j)
                beaten[i] += gt_i8
                beaten[j] -= gt_i8
        # element i's count of winners is beaten[i] + i (each lower j that i did not beat counts one)
        limit = (n - torch.arange(m, dtype=torch.int8, device=weight.device)).view(1, m, 1)
        mask = torch.empty((groups, m, gv.inner), dtype=torch.bool, device=weight.device)
        torch.lt(beaten.transpose(0, 1), limit, out=mask)
        return mask.reshape(weight.shape)
    mag = _magnitude(grouped)
    thr = mag.topk(n, dim=1, sorted=True).values.narrow(1, n - 1, 1)
    above = mag > thr
    tie = mag == thr
    need = n - above.sum(1, keepdim=True, dtype=torch.int32)
    mask = above | (tie & (tie.cumsum(1, dtype=torch.int32) <= need))
    return mask.reshape(weight.shape)


def nm_mask(
    weight: torch.Tensor,
    n: int,
    m: int,
    layout: Layout = "input_channel",
    *,
    check_finite: bool = True,
    input_dim: int = 1,
) -> torch.Tensor:
    """Boolean mask of ``weight``'s shape keeping the ``n`` largest-magnitude entries of every group of ``m``.

    Args:
        weight: 2-D Linear ``[out, in]``, 3/4/5-D conv ``[out, in, *k]`` or any tensor for ``"flat"``;
            float32, float16, bfloat16 or float64, on any device. Read only.
        n: weights kept per group, ``1 <= n <= m``.
        m: group size.
        layout: ``"input_channel"`` or ``"flat"`` (see the module docstring).
        check_finite: reject NaN/Inf (they have no magnitude order). Disable only when the caller
            already checked.
        input_dim: the dim the groups run along in the ``"input_channel"`` layout (default 1; 0 for a
            weight stored ``[in, out]``); ignored for ``"flat"``.

    Returns:
        A ``torch.bool`` tensor on ``weight``'s device with exactly ``n`` ``True`` per group. On CPU the
        native kernel computes it when built, elsewhere (and as the fallback) a sort-free PyTorch
        formulation; both give the same bits.

    Raises:
        TypeError: ``n``/``m``/``input_dim`` not ints, or ``weight`` not a floating tensor.
        ValueError: ``n``/``m``/``layout``/``input_dim`` out of range, grouped dimension not divisible by
            ``m``, or NaN/Inf in ``weight``.
    """
    n, m, layout = _validate_call(weight, n, m, layout, input_dim)
    return _nm_mask_op(weight.detach(), n, m, layout, check_finite, input_dim)


@torch.library.custom_op("nm_lightning::nm_mask", mutates_args=())
def _nm_mask_op(
    weight: torch.Tensor, n: int, m: int, layout: str, check_finite: bool, input_dim: int
) -> torch.Tensor:
    # A custom op so that torch.compile treats the native kernel as one opaque op (no graph break).
    gv = group_view(weight.shape, layout, input_dim)  # type: ignore[arg-type]
    if n < m and _native.supports(weight, m):
        return _native.nm_mask(weight, n, m, gv.outer, gv.length, gv.inner, check_finite)[0]
    if check_finite:
        _check_finite(weight)
    if n == m:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    return _mask_generic(weight, n, m, gv)


@_nm_mask_op.register_fake
def _(weight: torch.Tensor, n: int, m: int, layout: str, check_finite: bool, input_dim: int) -> torch.Tensor:
    return torch.empty(weight.shape, dtype=torch.bool, device=weight.device)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` where ``mask``, ``+0.0`` elsewhere: kept entries keep their bits (``-0.0`` included).

    Differentiable: the gradient is masked too (``torch.where``). ``weight * mask`` would instead turn a
    pruned negative weight into ``-0.0``, and ``+ 0.0`` on top would turn a kept ``-0.0`` into ``+0.0``.
    """
    if not torch.compiler.is_compiling() and _native.supports_apply(weight, mask):
        if torch.is_grad_enabled() and weight.requires_grad:
            return _ApplyMask.apply(weight, mask)
        return _native.apply_mask(weight, mask)
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


class _ApplyMask(torch.autograd.Function):
    """:func:`apply_mask` on CPU through the native one-pass kernel; the gradient is masked the same way (what
    ``torch.where``'s backward gives: the gradient where kept, ``+0`` elsewhere)."""

    @staticmethod
    def forward(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _native.apply_mask(weight, mask)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return apply_mask(grad, mask), None


def nm_masked(
    weight: torch.Tensor, n: int, m: int, layout: Layout = "input_channel", *, input_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight ⊙ mask, mask)`` in one pass over the weight (no autograd).

    Kept entries keep their exact bits (a kept ``-0.0`` stays ``-0.0``); pruned entries are ``+0.0``, on
    every path. Same validation and errors as :func:`nm_mask`; this is what the SR-STE forward runs
    every step.
    """
    n, m, layout = _validate_call(weight, n, m, layout, input_dim)
    return _nm_masked_op(weight.detach(), n, m, layout, input_dim)


@torch.library.custom_op("nm_lightning::nm_masked", mutates_args=())
def _nm_masked_op(
    weight: torch.Tensor, n: int, m: int, layout: str, input_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gv = group_view(weight.shape, layout, input_dim)  # type: ignore[arg-type]
    if n < m and _native.supports(weight, m):
        mask, masked = _native.nm_mask(weight, n, m, gv.outer, gv.length, gv.inner, True, with_masked=True)
        assert masked is not None
        return masked, mask
    mask = _nm_mask_op(weight, n, m, layout, True, input_dim)
    return apply_mask(weight, mask), mask


@_nm_masked_op.register_fake
def _(weight: torch.Tensor, n: int, m: int, layout: str, input_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(weight), torch.empty(weight.shape, dtype=torch.bool, device=weight.device)


def _validate_call(
    weight: torch.Tensor, n: object, m: object, layout: object, input_dim: object = 1
) -> tuple[int, int, Layout]:
    n, m, layout = validate_nm(n, m, layout)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"nm_mask needs a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() == 1 and layout == "input_channel":
        raise ValueError(
            f"layout 'input_channel' needs a weight with >= 2 dims, got shape {tuple(weight.shape)}; use layout='flat'"
        )
    if layout == "input_channel":
        check_input_dim(input_dim, weight.shape)
    elif isinstance(input_dim, bool) or not isinstance(input_dim, int):
        check_input_dim(input_dim, weight.shape)  # the type error
    reason = check_nm(weight.shape, n, m, layout, input_dim)  # type: ignore[arg-type]
    if reason is not None:
        raise ValueError(f"cannot apply {n}:{m} sparsity: {reason}")
    return n, m, layout


def _check_finite(weight: torch.Tensor) -> None:
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} contains {int((~finite).sum())} NaN/Inf value(s); "
            "N:M masks need finite weights"
        )
