"""Attach N:M sparsity to modules and take it off again (no Lightning).

Mechanism: a ``torch.nn.utils.parametrize`` parametrization (:class:`NMSparsity`) on the weight. It keeps
the *same* ``Parameter`` object (as ``parametrizations.weight.original``), so optimizers and DDP hooks
built before or after attaching stay valid, and every read of ``module.weight`` — including direct
reads such as ``nn.MultiheadAttention`` reading ``out_proj.weight`` — returns the masked weight.

State lives in the model, so it survives ``state_dict``/``load_state_dict`` with the weights:

* ``<layer>.parametrizations.weight.original``: the dense weight (SR-STE keeps training it);
* ``<layer>.parametrizations.weight.0.mask``: the bool mask of the last training forward (the fixed
  mask in fixed mode);
* ``<layer>.parametrizations.weight.0._extra_state``: ``n``, ``m``, layout and whether the mask is fixed.

:func:`split_state_dict` turns such a state dict into the plain model's keys (masked weights) plus the
entries above; sparsified modules also accept plain keys when loading (see :meth:`NMSparsity.accept_plain`).
"""

from __future__ import annotations

import fnmatch
import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from nm_lightning.masks import Layout, check_nm, nm_mask, validate_nm
from nm_lightning.srste import fixed_mask, ste_nm, tag_masked_weight

__all__ = [
    "DEFAULT_TYPES",
    "NMSparsity",
    "LayerPlan",
    "SparseLayer",
    "plan_layers",
    "attach",
    "detach",
    "freeze_layers",
    "sparse_layers",
    "split_state_dict",
    "plain_state_dict",
    "load_plain_weights",
    "materialize_lazy",
    "saved_nm_layers",
    "resolve_type",
]

DEFAULT_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention")
_MHA_PARAMS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_EXTRA_KEY = "nm_lightning"


