"""Compact N:M storage: kept values plus bit-packed in-group positions; exact reconstruction.

File layout (``torch.save`` of tensors and plain containers only, so :func:`load_packed` reads it with
``torch.load(weights_only=True)``; no pickled code)::

    {"format": "nm_lightning.packed", "version": 2, "order": [every key, in state-dict order],
     "tensors": {key: tensor or plain value},              # everything stored as-is
     "layers": {key: {"shape": [...], "dtype": "float16", "n": 2, "m": 4, "layout": "input_channel",
                      "coding": "bits" | "combinatorial", "bits": b, "groups": G,
                      "values": Tensor[G * n],              # kept values, group by group, ascending position
                      "codes": uint8 Tensor}},              # G codes of b bits each, little-endian bit stream
     "sha256": digest of everything above}                 # key list, header fields and every tensor

The digest is one sha256 over a canonical serialization of the whole payload (the key list, every
header field, the biases and other ``tensors`` entries, the packed values and codes). The loader checks,
before it decodes or allocates anything: the format and version (version 1 files, which had per-layer
checksums only, are refused), that every stored tensor is a plain contiguous CPU tensor owning exactly
its storage (so a zero-stride view cannot claim a large layer over a few bytes, and nothing decoded is
larger than ``m / n`` times the stored values), the digest, the key list (no key twice, none both in
``tensors`` and ``layers``, none missing or extra), and every layer's fields against its shape and N:M.

Each group of ``m`` (see :mod:`nm_lightning.masks` for the ``input_channel``/``flat`` grouping) keeps
exactly ``n`` entries. ``coding="bits"`` stores each kept position in ``ceil(log2(m))`` bits;
``coding="combinatorial"`` stores the group's choice as its rank among the ``C(m, n)`` sorted
position sets in ``ceil(log2(C(m, n)))`` bits (2:4: 3 bits per group instead of 4). ``"auto"`` picks
combinatorial when ``C(m, n) <= 65536`` (every m <= 16), bits otherwise.

Exact means exact up to the sign of a pruned zero. Each group stores exactly ``n`` values: its
non-zeros (NaN included) first, then its -0.0 entries, then +0.0, lower position first; every other
entry is decoded as +0.0. So a weight masked the way nm_lightning masks (``torch.where(mask, w, 0)``:
pruned entries +0.0) round-trips bit for bit, a kept -0.0 included; a weight pruned with
``w.mul_(mask)`` (ASP, ``torch.ao``) has -0.0 in pruned positions, which decode as +0.0. The file size
never depends on the signs of zeros.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from nm_lightning.export._util import (
    NMInfo,
    atomic_torch_save,
    canonical_copy,
    check_plain,
    dtype_from_name,
    dtype_name,
    from_groups,
    group_position,
    layer_name,
    load_weights_only,
    nm_infos,
    open_envelope,
    seal,
    state_dict_of,
    to_groups,
)
from nm_lightning.masks import check_nm, nm_mask, validate_nm
from nm_lightning.sparsify import plain_state_dict

__all__ = ["save_packed", "load_packed", "pack_state_dict", "unpack_state_dict", "FORMAT", "VERSION"]

FORMAT = "nm_lightning.packed"
VERSION = 2
Coding = Literal["auto", "bits", "combinatorial"]
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}
_MAX_TABLE = 1 << 16
_CHUNK = 1 << 20  # codes per bit-packing chunk (a multiple of 8)


# ---------------------------------------------------------------------------------------------- bit streams
def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit stream of ``codes`` (non-negative ints < 2**bits), ``bits`` bits each -> uint8."""
    codes = np.ascontiguousarray(codes, dtype=np.uint32).reshape(-1)
    if bits == 0 or codes.size == 0:
        return np.zeros(0, dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint32)
    out = []
    for start in range(0, codes.size, _CHUNK):
        chunk = codes[start : start + _CHUNK]
        bitmat = ((chunk[:, None] >> shifts) & 1).astype(np.uint8)
        out.append(np.packbits(bitmat.reshape(-1), bitorder="little"))
    return np.concatenate(out)


