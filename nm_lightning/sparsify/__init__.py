"""Attach N:M sparsity to modules and take it off again (no Lightning).

* :mod:`~nm_lightning.sparsify.parametrization`: the parametrization ``W -> W ⊙ E`` holding each layer's
  :class:`~nm_lightning.state.NMLayerState`; attach/detach/freeze.
* :mod:`~nm_lightning.sparsify.selection`: which weights become N:M and why the others do not; lazy-layer init.
* :mod:`~nm_lightning.sparsify.state_dict`: translation between sparsified and plain state dicts.
"""

from nm_lightning.sparsify.parametrization import (
    NMSparsity,
    SparseLayer,
    bind_shards,
    bind_tensor_parallel,
    detach,
    freeze_layers,
    nm_state,
    sparse_layers,
)
from nm_lightning.sparsify.selection import (
    DEFAULT_TYPES,
    LayerPlan,
    as_patterns,
    attach,
    materialize_lazy,
    plan_layers,
    resolve_type,
)
from nm_lightning.sparsify.state_dict import (
    load_plain_weights,
    plain_state_dict,
    saved_states,
    split_state_dict,
)

__all__ = [
    "DEFAULT_TYPES",
    "LayerPlan",
    "NMSparsity",
    "SparseLayer",
    "as_patterns",
    "attach",
    "bind_shards",
    "bind_tensor_parallel",
    "detach",
    "freeze_layers",
    "load_plain_weights",
    "materialize_lazy",
    "nm_state",
    "plain_state_dict",
    "plan_layers",
    "resolve_type",
    "saved_states",
    "sparse_layers",
    "split_state_dict",
]
