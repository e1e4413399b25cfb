"""``LastCheckpoint``: a checkpoint that always holds the state the run ended with.

Lightning's ``ModelCheckpoint(monitor=..., save_top_k=k, save_last=True)`` writes ``last.ckpt`` only when
a top-k checkpoint is written in the same step, so after a run whose monitored metric peaked at epoch 25
of 40, ``last.ckpt`` holds epoch 25. Resuming from it silently drops the last 15 epochs. This callback
has no monitor: it overwrites ``<dirpath>/<filename>.ckpt`` at the end of every training epoch (after
validation, like ``ModelCheckpoint``) and once more at the end of fit when training stopped between
epochs (``max_steps``, ``should_stop``). Keep a monitored ``ModelCheckpoint`` next to it for the best one.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """Write ``<dirpath>/<filename>.ckpt`` at every epoch end and at fit end, whatever the metrics do.

    Args:
        dirpath: directory of the checkpoint (default: Lightning's ``<log_dir>/checkpoints``).
        filename: file name without ``.ckpt`` (default ``last``).
        every_n_epochs: write at the end of every ``every_n_epochs``-th epoch (the fit-end write always happens).
        verbose: log each write.

    :attr:`path` (also :attr:`last_model_path`, so ``trainer.test(ckpt_path="last")`` finds it) is the file
    after the first write, ``""`` before. Like every ``ModelCheckpoint`` it writes nothing under
    ``fast_dev_run`` and is restored on resume (``state_key`` differs from a monitored ``ModelCheckpoint``'s).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last", every_n_epochs: int = 1,
                 verbose: bool = False) -> None:
        if not isinstance(filename, str) or not filename or "/" in filename or filename.endswith(".ckpt"):
            raise ValueError(f"LastCheckpoint filename must be a file name without '/' or '.ckpt', got {filename!r}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"LastCheckpoint every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        super().__init__(dirpath=dirpath, filename=filename, monitor=None, save_top_k=1, save_last=False,
                         every_n_epochs=every_n_epochs, auto_insert_metric_name=False, enable_version_counter=False,
                         verbose=verbose)
        self._written = ""  # this process's last write; not in the state, so testing an older checkpoint
        # (which restores the callbacks' state) does not point `path` back at what that checkpoint saw

    @property
    def path(self) -> str:
        return self._written or self.best_model_path

    def _save_none_monitor_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_none_monitor_checkpoint(trainer, monitor_candidates)
        self.last_model_path = self._written = self.best_model_path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training stopped after the last epoch-end write (``max_steps`` mid-epoch, ``should_stop``): write now."""
        super().on_train_end(trainer, pl_module)
        if trainer.fast_dev_run or trainer.sanity_checking or self._last_global_step_saved == trainer.global_step:
            return
        self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))
