"""Small models and a deterministic dataset shared by the tests (CPU, a few seconds each)."""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n: int = 64, length: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, length, generator=g)
    y = (x.mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 0].mean(-1) > 0).long()
    return TensorDataset(x, y % classes)


class TinyNet(pl.LightningModule):
    """Conv1d stem (in=4) -> Conv1d -> Linear -> Linear; every weight is N:M-able with m in {4, 8}."""

    def __init__(self, lr: float = 0.1, momentum: float = 0.9, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 16, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(16 * 16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum, weight_decay=1e-4)

    def train_dataloader(self):
        return DataLoader(make_data(), batch_size=self.hparams.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(make_data(32, seed=1), batch_size=16)


def trainer_kwargs(tmp_path, **over):
    kw = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    kw.update(over)
    return kw


def metrics_rows(root: Path) -> list[dict[str, str]]:
    """Rows of the CSV logger's metrics file under ``root`` (exactly one: rank 0 writes it)."""
    files = list(root.rglob("metrics.csv"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        return list(csv.DictReader(f))


@pytest.fixture
def _no_hang():
    """A rank-dependent collective deadlocks the workers: fail after 5 minutes instead of hanging CI."""

    def _timeout(*_):
        raise TimeoutError("distributed test hung (a collective call that depends on the rank?)")

    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(300)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def tiny_net() -> TinyNet:
    pl.seed_everything(0, workers=True)
    return TinyNet()


@pytest.fixture
def compose_train(tmp_path):
    """compose(*overrides) -> the `nm-train` config, its outputs in ``tmp_path/run`` and data in
    ``tmp_path/data``; Hydra's global state is cleared before and after."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from nm_lightning.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3")

    def _compose(*overrides: str):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.data_dir = str(tmp_path / "data")
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
