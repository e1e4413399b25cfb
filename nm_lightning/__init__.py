"""nm_lightning: N:M fine-grained structured sparsity for PyTorch Lightning (``lightning.pytorch``).

Public API: :func:`nm_mask` (mask math), :class:`NMLayerState` (the one N:M state of a weight),
:class:`SRSTECallback`, :class:`SparsityScheduler` and :class:`DominoSearchCallback` (training),
:class:`NMScheme` (per-layer schemes), the module helpers of :mod:`nm_lightning.sparsify` and the exports of
:mod:`nm_lightning.export`.
"""

from nm_lightning.accounting import scheme_stats
from nm_lightning.callbacks import DominoSearchCallback, SparsityScheduler, SRSTECallback
from nm_lightning.callbacks.model_parallel import attach_pending
from nm_lightning.export import dense_state_dict, export_artifacts, load_packed, save_dense, save_packed
from nm_lightning.layers import input_dim_of, known_types, register_layer_type, registered_params
from nm_lightning.masks import check_nm, nm_mask
from nm_lightning.metrics import MaskFlipRate
from nm_lightning.oneshot import OneShotReport, prune_one_shot
from nm_lightning.optim import AutoSwitch, FrozenSecondMoment, auto_decay
from nm_lightning.scheme import NMScheme
from nm_lightning.sparsify import (
    attach,
    detach,
    nm_state,
    plain_state_dict,
    plan_layers,
    sparse_layers,
    split_state_dict,
)
from nm_lightning.state import NMLayerState

__all__ = [
    "AutoSwitch",
    "DominoSearchCallback",
    "FrozenSecondMoment",
    "MaskFlipRate",
    "NMLayerState",
    "NMScheme",
    "OneShotReport",
    "SRSTECallback",
    "SparsityScheduler",
    "attach",
    "attach_pending",
    "auto_decay",
    "check_nm",
    "dense_state_dict",
    "detach",
    "export_artifacts",
    "input_dim_of",
    "known_types",
    "load_packed",
    "nm_mask",
    "nm_state",
    "plain_state_dict",
    "plan_layers",
    "prune_one_shot",
    "register_layer_type",
    "registered_params",
    "save_dense",
    "save_packed",
    "scheme_stats",
    "sparse_layers",
    "split_state_dict",
]
__version__ = "0.1.0"
