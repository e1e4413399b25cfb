"""Sparsity telemetry: mask flip rate (SAD) as a torchmetrics metric, and sparsity counts.

SAD (sparse architecture divergence, Zhou et al. 2021) is the number of mask entries that differ between
two steps; divided by the number of entries it is the "flip rate" (Hu et al. 2024). A high flip rate
means the sparse topology is still churning; SR-STE's decay term exists to bring it down.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["MaskFlipRate", "mask_flips", "nonzero_count"]


def mask_flips(old: torch.Tensor, new: torch.Tensor) -> int:
    """Number of positions where two bool masks differ (SAD)."""
    return int(torch.ne(old, new).sum())


def nonzero_count(weight: torch.Tensor, mask: torch.Tensor) -> int:
    """Non-zeros of the effective weight ``weight ⊙ mask``."""
    return int(torch.logical_and(mask, weight != 0).sum())


class MaskFlipRate(Metric):
    """Fraction of mask entries that flipped, accumulated over any number of (old, new) mask pairs."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("flips", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, old: torch.Tensor, new: torch.Tensor) -> None:
        if old.shape != new.shape:
            raise ValueError(f"mask shapes differ: {tuple(old.shape)} vs {tuple(new.shape)}")
        self.flips += torch.ne(old, new).sum().to(self.flips.device)
        self.total += new.numel()

    def compute(self) -> torch.Tensor:
        return self.flips.double() / self.total.clamp(min=1)
