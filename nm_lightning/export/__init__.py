"""Inference exports of N:M sparse models.

* :mod:`~nm_lightning.export.dense`: dense-with-zeros state dict of the plain model.
* :mod:`~nm_lightning.export.packed`: compact N:M storage (values + bit-packed positions), exact.
* :mod:`~nm_lightning.export.semi_structured`: 2:4 ``torch.sparse`` semi-structured (CUDA sm80+) and the
  CUTLASS packed file format (CPU).
* :mod:`~nm_lightning.export.cpu`: fast CPU inference kernels chosen per layer by measurement.
* ``_convert``: what both measured converters share (output checks over every tensor, interleaved
  timers, the end-to-end check that reverts layers until the whole model is not slower, the report base).
* :func:`write_artifacts` / :func:`export_artifacts`: all files of an export plus ``scheme.json``, written
  into a temporary sibling directory and moved into place as one unit (the latter at ``on_fit_end``:
  rank 0, barriers).
"""

from nm_lightning.export.artifacts import export_artifacts, write_artifacts
from nm_lightning.export.cpu import CPUSparseReport, SparseConv2dCPU, SparseLinearCPU, to_cpu_sparse
from nm_lightning.export.dense import dense_state_dict, save_dense
from nm_lightning.export.packed import load_packed, pack_state_dict, save_packed, unpack_state_dict
from nm_lightning.export.semi_structured import (
    SemiStructuredReport,
    load_semi_structured,
    save_semi_structured,
    to_semi_structured,
)

__all__ = [
    "CPUSparseReport",
    "SemiStructuredReport",
    "SparseConv2dCPU",
    "SparseLinearCPU",
    "dense_state_dict",
    "export_artifacts",
    "load_packed",
    "load_semi_structured",
    "pack_state_dict",
    "save_dense",
    "save_packed",
    "save_semi_structured",
    "to_cpu_sparse",
    "to_semi_structured",
    "unpack_state_dict",
    "write_artifacts",
]
