"""The layer-type registry: which dimension of each weight the N:M groups run along (pure, no Lightning).

N:M groups run along a layer's *input* dimension (the reduction dimension of its matrix product). Most
PyTorch layers store ``[out, in, *kernel]`` weights (input dim 1), but not all: Hugging Face's GPT-2
projections (``transformers.pytorch_utils.Conv1D``) store ``[in, out]`` (input dim 0). Grouping such a
weight along dim 1 would group along its *output* dimension, which no sparse kernel accelerates.

Built in:

* ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: ``weight``, input dim 1;
* ``nn.MultiheadAttention``: ``in_proj_weight``, ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``,
  input dim 1 (its ``out_proj`` is an ``nn.Linear`` submodule, covered as such);
* ``transformers.pytorch_utils.Conv1D``: ``weight``, input dim 0. Registered lazily: only once the
  module ``transformers.pytorch_utils`` has been imported by someone else (a model built from
  ``transformers`` has imported it). This module never imports ``transformers``.

Lookups follow the MRO, so a subclass inherits its nearest registered base's entry unless it has its own.
Users add their own types with :func:`register_layer_type`. This module imports only torch and the
standard library.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "LayerType",
    "register_layer_type",
    "input_dim_of",
    "registered_params",
    "known_types",
    "input_major",
    "module_type",
]

_HF_CONV1D_MODULE = "transformers.pytorch_utils"


@dataclass(frozen=True)
class LayerType:
    """A registered layer type: the weights (parameter names) N:M applies to and their input dimension."""

    cls: type
    input_dim: int
    params: tuple[str, ...]


_REGISTRY: dict[type, LayerType] = {}
_LOCK = threading.Lock()
_hf_conv1d_done = False


def _validate(cls: object, input_dim: object, params: object) -> tuple[type, int, tuple[str, ...]]:
    if not isinstance(cls, type):
        raise TypeError(f"register_layer_type needs a class, got {cls!r} ({type(cls).__name__})")
    if isinstance(input_dim, bool) or not isinstance(input_dim, int):
        raise TypeError(
            f"register_layer_type({cls.__qualname__}): input_dim must be an int, got {input_dim!r} "
            f"({type(input_dim).__name__})"
        )
    if input_dim < 0:
        raise ValueError(f"register_layer_type({cls.__qualname__}): input_dim must be >= 0, got {input_dim}")
    if isinstance(params, str):
        params = (params,)
    try:
        names = tuple(params)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"register_layer_type({cls.__qualname__}): params must be a sequence of parameter names, got {params!r}"
        ) from None
    if not names:
        raise ValueError(f"register_layer_type({cls.__qualname__}): params must name at least one parameter")
    bad = [p for p in names if not isinstance(p, str) or not p]
    if bad:
        raise TypeError(
            f"register_layer_type({cls.__qualname__}): params must be non-empty strings, got {bad!r} in {names!r}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"register_layer_type({cls.__qualname__}): params has duplicates: {names!r}")
    return cls, input_dim, names


def register_layer_type(cls: type, input_dim: int, params: tuple[str, ...] | list[str] | str = ("weight",)) -> None:
    """Register ``cls`` as a layer type whose ``params`` group N:M along dimension ``input_dim``.

    Args:
        cls: the module class (subclasses inherit the entry unless they are registered themselves).
        input_dim: the weight dimension that is the layer's input (reduction) dimension, ``>= 0``:
            1 for ``[out, in, *k]`` weights, 0 for ``[in, out]`` weights such as GPT-2's ``Conv1D``.
        params: the names of the weights N:M applies to (default ``("weight",)``); a single string is
            taken as one name.

    Re-registering a type with the same ``input_dim`` replaces its ``params``.

    Raises:
        TypeError: ``cls`` not a class, ``input_dim`` not an int, a param name not a non-empty string.
        ValueError: ``input_dim < 0``, no or duplicate params, or ``cls`` already registered with another
            input dimension (the message names both).
    """
    cls, input_dim, names = _validate(cls, input_dim, params)
    with _LOCK:
        _ensure_lazy_locked()
        old = _REGISTRY.get(cls)
        if old is not None and old.input_dim != input_dim:
            raise ValueError(
                f"layer type {cls.__module__}.{cls.__qualname__} is already registered with input dim "
                f"{old.input_dim}; cannot register it again with input dim {input_dim}"
            )
        _REGISTRY[cls] = LayerType(cls, input_dim, names)


def _ensure_lazy_locked() -> None:
    """Register ``transformers``' Conv1D once its module is loaded (never import it ourselves)."""
    global _hf_conv1d_done
    if _hf_conv1d_done:
        return
    mod = sys.modules.get(_HF_CONV1D_MODULE)
    if mod is None:
        return
    cls = getattr(mod, "Conv1D", None)
    if isinstance(cls, type) and cls not in _REGISTRY:  # a user's own registration wins
        _REGISTRY[cls] = LayerType(cls, 0, ("weight",))
    _hf_conv1d_done = True


