"""One-shot pruning at fit start: the calibration inputs taken from the first training batches (Lightning glue
around :func:`nm_lightning.oneshot.prune_one_shot`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from nm_lightning.oneshot import OneShotReport, prune_one_shot

__all__ = ["default_model_input", "calibration_inputs", "one_shot_at_fit_start"]

_LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def default_model_input(batch: Any) -> Any:
    """What the model is called with for one training batch, by default.

    A tensor is the input itself; a tuple or list ``(x, y, ...)`` gives its first element (the
    ``(inputs, targets)`` convention); a dict (Hugging Face style) is passed as keyword arguments without its
    label keys (``labels``, ``label``, ``targets``, ``target``, ``y``). Anything else needs ``calibration_input``.
    """
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],)
    return batch


def calibration_inputs(
    trainer: pl.Trainer, pl_module: pl.LightningModule, count: int, to_input: Callable[[Any], Any] | None
) -> list[Any]:
    """The model inputs of the first ``count`` training batches (the same on every rank: the module's or the
    datamodule's own ``train_dataloader``, before Lightning adds a distributed sampler)."""
    source = trainer.datamodule if trainer.datamodule is not None else pl_module
    loader = source.train_dataloader()
    batches = list(itertools.islice(iter(loader), count))
    if not batches:
        raise ValueError("SRSTECallback one_shot: the training dataloader yielded no batch to calibrate on")
    fn = to_input or default_model_input
    return [fn(b) for b in batches]


def one_shot_at_fit_start(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    *,
    method: str,
    count: int,
    to_input: Callable[[Any], Any] | None,
    **prune_kwargs: Any,
) -> OneShotReport:
    """Prune ``pl_module`` in place with ``method`` on its first ``count`` training batches and report it.

    Every rank computes the same result from the same batches; DDP's start-of-training broadcast of rank 0's
    weights keeps them identical in any case.
    """
    items = calibration_inputs(trainer, pl_module, count, to_input)
    was_training = pl_module.training
    pl_module.eval()
    try:
        report = prune_one_shot(pl_module, items, method=method, progress=trainer.is_global_zero, **prune_kwargs)
    finally:
        pl_module.train(was_training)
    rank_zero_only(report.print)()
    rank_zero_info(
        f"SRSTECallback: one-shot {method} pruned {len(report.layers)} layers on {len(items)} calibration batches "
        f"(mean relative reconstruction error {report.mean_rel_error:.4g})"
    )
    return report
