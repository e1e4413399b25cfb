"""DominoSearch (Sun et al., NeurIPS 2021) as pure tensor code: thresholds, votes, commits, η, ERK.

Every layer starts at M:M. Each group keeps a fixed threshold (mean of its M/2 smallest |w| at the start).
Every ``check_every`` steps a layer whose committed N is above 1 counts, per group, the weights above the
threshold; when at least ``vote_ratio`` of the groups have fewer than the intermediate N, that N drops by
one. A power of two reached by the intermediate N is committed; after each commit the layer-wise penalty
factors η are recomputed (FLOPs share and ERK gap) and the target is tested. Between checks a periodic
L2 shrink ``λ(t)·η_i`` on the kept weights pushes them towards the thresholds.

Everything here is a function of weights and layer shapes, so synchronized replicas take the same
decisions. No Lightning in this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nm_lightning.masks import Layout, group_view

__all__ = [
    "DominoLayer",
    "DominoSearch",
    "erk_sparsities",
    "group_thresholds",
    "vote",
    "penalty_factors",
    "powers_of_two",
    "checks_needed",
]


def powers_of_two(m: int) -> list[int]:
    """Candidate committed N for group size ``m``: 1, 2, 4, ... up to m (m must be a power of two)."""
    if m < 1 or m & (m - 1):
        raise ValueError(f"DominoSearch needs m to be a power of two (candidates are 1, 2, 4, ..., m), got m={m}")
    return [2**k for k in range(int(math.log2(m)) + 1)]


def checks_needed(target: float, m: int, tolerance: float = 0.0) -> int | None:
    """The fewest vote rounds (checks) after which a target (sparsity or FLOPs reduction) can be met at group size
    ``m``, or ``None`` if it cannot be met at all.

    A round lowers a layer's intermediate N by at most one, and only powers of two are committed, so after ``k``
    rounds every layer keeps at least ``2^ceil(log2(m - k))`` of ``m``: both the size and the FLOPs reduction are at
    most ``1 - that / m``. A lower bound: real searches need more rounds (not every group votes every time).
    """
    for k in range(m):
        n = 1 << max(0, (m - k - 1).bit_length())  # the smallest power of two >= m - k
        if 1.0 - n / m >= target - tolerance:
            return k
    return None


def _groups(weight: torch.Tensor, m: int, layout: Layout, input_dim: int = 1) -> torch.Tensor:
    """|w| viewed as ``[outer, groups, m, inner]`` (groups along dim 2), like :func:`nm_mask`."""
    gv = group_view(weight.shape, layout, input_dim=input_dim)
    return weight.detach().abs().reshape(gv.outer, gv.length // m, m, gv.inner)


def group_thresholds(
    weight: torch.Tensor, m: int, layout: Layout = "input_channel", input_dim: int = 1
) -> torch.Tensor:
    """Per-group threshold: the mean of the ``m // 2`` smallest magnitudes (``max(1, m // 2)``)."""
    a = _groups(weight, m, layout, input_dim).float()
    k = max(1, m // 2)
    return torch.topk(a, k, dim=2, largest=False).values.mean(dim=2, keepdim=True)


def vote(
    weight: torch.Tensor,
    thresholds: torch.Tensor,
    n_int: int,
    m: int,
    layout: Layout,
    vote_ratio: float,
    input_dim: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[bool, float]:
    """Whether the layer votes to lower its intermediate N, and the fraction of groups voting for it.

    A group votes when fewer than ``n_int`` of its weights (masked ones included) exceed its threshold.
    ``reduce`` sums ``[voting groups, groups]`` (float64) over the ranks that each hold some of the layer's rows
    (FSDP2 shards), so every rank takes the decision of the whole layer.
    """
    above = (_groups(weight, m, layout, input_dim).float() > thresholds).sum(dim=2)
    if reduce is None:
        q = float((above < n_int).float().mean())
    else:
        counts = reduce(torch.tensor([float((above < n_int).sum()), float(above.numel())], dtype=torch.float64))
        q = float(counts[0] / counts[1]) if counts[1] > 0 else 0.0
    return q >= vote_ratio, q


def erk_sparsities(shapes: Mapping[str, Sequence[int]], target: float) -> dict[str, float]:
    """Erdős–Rényi-kernel sparsity per layer for an overall ``target`` (RigL's solve, kernel dims included).

    Density of layer i is ε·Σdims/Πdims; ε makes the kept total equal (1 − target)·total. A layer whose
    density would exceed 1 is made dense and the solve is repeated.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"ERK target sparsity must be in [0, 1), got {target}")
    numel = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    dense: set[str] = set()
    while True:
        rhs = 0.0
        divisor = 0.0
        for k in shapes:
            if k in dense:
                rhs -= numel[k] * target
            else:
                rhs += numel[k] * (1.0 - target)
                divisor += raw[k] * numel[k]
        if divisor == 0.0:
            return {k: 0.0 for k in shapes}
        eps = rhs / divisor
        over = [k for k in shapes if k not in dense and eps * raw[k] > 1.0]
        if not over:
            break
        top = max(raw[k] for k in over)
        dense.update(k for k in over if raw[k] == top)
    return {k: 0.0 if k in dense else 1.0 - eps * raw[k] for k in shapes}


def penalty_factors(
    layers: Mapping[str, DominoLayer], erk: Mapping[str, float], beta_flops: float, beta_erk: float
) -> dict[str, float]:
    """η_i = β_F·c_i + β_E·r_i.

    c_i: the layer's remaining MACs (dense MACs × N/M) over the largest such value; r_i: the ERK gap
    (e_i − s_i) over the largest |gap|, s_i = 1 − N/M the committed sparsity. When every gap is below
    0.01 the ERK term is 0 (the reference crashes there).
    """
    work = {k: layer.macs * layer.n_committed / layer.m for k, layer in layers.items()}
    top = max(work.values()) if work else 0.0
    gaps = {k: erk[k] - (1.0 - layer.n_committed / layer.m) for k, layer in layers.items()}
    top_gap = max((abs(g) for g in gaps.values()), default=0.0)
    eta = {}
    for k in layers:
        c = work[k] / top if top > 0 else 0.0
        r = gaps[k] / top_gap if top_gap >= 0.01 else 0.0
        eta[k] = beta_flops * c + beta_erk * r
    return eta


@dataclass
class DominoLayer:
    """Search state of one layer."""

    m: int
    params: int
    macs: float
    n_int: int
    n_committed: int
    thresholds: torch.Tensor | None = None
    eta: float = 0.0
    input_dim: int = 1  # the weight dim the groups run along (the layer-type registry's)


@dataclass
class DominoSearch:
    """The search state machine. Drive it with :meth:`check` every ``check_every`` steps.

    Args:
        layers: per-layer state (module order matters: layers are checked in this order).
        target_sparsity: model-size target (fraction of covered weights removed), or ``None``.
        target_flops: FLOPs-reduction target (0.875 = "8x fewer MACs"), or ``None``.
        erk_target: overall sparsity used for the ERK guidance (defaults to the active target).
    """

    layers: dict[str, DominoLayer]
    target_sparsity: float | None = None
    target_flops: float | None = None
    vote_ratio: float = 0.75
    beta_flops: float | None = None
    erk_target: float | None = None
    tolerance: float = 1e-3
    erk: dict[str, float] = field(default_factory=dict)
    done: bool = False
    commits: list[tuple[int, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.target_sparsity is None) == (self.target_flops is None):
            raise ValueError(
                "DominoSearch needs exactly one target: target_sparsity (model size) or target_flops, got "
                f"target_sparsity={self.target_sparsity}, target_flops={self.target_flops}"
            )
        target = self.target_sparsity if self.target_sparsity is not None else self.target_flops
        assert target is not None
        if not 0.0 < target < 1.0:
            raise ValueError(f"DominoSearch target must be in (0, 1), got {target}")
        if not 0.0 < self.vote_ratio <= 1.0:
            raise ValueError(f"DominoSearch vote_ratio must be in (0, 1], got {self.vote_ratio}")
        if self.beta_flops is None:
            self.beta_flops = 0.5 if self.target_sparsity is not None else 0.8
        if not 0.0 <= self.beta_flops <= 1.0:
            raise ValueError(f"DominoSearch beta_flops must be in [0, 1], got {self.beta_flops}")
        for name, layer in self.layers.items():
            powers_of_two(layer.m)
            if layer.n_committed not in powers_of_two(layer.m):
                raise ValueError(f"layer {name}: committed N {layer.n_committed} is not a power of two <= {layer.m}")
        min_density = min((1 / layer.m for layer in self.layers.values()), default=0.0)
        if self.target_sparsity is not None and self.target_sparsity > 1 - min_density + 1e-9:
            raise ValueError(
                f"target_sparsity={self.target_sparsity} is unreachable: the sparsest N:M keeps 1/m "
                f"(max sparsity {1 - min_density:.4f}); use a larger m"
            )
        self._erk_target = self.erk_target if self.erk_target is not None else target

    @property
    def beta_erk(self) -> float:
        assert self.beta_flops is not None
        return 1.0 - self.beta_flops

    def init_erk(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Solve ERK once from the weight shapes, then compute the initial η."""
        self.erk = erk_sparsities(shapes, self._erk_target)
        self.update_eta()

    def update_eta(self) -> None:
        assert self.beta_flops is not None
        for k, v in penalty_factors(self.layers, self.erk, self.beta_flops, self.beta_erk).items():
            self.layers[k].eta = v

    def sparsity(self) -> float:
        """Overall sparsity of the covered weights under the committed N (``int(P·N/M)`` kept per layer)."""
        total = sum(v.params for v in self.layers.values())
        kept = sum(int(v.params * v.n_committed / v.m) for v in self.layers.values())
        return 1.0 - kept / total if total else 0.0

    def flops_reduction(self) -> float:
        """1 − Σ MACs·N/M / Σ MACs under the committed N."""
        dense = sum(v.macs for v in self.layers.values())
        sparse = sum(v.macs * v.n_committed / v.m for v in self.layers.values())
        return 1.0 - sparse / dense if dense else 0.0

    def progress(self) -> float:
        """The quantity the target is tested on (sparsity or FLOPs reduction)."""
        return self.sparsity() if self.target_sparsity is not None else self.flops_reduction()

    @property
    def target(self) -> float:
        return self.target_sparsity if self.target_sparsity is not None else self.target_flops  # type: ignore[return-value]

    def reached(self) -> bool:
        return self.progress() >= self.target - self.tolerance

    def check(
        self,
        weights: Mapping[str, torch.Tensor],
        layout: Layout,
        step: int,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[str]:
        """One vote round over all layers in order; returns the layers whose intermediate N changed.

        After each commit η is recomputed and the target tested; the round stops as soon as it is met. With
        sharded layers, ``weights`` and the thresholds hold this rank's rows and ``reduce`` sums the vote counts
        over the ranks (see :func:`vote`).
        """
        changed = []
        for name, layer in self.layers.items():
            if self.done or layer.n_committed <= 1:
                continue
            assert layer.thresholds is not None, "thresholds are initialized at the start of the search"
            lower, _ = vote(
                weights[name], layer.thresholds, layer.n_int, layer.m, layout, self.vote_ratio, layer.input_dim, reduce
            )
            if lower and layer.n_int > 1:
                layer.n_int -= 1
                changed.append(name)
            if layer.n_int in powers_of_two(layer.m) and layer.n_int != layer.n_committed:
                layer.n_committed = layer.n_int
                self.commits.append((step, name, layer.n_committed))
                self.update_eta()
                if self.reached():
                    self.done = True
        return changed

    def scheme(self) -> dict[str, tuple[int, int]]:
        """The committed scheme, ``{layer: (n, m)}``."""
        return {k: (v.n_committed, v.m) for k, v in self.layers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": {
                k: {
                    "n_int": v.n_int,
                    "n_committed": v.n_committed,
                    "thresholds": v.thresholds,
                    "eta": v.eta,
                    "macs": v.macs,
                }
                for k, v in self.layers.items()
            },
            "erk": dict(self.erk),
            "done": self.done,
            "commits": list(self.commits),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state["layers"]) != set(self.layers):
            saved, now = sorted(state["layers"]), sorted(self.layers)
            raise ValueError(f"the saved DominoSearch covers other layers: saved {saved}, now {now}")
        for k, v in state["layers"].items():
            layer = self.layers[k]
            layer.n_int, layer.n_committed, layer.eta = int(v["n_int"]), int(v["n_committed"]), float(v["eta"])
            layer.thresholds, layer.macs = v["thresholds"], float(v["macs"])
        self.erk = dict(state["erk"])
        self.done = bool(state["done"])
        self.commits = [tuple(c) for c in state["commits"]]  # type: ignore[misc]
