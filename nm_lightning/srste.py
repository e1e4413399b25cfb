"""SR-STE as pure autograd pieces (no modules, no Lightning).

SR-STE (Zhou et al., ICLR 2021) trains a dense weight ``W`` whose forward uses ``W ⊙ E`` (``E`` the N:M
mask of ``W``) and whose gradient is ``dL/dW̃ + λ·(1−E)⊙W``: every weight receives the straight-through
gradient, and the pruned ones are also pulled towards zero so that the mask settles.

Where this differs from the reference code: the reference adds ``λ·(1−E)⊙W`` inside the autograd
backward. That is added once per *backward* (k times per optimizer step with gradient accumulation),
is not loss-scaled under fp16 AMP (so it shrinks by the loss scale after unscaling), and is summed
over ranks by its all-reduce (×world size). Here the backward is the plain straight-through estimator
and :func:`add_decay_` adds the term once per optimizer step, on the unscaled, already reduced
gradient (``SRSTECallback`` calls it from ``on_before_optimizer_step``), so λ means the same thing for
every batch size, accumulation factor, precision and number of devices.
"""

from __future__ import annotations

from typing import Any

import torch

from nm_lightning import _native
from nm_lightning.masks import Layout, apply_mask, nm_masked

__all__ = ["ste_nm", "fixed_mask", "add_decay_", "tag_masked_weight", "recompute_masked_weights"]


class _StraightThroughNM(torch.autograd.Function):
    """Forward: ``(W ⊙ E, E)`` with ``E`` the N:M mask of ``W``, in one fused pass; backward: the gradient
    passes to ``W`` unchanged (pruned weights keep learning).

    Nothing is saved for backward: the gradient needs neither ``W`` nor ``E``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        weight: torch.Tensor, n: int, m: int, layout: str, input_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return nm_masked(weight, n, m, layout, input_dim=input_dim)  # type: ignore[arg-type]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_mask: Any) -> tuple[torch.Tensor, None, None, None, None]:  # type: ignore[override]
        return grad, None, None, None, None


def ste_nm(
    weight: torch.Tensor, n: int, m: int, layout: Layout = "input_channel", *, input_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight ⊙ E, E)`` with a straight-through gradient (the SR-STE/STE forward), ``E = nm_mask(weight)``.

    Kept entries keep their exact bits, pruned ones are ``+0.0`` (see :func:`nm_lightning.masks.nm_masked`);
    ``input_dim`` as in :func:`nm_lightning.masks.nm_mask`.
    """
    return _StraightThroughNM.apply(weight, n, m, layout, input_dim)


def fixed_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight ⊙ mask`` with the gradient masked too: pruned weights get no gradient (ASP-style).

    Computed as ``torch.where(mask, weight, 0)``: kept entries keep their bits (``-0.0`` included), pruned
    entries are ``+0.0``, bit for bit the same as :func:`ste_nm`'s forward for the same mask.
    """
    return apply_mask(weight, mask)


@torch.no_grad()
def add_decay_(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
    """Add the SR-STE term to ``grad`` in place (call once per optimizer step) and return ``grad``."""
    if decay == 0.0:
        return grad
    weight = weight.detach()
    if _native.supports_decay(grad, weight, mask):
        _native.add_decay_(grad, weight, mask, decay)
    else:
        grad.add_((weight * ~mask).to(grad.dtype), alpha=decay)
    return grad


# ---------------------------------------------------------------------- memory: recompute W ⊙ E in backward
_SOURCE_ATTR = "_nm_source"


def tag_masked_weight(masked: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Remember how ``masked`` was made, so :func:`recompute_masked_weights` can drop it after forward."""
    setattr(masked, _SOURCE_ATTR, (weight, mask))


def _pack(t: torch.Tensor) -> Any:
    src = getattr(t, _SOURCE_ATTR, None)
    base = t
    if src is None and t._base is not None:  # e.g. F.linear saves weight.t(), a view of the masked weight
        base = t._base
        src = getattr(base, _SOURCE_ATTR, None)
    if src is None or base.dtype != src[0].dtype:
        return t
    weight, mask = src
    view = None if base is t else (tuple(t.size()), tuple(t.stride()), t.storage_offset())
    return (_SOURCE_ATTR, weight, mask, weight._version, view)


def _unpack(packed: Any) -> torch.Tensor:
    if not (isinstance(packed, tuple) and packed and packed[0] == _SOURCE_ATTR):
        return packed
    _, weight, mask, version, view = packed
    if weight._version != version:
        raise RuntimeError(
            "an N:M-sparse weight was modified in place between forward and backward; its masked value, "
            "needed by backward, can no longer be rebuilt (SRSTECallback(recompute_masked=False) keeps a copy)"
        )
    with torch.no_grad():
        masked = apply_mask(weight, mask)  # bit-identical to the forward's W ⊙ E (kept bits; +0 where pruned)
    return masked if view is None else masked.as_strided(*view)


def recompute_masked_weights() -> torch.autograd.graph.saved_tensors_hooks:
    """Context in which layers that save an N:M-masked weight for backward keep only ``W`` (a Parameter,
    which exists anyway) and the bool mask (1 byte per weight) instead of the 4-byte ``W ⊙ E``; backward
    rebuilds ``W ⊙ E`` exactly. Other saved tensors are untouched; hooks entered inside take precedence."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
