r"""One-shot N:M pruning of a plain, pretrained model from calibration data (pure PyTorch, no Lightning).

:func:`prune_one_shot` prunes every covered weight of a model in place to exactly ``n`` non-zeros in
every group of ``m`` consecutive *input* features (the registry of :mod:`nm_lightning.layers` says which
dimension that is; for a conv, ``m`` consecutive input channels at one kernel position). Three methods:

* ``"magnitude"``: keep the ``n`` largest ``|W_ij|`` of each group.
* ``"wanda"`` (Sun et al., 2024): keep the ``n`` largest ``|W_ij| · ‖X_j‖₂`` of each group, where
  ``‖X_j‖₂`` is the norm of input feature ``j`` over all calibration tokens. No weight update.
* ``"sparsegpt"`` (Frantar & Alistarh, 2023): per layer, with ``X ∈ R^{d_in × T}`` its calibration inputs,
  minimise ``‖W X − W' X‖²`` over N:M ``W'`` approximately, with the Optimal Brain Surgeon update:

  - ``H = 2 X Xᵀ / T`` (the Hessian of the layer-wise squared error), dampened:
    ``H ← H + λ I`` with ``λ = percdamp · mean(diag H)``; columns never active get ``H_jj = 1``;
  - ``U = chol(H⁻¹)ᵀ`` (upper Cholesky factor of the inverse), so that row ``j`` of ``U`` is the
    ``j``-th row of the inverse Hessian of the columns not yet processed, divided by ``√[H⁻¹]_jj``;
  - columns are visited left to right (in blocks of ``blocksize`` for speed, with lazy batched
    updates of the columns after the block). At the first column of every group of ``m``, the mask of
    the group is chosen for each row: the ``m − n`` entries with the smallest OBS saliency
    ``w_j² / U_jj²`` are pruned (``w`` already includes the updates from earlier columns);
  - visiting column ``j``: ``q_j = w_j`` (kept) or ``0`` (pruned), ``e = (w_j − q_j) / U_jj``, and every
    later column ``k > j`` absorbs the error: ``w_k ← w_k − e · U_jk``.

  This is the faithful algorithm, with its weight update (the update is what makes SparseGPT beat
  mask-only selection).

All three run **sequentially** over the layers in forward order: a layer's calibration inputs are
recomputed by a forward pass through the *already pruned* predecessors. Layers that read the very same
input tensor (e.g. the q/k/v projections of an attention block) are pruned together from one pass. Only the
Hessians of the layers being pruned exist at any time (one per input, shared by siblings).

The reconstruction error reported per layer is ``‖W X − W' X‖_F² / ‖W X‖_F²`` on the calibration inputs
(bias excluded), computed exactly as ``tr(D H Dᵀ) / tr(W H Wᵀ)`` with ``D = W − W'`` and the undampened ``H``.

How a calibration item is fed: a tensor ``x`` as ``model(x)``, a tuple/list as ``model(*item)``, a dict as
``model(**item)``; tensors inside are moved to the model's device. Nothing is trained; the model runs in
``eval()`` mode under ``torch.no_grad()`` and gets its training flag back afterwards.
"""

from __future__ import annotations

import fnmatch
import math
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from nm_lightning.layers import input_dim_of, input_major, registered_params
from nm_lightning.masks import Layout, nm_mask, validate_nm

__all__ = ["METHODS", "OneShotLayer", "OneShotReport", "prune_one_shot", "sparsegpt_prune"]

Method = Literal["sparsegpt", "wanda", "magnitude"]
METHODS: tuple[str, ...] = ("sparsegpt", "wanda", "magnitude")
_MHA_CONTEXT = "<attention output>"
_MHA_INPUTS = {"in_proj_weight": None, "q_proj_weight": "query", "k_proj_weight": "key", "v_proj_weight": "value"}


