"""nm_lightning: N:M fine-grained structured sparsity for PyTorch Lightning (``lightning.pytorch``).

Public API: :func:`nm_mask` (mask math), :class:`SRSTECallback` (training), :class:`NMScheme`
(per-layer schemes), and the module-level helpers in :mod:`nm_lightning.sparsify`.
"""

from nm_lightning.accounting import scheme_stats
from nm_lightning.callbacks import DominoSearchCallback, SparsityScheduler, SRSTECallback
from nm_lightning.masks import check_nm, nm_mask
from nm_lightning.metrics import MaskFlipRate
from nm_lightning.scheme import NMScheme
from nm_lightning.sparsify import attach, detach, plain_state_dict, plan_layers, sparse_layers, split_state_dict

__all__ = [
    "DominoSearchCallback",
    "MaskFlipRate",
    "NMScheme",
    "SRSTECallback",
    "SparsityScheduler",
    "attach",
    "check_nm",
    "detach",
    "nm_mask",
    "plain_state_dict",
    "plan_layers",
    "scheme_stats",
    "sparse_layers",
    "split_state_dict",
]
__version__ = "0.1.0"
from nm_lightning.export import dense_state_dict, export_artifacts, load_packed, save_dense, save_packed  # noqa: E402, F401
