"""Sparsity and λ schedules as pure functions of time (no Lightning).

Time ``t`` is counted in the unit the user chose (optimizer steps or epochs). A schedule gives the
fraction ``f(t) ∈ [0, 1]`` of the way from the start density to the target density:

* ``constant``: 0 before ``start``, 1 from ``start`` on;
* ``step``: ``k / len(milestones)`` after the k-th milestone;
* ``linear``: linear from ``start`` to ``end``;
* ``cubic``: Zhu & Gupta (2017), as ``torch.ao.pruning``'s ``CubicSL``: ``1 − (1 − (t − start)/(end − start))³``.

Each layer maps the fraction onto a reachable N between its start N (M: dense) and its own target N;
N is rounded up (never sparser than the schedule) and therefore never increases over time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

__all__ = ["Schedule", "ramp_fraction", "n_at", "decay_at", "validate_schedule"]

Schedule = Literal["constant", "step", "linear", "cubic"]
DecaySchedule = Literal["constant", "linear", "step"]


def validate_schedule(
    schedule: str, start: int, end: int | None, milestones: Sequence[int] | None, what: str = "schedule"
) -> None:
    """Raise a clear error for an inconsistent schedule."""
    if schedule not in ("constant", "step", "linear", "cubic"):
        raise ValueError(f"{what} must be 'constant', 'step', 'linear' or 'cubic', got {schedule!r}")
    for name, value in (("start", start), ("end", end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{what} {name} must be an int >= 0, got {value!r}")
    if schedule in ("linear", "cubic"):
        if end is None:
            raise ValueError(f"a {schedule} {what} needs end (the step/epoch where the target is reached)")
        if end <= start:
            raise ValueError(f"{what} end must be after start, got start={start}, end={end}")
    if schedule == "step":
        if not milestones:
            raise ValueError(f"a step {what} needs milestones, e.g. [10, 20, 30]")
        ms = list(milestones)
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in ms):
            raise ValueError(f"{what} milestones must be ints >= 0, got {ms}")
        if ms != sorted(ms) or len(set(ms)) != len(ms):
            raise ValueError(f"{what} milestones must be strictly increasing, got {ms}")


def ramp_fraction(
    t: int, schedule: Schedule, start: int = 0, end: int | None = None, milestones: Sequence[int] | None = None
) -> float:
    """How far (0..1) the schedule has moved from the start density to the target at time ``t``."""
    if schedule == "step":
        assert milestones
        return sum(t >= m for m in milestones) / len(milestones)
    if t < start:
        return 0.0
    if schedule == "constant":
        return 1.0
    assert end is not None
    x = min(1.0, (t - start) / (end - start))
    if schedule == "linear":
        return x
    return 1.0 - (1.0 - x) ** 3


def n_at(fraction: float, n_start: int, n_final: int, m: int, levels: Sequence[int] | None = None) -> int:
    """The N for a layer at ``fraction`` of its way from ``n_start:m`` to ``n_final:m``.

    The density ``n/m`` is interpolated linearly and rounded *up* to a reachable N (optionally one of
    ``levels``), so N never increases as the fraction grows and the target is reached exactly at 1.
    """
    if fraction >= 1.0:
        return n_final
    density = n_start / m - fraction * (n_start - n_final) / m
    n = max(n_final, min(n_start, math.ceil(density * m - 1e-9)))
    if levels:
        n = min(x for x in (*levels, n_start) if x >= n)
    return n


def decay_at(
    t: int,
    decay: float,
    schedule: DecaySchedule = "constant",
    start: int = 0,
    end: int | None = None,
    milestones: Sequence[int] | None = None,
    factor: float = 2.0,
    initial: float = 0.0,
) -> float:
    """SR-STE λ at time ``t``.

    ``constant``: ``decay``; ``linear``: from ``initial`` at ``start`` to ``decay`` at ``end``;
    ``step``: ``decay · factor^k`` after the k-th milestone (factor 2 = doubling).
    """
    if schedule == "constant":
        return decay
    if schedule == "linear":
        assert end is not None
        if t <= start:
            return initial
        return initial + (decay - initial) * min(1.0, (t - start) / (end - start))
    if schedule == "step":
        assert milestones
        return decay * factor ** sum(t >= m for m in milestones)
    raise ValueError(f"decay_schedule must be 'constant', 'linear' or 'step', got {schedule!r}")
