"""2:4 semi-structured export for NVIDIA sparse tensor cores (``torch.sparse.to_sparse_semi_structured``).

Two entry points:

* :func:`to_semi_structured` converts, in place on a CUDA GPU (sm80+), the eligible layers where a 2:4
  kernel (cuSPARSELt or CUTLASS) is measured faster than dense on the layer's real input, checks the
  whole model end to end (reverting layers until it is not slower) and checks every output tensor
  against the masked dense model. Without CUDA it converts nothing and says why.
* :func:`save_semi_structured` / :func:`load_semi_structured` write and read the CUTLASS packed format
  (values + int16 metadata) on any machine, using torch's pure-PyTorch conversion functions, which run
  on CPU. On a GPU, :func:`semi_structured_weight` turns a stored pair into a CUTLASS sparse tensor.

Triton-free by construction: no triton, torchao, torch.compile or inductor on this path.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from nm_lightning.export._convert import (
    Conversion,
    ConversionReport,
    KernelTimes,
    Timer,
    TimingContext,
    call_model,
    compare_outputs,
    cpu_timer,
    cuda_timer,
    end_to_end,
    ms_cell,
    replace_module,
)
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

Backend = Literal["auto", "cusparselt", "cutlass"]
# sparse (weight) minimum rows, cols per backend and dtype (torch/sparse/semi_structured.py)
MIN_SHAPES: dict[str, dict[torch.dtype, tuple[int, int]]] = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (16, 128)},
}
FORMAT = "nm_lightning.semi_structured_cutlass"
VERSION = 2


@dataclass
class LayerResult(KernelTimes):
    name: str
    type_name: str
    shape: tuple[int, ...]
    status: Literal["converted", "eligible", "dense", "skipped"]
    reason: str = ""
    input_shape: tuple[int, ...] | None = None
    times_ms: dict[str, float] = field(default_factory=dict)
    kernel: str = "dense"


@dataclass(kw_only=True)
class SemiStructuredReport(ConversionReport):
    """What :func:`to_semi_structured` did: per layer the timings, the choice and why; end to end; output check.

    Status per layer: ``converted``; ``dense`` (eligible and measured, but no sparse kernel was at least
    ``min_speedup`` faster, its output differed, or the end-to-end check reverted it); ``skipped`` (not
    eligible, with the reason); ``eligible`` (would be measured, but this machine cannot run the kernels).
    """

    backend: str
    dtype: str
    cuda: bool
    reason: str = ""  # why nothing could be converted (no CUDA, old GPU, backend missing)
    backends: tuple[str, ...] = ()
    layers: list[LayerResult] = field(default_factory=list)

    console_width: ClassVar[int] = 180

    @property
    def converted(self) -> list[str]:
        return [r.name for r in self.layers if r.status == "converted"]

    @property
    def skipped(self) -> dict[str, str]:
        return {r.name: r.reason for r in self.layers if r.status == "skipped"}

    @property
    def choices(self) -> dict[str, str]:
        return {r.name: r.kernel for r in self.layers}

    def _title(self) -> str:
        return f"2:4 semi-structured export ({self.backend}, {self.dtype}; ms = median per call)"

    def _columns(self) -> tuple[str, ...]:
        timed = tuple(f"{b} ms" for b in self.backends)
        return ("layer", "type", "weight", "input", "dense ms", *timed, "chosen", "x", "status", "why")

    def _row(self, r: LayerResult) -> list[str]:
        style = {"converted": "green", "eligible": "cyan", "dense": "white", "skipped": "yellow"}[r.status]
        return [
            r.name,
            r.type_name,
            "x".join(map(str, r.shape)),
            "x".join(map(str, r.input_shape)) if r.input_shape else "-",
            *(ms_cell(r.times_ms, k) for k in ("dense", *self.backends)),
            r.kernel,
            f"{r.speedup:.2f}" if r.speedup else "-",
            f"[{style}]{r.status}[/]",
            r.reason,
        ]

    def caption(self) -> str | None:
        text = super().caption()
        if self.reason:
            text = f"nothing converted: {self.reason}" + (f"; {text}" if text else "")
        return text


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


def _torch_kernel(backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``to_sparse_semi_structured`` with torch's cuSPARSELt or CUTLASS kernels (``_FORCE_CUTLASS``)."""

    def make(w2d: torch.Tensor) -> torch.Tensor:
        from torch.sparse import to_sparse_semi_structured

        with _force_cutlass(backend == "cutlass"):
            return to_sparse_semi_structured(w2d)

    return make


