"""Pure search algorithms (no Lightning)."""

from nm_lightning.search.domino import DominoLayer, DominoSearch, erk_sparsities, group_thresholds, penalty_factors

__all__ = ["DominoLayer", "DominoSearch", "erk_sparsities", "group_thresholds", "penalty_factors"]
