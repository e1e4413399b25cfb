"""CPU inference for N:M (and any fine-grained) sparse weights: per-layer kernel choice by measurement.

Kernels (all stock PyTorch, no compilation):

* ``"ell"``: ELLPACK sparse x dense product through ``F.embedding_bag``. N:M gives every output row the
  same number of non-zeros (``in * n / m``), so the weight is stored as ``values [out, K']`` and
  ``columns [out, K']`` (int32). With the activations transposed to ``[in, batch]`` (rows of ``batch``
  contiguous values), every output row is a weighted sum of ``K'`` gathered rows, which
  ``embedding_bag(mode="sum", per_sample_weights=values)`` does in one vectorized, multi-threaded call
  (FBGEMM's SpMDM kernels on x86). Work and weight traffic scale with ``n / m``.
* ``"csr"``: ``torch.sparse.mm`` on a CSR copy of the weight (MKL where available).
* ``"dense"``: the original layer (the fallback; kept whenever no sparse kernel is faster).

Convs (Conv2d, groups=1) run as im2col (``F.unfold``; 1x1 stride-1 convs without it) followed by the same
sparse product with the weight viewed as ``[out, in * kh * kw]``, so any layout works.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    end_to_end,
    ms_cell,
    replace_module,
)
from nm_lightning.sparsify import detach

__all__ = ["SparseLinearCPU", "SparseConv2dCPU", "CPUSparseReport", "to_cpu_sparse", "ell_from_dense", "KERNELS"]

KERNELS = ("ell", "csr")


def ell_from_dense(weight2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(columns int32 [out, K'], values [out, K'])`` of a 2-D weight, ``K'`` = most non-zeros in a row.

    Columns are ascending; rows with fewer non-zeros are padded with zero values (at real columns).
    """
    w = weight2d.detach()
    nz = w != 0
    k = max(int(nz.sum(dim=1).max()) if w.numel() else 0, 1)
    cols = torch.sort(nz.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    cols = cols.sort(dim=1).values
    return cols.to(torch.int32).contiguous(), w.gather(1, cols).contiguous()


class _SparseMM(nn.Module):
    """``W @ xt`` for ``xt [in, B]`` with W sparse, returning ``[out, B]``."""

    def __init__(self, weight2d: torch.Tensor, kernel: str) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self.out_features, self.in_features = (int(s) for s in weight2d.shape)
        self.dtype = weight2d.dtype
        self.nnz = int((weight2d != 0).sum())
        if kernel == "ell":
            cols, vals = ell_from_dense(weight2d)
            self.register_buffer("cols", cols, persistent=False)
            self.register_buffer("vals", vals, persistent=False)
        else:
            self.register_buffer("csr", weight2d.detach().to_sparse_csr(), persistent=False)

    def mm(self, xt: torch.Tensor) -> torch.Tensor:
        if xt.dtype != self.dtype:
            xt = xt.to(self.dtype)
        if xt.shape[1] == 0:
            return xt.new_zeros(self.out_features, 0)
        if self.kernel == "ell":
            return F.embedding_bag(self.cols, xt, per_sample_weights=self.vals, mode="sum")
        return torch.sparse.mm(self.csr, xt)


class SparseLinearCPU(nn.Module):
    """Inference-only replacement of an ``nn.Linear`` with a sparse weight (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "ell") -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinearCPU needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.op = _SparseMM(weight, kernel)
        self.in_features, self.out_features = self.op.in_features, self.op.out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @property
    def kernel(self) -> str:
        return self.op.kernel

    def extra_repr(self) -> str:
        density = self.op.nnz / max(1, self.in_features * self.out_features)
        return f"{self.in_features}, {self.out_features}, kernel={self.kernel!r}, density={density:.3f}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        yt = self.op.mm(x.reshape(-1, self.in_features).t().contiguous())
        if self.bias is not None:
            yt = yt.add_(self.bias.unsqueeze(1))
        return yt.t().contiguous().reshape(*lead, self.out_features)


def _conv_unsupported(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}"
    if isinstance(conv.padding, str) and conv.padding != "valid":
        if any(s != 1 for s in conv.stride) or any(
            (d * (k - 1)) % 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)
        ):
            return "padding='same' with an even kernel or a stride"
    return None


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True))  # type: ignore[return-value]
    return tuple(conv.padding)  # type: ignore[return-value]


class SparseConv2dCPU(nn.Module):
    """Inference-only replacement of an ``nn.Conv2d`` (groups=1, zero padding): im2col + sparse product."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, kernel: str = "ell") -> None:
        super().__init__()
        why = _conv_unsupported(conv)
        if why is not None:
            raise ValueError(f"SparseConv2dCPU cannot run this conv: {why}")
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        self.padding = _conv_padding(conv)
        self.out_channels = conv.out_channels
        self.pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        self.op = _SparseMM(weight.detach().reshape(weight.shape[0], -1), kernel)
        bias = conv.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @property
    def kernel(self) -> str:
        return self.op.kernel

    def extra_repr(self) -> str:
        return f"{self.op.in_features}->{self.out_channels}, k={self.kernel_size}, kernel={self.kernel!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.pointwise:
            oh, ow = h, w
            table = x.transpose(0, 1).reshape(c, n * h * w)
        else:
            kh, kw = self.kernel_size
            (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
            oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
            table = cols.transpose(0, 1).reshape(cols.shape[1], n * oh * ow)
        yt = self.op.mm(table.contiguous())
        if self.bias is not None:
            yt = yt.add_(self.bias.unsqueeze(1))
        return yt.reshape(self.out_channels, n, oh, ow).transpose(0, 1).contiguous()


# ---------------------------------------------------------------------------------------------- report
@dataclass
class LayerChoice(KernelTimes):
    name: str
    type_name: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...] | None
    density: float | None
    kernel: str = "dense"
    times_ms: dict[str, float] = field(default_factory=dict)
    reason: str = ""


@dataclass(kw_only=True)
class CPUSparseReport(ConversionReport):
    """Per-layer kernel choices and timings of :func:`to_cpu_sparse`, the end-to-end timing and output check."""

    threads: int
    layers: list[LayerChoice] = field(default_factory=list)

    columns: ClassVar[tuple[str, ...]] = (
        "layer", "type", "weight", "input", "density", "dense ms", "ell ms", "csr ms", "chosen", "x", "why",
    )  # fmt: skip

    def _title(self) -> str:
        return f"CPU sparse inference ({self.threads} threads; ms = median per call)"

    def _row(self, c: LayerChoice) -> list[str]:
        return [
            c.name,
            c.type_name,
            "x".join(map(str, c.weight_shape)),
            "x".join(map(str, c.input_shape)) if c.input_shape else "-",
            f"{c.density:.3f}" if c.density is not None else "-",
            *(ms_cell(c.times_ms, k) for k in ("dense", *KERNELS)),
            c.kernel,
            f"{c.speedup:.2f}" if c.speedup else "-",
            c.reason,
        ]

    @property
    def choices(self) -> dict[str, str]:
        return {c.name: c.kernel for c in self.layers}

    @property
    def layer_speedup(self) -> float | None:
        """Sum of dense times / sum of chosen times over the timed layers (an estimate; see ``end_to_end``)."""
        timed = [c for c in self.layers if "dense" in c.times_ms]
        if not timed:
            return None
        dense = sum(c.times_ms["dense"] for c in timed)
        return dense / sum(c.times_ms[c.kernel] for c in timed)


# ---------------------------------------------------------------------------------------------- conversion
def time_interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds per call of each function, run round-robin so background load hits all alike."""
    return cpu_timer(fns, repeats=repeats, warmup=warmup, context=TimingContext("layer"))


def to_cpu_sparse(
    model: nn.Module,
    example_input: Any,
    *,
    kernels: Sequence[str] = KERNELS,
    max_density: float = 0.5,
    min_speedup: float = 1.05,
    end_to_end_min_speedup: float = 1.0,
    repeats: int = 15,
    warmup: int = 2,
    rtol: float | None = None,
    timer: Timer | None = None,
    verbose: bool = True,
) -> CPUSparseReport:
    """Swap sparse Linear/Conv2d layers of a CPU ``model`` for the fastest kernel on their real shapes, in place.

    ``example_input`` (a tensor, a tuple of positional arguments or a dict of keyword arguments) is run
    once with hooks to record each layer's input. N:M parametrizations are removed first (the masked
    weights stay) and the model is put in eval mode. Then:

    1. per layer: every Linear/Conv2d weight with density <= ``max_density`` is timed dense vs each of
       ``kernels`` on its recorded input (interleaved, median of ``repeats``); a sparse kernel is chosen
       only when it is at least ``min_speedup`` times faster than dense and matches the dense layer's output;
    2. end to end: the whole converted model is timed against the dense one (interleaved, median); while
       it is slower than ``dense / end_to_end_min_speedup``, the converted layer with the smallest measured
       gain is reverted to dense and the model timed again (layers that win alone can lose together:
       caches, memory traffic, thread pools);
    3. every tensor of the output (tensor, tuple/list, dict or ``ModelOutput``, nested) is compared with
       the original model's; if any differs, every layer is reverted and ``report.ok`` stays False.

    ``timer`` (see :mod:`nm_lightning.export._convert`) replaces the wall-clock timer, e.g. to test the
    decisions deterministically.
    """
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        raise ValueError(f"unknown CPU kernel(s) {bad}; choose from {KERNELS}")
    if not (0.0 < max_density <= 1.0):
        raise ValueError(f"max_density must be in (0, 1], got {max_density!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device.type != "cpu":
            raise ValueError(f"to_cpu_sparse needs a CPU model; {pname!r} is on {p.device}")
    timer = timer or cpu_timer

    model.eval()
    candidates: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        cls = parametrize.type_before_parametrizations(module)
        if not isinstance(module, parametrize.ParametrizationList) and issubclass(cls, (nn.Linear, nn.Conv2d)):
            candidates[name] = module
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, _n=name: inputs.setdefault(_n, args[0]))
        for name, m in candidates.items()
    ]
    try:
        with torch.inference_mode():
            ref = call_model(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    detach(model)

    report = CPUSparseReport(threads=torch.get_num_threads())
    conversions: dict[str, Conversion] = {}
    for name, module in candidates.items():
        weight = module.weight.detach()
        choice = LayerChoice(name, type(module).__name__, tuple(weight.shape), None, None)
        report.layers.append(choice)
        x = inputs.get(name)
        if x is None:
            choice.reason = "not called by example_input"
            continue
        choice.input_shape = tuple(x.shape)
        choice.density = float((weight != 0).sum()) / max(1, weight.numel())
        if isinstance(module, nn.Conv2d):
            why = _conv_unsupported(module) or (None if x.dim() == 4 else f"{x.dim()}-D conv input")
            if why:
                choice.reason = why
                continue
        if choice.density > max_density:
            choice.reason = f"density {choice.density:.2f} > max_density {max_density}"
            continue
        with torch.inference_mode():
            dense_out = module(x)
        fns: dict[str, Callable[[], Any]] = {"dense": lambda m=module, x=x: m(x)}
        wrappers: dict[str, nn.Module] = {}
        notes = []
        for k in kernels:
            try:
                if isinstance(module, nn.Conv2d):
                    wrapper: nn.Module = SparseConv2dCPU(module, weight, k)
                else:
                    wrapper = SparseLinearCPU(weight, module.bias, k)
                with torch.inference_mode():
                    out = wrapper(x)
                check = compare_outputs(dense_out, out, rtol)
                if not check.ok:
                    notes.append(f"{k}: output differs ({check.summary()})")
                    continue
            except (RuntimeError, ValueError, NotImplementedError) as err:
                notes.append(f"{k}: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
                continue
            wrappers[k] = wrapper
            fns[k] = lambda w=wrapper, x=x: w(x)
        with torch.inference_mode():
            choice.times_ms = timer(fns, repeats=repeats, warmup=warmup, context=TimingContext("layer", name))
        best = min(wrappers, key=lambda k: choice.times_ms[k], default=None)
        if best is not None and choice.times_ms["dense"] >= min_speedup * choice.times_ms[best]:
            choice.kernel = best
            replace_module(model, name, wrappers[best])
            conversions[name] = Conversion(module, wrappers[best], choice.times_ms["dense"] - choice.times_ms[best])
        else:
            notes.insert(0, f"no sparse kernel >= {min_speedup}x faster than dense")
        choice.reason = "; ".join(notes)

    rows = {c.name: c for c in report.layers}
    if conversions:
        report.end_to_end, kept = end_to_end(
            model, example_input, conversions, timer, repeats=repeats, warmup=warmup, min_speedup=end_to_end_min_speedup
        )
        for name in report.end_to_end.reverted:
            rows[name].reason = f"{rows[name].kernel} reverted: the whole model was not faster with it"
            rows[name].kernel = "dense"
    with torch.inference_mode():
        out = call_model(model, example_input)
    report.output_check = compare_outputs(ref, out, rtol)
    if not report.output_check.ok and conversions:
        for name, c in conversions.items():
            replace_module(model, name, c.original)
            if rows[name].kernel != "dense":
                rows[name].reason = f"{rows[name].kernel} reverted: the converted model's output differed"
                rows[name].kernel = "dense"
        report.notes.append("every layer reverted: the converted model's output differed (" +
                            report.output_check.summary() + ")")  # fmt: skip
    if verbose:
        report.print()
    return report
