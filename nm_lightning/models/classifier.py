"""``Classifier``: a LightningModule around any classification ``nn.Module`` (SGD/AdamW + cosine LR)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["Classifier"]


class Classifier(pl.LightningModule):
    """Cross-entropy classifier with SGD-momentum (or AdamW) and a per-step cosine LR schedule.

    The schedule runs over ``trainer.estimated_stepping_batches`` (so ``trainer.max_epochs`` or
    ``max_steps`` sets its length), after ``warmup_steps`` of linear warm-up, down to ``lr * min_lr_ratio``.
    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.

    Args:
        net: the network (logits ``[B, num_classes]``); default: :func:`nm_lightning.models.cnn1d` for MNIST-1D.
        num_classes: number of classes (checked against the datamodule's ``num_classes`` when it has one).
        optimizer: ``"sgd"`` (momentum, Nesterov optional) or ``"adamw"``.
        lr: peak learning rate.
        momentum: SGD momentum (ignored by AdamW).
        weight_decay: L2 weight decay (decoupled for AdamW).
        nesterov: Nesterov momentum for SGD.
        warmup_steps: optimizer steps of linear warm-up.
        min_lr_ratio: final learning rate as a share of ``lr``.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        num_classes: int = 10,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"Classifier optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        for name, value, low in (("lr", lr, 0.0), ("momentum", momentum, 0.0), ("weight_decay", weight_decay, 0.0),
                                 ("min_lr_ratio", min_lr_ratio, 0.0), ("label_smoothing", label_smoothing, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                raise ValueError(f"Classifier {name} must be a number >= {low}, got {value!r}")
        if lr <= 0:
            raise ValueError(f"Classifier lr must be > 0, got {lr!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"Classifier num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Classifier warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if net is None:
            from nm_lightning.models.nets import cnn1d

            net = cnn1d(num_classes=num_classes)
        if not isinstance(net, nn.Module):
            raise TypeError(f"Classifier net must be an nn.Module, got {type(net).__name__}")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.num_classes = num_classes
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (``trainer=fsdp2_sim``): ``fully_shard`` every conv and linear
        layer, then the whole module, on the data-parallel mesh (FSDP2). N:M callbacks attach in ``setup``,
        before this runs, as FSDP2 needs. A no-op under every other strategy."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self, FSDPModule):  # already sharded (configure_model may run more than once)
            return
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "Classifier shards with FSDP2 only: set ModelParallelStrategy(tensor_parallel_size=1), "
                f"got a tensor-parallel mesh of size {mesh['tensor_parallel'].size()}"
            )
        dp = mesh["data_parallel"] if "data_parallel" in names else mesh
        for module in self.net.modules():
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                fully_shard(module, mesh=dp)
        fully_shard(self, mesh=dp)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dm_classes = getattr(dm, "num_classes", None)
        if isinstance(dm_classes, int) and dm_classes != self.num_classes:
            raise ValueError(
                f"Classifier num_classes={self.num_classes} but the datamodule {type(dm).__name__} has "
                f"{dm_classes} classes; set the model's num_classes (and its net's) to {dm_classes}"
            )

    def _step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"Classifier: the net returned logits of shape {tuple(logits.shape)}, "
                f"expected [batch, {self.num_classes}]"
            )
        loss = self.criterion(logits, y)
        metric(logits.detach(), y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "test")
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                nesterov=bool(hp.nesterov and hp.momentum > 0),
            )
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, floor = min(hp.warmup_steps, total - 1), hp.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
