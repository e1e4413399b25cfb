"""THE N:M state of a sparsified weight: one record per tensor, keyed by its fully qualified name.

Every part of nm_lightning reads and writes the same record: layer selection creates it (and validates it,
once), the parametrization computes with it, the callbacks, the scheduler and the search move its current
``n``, checkpoints carry it (as the parametrization's extra state) and the exports read it. No other object
keeps a copy of a layer's N:M.

Identity: ``fqn`` is the tensor's fully qualified name in the model (``"block.0.conv.weight"``,
``"attn.in_proj_weight"``), the key of the plain state dict. :func:`layer_name` derives the short name used in
tables, metric names and scheme files (``"block.0.conv"``; a weight not called ``weight`` keeps its name);
:func:`fqn_of` is its inverse given the module name. Nothing else converts between spellings.

Pure code: imports only :mod:`nm_lightning.masks`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from nm_lightning.masks import Layout, check_nm, validate_nm

__all__ = ["NMLayerState", "layer_name", "fqn_of", "split_fqn", "STATE_MARKER", "STATE_VERSION"]

STATE_MARKER = "nm_lightning"  # key in the serialized state that marks it as ours
STATE_VERSION = 2  # 1: n, m, layout, frozen, straight_through (no target); 2: + target_n, input_dim


def split_fqn(fqn: str) -> tuple[str, str]:
    """``"block.0.conv.weight"`` -> ``("block.0.conv", "weight")``; a root parameter -> ``("", name)``."""
    module, _, param = fqn.rpartition(".")
    return module, param


def fqn_of(module_name: str, param_name: str) -> str:
    """The tensor's fully qualified name from its module name and parameter name."""
    return f"{module_name}.{param_name}" if module_name else param_name


def layer_name(fqn: str) -> str:
    """The short layer name: ``conv1`` for ``conv1.weight``; other weights (``attn.in_proj_weight``) and a root
    ``weight`` keep their full name."""
    module, param = split_fqn(fqn)
    return module if param == "weight" and module else fqn


