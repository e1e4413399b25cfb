"""Parameter and MAC accounting of N:M schemes, counted like the DominoSearch paper.

Covered weights only (convs incl. stem/downsample, linears, attention projections); biases and norms are
not counted. MACs are measured from a real forward pass: hooks record how many output positions each
layer computes on the example batch, and a weight of ``P`` entries costs ``P`` MACs per position (for a
conv, one position is one output pixel; for a linear or projection, one token). Results are per sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["measure_macs", "scheme_stats"]


def _split(name: str, model: nn.Module) -> tuple[str, str]:
    """Layer name -> (module name, parameter name)."""
    try:
        model.get_submodule(name)
        return name, "weight"
    except AttributeError:
        head, _, param = name.rpartition(".")
        return head, param


def _batch_size(example_input: Any) -> int:
    first = example_input
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, Mapping):
        first = next(iter(first.values()))
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise ValueError("cannot find the batch size of the example input: give a tensor (or tuple of tensors)")
    return int(first.shape[0])


@torch.no_grad()
def measure_macs(model: nn.Module, example_input: Any, names: list[str]) -> dict[str, float]:
    """Dense MACs per sample of each named layer, from one forward pass on ``example_input``.

    ``names`` are layer names as in a scheme (``conv1``, ``attn.in_proj_weight``, ``attn.out_proj``).
    The model is run in eval mode (no BatchNorm statistics change) and restored afterwards.
    """
    positions: dict[str, float] = {}
    handles = []

    def make_hook(module_name: str, kind: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if kind == "mha":  # tokens = query elements / embed dim; out_proj is called functionally
                positions[module_name] = positions.get(module_name, 0.0) + args[0].numel() / module.embed_dim
                return
            out = output[0] if isinstance(output, tuple) else output
            channels = module.out_channels if kind == "conv" else module.out_features
            positions[module_name] = positions.get(module_name, 0.0) + out.numel() / channels

        return hook

    modules = dict(model.named_modules())
    for module_name, module in modules.items():
        cls = parametrize.type_before_parametrizations(module)
        kind = None
        if issubclass(cls, nn.MultiheadAttention):
            kind = "mha"
        elif issubclass(cls, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kind = "conv"
        elif issubclass(cls, nn.Linear):
            kind = "linear"
        if kind is not None:
            handles.append(module.register_forward_hook(make_hook(module_name, kind)))
    was_training = model.training
    model.eval()
    try:
        if isinstance(example_input, (list, tuple)):
            model(*example_input)
        else:
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    batch = _batch_size(example_input)
    macs: dict[str, float] = {}
    for name in names:
        module_name, param = _split(name, model)
        module = modules.get(module_name)
        if module is None:
            raise ValueError(f"no layer named {name!r} in the model")
        pos = positions.get(module_name)
        parent = module_name.rpartition(".")[0]
        if pos is None and module_name.endswith("out_proj") and isinstance(modules.get(parent), nn.MultiheadAttention):
            pos = positions.get(parent)  # MultiheadAttention calls out_proj's weight functionally
        if pos is None:
            raise ValueError(f"layer {name!r} was not run by the example forward pass, so its MACs are unknown")
        weight = getattr(module, param)
        macs[name] = float(weight.numel()) * pos / batch
    return macs


def scheme_stats(model: nn.Module, scheme: Mapping[str, tuple[int, int]], example_input: Any) -> dict[str, Any]:
    """Kept parameters, sparsity and MACs of ``model`` under ``scheme`` (covered layers = the scheme's).

    Returns ``kept_params``, ``total_params``, ``sparsity`` (1 − kept/total), ``macs``, ``dense_macs``,
    ``flops_reduction`` (1 − macs/dense_macs) and ``layers`` (per-layer ``n``, ``m``, ``params``,
    ``kept_params``, ``dense_macs``, ``macs``). Kept weights per layer are ``int(P·n/m)`` as in the paper.
    """
    names = list(scheme)
    dense_macs = measure_macs(model, example_input, names)
    layers: dict[str, dict[str, float]] = {}
    for name in names:
        n, m = scheme[name]
        module_name, param = _split(name, model)
        params = getattr(model.get_submodule(module_name), param).numel()
        layers[name] = {
            "n": n, "m": m, "params": params, "kept_params": int(params * n / m),
            "dense_macs": dense_macs[name], "macs": dense_macs[name] * n / m,
        }  # fmt: skip
    total = sum(v["params"] for v in layers.values())
    kept = sum(v["kept_params"] for v in layers.values())
    dmacs = sum(v["dense_macs"] for v in layers.values())
    smacs = sum(v["macs"] for v in layers.values())
    return {
        "kept_params": kept,
        "total_params": total,
        "sparsity": 1.0 - kept / total if total else 0.0,
        "macs": smacs,
        "dense_macs": dmacs,
        "flops_reduction": 1.0 - smacs / dmacs if dmacs else 0.0,
        "layers": layers,
    }
