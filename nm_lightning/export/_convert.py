"""What the measured converters (:func:`~nm_lightning.export.to_cpu_sparse`, ``to_semi_structured``) share.

* calling a model on an example input and swapping one of its layers;
* checking every tensor of a model's output (a tensor, a tuple/list, a dict or ``ModelOutput``, nested);
* timers: ``timer(fns, repeats=, warmup=, context=, setup=)`` returns the median milliseconds per call of
  each function, the calls interleaved (round-robin) so that background load hits all alike. The CPU
  timer uses ``time.perf_counter``, the CUDA timer CUDA events. Pass your own (same signature) to test
  the decisions deterministically; ``context`` says what is timed (one layer, or the whole model with a
  given set of converted layers);
* the end-to-end check: the whole converted model against the dense one, reverting converted layers (the
  one with the smallest measured gain first) until the converted model is not slower;
* the report base class: ``ok``, ``table()``, ``print()``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

__all__ = [
    "Conversion",
    "KernelTimes",
    "ConversionReport",
    "EndToEnd",
    "OutputCheck",
    "TensorCheck",
    "Timer",
    "TimingContext",
    "call_model",
    "compare_outputs",
    "cpu_timer",
    "cuda_timer",
    "end_to_end",
    "replace_module",
]


# ---------------------------------------------------------------------------------------------- model calls
def call_model(model: nn.Module, x: Any) -> Any:
    """``model(*x)`` for a tuple, ``model(**x)`` for a dict, else ``model(x)``."""
    if isinstance(x, tuple):
        return model(*x)
    if isinstance(x, dict):
        return model(**x)
    return model(x)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ---------------------------------------------------------------------------------------------- output checks
def default_rtol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


class KernelTimes:
    """Mixin of a per-layer result that holds ``times_ms`` (median ms per kernel) and the chosen ``kernel``."""

    kernel: str
    times_ms: dict[str, float]

    @property
    def speedup(self) -> float | None:
        """Dense time over the chosen kernel's time (``None`` when dense was kept or a time is missing)."""
        if self.kernel == "dense" or "dense" not in self.times_ms or self.kernel not in self.times_ms:
            return None
        return self.times_ms["dense"] / self.times_ms[self.kernel]


@dataclass
class TensorCheck:
    """One output tensor: ``max |out - ref|`` against ``rtol * max(1, max |ref|)`` (exact for int/bool)."""

    path: str
    max_abs_diff: float
    ref_max_abs: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance  # False for NaN


