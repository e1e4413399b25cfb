"""2:4 semi-structured export for NVIDIA sparse tensor cores (``torch.sparse.to_sparse_semi_structured``).

Two entry points:

* :func:`to_semi_structured` converts a model's eligible layers in place on a CUDA GPU (sm80+) and
  checks its outputs against the masked dense model. Without CUDA it converts nothing and says why.
* :func:`save_semi_structured` / :func:`load_semi_structured` write and read the CUTLASS packed format
  (values + int16 metadata) on any machine, using torch's pure-PyTorch conversion functions, which run
  on CPU. On a GPU, :func:`semi_structured_weight` turns a stored pair into a CUTLASS sparse tensor.

Triton-free by construction: no triton, torchao, torch.compile or inductor on this path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from nm_lightning.export._util import (
    atomic_torch_save,
    canonical_copy,
    check_plain,
    dtype_from_name,
    dtype_name,
    effective_weight,
    load_weights_only,
    nm_infos,
    open_envelope,
    seal,
    state_dict_of,
)
from nm_lightning.sparsify import detach, plain_state_dict

__all__ = [
    "SemiStructuredReport",
    "SemiStructuredConv1x1",
    "MIN_SHAPES",
    "check_2to4",
    "eligibility",
    "to_semi_structured",
    "save_semi_structured",
    "load_semi_structured",
    "semi_structured_weight",
]

Backend = Literal["cusparselt", "cutlass"]
# sparse (weight) minimum rows, cols per backend and dtype (torch/sparse/semi_structured.py)
MIN_SHAPES: dict[str, dict[torch.dtype, tuple[int, int]]] = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (16, 128)},
}
FORMAT = "nm_lightning.semi_structured_cutlass"
VERSION = 2


@dataclass
class LayerResult:
    name: str
    type_name: str
    shape: tuple[int, ...]
    status: Literal["converted", "eligible", "skipped"]
    reason: str = ""


@dataclass
class SemiStructuredReport:
    """What :func:`to_semi_structured` did: converted and skipped layers, and the output check."""

    backend: str
    dtype: str
    cuda: bool
    reason: str = ""  # why nothing could be converted (no CUDA, old GPU, backend missing)
    layers: list[LayerResult] = field(default_factory=list)
    max_abs_diff: float | None = None
    ref_max_abs: float | None = None
    tolerance: float | None = None

    @property
    def converted(self) -> list[str]:
        return [r.name for r in self.layers if r.status == "converted"]

    @property
    def skipped(self) -> dict[str, str]:
        return {r.name: r.reason for r in self.layers if r.status == "skipped"}

    @property
    def ok(self) -> bool | None:
        """Output check passed (``None`` when no check ran)."""
        if self.max_abs_diff is None or self.tolerance is None:
            return None
        return self.max_abs_diff <= self.tolerance

    def table(self) -> Any:
        from rich.table import Table

        title = f"2:4 semi-structured export ({self.backend}, {self.dtype})"
        table = Table(title=title)
        for col in ("layer", "type", "shape", "status", "why"):
            table.add_column(col, overflow="fold")
        style = {"converted": "green", "eligible": "cyan", "skipped": "yellow"}
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            table.add_row(r.name, r.type_name, shape, f"[{style[r.status]}]{r.status}[/]", r.reason)
        notes = []
        if self.reason:
            notes.append(f"nothing converted: {self.reason}")
        if self.max_abs_diff is not None:
            notes.append(
                f"output check vs masked dense: max |diff| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}, max |ref| {self.ref_max_abs:.3g}) -> {'OK' if self.ok else 'FAILED'}"
            )
        table.caption = "; ".join(notes) or None
        return table

    def print(self) -> None:
        from rich.console import Console

        Console(width=160).print(self.table())


# ---------------------------------------------------------------------------------------------- checks
def check_2to4(weight2d: torch.Tensor) -> str | None:
    """``None`` if every group of 4 consecutive inputs (dim 1) has at most 2 non-zeros, else why not."""
    if weight2d.dim() != 2:
        return f"{weight2d.dim()}-D weight"
    if weight2d.shape[1] % 4:
        return f"input features {weight2d.shape[1]} not divisible by 4"
    counts = (weight2d.detach().reshape(weight2d.shape[0], -1, 4) != 0).sum(-1)
    bad = int((counts > 2).sum())
    if bad:
        return f"not 2:4 along the input dimension ({bad} of {counts.numel()} groups have > 2 non-zeros)"
    return None


def _as_2d(module: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The GEMM weight ``[out, in]`` of a Linear or a plain 1x1 Conv2d, or a reason why there is none."""
    cls = parametrize.type_before_parametrizations(module)
    if issubclass(cls, nn.Linear):
        return weight, ""
    if issubclass(cls, nn.Conv2d):
        conv: nn.Conv2d = module  # type: ignore[assignment]
        if tuple(conv.kernel_size) != (1, 1):
            return None, f"conv kernel {tuple(conv.kernel_size)} (only 1x1 convs run as GEMMs here)"
        if conv.groups != 1 or tuple(conv.stride) != (1, 1) or conv.padding not in ((0, 0), "valid"):
            return None, "1x1 conv with groups/stride/padding (only plain 1x1 convs run as GEMMs here)"
        return weight.reshape(weight.shape[0], weight.shape[1]), ""
    return None, f"type {cls.__name__} (only Linear and 1x1 Conv2d)"


