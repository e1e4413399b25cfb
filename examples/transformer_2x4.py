"""A transformer encoder on MNIST-1D (10 patches of 4 samples) with 2:4 attention and MLP weights.

    python examples/transformer_2x4.py             # ~30 s on 2 CPU cores

SRSTECallback covers ``nn.MultiheadAttention`` in-projections, ``out_proj`` and the MLP Linears; the
patch embedding (4 inputs) is excluded here so that it stays dense.
"""

from __future__ import annotations

import lightning.pytorch as pl

from nm_lightning import SRSTECallback
from nm_lightning.data import MNIST1DDataModule
from nm_lightning.models import Classifier, transformer
from nm_lightning.train import sparsity_rows


def main() -> None:
    pl.seed_everything(0, workers=True)
    model = Classifier(transformer(dim=64, depth=2, heads=4), optimizer="adamw", lr=3e-3, weight_decay=0.05,
                       warmup_steps=30)
    srste = SRSTECallback(n=2, m=4, exclude=["net.embed", "net.head"], verbose=False)
    trainer = pl.Trainer(max_epochs=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                         callbacks=[srste], enable_model_summary=False)
    datamodule = MNIST1DDataModule(batch_size=128)
    trainer.fit(model, datamodule=datamodule)
    (result,) = trainer.test(model, datamodule=datamodule, verbose=False)
    print(f"test accuracy {result['test/acc']:.2%}")
    for row in sparsity_rows(model):
        print(f"  {row['layer']:<40} {row['type']:<18} {row['n']}:{row['m']} sparsity {row['sparsity']:.1%} "
              f"N:M ok={row['nm_ok']}")


if __name__ == "__main__":
    main()
