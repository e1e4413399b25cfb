"""The README's torch.compile advice for a module that calls ``self.log``: compile its network in place."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch._dynamo.testing import CompileCounter

from nm_lightning import SRSTECallback, nm_mask, sparse_layers
from nm_lightning.data import MNIST1DDataModule
from nm_lightning.models import Classifier, cnn1d


def test_compiled_net_inside_a_logging_module(tmp_path):
    """``model.net.compile()``: SR-STE attaches under the same names, ``self.log`` runs uncompiled, and the
    network is compiled once for training and once for evaluation, not per step."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    try:
        pl.seed_everything(0)
        model = Classifier(net=cnn1d())
        counter = CompileCounter()
        model.net.compile(backend=counter)
        dm = MNIST1DDataModule(data_dir=str(tmp_path / "data"), num_samples=300, batch_size=32)
        trainer = pl.Trainer(
            default_root_dir=tmp_path, accelerator="cpu", max_epochs=2, limit_train_batches=4, limit_val_batches=2,
            logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[SRSTECallback(2, 4, verbose=False)],
        )  # fmt: skip
        trainer.fit(model, datamodule=dm)
    finally:
        torch.set_num_threads(before)
    assert trainer.global_step == 8
    assert 1 <= counter.frame_count <= 2, counter.frame_count
    layers = sparse_layers(model)
    assert set(layers) == {"net.features.3", "net.features.6", "net.classifier.1", "net.classifier.4"}
    for layer in layers.values():
        w = layer.effective().detach()
        assert not bool(((w != 0) & ~nm_mask(w, 2, 4)).any())
    (metrics_csv,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    header = metrics_csv.read_text().splitlines()[0].split(",")
    assert "train/loss_step" in header and "nm/sparsity" in header  # self.log and the callback's logging
