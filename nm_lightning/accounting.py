"""Parameter and MAC accounting of N:M schemes, counted like the DominoSearch paper.

Covered weights only (convs incl. stem/downsample, linears, attention projections); biases and norms are
not counted. MACs are measured from one real forward pass and reported per sample:

* Convolutions, linears and any other covered module: :class:`torch.utils.flop_counter.FlopCounterMode`
  counts the matmul/convolution FLOPs of the forward, and forward pre/post hooks on the covered modules
  attribute them to the module whose call they ran in (nested covered modules are counted exclusively).
  MACs are FLOPs / 2: ``P`` weights times the output positions (a conv's output pixels, a linear's tokens),
  the paper's ``Kh·Kw·Cin·Cout·Hout·Wout``; stride, padding, dilation and groups (``Cin/groups`` per filter)
  come out of the real output shape, and the bias is not counted. FlopCounterMode's own per-module table is
  not used: it names modules by an undocumented ``<RootClass>.<path>`` scheme and a shared module once.
* ``nn.MultiheadAttention``: its projections are one module, and ``out_proj`` is applied functionally, so
  FlopCounterMode cannot split them; a hook reads the query/key/value token counts instead. ``in_proj_weight``
  costs ``E·E`` per query, key and value token (``3·E·E·L`` for self-attention), ``q/k/v_proj_weight`` their
  size per query/key/value token, ``out_proj`` ``E·E`` per query token. The attention products themselves
  (``QKᵀ``, ``AV``) use no weight and are not counted.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nm_lightning.sparsify.parametrization import get_param

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


# MultiheadAttention weights -> the input (0 query, 1 key, 2 value) whose tokens each of its rows multiplies
_MHA_INPUT = {"q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2, "out_proj": 0}
_MHA_PARAMS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _tokens(x: Any) -> int:
    """Number of token vectors in an attention input ``(..., features)``."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"cannot count the tokens of a MultiheadAttention input of type {type(x).__name__}")
    return x.numel() // x.shape[-1]


@torch.no_grad()
def measure_macs(model: nn.Module, example_input: Any, names: list[str]) -> dict[str, float]:
    """Dense MACs per sample of each named layer, from one forward pass on ``example_input``.

    ``names`` are layer names as in a scheme (``conv1``, ``attn.in_proj_weight``, ``attn.out_proj``).
    ``example_input`` is a tensor (batch first), or a tuple/list of positional arguments whose first tensor
    gives the batch size. The model is run in eval mode (no BatchNorm statistics change) and restored
    afterwards. Raises ``ValueError`` for a name that is not a layer of ``model`` or a layer the forward
    pass did not run. See the module docstring for what is counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    batch = _batch_size(example_input)
    modules = dict(model.named_modules())
    # name -> (module whose call is measured, weight, role): role "ops" = FlopCounterMode's count of that call,
    # else the MultiheadAttention input(s) whose tokens the weight multiplies
    targets: dict[str, tuple[nn.Module, torch.Tensor, str]] = {}
    for name in names:
        module_name, param = _split(name, model)
        module = modules.get(module_name)
        # the stored parameter (its global shape under FSDP2): reading the parametrized weight would run the mask
        weight = None if module is None else get_param(module, param)
        if weight is None and module is not None:
            weight = getattr(module, param, None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"no layer named {name!r} in the model")
        parent = modules.get(module_name.rpartition(".")[0]) if module_name else None
        if isinstance(module, nn.MultiheadAttention):
            if param not in _MHA_PARAMS:
                raise ValueError(f"cannot count MACs of {name!r}: a MultiheadAttention weight is one of {_MHA_PARAMS}")
            targets[name] = (module, weight, param)
        elif param == "weight" and module_name.endswith("out_proj") and isinstance(parent, nn.MultiheadAttention):
            targets[name] = (parent, weight, "out_proj")  # MultiheadAttention applies out_proj functionally
        else:
            targets[name] = (module, weight, "ops")

    counter = FlopCounterMode(display=False)
    own_flops: dict[int, int] = {}  # id(module) -> FLOPs of its calls, covered modules nested in it excluded
    mha_tokens: dict[int, list[int]] = {}  # id(MultiheadAttention) -> query, key, value tokens
    frames: list[list[int]] = []  # open calls: [total FLOPs at entry, FLOPs of nested covered calls]

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        frames.append([counter.get_total_flops(), 0])
        if isinstance(module, nn.MultiheadAttention):
            qkv = [args[i] if len(args) > i else kwargs.get(key) for i, key in enumerate(("query", "key", "value"))]
            counts = mha_tokens.setdefault(id(module), [0, 0, 0])
            for i, x in enumerate(qkv):
                counts[i] += _tokens(x)

    def post_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        start, nested = frames.pop()
        total = counter.get_total_flops() - start
        own_flops[id(module)] = own_flops.get(id(module), 0) + total - nested
        if frames:
            frames[-1][1] += total

    hooked = {id(module): module for module, _, _ in targets.values()}
    handles = []
    for module in hooked.values():
        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with counter:
            if isinstance(example_input, (list, tuple)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    macs: dict[str, float] = {}
    for name, (module, weight, role) in targets.items():
        if id(module) not in own_flops:
            raise ValueError(f"layer {name!r} was not run by the example forward pass, so its MACs are unknown")
        if role == "ops":
            total = own_flops[id(module)] / 2
        else:
            q, k, v = mha_tokens[id(module)]
            if role == "in_proj_weight":  # [3E, E]: the q, k and v blocks of E·E each
                block = weight.numel() // 3
                total = block * (q + k + v)
            else:
                total = weight.numel() * (q, k, v)[_MHA_INPUT[role]]
        macs[name] = float(total) / batch
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
