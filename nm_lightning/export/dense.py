"""Dense-with-zeros export: the plain (never sparsified) model's keys, N:M-masked weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nm_lightning.export._util import atomic_torch_save, check_plain, state_dict_of
from nm_lightning.sparsify import plain_state_dict

__all__ = ["dense_state_dict", "save_dense"]


def dense_state_dict(model_or_state_dict: nn.Module | Mapping[str, Any]) -> dict[str, Any]:
    """The plain model's state dict with N:M-masked weights, as detached contiguous CPU tensors.

    Loads with ``strict=True`` into the never-sparsified model. Sparsified layers (``NMSparsity``
    parametrizations) contribute ``<layer>.weight`` = mask ⊙ weight; everything else is copied.
    """
    plain = plain_state_dict(state_dict_of(model_or_state_dict))
    out: dict[str, Any] = {}
    for key, value in plain.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", copy=True).contiguous()
        out[key] = value
    return out


def save_dense(model_or_state_dict: nn.Module | Mapping[str, Any], path: str | Path) -> Path:
    """Write :func:`dense_state_dict` with ``torch.save``; read it back with ``torch.load(weights_only=True)``."""
    sd = dense_state_dict(model_or_state_dict)
    for key, value in sd.items():
        check_plain(value, key)
    return atomic_torch_save(sd, path)
