"""Networks (1-D CNN, CIFAR ResNet-20/18, transformer encoder) and the ``Classifier`` LightningModule."""

from nm_lightning.models.classifier import Classifier
from nm_lightning.models.nets import (
    CNN1D,
    CifarResNet,
    TransformerClassifier,
    cnn1d,
    resnet18,
    resnet20,
    transformer,
)

__all__ = [
    "CNN1D",
    "CifarResNet",
    "Classifier",
    "TransformerClassifier",
    "cnn1d",
    "resnet18",
    "resnet20",
    "transformer",
]