def eligibility(weight2d: torch.Tensor, backend: str, dtype: torch.dtype) -> str | None:
    """Why a ``[out, in]`` weight cannot become a semi-structured tensor for ``backend``/``dtype``."""
    if backend not in MIN_SHAPES:
        raise ValueError(f"backend must be one of {sorted(MIN_SHAPES)}, got {backend!r}")
    if dtype not in MIN_SHAPES[backend]:
        return f"dtype {dtype} not supported by {backend}"
    why = check_2to4(weight2d)
    if why is not None:
        return why
    rows, cols = weight2d.shape
    min_r, min_c = MIN_SHAPES[backend][dtype]
    if rows < min_r or rows % min_r or cols < min_c or cols % min_c:
        return f"shape {rows}x{cols} must be multiples of {min_r}x{min_c} for {backend} {dtype_name(dtype)}"
    return None


def cuda_reason(backend: str) -> str | None:
    """Why this machine cannot run ``backend`` semi-structured kernels, or ``None``."""
    if not torch.cuda.is_available():
        return (
            "CUDA is not available (torch.sparse semi-structured kernels run only on NVIDIA GPUs with "
            f"compute capability >= 8.0; this torch is {torch.__version__})"
        )
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"GPU compute capability {major}.{minor} < 8.0 (no sparse tensor cores)"
    if backend == "cutlass" and major != 8:
        return f"torch's CUTLASS 2:4 kernels are built for sm8x only; this GPU is sm{major}{minor} (use cusparselt)"
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt (use backend='cutlass' on sm8x)"
    return None


@contextlib.contextmanager
def _force_cutlass(flag: bool) -> Iterator[None]:
    from torch.sparse import SparseSemiStructuredTensor

    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = flag
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old