@dataclass(eq=True)
class NMLayerState:
    """N:M state of one weight tensor.

    Attributes:
        fqn: fully qualified tensor name (the identity).
        shape: the weight's shape (fixed at creation).
        m: group size.
        target_n: weights kept per group at the end of training (the request: ``n``, or a scheme's entry).
        n: weights kept per group now (a schedule or a search moves it; ``n == m`` is dense).
        layout: ``"input_channel"`` or ``"flat"``.
        input_dim: the weight dimension the groups run along in the input-channel layout (1 for
            ``[out, in, *k]`` weights, 0 for ``[in, out]`` ones such as transformers' ``Conv1D``).
        frozen: the mask is fixed (pruned weights are zero and get no gradient).
        straight_through: pruned weights get the straight-through gradient (SR-STE/STE); ``False`` for the
            DominoSearch search rule.
        decay_scale: factor on the SR-STE λ for this layer (a schedule's λ ramp; not part of checkpoints).
        driver: the callback that moves ``n`` over time (e.g. a SparsityScheduler), or ``None``.
        owner: the callback that attached the layer, or ``None``.
    """

    fqn: str
    shape: tuple[int, ...]
    m: int
    target_n: int
    n: int
    layout: Layout = "input_channel"
    input_dim: int = 1
    frozen: bool = False
    straight_through: bool = True
    decay_scale: float = field(default=1.0, compare=False)
    driver: str | None = field(default=None, compare=False)
    owner: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.fqn, str) or not self.fqn:
            raise ValueError(f"an N:M state needs a non-empty tensor name, got {self.fqn!r}")
        self.shape = tuple(int(s) for s in self.shape)
        where = f"layer {self.name!r}"
        try:
            self.target_n, self.m, self.layout = validate_nm(self.target_n, self.m, self.layout)
            self.n = validate_nm(self.n, self.m, self.layout)[0]
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None
        for flag in ("frozen", "straight_through"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{where}: {flag} must be a bool, got {getattr(self, flag)!r}")
        if isinstance(self.input_dim, bool) or not isinstance(self.input_dim, int):
            raise TypeError(f"{where}: input_dim must be an int, got {self.input_dim!r}")
        if not 0 <= self.input_dim < max(1, len(self.shape)):
            raise ValueError(f"{where}: input_dim {self.input_dim} is out of range for shape {list(self.shape)}")
        reason = check_nm(self.shape, self.target_n, self.m, self.layout, input_dim=self.input_dim)
        if reason is not None:
            raise ValueError(f"{where}: cannot be {self.target_n}:{self.m}: {reason}")

    @property
    def name(self) -> str:
        """The short layer name (see :func:`layer_name`)."""
        return layer_name(self.fqn)

    @property
    def dense(self) -> bool:
        return self.n == self.m

    def set_n(self, n: int) -> None:
        """Move the current N (a schedule, a search, a user walking N by hand); never for a fixed mask."""
        n = validate_nm(n, self.m, self.layout)[0]
        if self.frozen and n != self.n:
            raise RuntimeError(f"layer {self.name!r}: cannot change a fixed {self.n}:{self.m} mask to {n}:{self.m}")
        reason = check_nm(self.shape, n, self.m, self.layout, input_dim=self.input_dim)
        if reason is not None:
            raise ValueError(f"layer {self.name!r}: cannot switch to {n}:{self.m}: {reason}")
        self.n = n

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """What checkpoints carry (plain values only: ``torch.load(weights_only=True)`` reads it)."""
        d = asdict(self)
        for transient in ("decay_scale", "driver", "owner", "fqn"):
            d.pop(transient)
        d["shape"] = list(self.shape)
        return {STATE_MARKER: STATE_VERSION, **d}

    @classmethod
    def from_dict(cls, fqn: str, data: Any, shape: tuple[int, ...] | None = None) -> NMLayerState:
        """Rebuild a state from :meth:`to_dict` output (or a version-1 record), checking every field's type.

        Raises ``ValueError`` naming the layer and field for anything malformed (a string where a bool belongs,
        a missing field, another shape): a checkpoint is input, not trusted code.
        """
        where = f"layer {layer_name(fqn)!r}"
        if not isinstance(data, Mapping) or data.get(STATE_MARKER) not in (1, STATE_VERSION):
            raise ValueError(f"{where}: not an nm_lightning N:M state (version 1 or {STATE_VERSION}): {_short(data)}")
        required = {"n": int, "m": int, "layout": str, "frozen": bool}
        optional = {"straight_through": bool, "target_n": int, "input_dim": int, "shape": list}
        for key, typ in {**required, **optional}.items():
            if key not in data:
                if key in required:
                    raise ValueError(f"{where}: N:M state lacks field {key!r}")
                continue
            value = data[key]
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise ValueError(f"{where}: N:M state field {key!r} must be {typ.__name__}, got {_short(value)}")
        saved_shape = tuple(data["shape"]) if "shape" in data else None
        if shape is not None and saved_shape is not None and tuple(shape) != saved_shape:
            raise ValueError(f"{where}: N:M state is for shape {list(saved_shape)}, the weight has {list(shape)}")
        final_shape = shape if shape is not None else saved_shape
        if final_shape is None:
            raise ValueError(f"{where}: N:M state has no shape and none was given")
        try:
            return cls(
                fqn=fqn, shape=tuple(final_shape), m=data["m"], target_n=data.get("target_n", data["n"]), n=data["n"],
                layout=data["layout"], input_dim=data.get("input_dim", 1), frozen=data["frozen"],
                straight_through=data.get("straight_through", True),
            )  # fmt: skip
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid N:M state: {err}") from None

    def __str__(self) -> str:
        now = "" if self.n == self.target_n else f" (now {self.n}:{self.m})"
        return f"{self.name}: {self.target_n}:{self.m}{now}, {self.layout}{', fixed' if self.frozen else ''}"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