class NMSparsity(nn.Module):
    """Parametrization ``W -> W ⊙ E`` with ``E`` the N:M mask.

    Dynamic mode (SR-STE/STE): ``E`` is recomputed from ``W`` on every forward and the gradient passes
    straight through to all of ``W``. Fixed mode (after :meth:`freeze`): ``E`` is the stored mask, the
    pruned weights are zero and receive no gradient.
    """

    def __init__(
        self, shape: Sequence[int], n: int, m: int, layout: Layout = "input_channel", straight_through: bool = True
    ) -> None:
        super().__init__()
        self.n, self.m, self.layout = validate_nm(n, m, layout)
        self.frozen = False
        # False: pruned weights get no gradient even with a dynamic mask (the DominoSearch search rule)
        self.straight_through = straight_through
        self.register_buffer("mask", torch.ones(tuple(shape), dtype=torch.bool))
        self.mask: torch.Tensor

    def extra_repr(self) -> str:
        ste = self.straight_through
        return f"{self.n}:{self.m}, layout={self.layout!r}, frozen={self.frozen}, straight_through={ste}"

    def compute_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The N:M mask of ``weight`` (ignores the stored mask)."""
        return nm_mask(weight, self.n, self.m, self.layout)

    def current_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The mask the next forward would use: the fixed mask, or the one computed from ``weight``."""
        return self.mask if self.frozen else self.compute_mask(weight)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.frozen:  # pruned weights are +0 here, so W ⊙ E can be rebuilt exactly in backward
            out, mask = fixed_mask(weight, self.mask), self.mask
        elif self.straight_through:
            out, mask = ste_nm(weight, self.n, self.m, self.layout)
        else:  # negative pruned weights give -0 here: not rebuilt bit-exactly, so not tagged
            mask = self.compute_mask(weight)
            out = fixed_mask(weight, mask)
        if (self.frozen or self.straight_through) and not torch.compiler.is_compiling():
            tag_masked_weight(out, weight, mask)
        if self.training and not self.frozen:
            # recorded for the SR-STE decay term and the flip-rate metrics of this step
            self.mask.copy_(mask)
        return out

    @torch.no_grad()
    def freeze(self, weight: torch.Tensor) -> torch.Tensor:
        """Fix the mask to the current one and zero the pruned entries of ``weight`` in place."""
        if not self.frozen:
            self.mask.copy_(self.compute_mask(weight))
            weight.masked_fill_(~self.mask, 0)
            self.frozen = True
        return self.mask

    def unfreeze(self) -> None:
        """Back to a dynamic mask (pruned weights were zeroed by :meth:`freeze` and may regrow)."""
        self.frozen = False

    def set_nm(self, n: int, m: int) -> None:
        """Change the pattern (e.g. a schedule lowering N); a fixed mask must be unfrozen first."""
        n, m, _ = validate_nm(n, m, self.layout)
        if self.frozen and (n, m) != (self.n, self.m):
            raise RuntimeError(f"cannot change a fixed {self.n}:{self.m} mask to {n}:{m}; unfreeze it first")
        reason = check_nm(self.mask.shape, n, m, self.layout)
        if reason is not None:
            raise ValueError(f"cannot switch to {n}:{m}: {reason}")
        self.n, self.m = n, m

    def get_extra_state(self) -> dict[str, Any]:
        return {
            _EXTRA_KEY: 1,
            "n": self.n,
            "m": self.m,
            "layout": self.layout,
            "frozen": self.frozen,
            "straight_through": self.straight_through,
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or state.get(_EXTRA_KEY) != 1:
            raise ValueError(f"not an nm_lightning N:M state: {state!r}")
        self.n, self.m, self.layout = validate_nm(state["n"], state["m"], state["layout"])
        self.frozen = bool(state["frozen"])
        self.straight_through = bool(state.get("straight_through", True))

    def accept_plain(self, state_dict: dict[str, Any], module_prefix: str, param_name: str) -> None:
        """Let a plain (never sparsified) state dict load into the sparsified module.

        ``<prefix><param>`` becomes ``original``; mask and extra state default to the current ones. For a
        fixed mask the mask is recomputed from the loaded weight (one-shot magnitude pruning).
        """
        plain_key = module_prefix + param_name
        base = f"{module_prefix}parametrizations.{param_name}."
        if plain_key not in state_dict or base + "original" in state_dict:
            return
        weight = state_dict.pop(plain_key)
        state_dict.setdefault(base + "0._extra_state", self.get_extra_state())
        if self.frozen and isinstance(weight, torch.Tensor):
            mask = self.compute_mask(weight)
            state_dict.setdefault(base + "0.mask", mask)
            weight = torch.where(state_dict[base + "0.mask"], weight, weight.new_zeros(()))
        state_dict.setdefault(base + "0.mask", self.mask.detach().clone())
        state_dict[base + "original"] = weight


@dataclass
class LayerPlan:
    """One candidate weight and what happens to it."""

    name: str  # the module name, or "<module>.<param>" for a weight not called "weight"
    module_name: str
    param_name: str
    type_name: str
    shape: tuple[int, ...]
    n: int
    m: int
    status: Literal["covered", "skipped", "excluded"]
    reason: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SparseLayer:
    """An attached layer: the module, the name of its weight and the parametrization."""

    name: str
    module_name: str
    module: nn.Module
    param_name: str
    sparsity: NMSparsity
    owner: str | None = field(default=None)

    @property
    def original(self) -> nn.Parameter:
        """The dense trained Parameter (the same object the model had before attaching)."""
        return getattr(self.module.parametrizations, self.param_name).original

    def effective(self) -> torch.Tensor:
        """The weight the model computes with, without side effects on the recorded mask."""
        with torch.no_grad():
            w = self.original
            return torch.where(self.sparsity.current_mask(w), w, w.new_zeros(()))


def resolve_type(spec: str | type) -> type:
    """``"Linear"``, ``"nn.Conv2d"``, ``"torch.nn.Conv2d"``, ``"pkg.mod.Cls"`` or a class -> the class."""
    if isinstance(spec, type):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"a layer type must be a class or a non-empty string, got {spec!r}")
    short = spec.removeprefix("torch.nn.").removeprefix("nn.")
    if "." not in short and isinstance(getattr(nn, short, None), type):
        return getattr(nn, short)
    module_name, _, cls_name = spec.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name) if module_name else None
    except (ImportError, AttributeError):
        cls = None
    if not isinstance(cls, type):
        raise ValueError(f"unknown layer type {spec!r}: give a torch.nn class name (e.g. 'Linear') or a dotted path")
    return cls


