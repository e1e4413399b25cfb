"""Which weights of a model become N:M, and why the others do not (no Lightning).

:func:`plan_layers` decides for every module weight; for each covered one it creates the layer's
:class:`~nm_lightning.state.NMLayerState` (validated there, once). :func:`attach` installs those states as
parametrizations. Lazy modules are initialized first with :func:`materialize_lazy`.
"""

from __future__ import annotations

import fnmatch
import importlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from nm_lightning.layers import input_dim_of, known_types, module_type, registered_params
from nm_lightning.masks import Layout, check_nm, validate_nm
from nm_lightning.sparsify.parametrization import SparseLayer, attach_state, get_param, our_parametrization
from nm_lightning.state import NMLayerState, fqn_of, layer_name

__all__ = ["DEFAULT_TYPES", "LayerPlan", "as_patterns", "attach", "materialize_lazy", "plan_layers", "resolve_type"]

# the built-in layer types (the registry in nm_lightning.layers also knows transformers' Conv1D and user types)
DEFAULT_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention")
# known layer types that cannot be N:M along their input: selected, they are reported with this reason
_UNSUPPORTED: dict[type, str] = {
    t: "transposed conv weights [in, out, *k] have no input-channel N:M layout"
    for t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
}
Status = Literal["covered", "skipped", "excluded"]


@dataclass
class LayerPlan:
    """One candidate weight and what happens to it; a covered one carries its new N:M ``state``."""

    name: str  # the layer name (see nm_lightning.state.layer_name)
    module_name: str
    param_name: str
    type_name: str
    shape: tuple[int, ...]
    status: Status
    reason: str = ""
    state: NMLayerState | None = None

    @property
    def fqn(self) -> str:
        return fqn_of(self.module_name, self.param_name)

    @property
    def n(self) -> int | None:
        """The target N of a covered layer (from its state), else ``None``."""
        return self.state.target_n if self.state is not None else None

    @property
    def m(self) -> int | None:
        return self.state.m if self.state is not None else None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def as_patterns(value: Any, argument: str) -> list[Any] | None:
    """``None`` -> ``None``; one string (what Hydra passes for ``exclude=net.fc``) -> one pattern; a list/tuple/set
    of strings (or, for types, classes) -> a list. Anything else is an error naming ``argument``."""
    if value is None:
        return None
    if isinstance(value, (str, type)):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        items = list(value)
        bad = [v for v in items if not isinstance(v, (str, type)) or v == ""]
        if not bad:
            return items
    raise TypeError(f"{argument} must be a string or a list of strings (patterns or layer types), got {value!r}")


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


def _weight_params(module: nn.Module, cls: type) -> list[str]:
    """The weights of ``module`` that N:M applies to (from the layer-type registry)."""
    names = registered_params(cls) or (("weight",) if issubclass(cls, tuple(_UNSUPPORTED)) else ())
    return [p for p in names if get_param(module, p) is not None]


def _input_dim(cls: type, param_name: str) -> int:
    """The registered input dim (1 for the known-but-unsupported types, which are skipped before any use)."""
    dim = input_dim_of(cls, param_name)
    return 1 if dim is None else dim


def _check_known(types: tuple[type, ...]) -> None:
    """An included type needs a known input dimension: never guess which dim the groups run along."""
    for t in types:
        if input_dim_of(t, registered_params(t)[0] if registered_params(t) else "weight") is None and not issubclass(
            t, tuple(_UNSUPPORTED)
        ):
            raise ValueError(
                f"layer type {t.__module__}.{t.__qualname__} has no known input dimension (the dim N:M groups run "
                f"along); register it: nm_lightning.register_layer_type({t.__qualname__}, input_dim=1) for "
                "[out, in, *k] weights, input_dim=0 for [in, out] ones"
            )


def plan_layers(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    layout: Layout = "input_channel",
    *,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    include_types: Iterable[str | type] | str | type | None = None,
    exclude_types: Iterable[str | type] | str | type | None = None,
    scheme: Mapping[str, tuple[int, int]] | None = None,
    owner: str | None = None,
) -> list[LayerPlan]:
    """Decide, for every module weight of ``model``, whether it becomes N:M and why (not).

    ``include``/``exclude`` are ``fnmatch`` globs on layer names (one string is one pattern);
    ``include_types`` (default: every type of the layer-type registry, :mod:`nm_lightning.layers`) and
    ``exclude_types`` are classes or names; an included type must have a known input dimension. A weight tied to
    an embedding (an output head sharing the input embedding, e.g. a tied ``lm_head``) is excluded. With ``scheme``
    only the layers it names are covered, each with its own ``(n, m)``; a name the model does not have is an
    error. Scheme entries may use the layer name (``"fc1"``) or the tensor name (``"fc1.weight"``).
    """
    n, m, layout = validate_nm(n, m, layout)
    include = as_patterns(include, "include")
    exclude = as_patterns(exclude, "exclude") or []
    given = as_patterns(include_types, "include_types")
    inc_types = tuple(resolve_type(t) for t in given) if given is not None else tuple(known_types())
    _check_known(inc_types)
    exc_types = tuple(resolve_type(t) for t in (as_patterns(exclude_types, "exclude_types") or ()))
    if scheme is not None:
        scheme = {str(k): validate_nm(*v, layout)[:2] for k, v in scheme.items()}

    # every Parameter that appears under more than one name is shared (tied weights)
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    embeddings = {fqn_of(n, "weight") for n, mod in model.named_modules() if isinstance(mod, nn.Embedding)}

    plans: list[LayerPlan] = []
    used_scheme_keys: set[str] = set()
    for module_name, module in model.named_modules():
        cls = module_type(module)
        if isinstance(module, parametrize.ParametrizationList) or module_name.endswith(".parametrizations"):
            continue
        candidates = _weight_params(module, cls) if issubclass(cls, inc_types) else []
        if not candidates:
            p = get_param(module, "weight")
            if p is not None and not issubclass(cls, inc_types):
                plans.append(_plan(module_name, "weight", cls, p, "excluded", f"type {cls.__name__} not selected"))
            continue
        for param_name in candidates:
            p = get_param(module, param_name)
            assert p is not None
            plan = _plan(module_name, param_name, cls, p, "covered", "")
            ln, lm = n, m
            if scheme is not None:
                key = next((k for k in (plan.name, plan.fqn) if k in scheme), None)
                if key is not None:
                    used_scheme_keys.add(key)
                    ln, lm = scheme[key]
                in_scheme: bool | None = key is not None
            else:
                in_scheme = None
            plan.status, plan.reason = _decide(
                plan, module, cls, p, ln, lm, layout, include, exclude, exc_types, in_scheme, owners, embeddings, owner
            )
            if plan.status == "covered":
                plan.state = NMLayerState(
                    plan.fqn, plan.shape, m=lm, target_n=ln, n=ln, layout=layout,
                    input_dim=_input_dim(cls, param_name), owner=owner,
                )  # fmt: skip
            plans.append(plan)
    if scheme is not None:
        missing = sorted(set(scheme) - used_scheme_keys)
        if missing:
            names = ", ".join(p.name for p in plans if not p.reason.startswith("type ")) or "none"
            raise ValueError(f"scheme names layers the model does not have: {missing}; candidate layers: {names}")
    return plans


