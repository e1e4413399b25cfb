"""Data modules: MNIST-1D generated locally, and an image-folder loader for your own data (no torchvision)."""

from nm_lightning.data.image_folder import ImageFolderDataModule
from nm_lightning.data.mnist1d import MNIST1DDataModule

__all__ = ["ImageFolderDataModule", "MNIST1DDataModule"]