def _ensure_lazy() -> None:
    if not _hf_conv1d_done and _HF_CONV1D_MODULE in sys.modules:
        with _LOCK:
            _ensure_lazy_locked()


def module_type(module: nn.Module) -> type:
    """The user's class of ``module``: the class under the ones ``torch.nn.utils.parametrize`` (``Parametrized<X>``)
    and FSDP2's ``fully_shard`` (``FSDP<X>``, bases ``(FSDPModule, X)``) generate, in whichever order they wrap."""
    cls = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        FSDPModule = None  # noqa: N806
    for _ in range(2):
        bases = cls.__bases__
        if FSDPModule is not None and len(bases) == 2 and bases[0] is FSDPModule:
            cls = bases[1]
        elif (
            parametrize.is_parametrized(module)
            and len(bases) == 1
            and cls.__name__ == f"Parametrized{bases[0].__name__}"
        ):
            cls = bases[0]
        else:
            break
    return cls


def _entry(module_or_cls: nn.Module | type) -> LayerType | None:
    _ensure_lazy()
    if isinstance(module_or_cls, type):
        cls = module_or_cls
    elif isinstance(module_or_cls, nn.Module):
        cls = module_type(module_or_cls)
    else:
        raise TypeError(f"expected an nn.Module or a class, got {module_or_cls!r} ({type(module_or_cls).__name__})")
    for base in cls.__mro__:
        found = _REGISTRY.get(base)
        if found is not None:
            return found
    return None


def input_dim_of(module_or_cls: nn.Module | type, param_name: str = "weight") -> int | None:
    """The input dimension of ``param_name`` for this module (or class), or ``None`` when unknown.

    ``None`` means: the type (and none of its bases) is registered, or its entry does not list
    ``param_name``. The nearest registered class in the MRO decides. A parametrized module is looked
    up by its original class.
    """
    entry = _entry(module_or_cls)
    if entry is None or param_name not in entry.params:
        return None
    return entry.input_dim


def registered_params(module_or_cls: nn.Module | type) -> tuple[str, ...]:
    """The weight names N:M applies to for this module (or class); ``()`` for an unregistered type."""
    entry = _entry(module_or_cls)
    return entry.params if entry is not None else ()


def known_types() -> dict[type, LayerType]:
    """A snapshot of the registry: every registered class and its entry, in registration order."""
    _ensure_lazy()
    with _LOCK:
        return dict(_REGISTRY)


def input_major(weight: torch.Tensor, input_dim: int) -> torch.Tensor:
    """A view of ``weight`` with its input dimension moved to dim 1 (``[out, in, *k]``), no copy.

    This is the layout :func:`nm_lightning.nm_mask` groups along (``layout="input_channel"``); a mask
    computed on the view maps back with ``mask.movedim(1, input_dim)``.
    """
    if weight.dim() < 2:
        raise ValueError(f"an input-dimension view needs a weight with >= 2 dims, got shape {tuple(weight.shape)}")
    if not 0 <= input_dim < weight.dim():
        raise ValueError(f"input_dim {input_dim} is out of range for a weight of shape {tuple(weight.shape)}")
    return weight if input_dim == 1 else weight.movedim(input_dim, 1)


for _cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer_type(_cls, 1)
register_layer_type(nn.MultiheadAttention, 1, ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"))
del _cls
