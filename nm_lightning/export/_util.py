"""Helpers shared by the exporters: N:M info from a state dict, grouping views, hashing, atomic writes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nm_lightning.masks import Layout, group_view

_EXTRA_SUFFIX = "0._extra_state"
_MARKER = "parametrizations."

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: object, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"{where}: unsupported dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class NMInfo:
    """N:M of one weight, identified by its key in the plain state dict (``fc1.weight``)."""

    key: str
    name: str  # layer name as in plan_layers: "fc1", "attn.in_proj_weight"
    n: int
    m: int
    layout: Layout


def layer_name(key: str) -> str:
    """``fc1.weight`` -> ``fc1``; ``attn.in_proj_weight`` stays; the root ``weight`` stays ``weight``."""
    head, _, last = key.rpartition(".")
    return head if last == "weight" and head else key


def state_dict_of(model_or_state_dict: nn.Module | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    raise TypeError(f"expected an nn.Module or a state dict (Mapping), got {type(model_or_state_dict).__name__}")


def nm_infos(state_dict: Mapping[str, Any]) -> dict[str, NMInfo]:
    """N:M layers of a sparsified model's state dict, keyed by their plain key (from the validated N:M states)."""
    from nm_lightning.sparsify.state_dict import saved_states

    return {fqn: NMInfo(fqn, s.name, s.n, s.m, s.layout) for fqn, s in saved_states(state_dict).items()}


def to_groups(weight: torch.Tensor, m: int, layout: Layout) -> torch.Tensor:
    """``[G, m]`` contiguous copy/view of ``weight``'s N:M groups, in group order."""
    gv = group_view(weight.shape, layout)
    w = weight.contiguous().reshape(gv.outer, gv.length // m, m, gv.inner)
    if gv.inner > 1:
        w = w.permute(0, 1, 3, 2)
    return w.reshape(-1, m).contiguous()


def from_groups(groups: torch.Tensor, shape: tuple[int, ...], m: int, layout: Layout) -> torch.Tensor:
    """Inverse of :func:`to_groups`."""
    gv = group_view(shape, layout)
    if gv.inner > 1:
        return groups.reshape(gv.outer, gv.length // m, gv.inner, m).permute(0, 1, 3, 2).reshape(shape).contiguous()
    return groups.reshape(shape)


def group_position(shape: tuple[int, ...], m: int, layout: Layout, g: int) -> str:
    """Human-readable location of group ``g`` (for error messages)."""
    gv = group_view(shape, layout)
    if layout == "flat" or len(shape) < 2:
        return f"flat elements {g * m}..{g * m + m - 1}"
    per_outer = (gv.length // m) * gv.inner
    o, rest = divmod(g, per_outer)
    gl, i = divmod(rest, gv.inner)
    where = f"row {o}, input {gl * m}..{gl * m + m - 1}"
    return where + (f", kernel position {i}" if gv.inner > 1 else "")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1).cpu()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def sha256_tensors(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename (no half-written files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_PLAIN = (str, int, float, bool, type(None))


def check_plain(value: Any, key: str) -> None:
    """Only tensors and plain containers go into our files, so ``torch.load(weights_only=True)`` reads them."""
    if isinstance(value, torch.Tensor) or isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{key}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, _PLAIN):
                raise TypeError(f"state dict entry {key!r}: key {k!r} is not a plain value")
            check_plain(v, f"{key}[{k!r}]")
        return
    raise TypeError(
        f"state dict entry {key!r} holds a {type(value).__name__}; only tensors and plain containers "
        "(dict/list/str/int/float/bool/None) can be exported for weights_only loading"
    )


def load_weights_only(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle with code, ...
        raise ValueError(f"{path}: not a readable {what} file ({type(err).__name__}: {err})") from err


def effective_weight(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The weight ``module`` computes with, read without side effects (no mask recording in train mode)."""
    from torch.nn.utils import parametrize

    from nm_lightning.sparsify import NMSparsity

    if parametrize.is_parametrized(module, name):
        plist = getattr(module.parametrizations, name)
        if len(plist) == 1 and isinstance(plist[0], NMSparsity):
            with torch.no_grad():
                w = plist.original
                return torch.where(plist[0].current_mask(w), w, w.new_zeros(()))
    value = getattr(module, name, None)
    return value.detach() if isinstance(value, torch.Tensor) else None
