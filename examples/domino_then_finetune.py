"""DominoSearch then mixed-N:M fine-tuning on MNIST-1D, in plain Lightning (about a minute on a CPU).

    python examples/domino_then_finetune.py

1. train the dense 1D CNN briefly; 2. search a per-layer N:16 scheme for 80% model size with the paper's
search recipe (SGD, constant lr 0.01, no momentum, no weight decay; checks and penalties more frequent than
the ImageNet defaults because this run is short); 3. fine-tune with SR-STE and the found scheme, restarting
from the dense weights the search started from. Prints the scheme, its size and MACs, and the accuracies.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch

from nm_lightning import DominoSearchCallback, NMScheme, SRSTECallback, scheme_stats
from nm_lightning.data import MNIST1DDataModule
from nm_lightning.models import Classifier, cnn1d


def model(**opt: float) -> Classifier:
    return Classifier(net=cnn1d(), **opt)  # type: ignore[arg-type]


def trainer(root: Path, callbacks: list[pl.Callback], epochs: int) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root, max_epochs=epochs, callbacks=callbacks, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)
    root = Path(tempfile.mkdtemp(prefix="nm_domino_"))
    dm = MNIST1DDataModule(data_dir=str(root / "data"), batch_size=128)

    dense = model()
    trainer(root, [], epochs=10).fit(dense, datamodule=dm)
    dense_acc = trainer(root, [], 1).test(dense, datamodule=dm, verbose=False)[0]["test/acc"]

    search_model = model(lr=0.01, momentum=0.0, weight_decay=0.0, nesterov=False, min_lr_ratio=1.0)
    search_model.load_state_dict(dense.state_dict())
    search = DominoSearchCallback(
        target_sparsity=0.8, m=16, check_every=10, penalty_every=1, penalty=1.0, output=str(root / "scheme.txt")
    )
    trainer(root, [search], epochs=60).fit(search_model, datamodule=dm)

    scheme = NMScheme.load(root / "scheme.txt", model=model())
    stats = scheme_stats(model(), scheme, torch.randn(1, 1, 40))
    finetune = SRSTECallback(scheme=str(root / "scheme.txt"), init_weights=str(root / "scheme.dense.pt"), decay=5e-4)
    sparse = model()
    trainer(root, [finetune], epochs=20).fit(sparse, datamodule=dm)
    sparse_acc = trainer(root, [], 1).test(sparse, datamodule=dm, verbose=False)[0]["test/acc"]

    print("\nscheme found by DominoSearch:")
    for name, (n, m) in scheme.items():
        print(f"  {name:<20} {n}:{m}")
    print(
        f"covered weights kept {stats['kept_params']:,} of {stats['total_params']:,} "
        f"(sparsity {stats['sparsity']:.1%}), MACs {stats['macs']:,.0f} of {stats['dense_macs']:,.0f} per sample"
    )
    print(f"test accuracy: dense {dense_acc:.2%} -> mixed N:M {sparse_acc:.2%}   (files in {root})")


if __name__ == "__main__":
    main()
