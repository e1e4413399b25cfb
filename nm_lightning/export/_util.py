"""Helpers shared by the exporters: N:M info from a state dict, grouping views, hashing, atomic writes."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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
    input_dim: int = 1  # the weight dim the groups run along (0 for [in, out] weights such as HF Conv1D)


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

    return {fqn: NMInfo(fqn, s.name, s.n, s.m, s.layout, s.input_dim) for fqn, s in saved_states(state_dict).items()}


def to_groups(weight: torch.Tensor, m: int, layout: Layout, input_dim: int = 1) -> torch.Tensor:
    """``[G, m]`` contiguous copy/view of ``weight``'s N:M groups, in group order."""
    gv = group_view(weight.shape, layout, input_dim=input_dim)
    w = weight.contiguous().reshape(gv.outer, gv.length // m, m, gv.inner)
    if gv.inner > 1:
        w = w.permute(0, 1, 3, 2)
    return w.reshape(-1, m).contiguous()


def from_groups(
    groups: torch.Tensor, shape: tuple[int, ...], m: int, layout: Layout, input_dim: int = 1
) -> torch.Tensor:
    """Inverse of :func:`to_groups`."""
    gv = group_view(shape, layout, input_dim=input_dim)
    if gv.inner > 1:
        return groups.reshape(gv.outer, gv.length // m, gv.inner, m).permute(0, 1, 3, 2).reshape(shape).contiguous()
    return groups.reshape(shape)


def group_position(shape: tuple[int, ...], m: int, layout: Layout, g: int, input_dim: int = 1) -> str:
    """Human-readable location of group ``g`` (for error messages)."""
    gv = group_view(shape, layout, input_dim=input_dim)
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


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- stored tensors
MAX_DEPTH = 32  # nesting of plain containers in our files (a state dict's extra state is a few levels deep)


def check_stored_tensor(t: Any, where: str) -> torch.Tensor:
    """Refuse a loaded tensor that is not a plain, dense, contiguous CPU tensor owning exactly its storage.

    Run on every tensor of a file *before* anything reads or allocates from it: a zero-stride or
    overlapping view (``torch.save`` keeps views) can claim a huge size over a few stored bytes, and a
    tensor over a larger or shared storage is never written by our exporters. Every accepted tensor's
    bytes are therefore bytes of the file, which bounds what decoding can allocate by the file size.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: expected a tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type != "cpu":
        raise ValueError(f"{where}: expected a dense (strided) CPU tensor, got layout {t.layout} on {t.device}")
    if not t.is_contiguous() or t.storage_offset() != 0:
        raise ValueError(
            f"{where}: tensor of shape {list(t.shape)} has strides {list(t.stride())} and offset "
            f"{t.storage_offset()}; the exporters write contiguous tensors (offset 0) only"
        )
    nbytes = t.numel() * t.element_size()
    stored = t.untyped_storage().nbytes()
    if stored != nbytes:
        raise ValueError(
            f"{where}: tensor of shape {list(t.shape)} ({t.dtype}) needs {nbytes} bytes but its storage holds "
            f"{stored}; the exporters write each tensor with a storage of exactly its size"
        )
    return t


def check_stored_tree(value: Any, where: str, storages: set[int] | None = None, depth: int = 0) -> None:
    """:func:`check_stored_tensor` on every tensor in ``value`` (plain containers), and no storage twice."""
    storages = set() if storages is None else storages
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: containers nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, torch.Tensor):
        check_stored_tensor(value, where)
        if value.numel():
            ptr = value.untyped_storage().data_ptr()
            if ptr in storages:
                raise ValueError(f"{where}: shares its storage with another tensor of the file")
            storages.add(ptr)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_stored_tree(v, f"{where}[{i}]", storages, depth + 1)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, _PLAIN):
                raise ValueError(f"{where}: key {k!r} is not a plain value")
            check_stored_tree(v, f"{where}[{k!r}]", storages, depth + 1)
    elif not isinstance(value, _PLAIN):
        raise ValueError(f"{where}: unexpected {type(value).__name__} (only tensors and plain containers)")


def canonical_copy(value: Any) -> Any:
    """``value`` with every tensor a detached, contiguous CPU copy owning its storage (what the loaders accept)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True).contiguous().clone()
    if isinstance(value, list):
        return [canonical_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(canonical_copy(v) for v in value)
    if isinstance(value, Mapping):
        items = ((k, canonical_copy(v)) for k, v in value.items())
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    return value


def payload_digest(payload: Mapping[str, Any], exclude: str = "sha256") -> str:
    """sha256 of a canonical serialization of ``payload`` (all fields but ``exclude``).

    Every value is written with a type tag: strings (UTF-8, with length), ints, floats (``float.hex``),
    bools, None, lists/tuples (with length), dicts (with length, in their stored order: pickle keeps it)
    and tensors (dtype, shape, then the raw bytes). Run :func:`check_stored_tree` first: hashing reads
    the tensors' bytes in place, without a copy.
    """
    h = hashlib.sha256()

    def put(tag: bytes, data: bytes = b"") -> None:
        h.update(tag + len(data).to_bytes(8, "little") + data)

    def walk(v: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ValueError(f"containers nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, torch.Tensor):
            if not v.is_contiguous() or v.device.type != "cpu":
                raise ValueError("the digest reads contiguous CPU tensors only (run check_stored_tree first)")
            put(b"T", f"{dtype_name(v.dtype)}{list(v.shape)}".encode())
            if v.numel():
                h.update(memoryview(v.detach().reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(v, bool) or v is None:
            put(b"b", repr(v).encode())
        elif isinstance(v, int):
            put(b"i", str(v).encode())
        elif isinstance(v, float):
            put(b"f", v.hex().encode())
        elif isinstance(v, str):
            put(b"s", v.encode("utf-8", "surrogatepass"))
        elif isinstance(v, (list, tuple)):
            put(b"l" if isinstance(v, list) else b"t", str(len(v)).encode())
            for x in v:
                walk(x, depth + 1)
        elif isinstance(v, Mapping):
            put(b"d", str(len(v)).encode())
            for k, x in v.items():
                walk(k, depth + 1)
                walk(x, depth + 1)
        else:
            raise TypeError(f"cannot hash a {type(v).__name__}")

    walk({k: v for k, v in payload.items() if k != exclude}, 0)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- atomic writes
def current_umask() -> int:
    """The process umask (read from /proc where possible, so no other thread sees it change)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: str | Path, err: BaseException, what: str = "write") -> OSError:
    """An ``OSError`` naming ``path`` for a failed write (torch's zip writer raises RuntimeError on a full disk)."""
    code = err.errno if isinstance(err, OSError) and err.errno else errno.EIO
    detail = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
    new = OSError(code, f"cannot {what} {path}: {detail}")
    new.filename = str(path)
    return new


def write_file(path: Path, writer: Callable[[BinaryIO], None]) -> None:
    """Create ``path`` (mode ``0o666 & ~umask``, like ``open``/``torch.save``), fill it with ``writer``, fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | Path, writer: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through a temporary file in the same folder, then rename: readers never see a partial file.

    The file's mode follows the umask; any failure removes the temporary file and raises an ``OSError``
    naming ``path`` (the original exception chained).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(path.parent, err, "create the folder") from err
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        write_file(tmp, writer)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_write` (no half-written files; mode follows the umask)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


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


# ---------------------------------------------------------------------------------------------- file envelopes
def seal(payload: dict[str, Any]) -> dict[str, Any]:
    """Add ``payload["sha256"]``: the :func:`payload_digest` of everything else (tensors must be canonical)."""
    check_stored_tree({k: v for k, v in payload.items() if k != "sha256"}, "payload")
    payload["sha256"] = payload_digest(payload)
    return payload


def open_envelope(data: Any, where: str, fmt: str, version: int, what: str) -> tuple[list[str], Mapping, Mapping]:
    """Check a loaded ``{"format", "version", "order", "tensors", "layers", "sha256"}`` file before decoding it.

    In this order: the format and version (older and newer versions are refused by name); every tensor
    is plain, contiguous and owns exactly its storage (:func:`check_stored_tree`, nothing allocated);
    the digest over the whole payload (key list, every tensor, every header field); then the key list:
    strings, no key twice, no key both in ``tensors`` and ``layers``, every stored key listed and every
    listed key stored. Returns ``(order, tensors, layers)``.
    """
    if not isinstance(data, Mapping) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{where}: not an {what} file (format={got!r}, expected {fmt!r})")
    if data.get("version") != version:
        raise ValueError(
            f"{where}: unsupported {what} version {data.get('version')!r}; this reader reads version {version} "
            "only (write the file again with this version of nm_lightning)"
        )
    extra = sorted(set(data) - {"format", "version", "order", "tensors", "layers", "sha256"}, key=str)
    if extra:
        raise ValueError(f"{where}: unknown top-level field(s) {extra}")
    check_stored_tree({k: v for k, v in data.items() if k != "sha256"}, where)
    digest = data.get("sha256")
    if not isinstance(digest, str) or digest != payload_digest(data):
        raise ValueError(f"{where}: checksum mismatch: the file is corrupted or was modified (field 'sha256')")
    order, tensors, layers = data.get("order"), data.get("tensors"), data.get("layers")
    if not isinstance(order, list) or not isinstance(tensors, Mapping) or not isinstance(layers, Mapping):
        raise ValueError(f"{where}: fields 'order' (list), 'tensors' and 'layers' (dicts) are required")
    seen: set[str] = set()
    for key in order:
        if not isinstance(key, str):
            raise ValueError(f"{where}: key list entry {key!r} is not a string")
        if key in seen:
            raise ValueError(f"{where}: key {key!r} is listed twice in 'order'")
        seen.add(key)
    both = sorted(set(tensors) & set(layers), key=str)
    if both:
        raise ValueError(f"{where}: key(s) {both} stored both in 'tensors' and 'layers'")
    stored = set(tensors) | set(layers)
    if seen != stored:
        raise ValueError(
            f"{where}: key list does not match the stored entries (listed but not stored "
            f"{sorted(seen - stored, key=str)}, stored but not listed {sorted(stored - seen, key=str)})"
        )
    return order, tensors, layers
