"""State-dict translation between a sparsified model and the plain model (no Lightning, no modules needed).

A sparsified layer ``<module>.<param>`` appears in the state dict as three entries (the parametrization's keys):

* ``<module>.parametrizations.<param>.original``: the dense weight (SR-STE keeps training it);
* ``<module>.parametrizations.<param>.0.mask``: the bool mask of the last training forward (the fixed mask in
  fixed mode);
* ``<module>.parametrizations.<param>.0._extra_state``: the layer's :class:`~nm_lightning.state.NMLayerState`.

This module is the only place that knows these key spellings. :func:`split_state_dict` turns such a state dict
into the plain model's keys (masked weights) plus the entries above; :func:`accept_plain` lets a sparsified
module load a plain (never sparsified) state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from nm_lightning.masks import group_view, nm_mask
from nm_lightning.state import STATE_MARKER, NMLayerState, fqn_of, split_fqn

__all__ = [
    "NMKeys",
    "accept_plain",
    "check_mask",
    "load_plain_weights",
    "nm_keys",
    "parse_extra_key",
    "plain_state_dict",
    "saved_states",
    "split_state_dict",
]

_PARAMETRIZATIONS = "parametrizations."
_EXTRA_SUFFIX = ".0._extra_state"


class NMKeys(NamedTuple):
    """The state-dict keys of one sparsified tensor."""

    fqn: str  # the plain key, e.g. "block.0.conv.weight"
    original: str
    mask: str
    extra: str


def nm_keys(fqn: str) -> NMKeys:
    """The parametrization keys of the tensor ``fqn``."""
    module, param = split_fqn(fqn)
    base = f"{module + '.' if module else ''}{_PARAMETRIZATIONS}{param}."
    return NMKeys(fqn, base + "original", base + "0.mask", base + "0._extra_state")


def parse_extra_key(key: str, value: Any) -> str | None:
    """The tensor FQN if ``key``/``value`` is an N:M extra-state entry, else ``None``."""
    if not key.endswith(_EXTRA_SUFFIX) or not isinstance(value, Mapping) or STATE_MARKER not in value:
        return None
    head, sep, param = key[: -len(_EXTRA_SUFFIX)].rpartition(_PARAMETRIZATIONS)
    if not sep or not param or (head and not head.endswith(".")):
        return None
    return fqn_of(head.rstrip("."), param)


def check_mask(mask: torch.Tensor, state: NMLayerState) -> None:
    """Refuse a mask that does not fit ``state``: it must be a bool tensor of the layer's shape; a fixed mask keeps
    exactly ``n`` of every ``m``, a recorded dynamic one between ``n`` and ``m`` (it may predate a schedule's last
    change of N). A checkpoint is input: an all-True "fixed" mask would silently train the layer dense."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != state.shape:
        got = f"{getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}"
        raise ValueError(f"layer {state.name!r}: the mask must be a bool tensor of shape {list(state.shape)}, "
                         f"got {got}")  # fmt: skip
    gv = group_view(state.shape, state.layout, input_dim=state.input_dim)
    counts = mask.reshape(gv.outer, gv.length // state.m, state.m, gv.inner).sum(dim=2)
    low, high = (state.n, state.n) if state.frozen else (state.n, state.m)
    bad = (counts < low) | (counts > high)
    if bool(bad.any()):
        kind = "fixed" if state.frozen else "recorded"
        raise ValueError(
            f"layer {state.name!r}: the {kind} mask is not {state.n}:{state.m}: {int(bad.sum())} of {counts.numel()} "
            f"groups keep {int(counts[bad].flatten()[0])} weights (allowed: {low}..{high}); refusing the N:M state"
        )


def saved_states(state_dict: Mapping[str, Any]) -> dict[str, NMLayerState]:
    """The N:M state of every sparsified tensor in a state dict, by FQN (validated: types, shape)."""
    out: dict[str, NMLayerState] = {}
    for key, value in state_dict.items():
        fqn = parse_extra_key(key, value)
        if fqn is None:
            continue
        original = state_dict.get(nm_keys(fqn).original)
        shape = tuple(original.shape) if isinstance(original, torch.Tensor) else None
        out[fqn] = NMLayerState.from_dict(fqn, value, shape=shape)
    return out


def split_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a sparsified model's state dict into (plain keys with masked weights, N:M entries).

    Pure function of the state dict: the masks come from the stored state (``n``, ``m``, layout, fixed mask),
    so it also works on a checkpoint file without the model. The first dict loads with ``strict=True`` into the
    never-sparsified model; the second holds the dense weights, masks and states needed to resume exactly.
    Pruned entries are +0.0.
    """
    plain: dict[str, Any] = {}
    nm_entries: dict[str, Any] = {}
    for fqn, state in saved_states(state_dict).items():
        keys = nm_keys(fqn)
        base = keys.extra[: -len("0._extra_state")]
        others = [k for k in state_dict if k.startswith(base) and k[len(base) :].split(".")[0].isdigit()]
        if any(not k.startswith(base + "0.") for k in others):
            raise ValueError(f"{fqn}: N:M must be the only parametrization to export it, found {others}")
        if keys.original not in state_dict or keys.mask not in state_dict:
            raise ValueError(f"{fqn}: the state dict has the N:M state but lacks {keys.original} or {keys.mask}")
        original, mask = state_dict[keys.original], state_dict[keys.mask]
        check_mask(mask, state)
        if not state.frozen:
            mask = nm_mask(original, state.n, state.m, state.layout, input_dim=state.input_dim)
        plain[fqn] = torch.where(mask, original, original.new_zeros(())).detach()
        for k in (keys.original, keys.mask, keys.extra):
            nm_entries[k] = state_dict[k]
    for key, value in state_dict.items():
        if key not in nm_entries:
            plain.setdefault(key, value)
    return plain, nm_entries


def plain_state_dict(model_or_state_dict: nn.Module | Mapping[str, Any]) -> dict[str, Any]:
    """State dict with the plain model's keys and the N:M-masked weights (dense tensors with zeros)."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    return split_state_dict(sd)[0]


def accept_plain(sp: Any, state_dict: dict[str, Any], module_prefix: str, param_name: str) -> None:
    """Let a plain (never sparsified) state dict load into a sparsified module (a load-state-dict pre-hook).

    ``<prefix><param>`` becomes ``original``; mask and state default to the current ones (``sp`` is the
    module's :class:`~nm_lightning.sparsify.NMSparsity`). For a fixed mask the mask is recomputed from the loaded
    weight (one-shot magnitude pruning).
    """
    keys = nm_keys(module_prefix + param_name)
    if keys.fqn not in state_dict or keys.original in state_dict:
        return
    weight = state_dict.pop(keys.fqn)
    state_dict.setdefault(keys.extra, sp.get_extra_state())
    if sp.frozen and isinstance(weight, torch.Tensor):
        state_dict.setdefault(keys.mask, sp.compute_mask(weight))
        weight = torch.where(state_dict[keys.mask], weight, weight.new_zeros(()))
    state_dict.setdefault(keys.mask, sp.mask.detach().clone())
    state_dict[keys.original] = weight


def load_plain_weights(model: nn.Module, path: str | Path) -> None:
    """Load a plain state dict file (``torch.save`` of a plain model's ``state_dict``) with ``strict=True``.

    Loaded with ``weights_only=True``: nothing in the file is executed.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file not found: {path}") from None
    except Exception as err:  # a pickle with code, a truncated zip, ...
        raise ValueError(f"{path}: not a readable weights file ({type(err).__name__}: {str(err)[:300]})") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{path}: does not match the model: {err}") from None