# ---------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class OneShotLayer:
    """One pruned weight: its name, type, shape, method, N:M, reconstruction error and time."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    method: str
    n: int
    m: int
    rel_error: float  # ‖W X − W' X‖² / ‖W X‖² on the calibration inputs
    seconds: float
    tokens: int  # calibration rows (tokens × output positions) seen by the layer


@dataclass
class OneShotReport:
    """What :func:`prune_one_shot` did: pruned layers (in forward order), layers left alone and why."""

    method: str
    layers: list[OneShotLayer] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)
    calibration_batches: int = 0
    seconds: float = 0.0

    @property
    def mean_rel_error(self) -> float:
        """Mean per-layer reconstruction error (``nan`` when no layer was pruned)."""
        return sum(r.rel_error for r in self.layers) / len(self.layers) if self.layers else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the report."""
        return {
            "method": self.method,
            "calibration_batches": self.calibration_batches,
            "seconds": self.seconds,
            "mean_rel_error": self.mean_rel_error,
            "layers": [asdict(r) for r in self.layers],
            "excluded": [list(e) for e in self.excluded],
        }

    def table(self, title: str | None = None) -> Any:
        """A ``rich.table.Table``: one row per pruned layer, then the excluded ones with their reason."""
        from rich.table import Table

        table = Table(title=title or f"one-shot N:M pruning ({self.method}, {self.calibration_batches} batches)")
        for col in ("layer", "type", "shape", "n:m", "rel. error", "seconds", "note"):
            table.add_column(col, justify="right" if col in ("n:m", "rel. error", "seconds") else "left")
        for r in self.layers:
            table.add_row(
                r.name,
                r.type_name,
                str(r.shape),
                f"{r.n}:{r.m}",
                f"{r.rel_error:.4g}",
                f"{r.seconds:.2f}",
                r.method,
                style="green",
            )
        for name, reason in self.excluded:
            table.add_row(name, "", "", "", "", "", f"excluded: {reason}", style="dim")
        return table

    def print(self, console: Any = None) -> None:
        """Print :meth:`table` (to ``console`` or a new ``rich.console.Console``)."""
        from rich.console import Console

        (console or Console()).print(self.table())


# ---------------------------------------------------------------------------------------------- pure cores
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    n: int,
    m: int,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "weight",
) -> torch.Tensor:
    """SparseGPT N:M on a ``[rows, cols]`` matrix whose groups are ``m`` consecutive columns.

    Args:
        weight: ``[rows, cols]``, ``cols % m == 0``; not modified.
        hessian: ``[cols, cols]`` ``2 X Xᵀ / T`` of the inputs (undampened; not modified).
        n, m: keep ``n`` of every ``m`` consecutive columns in each row.
        blocksize: columns per lazy-update block (rounded down to a multiple of ``m``, at least ``m``).
        percdamp: dampening ``λ = percdamp · mean(diag H)`` added to the diagonal.
        name: the layer's name, for error messages.

    Returns:
        The pruned and OBS-updated weight (same dtype as the computation: float64 for a float64 input,
        else float32), with exactly ``m − n`` zeros chosen per group (kept entries may also be zero).

    Raises:
        ValueError: non-finite Hessian, or a Hessian that is not positive definite after dampening.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(dtype).clone()
    rows, cols = W.shape
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"layer {name!r}: its calibration inputs give a non-finite Hessian (NaN/Inf activations)")
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diagonal(H))
    H.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(U).all()):
        raise ValueError(
            f"layer {name!r}: the input Hessian is singular after dampening (percdamp={percdamp}); "
            "raise percdamp or give more (varied) calibration data"
        )
    bs = max(m, blocksize // m * m)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0 and n < m:
                saliency = W1[:, i : i + m] ** 2 / d1[i : i + m].unsqueeze(0) ** 2
                drop = torch.topk(saliency, m - n, dim=1, largest=False, sorted=False).indices
                pruned[:, i : i + m].scatter_(1, drop, True)
            w = W1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W


def _score_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask of ``[rows, cols]`` scores: the ``n`` largest of every ``m`` consecutive columns."""
    return nm_mask(scores, n, m, "input_channel")


# ---------------------------------------------------------------------------------------------- targets
@dataclass
class _Part:
    """Rows of a target weight that read one input (a conv group, an MHA projection, or all rows)."""

    rows: slice
    arg: str | int  # which forward argument of the source module is the input (name or position)
    channels: slice | None = None  # input channels of a grouped conv
    hkey: tuple = ()  # parts with equal (input, hkey) share one Hessian