class SemiStructuredConv1x1(nn.Module):
    """A 1x1, stride-1 Conv2d computed as a 2:4 sparse GEMM over the channels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = F.linear(x.permute(0, 2, 3, 1).reshape(-1, c), self.weight, self.bias)
        return y.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module, torch.Tensor]]:
    for name, module in model.named_modules():
        cls = parametrize.type_before_parametrizations(module)
        if isinstance(module, parametrize.ParametrizationList) or not issubclass(cls, (nn.Linear, nn.Conv2d)):
            continue
        weight = effective_weight(module)
        if weight is not None:
            yield name, module, weight


def _sample_to(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_sample_to(v, device, dtype) for v in x)
    if isinstance(x, Mapping):
        return {k: _sample_to(v, device, dtype) for k, v in x.items()}
    return x


def _call(model: nn.Module, x: Any) -> torch.Tensor:
    out = model(*x) if isinstance(x, tuple) else model(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the output check needs a model returning a tensor, got {type(out).__name__}")
    return out


def to_semi_structured(
    model: nn.Module,
    example_input: Any = None,
    backend: Backend = "cusparselt",
    dtype: torch.dtype = torch.float16,
    *,
    device: str | torch.device | None = None,
    rtol: float = 2e-2,
    verbose: bool = True,
) -> SemiStructuredReport:
    """Convert every eligible layer of ``model`` to a 2:4 semi-structured weight, in place.

    Eligible: Linear and plain 1x1 Conv2d weights that are exactly 2:4 along the input dimension and
    meet ``backend``'s minimum shapes for ``dtype`` (:data:`MIN_SHAPES`); everything else stays dense
    (with its zeros). With CUDA (sm80+), the model's N:M parametrizations are removed (masked weights
    kept), the model is moved to the GPU in ``dtype``, eligible weights are swapped for
    ``to_sparse_semi_structured`` tensors, and with ``example_input`` the output is compared with the
    masked dense model (``max |diff| <= rtol * max(1, max |ref|)``). Without CUDA, nothing changes and
    the report says why and which layers would convert.
    """
    if backend not in MIN_SHAPES:
        raise ValueError(f"backend must be 'cusparselt' or 'cutlass', got {backend!r}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"dtype must be torch.float16 or torch.bfloat16, got {dtype} (int8 needs a quantized model, "
            "float32 runs 1:2 TF32 kernels, neither is handled here)"
        )
    reason = cuda_reason(backend)
    report = SemiStructuredReport(backend=backend, dtype=dtype_name(dtype), cuda=torch.cuda.is_available())
    if reason is not None:
        report.reason = reason
        for name, module, weight in _candidates(model):
            w2d, why = _as_2d(module, weight.detach())
            why = why or eligibility(w2d.to(dtype), backend, dtype) or ""  # type: ignore[union-attr]
            status = "skipped" if why else "eligible"
            type_name = parametrize.type_before_parametrizations(module).__name__
            report.layers.append(LayerResult(name, type_name, tuple(weight.shape), status, why or reason))
        if verbose:
            report.print()
        return report

    from torch.sparse import to_sparse_semi_structured

    dev = torch.device(device) if device is not None else torch.device("cuda")
    model.eval()
    detach(model)  # masked weights stay; no mask recomputation in the converted model
    model.to(device=dev, dtype=dtype)
    sample = _sample_to(example_input, dev, dtype) if example_input is not None else None
    ref = None
    if sample is not None:
        with torch.inference_mode():
            ref = _call(model, sample).float()
    for name, module, weight in list(_candidates(model)):
        type_name = type(module).__name__
        w2d, why = _as_2d(module, weight.detach())
        why = why or eligibility(w2d, backend, dtype) or ""  # type: ignore[arg-type]
        if why:
            report.layers.append(LayerResult(name, type_name, tuple(weight.shape), "skipped", why))
            continue
        try:
            with _force_cutlass(backend == "cutlass"):
                sparse_w = to_sparse_semi_structured(w2d.contiguous())  # type: ignore[union-attr]
        except (RuntimeError, ValueError, NotImplementedError) as err:
            report.layers.append(LayerResult(name, type_name, tuple(weight.shape), "skipped", f"torch: {err}"))
            continue
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(sparse_w, requires_grad=False)
        else:
            _replace(model, name, SemiStructuredConv1x1(sparse_w, module.bias))  # type: ignore[arg-type]
        report.layers.append(LayerResult(name, type_name, tuple(weight.shape), "converted"))
    if sample is not None and ref is not None:
        with torch.inference_mode():
            out = _call(model, sample).float()
        report.max_abs_diff = float((out - ref).abs().max()) if out.numel() else 0.0
        report.ref_max_abs = float(ref.abs().max()) if ref.numel() else 0.0
        report.tolerance = rtol * max(1.0, report.ref_max_abs)
    if verbose:
        report.print()
    return report


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ---------------------------------------------------------------------------------------------- CUTLASS files (CPU ok)
def save_semi_structured(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    path: str | Path,
    dtype: torch.dtype | None = None,
) -> dict[str, str]:
    """Write the CUTLASS 2:4 packed form of every eligible N:M weight; returns ``{layer key: why skipped}``.

    Runs on CPU. A weight is packed when it is a 2-D (or 1x1 conv) fp16/bf16 weight (after casting to
    ``dtype`` if given), exactly 2:4 along the input dimension and a multiple of the CUTLASS minimum
    block (32x64). Layers of a sparsified model with another N:M, and all other tensors, are stored as-is.
    File (``weights_only``-loadable): ``{"format", "version": 2, "order", "tensors": {key: tensor},
    "layers": {key: {"shape", "dtype", "packed", "meta"}}, "sha256"}``, the digest covering the whole
    payload as in :mod:`nm_lightning.export.packed`.
    """
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    sd = state_dict_of(model_or_state_dict)
    infos = nm_infos(sd)
    plain = plain_state_dict(sd)
    tensors: dict[str, Any] = {}
    layers: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for key, value in plain.items():
        check_plain(value, key)
        value = canonical_copy(value)
        info = infos.get(key)
        # a sparsified model: its N:M layers; a plain state dict: every float weight that is 2:4
        candidate = info is not None or (not infos and key.endswith("weight") and _is_float(value))
        if not candidate or not isinstance(value, torch.Tensor):
            tensors[key] = value
            continue
        w = value.to(dtype) if dtype is not None else value
        why = None
        if info is not None and (info.n, info.m) != (2, 4):
            why = f"{info.n}:{info.m} is not 2:4"
        elif w.dim() == 4 and tuple(w.shape[2:]) == (1, 1):
            w = w.reshape(w.shape[0], w.shape[1])
        elif w.dim() != 2:
            why = f"{w.dim()}-D weight of shape {list(w.shape)} (only Linear and 1x1 conv)"
        why = why or eligibility(w, "cutlass", w.dtype)
        if why:
            skipped[key] = why
            tensors[key] = value
            continue
        packed, meta = sparse_semi_structured_from_dense_cutlass(w)
        layers[key] = {
            "shape": list(value.shape),
            "dtype": dtype_name(w.dtype),
            "packed": packed.contiguous().clone(),
            "meta": meta.contiguous().clone(),
        }
    payload = {"format": FORMAT, "version": VERSION, "order": list(plain), "tensors": tensors, "layers": layers}
    atomic_torch_save(seal(payload), path)
    return skipped


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2


def _check_cutlass_entry(entry: Any, key: str, where: str) -> tuple[list[int], torch.dtype]:
    """Every field of a stored CUTLASS layer against its shape: ``packed [rows, cols/2]``, ``meta [rows, cols/16]``."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"{where}: layer {key!r}: {msg}")

    if not isinstance(entry, Mapping):
        raise bad(f"expected a dict, got {type(entry).__name__}")
    fields = {"shape", "dtype", "packed", "meta"}
    if set(entry) != fields:
        raise bad(f"fields must be {sorted(fields)}, got {sorted(map(str, entry))}")
    shape = entry["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) not in (2, 4)
        or not all(type(s) is int and s > 0 for s in shape)
        or (len(shape) == 4 and shape[2:] != [1, 1])
    ):
        raise bad(f"field 'shape' must be [rows, cols] or [rows, cols, 1, 1] (positive ints), got {shape!r}")
    dtype = dtype_from_name(entry["dtype"], f"{where}: layer {key!r} field 'dtype'")
    if dtype not in (torch.float16, torch.bfloat16):
        raise bad(f"field 'dtype' must be float16 or bfloat16, got {entry['dtype']!r}")
    rows, cols = shape[0], shape[1]
    min_r, min_c = MIN_SHAPES["cutlass"][dtype]
    if rows % min_r or cols % min_c:
        raise bad(f"shape {rows}x{cols} is not a multiple of the CUTLASS block {min_r}x{min_c}")
    for name, want_dtype, want_shape in (
        ("packed", dtype, (rows, cols // 2)),
        ("meta", torch.int16, (rows, cols // 16)),
    ):
        t = entry[name]
        if not isinstance(t, torch.Tensor) or t.dtype != want_dtype or tuple(t.shape) != want_shape:
            raise bad(
                f"field {name!r} must be a {want_dtype} tensor of shape {list(want_shape)}, got "
                f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}"
            )
    return shape, dtype


def load_semi_structured(path: str | Path) -> dict[str, Any]:
    """Read a :func:`save_semi_structured` file into the plain dense-with-zeros state dict (on CPU).

    Before decoding: format and version, every tensor plain and owning exactly its storage, the digest
    over the whole payload, the key list (no key twice, none missing or extra) and every layer's fields
    against its shape; after decoding, every layer must be 2:4. Errors are ``ValueError`` naming the path.
    """
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    where = str(path)
    data = load_weights_only(path, "nm_lightning semi-structured")
    order, tensors, layers = open_envelope(data, where, FORMAT, VERSION, "nm_lightning semi-structured")
    checked = {key: _check_cutlass_entry(entry, key, where) for key, entry in layers.items()}
    out: dict[str, Any] = {}
    for key in order:
        if key not in layers:
            out[key] = tensors[key]
            continue
        shape, _ = checked[key]
        dense = sparse_semi_structured_to_dense_cutlass(layers[key]["packed"], layers[key]["meta"])
        why = check_2to4(dense)
        if why is not None:
            raise ValueError(f"{where}: layer {key!r}: decoded weight is {why}")
        out[key] = dense.reshape(shape)
    return out


def semi_structured_weight(entry: Mapping[str, Any], device: str | torch.device = "cuda") -> torch.Tensor:
    """A stored ``{"shape", "dtype", "packed", "meta"}`` entry as a CUTLASS ``SparseSemiStructuredTensor`` (GPU).

    The entry's fields are checked against its shape first (``ValueError`` naming the field).
    """
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    shape, _ = _check_cutlass_entry(entry, "entry", "semi_structured_weight")
    return SparseSemiStructuredTensorCUTLASS(
        torch.Size(shape[:2]),
        packed=entry["packed"].to(device),
        meta=entry["meta"].to(device),
        packed_t=None,
        meta_t=None,
        compressed_swizzled_bitmask=None,
        requires_grad=False,
    )