def _with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A Linear computing with ``weight`` (a copy of ``module`` sharing everything else), or a 1x1 conv GEMM."""
    if isinstance(module, nn.Linear):
        new = copy.copy(module)
        new._parameters = dict(module._parameters)  # noqa: SLF001 - the copy must not share the weight slot
        new.weight = nn.Parameter(weight, requires_grad=False)
        return new
    return SemiStructuredConv1x1(weight, module.bias)  # type: ignore[arg-type]


def to_semi_structured(
    model: nn.Module,
    example_input: Any = None,
    backend: Backend = "auto",
    dtype: torch.dtype = torch.float16,
    *,
    device: str | torch.device | None = None,
    rtol: float = 2e-2,
    min_speedup: float = 1.05,
    end_to_end_min_speedup: float = 1.0,
    repeats: int = 20,
    warmup: int = 5,
    timer: Timer | None = None,
    kernels: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    verbose: bool = True,
) -> SemiStructuredReport:
    """Convert the layers of ``model`` where a 2:4 sparse kernel is measurably faster, in place.

    Eligible: Linear and plain 1x1 Conv2d weights that are exactly 2:4 along the input dimension and
    meet the backend's minimum shapes for ``dtype`` (:data:`MIN_SHAPES`). With CUDA (sm80+) the
    model's N:M parametrizations are removed (masked weights kept), the model is moved to the GPU in
    ``dtype``, and ``example_input`` (a tensor, a tuple of positional or a dict of keyword arguments;
    required) is run once to record each layer's input. Then:

    1. per eligible layer: dense vs each backend (``backend="auto"``: cuSPARSELt and CUTLASS where this
       GPU runs them) on the layer's real input, timed with CUDA events (warm-up, interleaved calls,
       median of ``repeats``). The fastest sparse kernel is used only if it is at least ``min_speedup``
       times faster than dense and its output matches the dense layer's (``rtol``);
    2. end to end: the whole model dense vs converted (same timer); while ``dense / converted <
       end_to_end_min_speedup`` the converted layer with the smallest gain is reverted;
    3. every output tensor is compared with the masked dense model (``max |diff| <= rtol * max(1, max
       |ref|)``); if any differs, every layer is reverted (``report.ok`` is False).

    The report holds the per-layer table (timings, choice, reason) and the end-to-end ratio. Without
    CUDA (and without ``kernels``), nothing changes and the report says why and which layers would be
    measured. ``timer`` (see :mod:`nm_lightning.export._convert`) and ``kernels`` (``{name: fn}``, ``fn``
    turning a 2-D dense weight into the weight ``F.linear`` computes with; replaces torch's backends and
    the CUDA requirement; the model then stays on its device unless ``device`` is given) make the
    decisions testable without a GPU. Triton-free: no Triton, torchao or ``torch.compile``.
    """
    if backend not in ("auto", *MIN_SHAPES):
        raise ValueError(f"backend must be 'auto', 'cusparselt' or 'cutlass', got {backend!r}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"dtype must be torch.float16 or torch.bfloat16, got {dtype} (int8 needs a quantized model, "
            "float32 runs 1:2 TF32 kernels, neither is handled here)"
        )
    if not min_speedup >= 0 or not end_to_end_min_speedup >= 0:
        raise ValueError(
            f"min_speedup and end_to_end_min_speedup must be >= 0, got {min_speedup}, {end_to_end_min_speedup}"
        )
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if example_input is None:
        raise ValueError(
            "to_semi_structured needs example_input (a batch shaped like real inference): every layer is "
            "timed on its real input shape and converted only where the sparse kernel is faster"
        )
    names = tuple(MIN_SHAPES) if backend == "auto" else (backend,)
    report = SemiStructuredReport(backend=backend, dtype=dtype_name(dtype), cuda=torch.cuda.is_available())
    if kernels is None:
        reasons = {b: cuda_reason(b) for b in names}
        makers = {b: _torch_kernel(b) for b in names if reasons[b] is None}
        if not makers:
            report.reason = "; ".join(dict.fromkeys(r for r in reasons.values() if r))
            for name, module, weight in _candidates(model):
                w2d, why = _as_2d(module, weight.detach())
                whys = [why or eligibility(w2d.to(dtype), b, dtype) for b in names]  # type: ignore[union-attr]
                why = "" if any(not w for w in whys) else str(whys[0])
                type_name = parametrize.type_before_parametrizations(module).__name__
                status = "skipped" if why else "eligible"
                report.layers.append(LayerResult(name, type_name, tuple(weight.shape), status, why or report.reason))
            if verbose:
                report.print()
            return report
        report.notes += [f"{b} not used: {r}" for b, r in reasons.items() if r]
        dev = torch.device(device) if device is not None else torch.device("cuda")
    else:
        makers = dict(kernels)
        first = next(iter(model.parameters()), None)
        dev = (
            torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        )
    report.backends = tuple(makers)
    if timer is None:
        timer = cuda_timer if dev.type == "cuda" else cpu_timer

    model.eval()
    detach(model)  # masked weights stay; no mask recomputation in the converted model
    model.to(device=dev, dtype=dtype)
    sample = _sample_to(example_input, dev, dtype)
    candidates = list(_candidates(model))
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, _n=name: inputs.setdefault(_n, args[0]))
        for name, m, _ in candidates
    ]
    try:
        with torch.inference_mode():
            ref = call_model(model, sample)
    finally:
        for h in hooks:
            h.remove()

    conversions: dict[str, Conversion] = {}
    for name, module, weight in candidates:
        row = LayerResult(name, type(module).__name__, tuple(weight.shape), "skipped")
        report.layers.append(row)
        w2d, why = _as_2d(module, weight.detach())
        if why:
            row.reason = why
            continue
        whys = {b: eligibility(w2d, b, dtype) if b in MIN_SHAPES else check_2to4(w2d) for b in makers}  # type: ignore[arg-type]
        usable = [b for b, w in whys.items() if w is None]
        if not usable:
            row.reason = "; ".join(dict.fromkeys(str(w) for w in whys.values()))
            continue
        x = inputs.get(name)
        if x is None:
            row.reason = "not called by example_input"
            continue
        row.status, row.input_shape = "dense", tuple(x.shape)
        with torch.inference_mode():
            dense_out = module(x)
        fns: dict[str, Callable[[], Any]] = {"dense": lambda m=module, x=x: m(x)}
        new: dict[str, nn.Module] = {}
        notes = [f"{b}: {w}" for b, w in whys.items() if w is not None]
        for b in usable:
            try:
                converted = _with_weight(module, makers[b](w2d.contiguous()))  # type: ignore[union-attr]
                with torch.inference_mode():
                    check = compare_outputs(dense_out, converted(x), rtol)
            except (RuntimeError, ValueError, NotImplementedError, TypeError) as err:
                notes.append(f"{b}: {type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}")
                continue
            if not check.ok:
                notes.append(f"{b}: output differs ({check.summary()})")
                continue
            new[b] = converted
            fns[b] = lambda c=converted, x=x: c(x)
        if new:
            with torch.inference_mode():
                row.times_ms = timer(fns, repeats=repeats, warmup=warmup, context=TimingContext("layer", name))
            best = min(new, key=lambda b: row.times_ms[b])
            if row.times_ms["dense"] >= min_speedup * row.times_ms[best]:
                row.status, row.kernel = "converted", best
                replace_module(model, name, new[best])
                conversions[name] = Conversion(module, new[best], row.times_ms["dense"] - row.times_ms[best])
            else:
                notes.insert(0, f"no sparse kernel >= {min_speedup}x faster than dense")
        row.reason = "; ".join(notes)

    rows = {r.name: r for r in report.layers}
    if conversions:
        report.end_to_end, _ = end_to_end(
            model, sample, conversions, timer, repeats=repeats, warmup=warmup, min_speedup=end_to_end_min_speedup
        )
        for name in report.end_to_end.reverted:
            rows[name].status, rows[name].kernel = "dense", "dense"
            rows[name].reason = "reverted: the whole model was not faster with it"
    with torch.inference_mode():
        out = call_model(model, sample)
    report.output_check = compare_outputs(ref, out, rtol)
    if not report.output_check.ok and conversions:
        for name, c in conversions.items():
            replace_module(model, name, c.original)
            if rows[name].status == "converted":
                rows[name].status, rows[name].kernel = "dense", "dense"
                rows[name].reason = "reverted: the converted model's output differed"
        report.notes.append("every layer reverted: the converted model's output differed")
    if verbose:
        report.print()
    return report


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
