"""SR-STE 2:4 on your own LightningModule: add one callback to a plain Trainer, nothing else changes.

    python examples/srste_own_module.py            # ~20 s on 2 CPU cores
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from nm_lightning import SRSTECallback
from nm_lightning.data import MNIST1DDataModule


class MyModel(pl.LightningModule):
    """A user's model: nothing N:M-specific in it."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(
            nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
            nn.Conv1d(32, 64, 5, padding=2, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 20, 128), nn.ReLU(), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True)


def main() -> None:
    pl.seed_everything(0, workers=True)
    model = MyModel()
    srste = SRSTECallback(n=2, m=4, decay=2e-4)
    trainer = pl.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                         callbacks=[srste], enable_model_summary=False)
    datamodule = MNIST1DDataModule(batch_size=64)
    trainer.fit(model, datamodule=datamodule)
    (result,) = trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = srste.metrics()
    print(f"test accuracy {result['test_acc']:.2%} | sparsity of the N:M layers {metrics['nm/sparsity']:.1%} "
          f"| share of parameters covered {metrics['nm/covered_share']:.1%}")
    for name, (n, m) in srste.layer_nm().items():
        print(f"  {name}: {n}:{m}, sparsity {metrics.get(f'nm/layer/{name}/sparsity', float('nan')):.1%}")


if __name__ == "__main__":
    main()
