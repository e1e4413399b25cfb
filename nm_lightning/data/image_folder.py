"""``root/{train,val[,test]}/<class>/*.png|jpg`` image folders read with Pillow (no torchvision needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from nm_lightning.data.base import SplitDataModule, require_app_module

__all__ = ["ImageFolderDataModule", "ImageFolderDataset", "IMG_EXTENSIONS"]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"ImageFolderDataModule: directory {str(split_dir)!r} does not exist")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"ImageFolderDataModule: {str(split_dir)!r} has no class sub-directories")
    return classes


class ImageFolderDataset(Dataset):
    """Images under ``split_dir/<class>/``; ``class_to_idx`` fixes the label of every class name."""

    def __init__(
        self,
        split_dir: str | Path,
        class_to_idx: dict[str, int],
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        grayscale: bool = False,
        hflip: bool = False,
        extensions: Sequence[str] = IMG_EXTENSIONS,
    ) -> None:
        self.split_dir = Path(split_dir)
        self.size = size  # (height, width)
        self.grayscale, self.hflip = grayscale, hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        exts = {e.lower() for e in extensions}
        self.samples: list[tuple[Path, int]] = []
        for cls in _classes(self.split_dir):
            if cls not in class_to_idx:
                raise ValueError(
                    f"ImageFolderDataModule: class {cls!r} in {str(self.split_dir)!r} is not among the training "
                    f"classes {sorted(class_to_idx)}"
                )
            files = sorted(p for p in (self.split_dir / cls).rglob("*") if p.suffix.lower() in exts and p.is_file())
            self.samples += [(p, class_to_idx[cls]) for p in files]
        if not self.samples:
            raise FileNotFoundError(
                f"ImageFolderDataModule: no images with extensions {sorted(exts)} under {str(self.split_dir)!r}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: Path) -> torch.Tensor:
        Image = require_app_module("PIL.Image", "ImageFolderDataModule", "pillow")  # noqa: N806

        with Image.open(path) as img:
            img = img.convert("L" if self.grayscale else "RGB")
            img = img.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
        x = torch.from_numpy(arr)
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        return (x - self.mean) / self.std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        x = self.load(path)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, label


class ImageFolderDataModule(SplitDataModule):
    """Your own images: ``root/train/<class>/*.png|jpg``, ``root/val/<class>/...`` and optionally ``root/test``.

    Images are read with Pillow (the ``[apps]`` extra; without it the constructor raises ``ImportError``
    saying so), converted to RGB (or grayscale), resized to ``image_size`` and normalized
    with ``mean``/``std`` (default: ImageNet statistics for RGB, 0.5/0.5 for grayscale). Class indices come
    from the sorted class folder names of the training split; ``num_classes`` and ``classes`` are known after
    :meth:`setup`. Without a ``test`` folder the validation folder is also the test set.

    Args:
        root: dataset root holding ``train_dir`` and ``val_dir``.
        image_size: output size, an int (square) or ``[height, width]``.
        batch_size: batch size of all loaders.
        num_workers: DataLoader workers.
        mean: per-channel normalization mean (length 3, or 1 for grayscale).
        std: per-channel normalization std.
        grayscale: load single-channel images.
        hflip: random horizontal flips on the training set.
        train_dir: name of the training folder under ``root``.
        val_dir: name of the validation folder under ``root``.
        test_dir: name of the test folder under ``root`` (used when it exists).
    """

    train_set: ImageFolderDataset | None
    val_set: ImageFolderDataset | None
    test_set: ImageFolderDataset | None

    def __init__(
        self,
        root: str,
        image_size: int | list[int] = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        grayscale: bool = False,
        hflip: bool = False,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str = "test",
    ) -> None:
        super().__init__()
        require_app_module("PIL.Image", "ImageFolderDataModule", "pillow")  # fail at construction, not in a worker
        self.root = Path(root).expanduser()
        if isinstance(image_size, bool) or not isinstance(image_size, (int, Sequence)):
            raise ValueError(f"ImageFolderDataModule image_size must be an int or [height, width], got {image_size!r}")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
            raise ValueError(f"ImageFolderDataModule image_size must be an int or [height, width], got {image_size!r}")
        self.size: tuple[int, int] = (int(size[0]), int(size[1]))
        channels = 1 if grayscale else 3
        mean = list(mean) if mean is not None else ([0.5] if grayscale else list(_IMAGENET_MEAN))
        std = list(std) if std is not None else ([0.5] if grayscale else list(_IMAGENET_STD))
        for name, value in (("mean", mean), ("std", std)):
            if len(value) != channels:
                raise ValueError(
                    f"ImageFolderDataModule {name}={value!r} must have {channels} value(s) for "
                    f"{'grayscale' if grayscale else 'RGB'} images"
                )
        if any(s <= 0 for s in std):
            raise ValueError(f"ImageFolderDataModule std must be > 0, got {std!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"ImageFolderDataModule batch_size must be an int >= 1, got {batch_size!r}")
        self.mean, self.std = mean, std
        self.batch_size, self.num_workers = batch_size, num_workers
        self.grayscale, self.hflip = grayscale, hflip
        self.train_dir, self.val_dir, self.test_dir = train_dir, val_dir, test_dir
        self.input_shape = (channels, *self.size)
        self.classes: list[str] = []
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        if not self.classes:
            self.classes = _classes(self.root / self.train_dir)
        return len(self.classes)

    def _dataset(self, split: str, train: bool) -> ImageFolderDataset:
        class_to_idx = {c: i for i, c in enumerate(self.classes)}
        return ImageFolderDataset(self.root / split, class_to_idx, self.size, self.mean, self.std,
                                  grayscale=self.grayscale, hflip=self.hflip and train)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.classes = _classes(self.root / self.train_dir)
        self.train_set = self._dataset(self.train_dir, train=True)
        self.val_set = self._dataset(self.val_dir, train=False)
        test = self.test_dir if (self.root / self.test_dir).is_dir() else self.val_dir
        self.test_set = self._dataset(test, train=False)