@dataclass
class _Target:
    name: str
    module_name: str
    module: nn.Module
    param: str
    input_dim: int
    n: int
    m: int
    parts: list[_Part]
    source: nn.Module  # the module whose forward receives the input (the MHA for its projections)
    weight2d: Callable[[torch.Tensor], torch.Tensor] = field(repr=False, default=None)  # type: ignore[assignment]
    unweight2d: Callable[[torch.Tensor], torch.Tensor] = field(repr=False, default=None)  # type: ignore[assignment]
    features: Callable[[torch.Tensor, _Part], torch.Tensor] = field(repr=False, default=None)  # type: ignore[assignment]
    cols: int = 0  # columns of the weight2d view
    once: bool = False  # the module ran exactly once per forward (set by _call_order)
    slots: list[int] = field(default_factory=list)  # Hessian slot of each part (set by _call_order)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed  # noqa: SLF001


def _im2col(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:  # noqa: SLF001
    """``[rows, C·K]`` patches of a conv input (rows = batch × output positions), channel-major like the weight."""
    nd = len(module.kernel_size)
    if x.dim() == nd + 1:  # unbatched
        x = x.unsqueeze(0)
    if isinstance(module.padding, str) or any(module.padding):
        pad = module._reversed_padding_repeated_twice  # noqa: SLF001 - the pad the module itself applies
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    for i in range(nd):
        k, s, d = module.kernel_size[i], module.stride[i], module.dilation[i]
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    # x: [B, C, L1..Lnd, k1..knd]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(perm)
    c_k = x.shape[1 + nd :].numel()
    return x.reshape(-1, c_k)


def _make_target(
    name: str,
    module_name: str,
    module: nn.Module,
    param: str,
    input_dim: int,
    n: int,
    m: int,
    layout: Layout,
    parent: nn.Module | None = None,
) -> _Target:
    w = module._parameters[param]  # noqa: SLF001
    assert w is not None
    shape = tuple(w.shape)
    type_name = type(module).__name__
    if w.dim() < 2:
        raise ValueError(f"layer {name!r} ({type_name}): a {w.dim()}-D weight has no input dimension to group along")
    view = input_major(w.detach(), input_dim)
    out_f, in_f = view.shape[0], view.shape[1]
    kpos = view[0, 0].numel()
    if layout == "flat" and input_dim != 1:
        raise ValueError(
            f"layer {name!r} ({type_name}): layout 'flat' groups the stored weight, whose dim {input_dim} is the "
            "input here; use layout='input_channel'"
        )
    if layout == "flat" and (in_f * kpos) % m:
        raise ValueError(
            f"layer {name!r} ({type_name}): {in_f * kpos} weights per output row (shape {shape}) are not divisible "
            f"by m={m}; one-shot 'flat' groups must not straddle rows"
        )
    if layout == "input_channel" and in_f % m:
        raise ValueError(
            f"layer {name!r} ({type_name}): its input size (dim {input_dim} of weight shape {shape}) = {in_f} is not "
            f"divisible by m={m}; exclude it or choose another m for it in scheme="
        )

    def weight2d(weight: torch.Tensor) -> torch.Tensor:
        v = input_major(weight, input_dim)
        if layout == "flat":
            return v.reshape(out_f, -1)
        return v.movedim(1, -1).reshape(out_f, -1)  # column = kernel position · in + channel

    def unweight2d(mat: torch.Tensor) -> torch.Tensor:
        if layout == "flat":
            v = mat.reshape(view.shape)
        else:
            v = mat.reshape(out_f, *view.shape[2:], in_f).movedim(-1, 1)
        return v if input_dim == 1 else v.movedim(1, input_dim)

    def cols(x2d: torch.Tensor, c: int) -> torch.Tensor:  # (channel, kpos) columns -> the weight2d order
        if layout == "flat" or kpos == 1:
            return x2d
        return x2d.reshape(-1, c, kpos).transpose(1, 2).reshape(-1, kpos * c)

    source = module
    if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj and param == "weight":
        # MultiheadAttention reads out_proj.weight directly (out_proj's forward never runs): its input is the
        # attention output before the projection, recomputed from the MHA's own call (see _mha_context)
        source = parent
        parts = [_Part(slice(0, out_f), _MHA_CONTEXT, hkey=("linear",))]

        def features(x: torch.Tensor, part: _Part) -> torch.Tensor:
            return x.reshape(-1, in_f)
    elif isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        if param == "in_proj_weight":
            parts = [
                _Part(slice(i * e, (i + 1) * e), arg, hkey=("mha",)) for i, arg in enumerate(("query", "key", "value"))
            ]
        else:
            parts = [_Part(slice(0, out_f), _MHA_INPUTS[param], hkey=("mha",))]

        def features(x: torch.Tensor, part: _Part) -> torch.Tensor:
            return x.reshape(-1, x.shape[-1])
    elif _is_conv(module):
        groups = module.groups
        og = out_f // groups
        parts = [
            _Part(
                slice(g * og, (g + 1) * og),
                0,
                slice(g * in_f, (g + 1) * in_f),
                hkey=(
                    "conv",
                    module.kernel_size,
                    module.stride,
                    module.padding,
                    module.dilation,
                    module.padding_mode,
                    layout,
                ),
            )
            for g in range(groups)
        ]

        def features(x: torch.Tensor, part: _Part) -> torch.Tensor:
            if part.channels is not None and groups > 1:
                x = x.narrow(-1 - len(module.kernel_size), part.channels.start, in_f)
            return cols(_im2col(module, x), in_f)
    else:
        if kpos != 1:
            raise ValueError(
                f"layer {name!r} ({type_name}): one-shot pruning needs its inputs, known for 2-D weights and "
                f"nn.Conv1d/2d/3d only, not a weight of shape {shape}; exclude it"
            )
        parts = [_Part(slice(0, out_f), 0, hkey=("linear",))]

        def features(x: torch.Tensor, part: _Part) -> torch.Tensor:
            if x.shape[-1] != in_f:
                raise ValueError(
                    f"layer {name!r} ({type_name}): its input has last dim {x.shape[-1]}, the weight's input size is "
                    f"{in_f}"
                )
            return x.reshape(-1, in_f)

    return _Target(
        name,
        module_name,
        module,
        param,
        input_dim,
        n,
        m,
        parts,
        source,
        weight2d,
        unweight2d,
        features,
        cols=in_f * kpos,
    )


def _select(
    model: nn.Module,
    n: int,
    m: int,
    layout: Layout,
    scheme: Mapping[str, tuple[int, int]] | None,
    include: list[str] | None,
    exclude: list[str],
) -> tuple[list[_Target], list[tuple[str, str]]]:
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    targets: list[_Target] = []
    excluded: list[tuple[str, str]] = []
    seen: set[str] = set()
    for module_name, module in model.named_modules():
        params = registered_params(module)
        if not params:
            continue
        for param in params:
            if param not in module._parameters or module._parameters[param] is None:  # noqa: SLF001
                if parametrize.is_parametrized(module, param):
                    raise ValueError(
                        f"layer {module_name or param!r}: {param} is parametrized; prune_one_shot works on plain "
                        "modules (call nm_lightning.detach(model) first)"
                    )
                continue
            name = module_name if param == "weight" else (f"{module_name}.{param}" if module_name else param)
            seen.add(name)
            if include is not None and not any(fnmatch.fnmatchcase(name, g) for g in include):
                excluded.append((name, "not matched by include"))
                continue
            hit = next((g for g in exclude if fnmatch.fnmatchcase(name, g)), None)
            if hit is not None:
                excluded.append((name, f"matched exclude {hit!r}"))
                continue
            full = f"{module_name}.{param}" if module_name else param
            shared = [o for o in owners.get(id(module._parameters[param]), []) if o != full]  # noqa: SLF001
            if shared:
                excluded.append((name, f"weight is shared with {', '.join(shared)} (tied weights)"))
                continue
            ln, lm = scheme.get(name, (n, m)) if scheme is not None else (n, m)
            if scheme is not None and name not in scheme:
                excluded.append((name, "not in scheme"))
                continue
            if ln == lm:
                excluded.append((name, f"kept dense ({ln}:{lm})"))
                continue
            input_dim = input_dim_of(module, param)
            assert input_dim is not None
            parent = model.get_submodule(module_name.rpartition(".")[0]) if module_name else None
            targets.append(_make_target(name, module_name, module, param, input_dim, ln, lm, layout, parent))
    if scheme is not None:
        missing = sorted(set(scheme) - seen)
        if missing:
            raise ValueError(
                f"prune_one_shot scheme names layers the model does not have: {missing}; candidate layers: "
                f"{', '.join(sorted(seen)) or 'none'}"
            )
    return targets, excluded


# ---------------------------------------------------------------------------------------------- forward plumbing
class _Stop(BaseException):
    """Raised from a hook to end a calibration forward once the layers being pruned have their inputs.

    A ``BaseException``, so that a model catching ``Exception`` in its forward does not swallow it.
    """


class _LayerError(ValueError):
    """A problem found at a named layer while a calibration forward runs (passed through, never re-wrapped)."""


def _to_device(item: Any, device: torch.device) -> Any:
    if isinstance(item, torch.Tensor):
        return item.to(device)
    if isinstance(item, tuple):
        return tuple(_to_device(v, device) for v in item)
    if isinstance(item, list):
        return [_to_device(v, device) for v in item]
    if isinstance(item, Mapping):
        return {k: _to_device(v, device) for k, v in item.items()}
    return item


def _call(model: nn.Module, item: Any) -> Any:
    if isinstance(item, Mapping):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


def _input(mod: nn.Module, args: tuple, kwargs: dict, key: str | int) -> Any:
    """The input ``key`` names in a pre-hook call of ``mod`` (a position, an argument name, or the MHA context)."""
    if key == _MHA_CONTEXT:
        return _mha_context(mod, args, kwargs)  # type: ignore[arg-type]
    return _arg(args, kwargs, key, _MHA_POS)


def _mha_context(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """The attention output *before* ``out_proj``: the MHA's own forward with an identity projection."""
    w, b = mha.out_proj.weight, mha.out_proj.bias
    saved_w, saved_b = w.data, None if b is None else b.data
    try:
        w.data = torch.eye(w.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
        if b is not None:
            b.data = torch.zeros_like(saved_b)
        out = mha.forward(*args, **kwargs)  # forward, not __call__: no hooks run again
    finally:
        w.data = saved_w
        if b is not None:
            b.data = saved_b
    return out[0] if isinstance(out, tuple) else out


def _arg(args: tuple, kwargs: dict, key: str | int, positions: Mapping[str, int]) -> Any:
    if isinstance(key, int):
        if len(args) > key:
            return args[key]
        return next(iter(kwargs.values()), None) if kwargs else None
    pos = positions.get(key)
    if pos is not None and len(args) > pos:
        return args[pos]
    return kwargs.get(key)


_MHA_POS = {"query": 0, "key": 1, "value": 2}


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, mod in model.named_modules():
        names.setdefault(mod, name or "<model>")
    return names


def _run_all(model: nn.Module, batches: list[Any], what: str, start: int = 0) -> None:
    """Run every batch; a failing forward is re-raised naming the batch and the innermost module it was in."""
    stack: list[nn.Module] = []
    names = _module_names(model)
    handles = []

    def enter(mod: nn.Module, args: Any) -> None:
        stack.append(mod)

    def leave(mod: nn.Module, args: Any, out: Any) -> None:  # must return None (a value replaces the output)
        if stack:
            stack.pop()

    for mod in names:
        handles.append(mod.register_forward_pre_hook(enter))
        handles.append(mod.register_forward_hook(leave))
    try:
        for i, item in enumerate(batches, start):
            stack.clear()
            try:
                _call(model, item)
            except (_Stop, _LayerError):
                raise
            except Exception as exc:
                where = names.get(stack[-1], "?") if stack else "<model>"
                kind = type(item).__name__
                shape = tuple(item.shape) if isinstance(item, torch.Tensor) else None
                raise ValueError(
                    f"prune_one_shot: calibration batch {i} ({kind}{'' if shape is None else f' of shape {shape}'}) "
                    f"does not fit the model ({what}): the forward failed in layer {where!r} with "
                    f"{type(exc).__name__}: {exc}. Items are passed as model(x), model(*tuple) or model(**dict)"
                ) from exc
    finally:
        for h in handles:
            h.remove()


def _call_order(model: nn.Module, targets: list[_Target], items: list[Any]) -> list[list[_Target]]:
    """Targets in forward order, grouped: consecutive targets whose first input is the same tensor form a group.

    Runs every calibration batch once (so a batch that does not fit fails before any weight changes); the
    order is taken from the first. Inside a group, parts reading the same tensor with the same feature map
    share one Hessian slot (``_Target.slots``). ``_Target.once`` records whether the target's module ran
    exactly once in the first forward (then a calibration forward can stop once the group has its inputs).
    Identity is checked while the forward runs, through weak references: a freed tensor whose address is
    reused is never taken for the same input.
    """
    by_source: dict[nn.Module, list[_Target]] = {}
    for t in targets:
        by_source.setdefault(t.source, []).append(t)
    groups: list[list[_Target]] = []
    slot_refs: list[tuple[weakref.ref, tuple]] = []  # slots of the current (last) group
    calls: dict[int, int] = {}
    first = [True]
    handles = []

    def make_hook(ts: list[_Target]) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if not first[0]:
                return
            for t in ts:
                calls[id(t)] = calls.get(id(t), 0) + 1
                if calls[id(t)] > 1:
                    continue
                xs = [_input(mod, args, kwargs, p.arg) for p in t.parts]
                lead = groups[-1][0] if groups else None
                lead_x = slot_refs[lead.slots[0]][0]() if lead is not None and slot_refs else None
                if lead_x is None or lead_x is not xs[0] or not isinstance(xs[0], torch.Tensor):
                    groups.append([])
                    slot_refs.clear()
                groups[-1].append(t)
                t.slots = []
                for part, x in zip(t.parts, xs, strict=True):
                    sig = (part.hkey, part.channels and (part.channels.start, part.channels.stop), t.cols)
                    found = next(
                        (k for k, (r, s) in enumerate(slot_refs) if s == sig and x is not None and r() is x), None
                    )
                    if found is None:
                        slot_refs.append((weakref.ref(x) if isinstance(x, torch.Tensor) else _dead, sig))
                        found = len(slot_refs) - 1
                    t.slots.append(found)

        return hook

    for src, ts in by_source.items():
        handles.append(src.register_forward_pre_hook(make_hook(ts), with_kwargs=True))
    try:
        _run_all(model, items[:1], "finding the order of the layers")
        first[0] = False
        _run_all(model, items[1:], "checking the calibration batches", start=1)
    finally:
        for h in handles:
            h.remove()
    never = [t.name for t in targets if id(t) not in calls]
    if never:
        raise ValueError(
            f"prune_one_shot: layers {never} received no input during the calibration forward (the model does not "
            "call their forward, or reads their weight directly). Exclude them with "
            "exclude=[...] to prune the rest"
        )
    for t in targets:
        t.once = calls[id(t)] == 1
    return groups


def _dead() -> None:
    """A weak reference that never resolves (for a non-tensor input)."""
    return None


# ---------------------------------------------------------------------------------------------- the API
def prune_one_shot(
    model: nn.Module,
    batches: Iterable[Any],
    n: int = 2,
    m: int = 4,
    *,
    method: Method = "sparsegpt",
    scheme: Mapping[str, tuple[int, int]] | None = None,
    layout: Layout = "input_channel",
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    progress: bool = True,
) -> OneShotReport:
    """Prune ``model``'s covered weights in place to exactly ``n:m`` along their input dimension.

    Args:
        model: a plain ``nn.Module`` (no parametrizations on the covered weights), on any device; the
            calibration runs on the device of its parameters.
        batches: calibration inputs, iterated once and kept in memory: each a tensor (``model(x)``), a
            tuple/list (``model(*item)``) or a dict (``model(**item)``).
        n, m: keep ``n`` of every ``m`` consecutive input features (``1 <= n <= m``).
        method: ``"sparsegpt"`` (OBS update, see the module docstring), ``"wanda"`` or ``"magnitude"``.
        scheme: ``{layer name: (n, m)}`` per layer; only the layers it names are pruned (``(m, m)`` keeps
            a layer dense). Names are module names, ``"<module>.<param>"`` for weights not called ``weight``.
        layout: ``"input_channel"`` (groups along the input dim, at each kernel position for convs) or
            ``"flat"`` (consecutive entries of each output row of the stored ``[out, in, *k]`` weight).
        include, exclude: ``fnmatch`` globs on layer names.
        blocksize: SparseGPT's lazy-update block (columns).
        percdamp: SparseGPT's Hessian dampening, as a fraction of the mean diagonal.
        progress: show a per-layer rich progress bar.

    Covered: every weight of a type in the :mod:`nm_lightning.layers` registry (Linear, Conv1d/2d/3d,
    MultiheadAttention projections, Hugging Face ``Conv1D``, user-registered types), except tied weights
    (a Parameter shared with another module, e.g. an ``lm_head`` tied to the embedding) and what
    ``include``/``exclude``/``scheme`` leave out. Embeddings are never covered (not a registered type).

    Returns:
        An :class:`OneShotReport` (per layer: method, n:m, reconstruction error, seconds).

    Raises:
        ValueError: bad ``n``/``m``/``method``/``layout``/``blocksize``/``percdamp``; empty ``batches``; a
            batch that does not fit the model (naming the batch and the layer where the forward failed);
            a layer whose input size is not divisible by its ``m``; NaN/Inf activations or a singular Hessian
            at a layer (named); no layer to prune.
    """
    t_start = time.perf_counter()
    n, m, layout = validate_nm(n, m, layout)
    if method not in METHODS:
        raise ValueError(f"prune_one_shot method must be one of {METHODS}, got {method!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"prune_one_shot blocksize must be an int >= 1, got {blocksize!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < math.inf:
        raise ValueError(f"prune_one_shot percdamp must be a finite float >= 0, got {percdamp!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune_one_shot needs an nn.Module, got {type(model).__name__}")
    include = [include] if isinstance(include, str) else (list(include) if include is not None else None)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())
    if scheme is not None:
        if not isinstance(scheme, Mapping):
            raise TypeError(f"prune_one_shot scheme must be a mapping {{layer: (n, m)}}, got {type(scheme).__name__}")
        checked = {}
        for k, v in scheme.items():
            try:
                checked[str(k)] = validate_nm(*v, layout)[:2]
            except (TypeError, ValueError) as exc:
                raise ValueError(f"prune_one_shot scheme entry {k!r}: {exc}") from None
        scheme = checked
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise TypeError(
            "prune_one_shot batches must be an iterable of model inputs (e.g. a list of tensors or a DataLoader "
            f"of inputs), got a single {type(batches).__name__}; wrap it in a list"
        )

    targets, excluded = _select(model, n, m, layout, scheme, include, exclude)
    if not targets:
        why = "; ".join(f"{k}: {r}" for k, r in excluded) or "the model has no layer of a registered type"
        raise ValueError(f"prune_one_shot found no layer to prune ({why})")
    param = next(iter(model.parameters()))
    device = param.device
    items = [_to_device(b, device) for b in batches]
    if not items:
        raise ValueError("prune_one_shot got no calibration batches: `batches` is empty")

    report = OneShotReport(method=method, excluded=excluded, calibration_batches=len(items))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            groups = _call_order(model, targets, items)
            with _progress(progress, len(targets), method) as tick:
                for group in groups:
                    for row in _prune_group(model, group, items, method, blocksize, float(percdamp)):
                        report.layers.append(row)
                        tick(row)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - t_start
    return report


class _progress:
    def __init__(self, enabled: bool, total: int, method: str) -> None:
        self.enabled, self.total, self.method = enabled, total, method
        self._p: Any = None

    def __enter__(self) -> Callable[[OneShotLayer], None]:
        if not self.enabled:
            return lambda row: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[last]}"),
        )
        self._p.start()
        task = self._p.add_task(f"one-shot {self.method}", total=self.total, last="")

        def tick(row: OneShotLayer) -> None:
            self._p.update(task, advance=1, last=f"{row.name} {row.n}:{row.m} err {row.rel_error:.3g}")

        return tick

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.stop()


def _prune_group(
    model: nn.Module, group: list[_Target], items: list[Any], method: str, blocksize: int, percdamp: float
) -> list[OneShotLayer]:
    """Accumulate the group's Hessians over all batches (one forward each, stopped early), then prune it."""
    t0 = time.perf_counter()
    n_slots = 1 + max(s for t in group for s in t.slots)
    hess: list[torch.Tensor | None] = [None] * n_slots
    tokens = [0] * n_slots
    once = all(t.once for t in group)
    pending: set[int] = set()
    added: list[list[weakref.ref]] = [[] for _ in range(n_slots)]  # tensors already added in this batch, per slot
    batch = [0]
    by_source: dict[nn.Module, list[_Target]] = {}
    for t in group:
        by_source.setdefault(t.source, []).append(t)

    def add(t: _Target, part: _Part, slot: int, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise _LayerError(f"layer {t.name!r}: its input {part.arg!r} is not a tensor ({type(x).__name__})")
        if any(r() is x for r in added[slot]):  # a sibling already added this very tensor
            return
        added[slot].append(weakref.ref(x))
        X = t.features(x.detach(), part)
        finite = torch.isfinite(X)
        if not bool(finite.all()):
            raise _LayerError(
                f"layer {t.name!r}: its calibration inputs contain {int((~finite).sum())} NaN/Inf value(s) "
                f"(batch {batch[0]}); check the model and the calibration data"
            )
        X = X.to(torch.float64 if X.dtype == torch.float64 else torch.float32)
        if hess[slot] is None:
            hess[slot] = torch.zeros(X.shape[1], X.shape[1], dtype=X.dtype, device=X.device)
        hess[slot].addmm_(X.t(), X)
        tokens[slot] += X.shape[0]

    def make_hook(ts: list[_Target]) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            for t in ts:
                if once and id(t) not in pending:
                    continue
                for part, slot in zip(t.parts, t.slots, strict=True):
                    add(t, part, slot, _input(mod, args, kwargs, part.arg))
                pending.discard(id(t))
            if once and not pending:
                raise _Stop

        return hook

    handles = [src.register_forward_pre_hook(make_hook(ts), with_kwargs=True) for src, ts in by_source.items()]
    try:
        for i, item in enumerate(items):
            batch[0] = i
            pending.clear()
            pending.update(id(t) for t in group)
            for a in added:
                a.clear()
            try:
                _run_all(model, [item], f"calibrating {group[0].name}", start=i)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()

    rows = []
    setup = (time.perf_counter() - t0) / len(group)
    for t in group:
        t1 = time.perf_counter()
        weight = t.module._parameters[t.param]  # noqa: SLF001
        W = t.weight2d(weight.detach())
        dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
        new = W.to(dtype).clone()
        num = den = 0.0
        for part, slot in zip(t.parts, t.slots, strict=True):
            acc = hess[slot]
            if acc is None or tokens[slot] == 0:
                raise ValueError(f"layer {t.name!r}: received no calibration input")
            H = acc.to(dtype) * (2.0 / tokens[slot])
            Wp = new[part.rows]
            if method == "sparsegpt":
                Q = sparsegpt_prune(Wp, H, t.n, t.m, blocksize=blocksize, percdamp=percdamp, name=t.name)
            else:
                scores = Wp.abs()
                if method == "wanda":  # ‖X_j‖ ∝ sqrt(H_jj)
                    scores = scores * torch.diagonal(H).clamp_min(0).sqrt().unsqueeze(0)
                Q = torch.where(_score_mask(scores, t.n, t.m), Wp, torch.zeros_like(Wp))
            D = Wp - Q
            num += float(torch.sum((D @ H) * D))
            den += float(torch.sum((Wp @ H) * Wp))
            new[part.rows] = Q
        new = new + 0.0  # -0.0 -> +0.0
        weight.data.copy_(t.unweight2d(new).to(weight.dtype))
        _check_exact(t)
        rel = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
        rows.append(
            OneShotLayer(
                t.name,
                type(t.module).__name__,
                tuple(weight.shape),
                method,
                t.n,
                t.m,
                rel,
                setup + time.perf_counter() - t1,
                max(tokens[s] for s in t.slots),
            )
        )
    hess.clear()
    return rows


def _check_exact(t: _Target) -> None:
    """Every group of the written weight has at most ``n`` non-zeros (an internal invariant, checked cheaply)."""
    w = t.module._parameters[t.param].detach()  # noqa: SLF001
    mat = t.weight2d(w)
    nz = (mat != 0).reshape(mat.shape[0], -1, t.m).sum(-1)
    if int(nz.max()) > t.n:
        raise RuntimeError(f"layer {t.name!r}: pruning left a group with {int(nz.max())} non-zeros > n={t.n}")
