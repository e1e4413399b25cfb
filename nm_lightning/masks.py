"""N:M mask math: pure tensor code, no Lightning, no modules.

In every group of ``m`` weights the ``n`` of largest magnitude are kept. Two groupings ("layouts"):

* ``"input_channel"`` (default): groups run along the input dimension, dim 1 of the weight. For a
  Linear ``[out, in]`` that is along ``in``; for a Conv1d/2d/3d ``[out, in, *k]`` the group is ``m``
  consecutive input channels at a fixed (out, kernel position). This is the pattern NVIDIA sparse
  tensor cores, apex ASP, cuSPARSELt and TensorRT accelerate.
* ``"flat"``: ``m`` consecutive elements of the flattened weight (the SR-STE reference code). For a
  conv this is the im2col order ``weight.view(out, -1)``, i.e. 2:4 along K of an unfold-based GEMM.

Ties are broken by position: among equal magnitudes the element with the lower index inside its group
is kept. The result is therefore a pure function of the weight values, identical on every run, every
DDP rank and every backend (the native CPU kernel and the PyTorch path agree bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from nm_lightning import _native

__all__ = ["Layout", "LAYOUTS", "GroupView", "group_view", "nm_mask", "nm_masked", "check_nm", "validate_nm"]

Layout = Literal["input_channel", "flat"]
LAYOUTS: tuple[str, ...] = ("input_channel", "flat")


@dataclass(frozen=True)
class GroupView:
    """How a weight of a given shape splits into groups.

    The contiguous weight is viewed as ``[outer, length, inner]``; groups are ``m`` consecutive entries
    along ``length`` at a fixed (outer, inner) position. ``inner`` is 1 for Linear and flat layouts and
    the number of kernel positions for convs in the input-channel layout.
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


def group_view(shape: torch.Size | tuple[int, ...], layout: Layout) -> GroupView:
    """Return the ``[outer, length, inner]`` view of a weight shape for ``layout`` (no divisibility check)."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if layout == "flat" or len(shape) == 1:
        return GroupView(outer=1, length=numel, inner=1)
    inner = math.prod(shape[2:]) if len(shape) > 2 else 1
    return GroupView(outer=shape[0], length=shape[1], inner=inner)


def check_nm(shape: torch.Size | tuple[int, ...], n: int, m: int, layout: Layout = "input_channel") -> str | None:
    """Why a weight of ``shape`` cannot be made ``n:m`` in ``layout``, or ``None`` if it can."""
    if len(shape) == 0:
        return "a scalar has no groups"
    if any(s == 0 for s in shape):
        return f"shape {tuple(shape)} is empty"
    gv = group_view(shape, layout)
    if gv.length % m != 0:
        if layout == "flat":
            return f"numel {gv.length} of shape {tuple(shape)} is not divisible by m={m} (layout 'flat')"
        what = "input features" if len(shape) == 2 else "input channels per group"
        return (
            f"{what} (dim 1 of shape {tuple(shape)}) = {gv.length} is not divisible by m={m} (layout 'input_channel')"
        )
    return None


def _mask_torch(weight: torch.Tensor, n: int, m: int, gv: GroupView) -> torch.Tensor:
    """Reference path (any device and dtype): a stable descending sort keeps the lower index on ties."""
    w = weight.detach().reshape(gv.outer, gv.length // m, m, gv.inner).abs()
    keep_idx = torch.sort(w, dim=2, descending=True, stable=True).indices.narrow(2, 0, n)
    mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    mask.scatter_(2, keep_idx, True)
    return mask.reshape(weight.shape)


def nm_mask(
    weight: torch.Tensor, n: int, m: int, layout: Layout = "input_channel", *, check_finite: bool = True
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

    Returns:
        A ``torch.bool`` tensor on ``weight``'s device with exactly ``n`` ``True`` per group.

    Raises:
        TypeError: ``n``/``m`` not ints, or ``weight`` not a floating tensor.
        ValueError: ``n``/``m``/``layout`` out of range, grouped dimension not divisible by ``m``,
            or NaN/Inf in ``weight``.
    """
    n, m, layout = _validate_call(weight, n, m, layout)
    return _nm_mask_op(weight.detach(), n, m, layout, check_finite)


@torch.library.custom_op("nm_lightning::nm_mask", mutates_args=())
def _nm_mask_op(weight: torch.Tensor, n: int, m: int, layout: str, check_finite: bool) -> torch.Tensor:
    # A custom op so that torch.compile treats the native kernel as one opaque op (no graph break).
    gv = group_view(weight.shape, layout)  # type: ignore[arg-type]
    if n < m and _native.supports(weight, m):
        return _native.nm_mask(weight, n, m, gv.outer, gv.length, gv.inner, check_finite)[0]
    if check_finite:
        _check_finite(weight)
    if n == m:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    return _mask_torch(weight, n, m, gv)


@_nm_mask_op.register_fake
def _(weight: torch.Tensor, n: int, m: int, layout: str, check_finite: bool) -> torch.Tensor:
    return torch.empty(weight.shape, dtype=torch.bool, device=weight.device)


def nm_masked(
    weight: torch.Tensor, n: int, m: int, layout: Layout = "input_channel"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight ⊙ mask, mask)`` in one pass over the weight (no autograd; pruned entries are +0).

    Same validation and errors as :func:`nm_mask`; this is what the SR-STE forward runs every step.
    """
    n, m, layout = _validate_call(weight, n, m, layout)
    return _nm_masked_op(weight.detach(), n, m, layout)


@torch.library.custom_op("nm_lightning::nm_masked", mutates_args=())
def _nm_masked_op(weight: torch.Tensor, n: int, m: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    gv = group_view(weight.shape, layout)  # type: ignore[arg-type]
    if n < m and _native.supports(weight, m):
        mask, masked = _native.nm_mask(weight, n, m, gv.outer, gv.length, gv.inner, True, with_masked=True)
        assert masked is not None
        return masked, mask
    mask = _nm_mask_op(weight, n, m, layout, True)
    return torch.mul(weight, mask).add_(0.0), mask  # + 0.0 turns the -0.0 of negative pruned weights into +0


@_nm_masked_op.register_fake
def _(weight: torch.Tensor, n: int, m: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(weight), torch.empty(weight.shape, dtype=torch.bool, device=weight.device)


def _validate_call(weight: torch.Tensor, n: object, m: object, layout: object) -> tuple[int, int, Layout]:
    n, m, layout = validate_nm(n, m, layout)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"nm_mask needs a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() == 1 and layout == "input_channel":
        raise ValueError(
            f"layout 'input_channel' needs a weight with >= 2 dims, got shape {tuple(weight.shape)}; use layout='flat'"
        )
    reason = check_nm(weight.shape, n, m, layout)
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
