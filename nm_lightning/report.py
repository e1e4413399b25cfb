"""Rich tables and matplotlib figures shared by the callbacks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nm_lightning.search.domino import DominoSearch
from nm_lightning.sparsify import LayerPlan
from nm_lightning.state import NMLayerState

__all__ = ["layer_table", "print_layer_table", "coverage", "print_scheme_table", "save_scheme_figure", "table_title"]

_STYLE = {"covered": "green", "skipped": "yellow", "excluded": "dim"}


def coverage(plans: Sequence[LayerPlan], total_params: int) -> dict[str, float]:
    """Covered weights, their share of all parameters, and the resulting kept share of the covered weights."""
    covered = [p for p in plans if p.status == "covered"]
    n_cov = sum(p.numel for p in covered)
    kept = sum(p.numel * p.n // p.m for p in covered)
    return {
        "covered_params": float(n_cov),
        "total_params": float(total_params),
        "covered_share": n_cov / total_params if total_params else 0.0,
        "target_sparsity": 1.0 - kept / n_cov if n_cov else 0.0,
    }


def layer_table(plans: Sequence[LayerPlan], title: str = "N:M sparsity", total_params: int | None = None) -> Table:
    """One row per candidate weight: layer, type, shape, n:m, params, status and reason."""
    table = Table(title=title, show_lines=False)
    for col, justify in [
        ("layer", "left"),
        ("type", "left"),
        ("shape", "left"),
        ("n:m", "right"),
        ("params", "right"),
        ("status", "left"),
        ("why", "left"),
    ]:
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for p in plans:
        nm = f"{p.n}:{p.m}" if p.status == "covered" else "-"
        table.add_row(
            p.name,
            p.type_name,
            "x".join(map(str, p.shape)) or "?",
            nm,
            f"{p.numel:,}" if p.shape else "?",
            f"[{_STYLE[p.status]}]{p.status}[/]",
            p.reason,
        )
    if total_params:
        c = coverage(plans, total_params)
        table.caption = (
            f"covered {int(c['covered_params']):,} of {total_params:,} parameters ({c['covered_share']:.1%}); "
            f"target sparsity of covered weights {c['target_sparsity']:.1%}"
        )
    return table


def table_title(what: str, states: Sequence[NMLayerState]) -> str:
    """``what`` plus what the run really starts with, read from the layers' states: one N:M or a mixed scheme,
    and whether the layers start dense (a schedule) or elsewhere than their target."""
    targets = sorted({(s.target_n, s.m) for s in states})
    if len(targets) == 1:
        target = f"target {targets[0][0]}:{targets[0][1]}"
    else:
        target = f"mixed N:M target ({len(targets)} patterns: {', '.join(f'{n}:{m}' for n, m in targets[:4])}"
        target += ", ...)" if len(targets) > 4 else ")"
    if states and all(s.n == s.m for s in states):
        start = "starts dense (n = m), sparsified by a schedule"
    elif any(s.n != s.target_n for s in states):
        start = "starts at " + ", ".join(sorted({f"{s.n}:{s.m}" for s in states}))
    else:
        start = "from the first step"
    return f"{what}: {target}, {start}"


def print_layer_table(plans: Sequence[LayerPlan], title: str = "N:M sparsity", total_params: int | None = None) -> None:
    _console().print(layer_table(plans, title, total_params))


def _console() -> Console:
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the reasons into 80 columns
        console = Console(width=max(console.width, 160))
    return console


def print_scheme_table(search: DominoSearch, title: str) -> None:
    """Per-layer N:M of a search with parameters and MACs before/after, plus the totals."""
    table = Table(title=title)
    for col in ("layer", "n:m", "params", "kept", "MACs", "MACs kept", "η"):
        table.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
    for name, layer in search.layers.items():
        density = layer.n_committed / layer.m
        table.add_row(
            name, f"{layer.n_committed}:{layer.m}", f"{layer.params:,}", f"{int(layer.params * density):,}",
            f"{layer.macs:,.0f}", f"{layer.macs * density:,.0f}", f"{layer.eta:.3f}",
        )  # fmt: skip
    table.caption = (
        f"sparsity {search.sparsity():.2%}, FLOPs reduction {search.flops_reduction():.2%} "
        f"(target {search.target} on {'size' if search.target_sparsity is not None else 'FLOPs'})"
    )
    _console().print(table)


def save_scheme_figure(search: DominoSearch, path: str | Path) -> Path:
    """Bar charts of per-layer N, parameters and MACs before/after the scheme, saved as an image."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(search.layers)
    x = range(len(names))
    layers = list(search.layers.values())
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.35 * len(names) + 2), 8), sharex=True)
    axes[0].bar(x, [v.n_committed for v in layers], color="tab:blue")
    axes[0].set_ylabel("N (of M)")
    result = f"sparsity {search.sparsity():.1%}, FLOPs reduction {search.flops_reduction():.1%}"
    axes[0].set_title(f"DominoSearch: {result}")
    for ax, attr, label in ((axes[1], "params", "parameters"), (axes[2], "macs", "MACs / sample")):
        dense = [getattr(v, attr) for v in layers]
        kept = [getattr(v, attr) * v.n_committed / v.m for v in layers]
        ax.bar([i - 0.2 for i in x], dense, width=0.4, label="dense", color="lightgray")
        ax.bar([i + 0.2 for i in x], kept, width=0.4, label="N:M", color="tab:orange")
        ax.set_ylabel(label)
        ax.legend()
    axes[2].set_xticks(list(x))
    axes[2].set_xticklabels(names, rotation=90, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