def unpack_bits(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes as int64."""
    if bits == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    stream = np.ascontiguousarray(stream, dtype=np.uint8).reshape(-1)
    weights = (np.uint32(1) << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    out = np.empty(count, dtype=np.int64)
    step = _CHUNK * bits // 8  # bytes per full chunk
    for i, start in enumerate(range(0, count, _CHUNK)):
        n_codes = min(_CHUNK, count - start)
        raw = stream[i * step : i * step + (n_codes * bits + 7) // 8]
        bitmat = np.unpackbits(raw, count=n_codes * bits, bitorder="little").reshape(n_codes, bits)
        out[start : start + n_codes] = bitmat.astype(np.uint32) @ weights
    return out


# ---------------------------------------------------------------------------------------------- combinatorial coding
@lru_cache(maxsize=64)
def _binom_table(m: int, n: int) -> torch.Tensor:
    """``t[p, j] = C(p, j + 1)`` for ``p < m``, ``j < n``: the combinadic weights."""
    return torch.tensor([[math.comb(p, j + 1) for j in range(n)] for p in range(m)], dtype=torch.int64)


@lru_cache(maxsize=64)
def _combo_table(m: int, n: int) -> torch.Tensor:
    """``t[rank]`` = the ascending positions with that combinadic rank, ``[C(m, n), n]``."""
    combos = torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.int64).reshape(-1, n)
    ranks = _encode_combinatorial(combos, m, n)
    table = torch.empty_like(combos)
    table[ranks] = combos
    return table


def _encode_combinatorial(idx: torch.Tensor, m: int, n: int) -> torch.Tensor:
    binom = _binom_table(m, n)
    cols = torch.arange(n).expand_as(idx)
    return binom[idx, cols].sum(dim=1)


def _code_bits(coding: str, n: int, m: int) -> int:
    count = math.comb(m, n) if coding == "combinatorial" else m
    return max(0, (count - 1).bit_length())


def _resolve_coding(coding: str, n: int, m: int) -> str:
    if coding not in ("auto", "bits", "combinatorial"):
        raise ValueError(f"coding must be 'auto', 'bits' or 'combinatorial', got {coding!r}")
    if coding == "auto":
        return "combinatorial" if math.comb(m, n) <= _MAX_TABLE else "bits"
    if coding == "combinatorial" and math.comb(m, n) > _MAX_TABLE:
        raise ValueError(f"combinatorial coding supports C(m, n) <= {_MAX_TABLE}; {n}:{m} has {math.comb(m, n)}")
    return coding


# ---------------------------------------------------------------------------------------------- one layer
def _select(groups: torch.Tensor, n: int, key: str, info: NMInfo, shape: tuple[int, ...]) -> torch.Tensor:
    """Bool ``[G, m]`` with exactly ``n`` True per group covering every non-zero (and -0.0 where possible).

    Priority: non-zeros (NaN included), then -0.0, then +0.0, lower position first on ties; the top ``n``
    come from the N:M mask kernel itself. A dropped non-zero means the group breaks the pattern.
    """
    value_nz = groups != 0
    neg_zero = (groups.view(_INT_VIEW[groups.dtype]) != 0) & ~value_nz
    priority = value_nz.to(torch.float16) * 2 + neg_zero.to(torch.float16)
    keep = nm_mask(priority, n, info.m, "input_channel", check_finite=False)
    if bool((value_nz & ~keep).any()):
        counts = value_nz.sum(dim=1)
        too_many = counts > n
        g = int(too_many.nonzero()[0, 0])
        raise ValueError(
            f"layer {info.name!r} ({key}, shape {list(shape)}) is not {n}:{info.m} ({info.layout}): "
            f"group {g} ({group_position(shape, info.m, info.layout, g, info.input_dim)}) "
            f"has {int(counts[g])} non-zeros, "
            f"more than n={n}; {int(too_many.sum())} of {groups.shape[0]} groups violate the pattern"
        )
    return keep


def _pack_layer(weight: torch.Tensor, info: NMInfo, coding: str) -> dict[str, Any]:
    key, n, m, layout = info.key, info.n, info.m, info.layout
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"layer {info.name!r} ({key}): cannot pack dtype {weight.dtype}; expected a float weight")
    shape = tuple(weight.shape)
    reason = check_nm(shape, n, m, layout, input_dim=info.input_dim)
    if reason is not None:
        raise ValueError(f"layer {info.name!r} ({key}): cannot pack as {n}:{m}: {reason}")
    coding = _resolve_coding(coding, n, m)
    groups = to_groups(weight.detach().cpu(), m, layout, info.input_dim)
    keep = _select(groups, n, key, info, shape)
    n_groups = groups.shape[0]
    flat = keep.reshape(-1).nonzero().squeeze(1)  # exactly n per group: group order, ascending position
    values = groups.reshape(-1).index_select(0, flat)
    idx = flat.reshape(n_groups, n) - torch.arange(0, n_groups * m, m).unsqueeze(1)
    codes = _encode_combinatorial(idx, m, n) if coding == "combinatorial" else idx.reshape(-1)
    bits = _code_bits(coding, n, m)
    stream = torch.from_numpy(pack_bits(codes.numpy(), bits))
    return {
        "shape": list(shape),
        "dtype": dtype_name(weight.dtype),
        "n": n,
        "m": m,
        "layout": layout,
        "input_dim": info.input_dim,
        "coding": coding,
        "bits": bits,
        "groups": n_groups,
        "values": values.contiguous().clone(),
        "codes": stream.clone(),
    }


def _unpack_layer(entry: Any, key: str, where: str) -> torch.Tensor:
    def bad(msg: str) -> ValueError:
        return ValueError(f"{where}: layer {key!r}: {msg}")

    if not isinstance(entry, Mapping):
        raise bad(f"expected a dict, got {type(entry).__name__}")
    need = ("shape", "dtype", "n", "m", "layout", "input_dim", "coding", "bits", "groups", "values", "codes")
    missing = [f for f in need if f not in entry]
    if missing:
        raise bad(f"missing field(s) {missing}")
    unknown = sorted(set(entry) - set(need), key=str)
    if unknown:
        raise bad(f"unknown field(s) {unknown}")
    try:
        n, m, layout = validate_nm(entry["n"], entry["m"], entry["layout"])
    except (TypeError, ValueError) as err:
        raise bad(str(err)) from None
    shape = entry["shape"]
    if not isinstance(shape, (list, tuple)) or not all(type(s) is int and s > 0 for s in shape):
        raise bad(f"field 'shape' must be a list of positive ints, got {shape!r}")
    shape = tuple(shape)
    input_dim = entry["input_dim"]
    if type(input_dim) is not int or not 0 <= input_dim < len(shape):
        raise bad(f"field 'input_dim' must be an int in [0, {len(shape)}) for shape {list(shape)}, got {input_dim!r}")
    dtype = dtype_from_name(entry["dtype"], f"{where}: layer {key!r} field 'dtype'")
    coding = entry["coding"]
    if coding not in ("bits", "combinatorial"):
        raise bad(f"field 'coding' must be 'bits' or 'combinatorial', got {coding!r}")
    reason = check_nm(shape, n, m, layout, input_dim=input_dim)
    if reason is not None:
        raise bad(f"shape {list(shape)} does not fit {n}:{m}: {reason}")
    if coding == "combinatorial" and math.comb(m, n) > _MAX_TABLE:
        raise bad(f"combinatorial coding supports C(m, n) <= {_MAX_TABLE}; {n}:{m} has {math.comb(m, n)}")
    groups = math.prod(shape) // m
    bits = _code_bits(coding, n, m)
    values, stream = entry["values"], entry["codes"]
    if entry["groups"] != groups or entry["bits"] != bits:
        raise bad(
            f"fields groups={entry['groups']!r}, bits={entry['bits']!r} do not match shape/n:m "
            f"(expected {groups}, {bits})"
        )
    if not isinstance(values, torch.Tensor) or values.dtype != dtype or values.shape != (groups * n,):
        raise bad(
            f"field 'values' must be a {dtype} tensor of shape [{groups * n}], got "
            f"{getattr(values, 'dtype', type(values).__name__)} {list(getattr(values, 'shape', []))}"
        )
    n_bytes = (groups * (n if coding == "bits" else 1) * bits + 7) // 8
    if not isinstance(stream, torch.Tensor) or stream.dtype != torch.uint8 or stream.shape != (n_bytes,):
        raise bad(
            f"field 'codes' must be a uint8 tensor of shape [{n_bytes}], got "
            f"{getattr(stream, 'dtype', type(stream).__name__)} {list(getattr(stream, 'shape', []))}"
        )
    if coding == "combinatorial":
        ranks = torch.from_numpy(unpack_bits(stream.numpy(), bits, groups))
        if groups and int(ranks.max()) >= math.comb(m, n):
            raise bad(f"combinatorial code {int(ranks.max())} out of range for {n}:{m}")
        idx = _combo_table(m, n)[ranks]
    else:
        idx = torch.from_numpy(unpack_bits(stream.numpy(), bits, groups * n)).reshape(groups, n)
        if groups and (int(idx.max()) >= m or (n > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()))):
            raise bad(f"positions out of range or not strictly increasing inside groups of {m}")
    dense = torch.zeros(groups, m, dtype=dtype)  # pruned entries are +0.0
    dense.scatter_(1, idx, values.reshape(groups, n))
    return from_groups(dense, shape, m, layout, input_dim)


# ---------------------------------------------------------------------------------------------- state dicts
def _scheme_infos(scheme: Mapping[str, Any], plain: Mapping[str, Any], layout: str) -> dict[str, NMInfo]:
    out: dict[str, NMInfo] = {}
    for name, value in scheme.items():
        if not isinstance(name, str):
            raise ValueError(f"scheme keys must be layer names (str), got {name!r}")
        key = name if isinstance(plain.get(name), torch.Tensor) else f"{name}.weight"
        if not isinstance(plain.get(key), torch.Tensor):
            raise ValueError(f"scheme names layer {name!r}, but the state dict has neither {name!r} nor {key!r}")
        input_dim = 1
        if isinstance(value, Mapping):
            input_dim = value.get("input_dim", 1)
            value = (value.get("n"), value.get("m"), value.get("layout", layout))
        if not isinstance(value, (list, tuple)) or len(value) not in (2, 3):
            raise ValueError(f"scheme entry {name!r} must be (n, m) or (n, m, layout), got {value!r}")
        try:
            n, m, lay = validate_nm(value[0], value[1], value[2] if len(value) == 3 else layout)
        except (TypeError, ValueError) as err:
            raise ValueError(f"scheme entry {name!r}: {err}") from None
        if type(input_dim) is not int or not 0 <= input_dim < plain[key].dim():
            raise ValueError(f"scheme entry {name!r}: input_dim must be a dim of the weight, got {input_dim!r}")
        out[key] = NMInfo(key, layer_name(key), n, m, lay, input_dim)
    return out


def pack_state_dict(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    scheme: Mapping[str, Any] | None = None,
    *,
    layout: str = "input_channel",
    coding: Coding = "auto",
) -> dict[str, Any]:
    """The packed representation (what :func:`save_packed` writes) as an in-memory dict.

    The N:M of each layer comes from the sparsified model's extra state; ``scheme`` (``{layer: (n, m)}``
    or ``(n, m, layout)``, layer names like ``"fc1"`` or plain keys like ``"fc1.weight"``) adds layers of a
    plain state dict whose weights are already N:M (checked: a group with more than ``n`` non-zeros is
    an error naming the layer). Layers with ``n == m`` are stored as-is.
    """
    sd = state_dict_of(model_or_state_dict)
    infos = nm_infos(sd)
    plain = plain_state_dict(sd)
    if scheme is not None:
        for key, info in _scheme_infos(scheme, plain, layout).items():
            old = infos.get(key)
            if old is not None and (old.n, old.m, old.layout) != (info.n, info.m, info.layout):
                raise ValueError(
                    f"scheme entry for {info.name!r} says {info.n}:{info.m} ({info.layout}) but the model's "
                    f"N:M state says {old.n}:{old.m} ({old.layout})"
                )
            infos[key] = info if old is None else old
    tensors: dict[str, Any] = {}
    layers: dict[str, Any] = {}
    for key, value in plain.items():
        info = infos.get(key)
        if info is not None and info.n < info.m:
            layers[key] = _pack_layer(value, info, coding)
            continue
        check_plain(value, key)
        tensors[key] = canonical_copy(value)
    return seal({"format": FORMAT, "version": VERSION, "order": list(plain), "tensors": tensors, "layers": layers})


def unpack_state_dict(packed: Mapping[str, Any], where: str = "packed state") -> dict[str, Any]:
    """Inverse of :func:`pack_state_dict`: the plain state dict with exact dense-with-zeros weights.

    Checks the whole payload first (see the module docstring); a bad input is a ``ValueError`` that
    names ``where``, the key and the field.
    """
    order, tensors, layers = open_envelope(packed, where, FORMAT, VERSION, "nm_lightning packed")
    return {key: _unpack_layer(layers[key], key, where) if key in layers else tensors[key] for key in order}


def save_packed(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    path: str | Path,
    scheme: Mapping[str, Any] | None = None,
    *,
    layout: str = "input_channel",
    coding: Coding = "auto",
) -> Path:
    """Write the packed N:M file (see the module docstring); returns the path."""
    return atomic_torch_save(pack_state_dict(model_or_state_dict, scheme, layout=layout, coding=coding), path)


def load_packed(path: str | Path) -> dict[str, Any]:
    """Read a :func:`save_packed` file (``weights_only=True``) into the plain dense-with-zeros state dict."""
    return unpack_state_dict(load_weights_only(path, "nm_lightning packed"), where=str(path))