def _layer_name(module_name: str, param_name: str) -> str:
    """``conv1`` for ``conv1.weight``; ``attn.in_proj_weight`` for other weights; the bare param at the root."""
    if not module_name:
        return param_name
    return module_name if param_name == "weight" else f"{module_name}.{param_name}"


def _weight_params(module: nn.Module, cls: type) -> list[str]:
    if issubclass(cls, nn.MultiheadAttention):
        return [p for p in _MHA_PARAMS if _get_param(module, p) is not None]
    return ["weight"] if _get_param(module, "weight") is not None else []


def _get_param(module: nn.Module, name: str) -> torch.Tensor | None:
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    value = module._parameters.get(name)  # noqa: SLF001 - only real Parameters, not properties
    return value


def _our_parametrization(module: nn.Module, name: str) -> NMSparsity | None:
    if not parametrize.is_parametrized(module, name):
        return None
    plist = getattr(module.parametrizations, name)
    found = [p for p in plist if isinstance(p, NMSparsity)]
    return found[0] if found else None


def plan_layers(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    layout: Layout = "input_channel",
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    include_types: Iterable[str | type] | None = None,
    exclude_types: Iterable[str | type] | None = None,
    scheme: Mapping[str, tuple[int, int]] | None = None,
    owner: str | None = None,
) -> list[LayerPlan]:
    """Decide, for every module weight of ``model``, whether it becomes N:M and why (not).

    ``include``/``exclude`` are ``fnmatch`` globs on layer names; ``include_types`` (default
    :data:`DEFAULT_TYPES`) and ``exclude_types`` are classes or names. With ``scheme`` only the layers it
    names are covered, each with its own ``(n, m)``; a name the model does not have is an error.
    """
    n, m, layout = validate_nm(n, m, layout)
    inc_types = tuple(resolve_type(t) for t in (include_types if include_types is not None else DEFAULT_TYPES))
    exc_types = tuple(resolve_type(t) for t in (exclude_types or ()))
    include = list(include) if include is not None else None
    exclude = list(exclude or ())
    if scheme is not None:
        scheme = {str(k): validate_nm(*v, layout)[:2] for k, v in scheme.items()}

    # every Parameter that appears under more than one name is shared (tied weights)
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)

    plans: list[LayerPlan] = []
    for module_name, module in model.named_modules():
        cls = parametrize.type_before_parametrizations(module)
        if isinstance(module, parametrize.ParametrizationList) or module_name.endswith(".parametrizations"):
            continue
        candidates = _weight_params(module, cls) if issubclass(cls, inc_types) else []
        if not candidates:
            p = _get_param(module, "weight")
            if p is not None and not issubclass(cls, inc_types):
                plans.append(
                    _plan(module_name, "weight", cls, p, n, m, "excluded", f"type {cls.__name__} not selected")
                )
            continue
        for param_name in candidates:
            p = _get_param(module, param_name)
            assert p is not None
            name = _layer_name(module_name, param_name)
            ln, lm = scheme.get(name, (n, m)) if scheme is not None else (n, m)
            plan = _plan(module_name, param_name, cls, p, ln, lm, "covered", "")
            plan.status, plan.reason = _decide(
                plan, module, cls, p, layout, include, exclude, exc_types, scheme, owners, owner
            )
            plans.append(plan)
    if scheme is not None:
        missing = sorted(set(scheme) - {p.name for p in plans})
        if missing:
            names = ", ".join(p.name for p in plans if not p.reason.startswith("type ")) or "none"
            raise ValueError(f"scheme names layers the model does not have: {missing}; candidate layers: {names}")
    return plans


def _plan(
    module_name: str, param_name: str, cls: type, p: torch.Tensor, n: int, m: int, status: Any, reason: str
) -> LayerPlan:
    shape = () if isinstance(p, nn.parameter.UninitializedParameter) else tuple(p.shape)
    return LayerPlan(
        _layer_name(module_name, param_name), module_name, param_name, cls.__name__, shape, n, m, status, reason
    )


