"""What the data modules share: train/val/test loaders built the same way from three datasets."""

from __future__ import annotations

import importlib
from types import ModuleType

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

APPS_EXTRA = "pip install 'nm-lightning[apps]'"


def require_app_module(module: str, who: str, package: str) -> ModuleType:
    """Import ``module`` (a dependency of the demo apps, not of the library) or raise an ``ImportError``
    that names ``who`` needs it, the pip ``package`` and the ``[apps]`` extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{who} needs the '{package}' package (module {module!r}), which nm_lightning installs only with its "
            f"apps extra: {APPS_EXTRA} (or pip install {package}); the import failed with: {err}"
        ) from err


class SplitDataModule(pl.LightningDataModule):
    """Serves ``train_set`` (shuffled), ``val_set`` and ``test_set``, which subclasses fill in ``setup``."""

    batch_size: int
    num_workers: int
    pin_memory: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
