"""``nm-lightning``: a thin :class:`lightning.pytorch.cli.LightningCLI` with nm_lightning's classes importable.

Short class names resolve because this module imports ``nm_lightning``, ``nm_lightning.models`` and
``nm_lightning.data`` before parsing::

    nm-lightning fit --config examples/cli_srste.yaml
    nm-lightning fit --model Classifier --data MNIST1DDataModule --trainer.max_epochs 5 \\
        --trainer.callbacks+=SRSTECallback --trainer.callbacks.n=2 --trainer.callbacks.m=4
    nm-lightning fit --print_config            # the full, resolved config (full class paths)

Any LightningModule / LightningDataModule (importable by class path) can be used; the defaults are
``nm_lightning.models.Classifier`` (1-D CNN) and ``nm_lightning.data.MNIST1DDataModule``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

import nm_lightning  # noqa: F401  (registers SRSTECallback & co. for short names)
import nm_lightning.data  # noqa: F401
import nm_lightning.models  # noqa: F401

__all__ = ["NMLightningCLI", "build_cli", "main"]

DEFAULT_MODEL = "nm_lightning.models.Classifier"
DEFAULT_DATA = "nm_lightning.data.MNIST1DDataModule"


class NMLightningCLI(LightningCLI):
    """``LightningCLI`` whose ``--model``/``--data`` default to the MNIST-1D classifier and data module."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}, "data": {"class_path": DEFAULT_DATA}})


def build_cli(args: Sequence[str] | dict[str, Any] | None = None, run: bool = True, **kwargs: Any) -> NMLightningCLI:
    """Build (and by default run) the CLI and return it; ``args`` replaces ``sys.argv[1:]`` (tests, notebooks).

    Extra keyword arguments go to :class:`LightningCLI` (e.g. ``trainer_defaults``, ``save_config_kwargs``).
    Bad arguments raise ``SystemExit`` (jsonargparse's usage error, code 2).
    """
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return NMLightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if isinstance(args, (list, tuple)) else args,
        run=run,
        **kwargs,
    )


def main(args: Sequence[str] | dict[str, Any] | None = None) -> None:
    """Console entry ``nm-lightning``: run the CLI and return ``None`` (exit status 0 on success).

    The console script passes the return value to ``sys.exit``, so it must not return the CLI object
    (that printed the object's repr and exited 1); use :func:`build_cli` to get the CLI back.
    """
    build_cli(args)


if __name__ == "__main__":
    main()