def _plan(module_name: str, param_name: str, cls: type, p: torch.Tensor, status: Status, reason: str) -> LayerPlan:
    shape = () if isinstance(p, nn.parameter.UninitializedParameter) else tuple(p.shape)
    name = layer_name(fqn_of(module_name, param_name))
    return LayerPlan(name, module_name, param_name, cls.__name__, shape, status, reason)


def _decide(
    plan: LayerPlan,
    module: nn.Module,
    cls: type,
    p: torch.Tensor,
    n: int,
    m: int,
    layout: Layout,
    include: list[str] | None,
    exclude: list[str],
    exc_types: tuple[type, ...],
    in_scheme: bool | None,
    owners: dict[int, list[str]],
    embeddings: set[str],
    owner: str | None,
) -> tuple[Status, str]:
    name = plan.name
    if exc_types and issubclass(cls, exc_types):
        return "excluded", f"type {cls.__name__} excluded"
    if include is not None and not any(fnmatch.fnmatchcase(name, g) for g in include):
        return "excluded", "not matched by include"
    hit = next((g for g in exclude if fnmatch.fnmatchcase(name, g)), None)
    if hit is not None:
        return "excluded", f"matched exclude {hit!r}"
    if in_scheme is False:
        return "excluded", "not in scheme"
    if in_scheme and n == m:
        return "excluded", f"scheme keeps it dense ({n}:{m})"
    existing = our_parametrization(module, plan.param_name)
    if existing is not None and existing.state.owner not in (None, owner):
        return "skipped", f"already sparsified by {existing.state.owner}"
    if isinstance(p, nn.parameter.UninitializedParameter):
        return "skipped", (
            "lazy parameter not initialized yet: run one forward before attaching "
            "(the callbacks do it when the LightningModule sets `example_input_array`)"
        )
    if parametrize.is_parametrized(module, plan.param_name) and existing is None:
        return "skipped", "has another parametrization"
    unsupported = next((why for t, why in _UNSUPPORTED.items() if issubclass(cls, t)), None)
    if unsupported is not None:
        return "skipped", unsupported
    if p.dim() < 2:
        return "skipped", f"{p.dim()}-D weight"
    prefix = f"{plan.module_name}." if plan.module_name else ""
    own = {prefix + plan.param_name, f"{prefix}parametrizations.{plan.param_name}.original"}
    shared = [o for o in owners.get(id(p), []) if o not in own]
    if shared:
        if embeddings.intersection(shared):
            return "excluded", f"weight is shared with {', '.join(shared)} (tied to an embedding: stays dense)"
        return "skipped", f"weight is shared with {', '.join(shared)} (tied weights)"
    reason = check_nm(p.shape, n, m, layout, input_dim=_input_dim(cls, plan.param_name))
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
    layout: Layout | None = None,
    owner: str | None = None,
    straight_through: bool = True,
) -> dict[str, SparseLayer]:
    """Parametrize every covered layer of ``plans`` with its state (idempotent: an attached layer is reused as it
    is, with its current N, mask and mode, e.g. when ``setup`` runs again for ``trainer.test``; its plan then
    points to the live state).

    Returns the attached layers by name. The Parameters are not replaced. ``straight_through=False`` gives
    pruned weights no gradient while the mask is dynamic. ``layout``, if given, must be the plans' layout.
    """
    layers: dict[str, SparseLayer] = {}
    for plan in plans:
        if plan.status != "covered" or plan.state is None:
            continue
        if layout is not None and plan.state.layout != layout:
            raise ValueError(f"layer {plan.name!r} was planned with layout {plan.state.layout!r}, not {layout!r}")
        module = model.get_submodule(plan.module_name)
        if our_parametrization(module, plan.param_name) is None:
            plan.state.owner = owner
            plan.state.straight_through = straight_through
        sp = attach_state(module, plan.param_name, plan.state)
        plan.state = sp.state
        layers[plan.name] = SparseLayer(plan.name, plan.module_name, module, plan.param_name, sp)
    return layers
