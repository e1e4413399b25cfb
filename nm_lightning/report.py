"""Rich tables shared by the callbacks: what got sparsified, what did not, and why."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from nm_lightning.sparsify import LayerPlan

__all__ = ["layer_table", "print_layer_table", "coverage"]

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
            f"sparsity of covered weights {c['target_sparsity']:.1%}"
        )
    return table


def print_layer_table(plans: Sequence[LayerPlan], title: str = "N:M sparsity", total_params: int | None = None) -> None:
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the reasons into 80 columns
        console = Console(width=max(console.width, 160))
    console.print(layer_table(plans, title, total_params))