def _decide(
    plan: LayerPlan,
    module: nn.Module,
    cls: type,
    p: torch.Tensor,
    layout: Layout,
    include: list[str] | None,
    exclude: list[str],
    exc_types: tuple[type, ...],
    scheme: Mapping[str, tuple[int, int]] | None,
    owners: dict[int, list[str]],
    owner: str | None,
) -> tuple[Literal["covered", "skipped", "excluded"], str]:
    name = plan.name
    if exc_types and issubclass(cls, exc_types):
        return "excluded", f"type {cls.__name__} excluded"
    if include is not None and not any(fnmatch.fnmatchcase(name, g) for g in include):
        return "excluded", "not matched by include"
    hit = next((g for g in exclude if fnmatch.fnmatchcase(name, g)), None)
    if hit is not None:
        return "excluded", f"matched exclude {hit!r}"
    if scheme is not None:
        if name not in scheme:
            return "excluded", "not in scheme"
        if plan.n == plan.m:
            return "excluded", f"scheme keeps it dense ({plan.n}:{plan.m})"
    existing = _our_parametrization(module, plan.param_name)
    if existing is not None and getattr(existing, "owner", None) not in (None, owner):
        return "skipped", f"already sparsified by {existing.owner}"
    if isinstance(p, nn.parameter.UninitializedParameter):
        return "skipped", (
            "lazy parameter not initialized yet: run one forward before attaching "
            "(the callbacks do it when the LightningModule sets `example_input_array`)"
        )
    if parametrize.is_parametrized(module, plan.param_name) and existing is None:
        return "skipped", "has another parametrization"
    if issubclass(cls, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "skipped", "transposed conv weights [in, out, *k] have no input-channel N:M layout"
    if p.dim() < 2:
        return "skipped", f"{p.dim()}-D weight"
    prefix = f"{plan.module_name}." if plan.module_name else ""
    own = {prefix + plan.param_name, f"{prefix}parametrizations.{plan.param_name}.original"}
    shared = [o for o in owners.get(id(p), []) if o not in own]
    if shared:
        return "skipped", f"weight is shared with {', '.join(shared)} (tied weights)"
    reason = check_nm(p.shape, plan.n, plan.m, layout)
    if reason is not None:
        groups = getattr(module, "groups", 1)
        if groups > 1 and groups == getattr(module, "in_channels", 0):
            reason += " (depthwise conv: each output channel reads a single input channel)"
        return "skipped", reason
    return "covered", ""


def materialize_lazy(model: nn.Module, example: Any) -> list[str]:
    """Initialize lazy modules (``nn.LazyLinear``, ...) with one no-grad forward of ``example``.

    Their weights have no shape until the first forward, so N:M cannot be planned for them before. The dry
    run is done in eval mode (BatchNorm statistics and dropout untouched) and returns the names of the modules
    it initialized; ``example`` may be a tensor, a tuple of positional inputs or a dict of keyword inputs.
    """
    lazy = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, LazyModuleMixin) and mod.has_uninitialized_params()
    ]
    if not lazy:
        return []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example, Mapping):
                model(**example)
            elif isinstance(example, tuple):
                model(*example)
            else:
                model(example)
    finally:
        model.train(was_training)
    return lazy


def attach(
    model: nn.Module,
    plans: Iterable[LayerPlan],
    layout: Layout = "input_channel",
    owner: str | None = None,
    straight_through: bool = True,
) -> dict[str, SparseLayer]:
    """Parametrize every covered layer of ``plans`` (idempotent: an attached layer is reused as it is,
    with its current N, mask and mode, e.g. when ``setup`` runs again for ``trainer.test``).

    Returns the attached layers by name. The Parameters are not replaced. ``straight_through=False``
    gives pruned weights no gradient while the mask is dynamic.
    """
    layers: dict[str, SparseLayer] = {}
    for plan in plans:
        if plan.status != "covered":
            continue
        module = model.get_submodule(plan.module_name)
        sp = _our_parametrization(module, plan.param_name)
        if sp is None:
            weight = _get_param(module, plan.param_name)
            assert weight is not None
            sp = NMSparsity(weight.shape, plan.n, plan.m, layout, straight_through).to(weight.device)
            parametrize.register_parametrization(module, plan.param_name, sp, unsafe=True)
            prefix_param = plan.param_name

            def _hook(
                mod: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, _p: str = prefix_param
            ) -> None:
                found = _our_parametrization(mod, _p)
                if found is not None:
                    found.accept_plain(state_dict, prefix, _p)

            module.register_load_state_dict_pre_hook(_hook)
        sp.owner = owner  # type: ignore[assignment]
        layers[plan.name] = SparseLayer(plan.name, plan.module_name, module, plan.param_name, sp, owner)
    return layers


