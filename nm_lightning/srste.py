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

__all__ = ["ste_mask", "fixed_mask", "add_decay_", "decay_term"]


class _StraightThroughMask(torch.autograd.Function):
    """Forward ``W ⊙ E``; backward passes the gradient unchanged (pruned weights keep learning).

    Nothing is saved for backward: the masked weight is a new tensor either way, and the gradient
    needs neither ``W`` nor ``E``.
    """

    @staticmethod
    def forward(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.where(mask, weight, weight.new_zeros(()))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def ste_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight ⊙ mask`` with a straight-through gradient (the SR-STE/STE forward)."""
    return _StraightThroughMask.apply(weight, mask)


def fixed_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight ⊙ mask`` with the gradient masked too: pruned weights get no gradient (ASP-style)."""
    return torch.where(mask, weight, weight.new_zeros(()))


def decay_term(weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
    """``decay · (1 − mask) ⊙ weight``, the SR-STE regularization gradient."""
    return torch.where(mask, weight.new_zeros(()), weight) * decay


@torch.no_grad()
def add_decay_(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
    """Add the SR-STE term to ``grad`` in place (call once per optimizer step) and return ``grad``."""
    if decay != 0.0:
        grad.add_(torch.where(mask, weight.new_zeros(()), weight.detach()).to(grad.dtype), alpha=decay)
    return grad