@dataclass
class OutputCheck:
    """Every tensor of a model's output compared with the reference output, and any structural difference."""

    tensors: list[TensorCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(t.ok for t in self.tensors)

    @property
    def worst(self) -> TensorCheck | None:
        def badness(t: TensorCheck) -> float:
            r = t.max_abs_diff / t.tolerance if t.tolerance > 0 else (0.0 if t.max_abs_diff == 0 else float("inf"))
            return float("inf") if r != r else r

        return max(self.tensors, key=badness, default=None)

    def summary(self) -> str:
        w = self.worst
        parts = [f"{len(self.tensors)} output tensor(s)"]
        if w is not None:
            parts.append(
                f"worst {w.path}: max |diff| {w.max_abs_diff:.3g} (tolerance {w.tolerance:.3g}, "
                f"max |ref| {w.ref_max_abs:.3g})"
            )
        parts += self.problems[:3]
        return "; ".join(parts) + f" -> {'OK' if self.ok else 'FAILED'}"


def _tensor_check(path: str, ref: torch.Tensor, out: torch.Tensor, rtol: float | None) -> TensorCheck | str:
    if tuple(out.shape) != tuple(ref.shape):
        return f"{path}: shape {list(out.shape)} != reference {list(ref.shape)}"
    if ref.numel() == 0:
        return TensorCheck(path, 0.0, 0.0, 0.0)
    out = out.to(ref.device)
    if not (ref.is_floating_point() or ref.is_complex()):
        diff = float((out != ref).sum())  # ids, masks, counts: exact
        return TensorCheck(path, diff, 0.0, 0.0)
    wide = torch.float64 if ref.dtype == torch.float64 else torch.float32  # on the tensors' device
    r, o = ref.detach().to(wide), out.detach().to(wide)
    same = (o == r) | (torch.isnan(o) & torch.isnan(r))
    diff = torch.where(same, torch.zeros((), dtype=wide, device=r.device), (o - r).abs())
    finite = r[torch.isfinite(r)]
    ref_max = float(finite.abs().max()) if finite.numel() else 0.0
    tol = (default_rtol(ref.dtype) if rtol is None else rtol) * max(1.0, ref_max)
    return TensorCheck(path, float(diff.max()), ref_max, tol)


def compare_outputs(ref: Any, out: Any, rtol: float | None = None) -> OutputCheck:
    """Walk ``ref`` and ``out`` together (tensors, tuples/lists, dicts/``ModelOutput``, nested) and compare.

    Float tensors pass with ``max |out - ref| <= rtol * max(1, max |ref|)`` (``rtol`` defaults to 1e-4
    for fp32/fp64, 2e-2 for fp16/bf16; NaN must match NaN); integer and bool tensors must be equal;
    other values must be equal; a different structure (keys, lengths, types, shapes) fails.
    """
    check = OutputCheck()

    def walk(r: Any, o: Any, path: str) -> None:
        if isinstance(r, torch.Tensor):
            if not isinstance(o, torch.Tensor):
                check.problems.append(f"{path}: a tensor in the reference, {type(o).__name__} here")
                return
            res = _tensor_check(path, r, o, rtol)
            (check.tensors.append if isinstance(res, TensorCheck) else check.problems.append)(res)  # type: ignore[operator]
        elif isinstance(r, Mapping):
            if not isinstance(o, Mapping) or list(r.keys()) != list(o.keys()):
                got = list(o.keys()) if isinstance(o, Mapping) else type(o).__name__
                check.problems.append(f"{path}: keys {list(r.keys())} in the reference, {got} here")
                return
            for k in r:
                walk(r[k], o[k], f"{path}[{k!r}]")
        elif isinstance(r, (list, tuple)):
            if not isinstance(o, (list, tuple)) or len(o) != len(r):
                check.problems.append(f"{path}: a sequence of {len(r)} in the reference, {type(o).__name__} here")
                return
            for i, (a, b) in enumerate(zip(r, o, strict=True)):
                walk(a, b, f"{path}[{i}]")
        else:
            try:
                equal = bool(r == o)
            except Exception:  # noqa: BLE001 - an uncomparable value is a difference
                equal = False
            if not equal:
                check.problems.append(f"{path}: {r!r} in the reference, {o!r} here")

    walk(ref, out, "output")
    return check


# ---------------------------------------------------------------------------------------------- timers
@dataclass(frozen=True)
class TimingContext:
    """What a timer call measures: one layer (``kind="layer"``) or the whole model with ``converted`` layers."""

    kind: Literal["layer", "model"]
    layer: str | None = None
    converted: tuple[str, ...] = ()


class Timer(Protocol):
    def __call__(
        self,
        fns: Mapping[str, Callable[[], Any]],
        *,
        repeats: int,
        warmup: int,
        context: TimingContext,
        setup: Mapping[str, Callable[[], Any]] | None = None,
    ) -> dict[str, float]: ...


def cpu_timer(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 15,
    warmup: int = 2,
    context: TimingContext | None = None,
    setup: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, float]:
    """Median milliseconds per call of each function (``time.perf_counter``), round-robin, under inference mode.

    ``setup[k]`` (untimed) runs before every call of ``fns[k]``.
    """
    samples: dict[str, list[float]] = {k: [] for k in fns}
    setup = setup or {}
    with torch.inference_mode():
        for _ in range(warmup):
            for k, f in fns.items():
                if k in setup:
                    setup[k]()
                f()
        for _ in range(repeats):
            for k, f in fns.items():
                if k in setup:
                    setup[k]()
                t0 = time.perf_counter()
                f()
                samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def cuda_timer(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 20,
    warmup: int = 5,
    context: TimingContext | None = None,
    setup: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, float]:
    """Median milliseconds per call measured with CUDA events; warm-up calls first; calls interleaved.

    Each call is bracketed by its own pair of events; the device is synchronized after each round.
    """
    setup = setup or {}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for k, f in fns.items():
                if k in setup:
                    setup[k]()
                f()
        torch.cuda.synchronize()
        for _ in range(repeats):
            events = []
            for k, f in fns.items():
                if k in setup:
                    setup[k]()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                f()
                end.record()
                events.append((k, start, end))
            torch.cuda.synchronize()
            for k, start, end in events:
                samples[k].append(start.elapsed_time(end))
    return {k: statistics.median(v) for k, v in samples.items()}


# ---------------------------------------------------------------------------------------------- end to end
@dataclass
class Conversion:
    """One converted layer: the module it replaced, its replacement, and the measured per-call gain."""

    original: nn.Module
    converted: nn.Module
    gain_ms: float


@dataclass
class EndToEnd:
    """The whole model, dense vs converted, timed interleaved; one round per set of converted layers."""

    rounds: list[tuple[tuple[str, ...], float, float]] = field(default_factory=list)  # (converted, dense, sparse)
    reverted: list[str] = field(default_factory=list)

    @property
    def dense_ms(self) -> float | None:
        return self.rounds[-1][1] if self.rounds else None

    @property
    def sparse_ms(self) -> float | None:
        if not self.rounds:
            return None
        return self.rounds[-1][2] if self.rounds[-1][0] else self.rounds[-1][1]

    @property
    def speedup(self) -> float | None:
        """Dense time / converted time of the returned model (1.0 when every layer was reverted)."""
        if not self.rounds:
            return None
        return self.dense_ms / self.sparse_ms if self.sparse_ms else None  # type: ignore[operator]

    def summary(self) -> str:
        if not self.rounds:
            return "end to end: not timed"
        text = f"end to end: dense {self.dense_ms:.3f} ms, converted {self.sparse_ms:.3f} ms ({self.speedup:.2f}x)"
        if self.reverted:
            text += f"; reverted (not faster as a whole): {', '.join(self.reverted)}"
        return text


def end_to_end(
    model: nn.Module,
    sample: Any,
    conversions: Mapping[str, Conversion],
    timer: Timer,
    *,
    repeats: int,
    warmup: int,
    min_speedup: float = 1.0,
) -> tuple[EndToEnd, list[str]]:
    """Time ``model`` with and without ``conversions`` and revert them until the whole model is not slower.

    Each round times the dense model (every converted layer swapped back to its original) against the
    model with the current conversions, interleaved (``timer``, under ``torch.inference_mode``). While
    ``dense / converted < min_speedup``, the conversion with the smallest measured per-layer gain is
    reverted and the round repeated. Leaves the kept conversions installed; returns the measurements and
    the names of the kept layers.
    """
    active = list(conversions)
    result = EndToEnd()

    def install(names: Sequence[str]) -> None:
        keep = set(names)
        for name, c in conversions.items():
            replace_module(model, name, c.converted if name in keep else c.original)

    while active:
        current = tuple(active)
        with torch.inference_mode():
            times = timer(
                {"dense": lambda: call_model(model, sample), "sparse": lambda: call_model(model, sample)},
                repeats=repeats,
                warmup=warmup,
                context=TimingContext("model", None, current),
                setup={"dense": lambda: install(()), "sparse": lambda c=current: install(c)},
            )
        result.rounds.append((current, times["dense"], times["sparse"]))
        if times["sparse"] * min_speedup <= times["dense"]:
            break
        worst = min(active, key=lambda n: conversions[n].gain_ms)
        active.remove(worst)
        result.reverted.append(worst)
    if not active and conversions:
        dense = result.rounds[-1][1] if result.rounds else 0.0
        result.rounds.append(((), dense, dense))
    install(active)
    return result, active


# ---------------------------------------------------------------------------------------------- reports
@dataclass(kw_only=True)
class ConversionReport:
    """Base of the converters' reports: per-layer rows, the output check and the end-to-end timing.

    ``ok`` is ``None`` when no output check ran, else whether every output tensor matched.
    """

    layers: list[Any] = field(default_factory=list)
    output_check: OutputCheck | None = None
    end_to_end: EndToEnd | None = None
    notes: list[str] = field(default_factory=list)

    title: ClassVar[str] = "conversion"
    columns: ClassVar[tuple[str, ...]] = ()
    console_width: ClassVar[int] = 180

    @property
    def ok(self) -> bool | None:
        return None if self.output_check is None else self.output_check.ok

    @property
    def max_abs_diff(self) -> float | None:
        w = self.output_check.worst if self.output_check else None
        return None if w is None else w.max_abs_diff

    @property
    def ref_max_abs(self) -> float | None:
        w = self.output_check.worst if self.output_check else None
        return None if w is None else w.ref_max_abs

    @property
    def tolerance(self) -> float | None:
        w = self.output_check.worst if self.output_check else None
        return None if w is None else w.tolerance

    def _title(self) -> str:
        return self.title

    def _columns(self) -> tuple[str, ...]:
        return self.columns

    def _row(self, layer: Any) -> list[str]:  # pragma: no cover - every report overrides it
        raise NotImplementedError

    def caption(self) -> str | None:
        parts = list(self.notes)
        if self.end_to_end is not None:
            parts.append(self.end_to_end.summary())
        if self.output_check is not None:
            parts.append("output check vs masked dense: " + self.output_check.summary())
        return "; ".join(parts) or None

    def table(self) -> Any:
        from rich.table import Table

        table = Table(title=self._title())
        for col in self._columns():
            table.add_column(col, overflow="fold")
        for layer in self.layers:
            table.add_row(*self._row(layer))
        table.caption = self.caption()
        return table

    def print(self) -> None:
        from rich.console import Console

        Console(width=self.console_width).print(self.table())


def ms_cell(times: Mapping[str, float], key: str) -> str:
    return f"{times[key]:.3f}" if key in times else "-"