def sparse_layers(model: nn.Module, owner: str | None = None) -> dict[str, SparseLayer]:
    """All N:M layers attached to ``model`` (optionally only those of one owner), by name."""
    found: dict[str, SparseLayer] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name in list(module.parametrizations.keys()):
            sp = _our_parametrization(module, param_name)
            if sp is None or (owner is not None and getattr(sp, "owner", None) != owner):
                continue
            name = _layer_name(module_name, param_name)
            found[name] = SparseLayer(name, module_name, module, param_name, sp, getattr(sp, "owner", None))
    return found


def freeze_layers(layers: Iterable[SparseLayer], optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Fix each layer's current mask, zero its pruned weights and their optimizer state (momentum, Adam
    moments), so that nothing revives them: the weights that end training are the ones exported."""
    for layer in layers:
        if layer.sparsity.frozen:
            continue
        mask = layer.sparsity.freeze(layer.original)
        for opt in optimizers:
            for value in opt.state.get(layer.original, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    value.masked_fill_(~mask, 0)


def detach(model: nn.Module, owner: str | None = None) -> list[str]:
    """Remove the N:M parametrizations, leaving the masked weights in the same Parameters.

    Returns the names of the layers detached. The model is then a plain model with zeros.
    """
    names = []
    for name, layer in sparse_layers(model, owner).items():
        parametrize.remove_parametrizations(layer.module, layer.param_name, leave_parametrized=True)
        names.append(name)
    return names


def split_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a sparsified model's state dict into (plain keys with masked weights, N:M entries).

    Pure function of the state dict: the masks come from the stored extra state (``n``, ``m``, layout,
    fixed mask), so it also works on a checkpoint file without the model. The first dict loads with
    ``strict=True`` into the never-sparsified model; the second holds the dense weights, masks and
    extra state needed to resume training exactly.
    """
    plain: dict[str, Any] = {}
    nm_entries: dict[str, Any] = {}
    marker = "parametrizations."
    for key, value in state_dict.items():
        if not key.endswith("0._extra_state") or not isinstance(value, Mapping) or value.get(_EXTRA_KEY) != 1:
            continue
        base = key[: -len("0._extra_state")]  # "<prefix>parametrizations.<param>."
        head, _, rest = base.rpartition(marker)
        param = rest.rstrip(".")
        extra_keys = [k for k in state_dict if k.startswith(base) and k.removeprefix(base).split(".")[0].isdigit()]
        if any(not k.startswith(base + "0.") for k in extra_keys):
            raise ValueError(f"{head}{param}: N:M must be the only parametrization to export it, found {extra_keys}")
        original = state_dict[base + "original"]
        mask = state_dict[base + "0.mask"]
        if not value["frozen"]:
            mask = nm_mask(original, value["n"], value["m"], value["layout"])
        plain[head + param] = torch.where(mask, original, original.new_zeros(())).detach()
        for k in [base + "original", base + "0.mask", key]:
            nm_entries[k] = state_dict[k]
    for key, value in state_dict.items():
        if key not in nm_entries:
            plain.setdefault(key, value)
    return plain, nm_entries


def saved_nm_layers(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The N:M extra state (``n``, ``m``, layout, frozen, ...) of every sparsified layer in a state dict, by
    layer name (the names :func:`plan_layers` uses): what a checkpoint was written with."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        if key.endswith("0._extra_state") and isinstance(value, Mapping) and value.get(_EXTRA_KEY) == 1:
            head, _, rest = key[: -len("0._extra_state")].rpartition("parametrizations.")
            out[_layer_name(head.rstrip("."), rest.rstrip("."))] = dict(value)
    return out


def load_plain_weights(model: nn.Module, path: str | Path) -> None:
    """Load a plain state dict file (``torch.save`` of a plain model's ``state_dict``) with ``strict=True``.

    Loaded with ``weights_only=True``: nothing in the file is executed.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{path}: does not match the model: {err}") from None


def plain_state_dict(model_or_state_dict: nn.Module | Mapping[str, Any]) -> dict[str, Any]:
    """State dict with the plain model's keys and the N:M-masked weights (dense tensors with zeros)."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    return split_state_dict(sd)[0]
