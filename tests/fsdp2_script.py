"""Run by ``tests/test_fsdp2.py`` as a script: ``ModelParallelStrategy`` (FSDP2, gloo on CPU) relaunches this file
once per extra rank (Lightning's subprocess launcher), which cannot happen inside pytest itself.

    python tests/fsdp2_script.py OUT_DIR MODE DEVICES BATCH_SIZE

MODE ``srste``: SR-STE + SparsityScheduler + export. With 2 devices it also runs the checkpoint checks: a fit that
stops mid-epoch, saves (full file and sharded folder) and resumes must end bit-identical to a fit that never
stopped. MODE ``tp``: the same under tensor parallelism (``data_parallel_size=1``: ``fc1`` column-wise, ``fc2``
row-wise in slices of 16, every rank sees the whole batch), then a DominoSearch; with 1 device the same model
without a mesh. MODE ``2d`` (4 devices: ``data_parallel_size=2`` x ``tensor_parallel_size=2``): the tensor-parallel
model, ``nm_lightning.attach_pending``, then ``fully_shard`` per layer; SR-STE + a schedule with both checkpoint
resumes, a configure_model without ``attach_pending``, and a DominoSearch; with 1 device the reference runs.
Every rank writes ``OUT_DIR/<run>_rank{r}_of_{devices}.pt`` with the gathered full state dict, masks and
N:M; files of the callbacks go under ``OUT_DIR/<run>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_data  # noqa: E402

from nm_lightning import (  # noqa: E402
    DominoSearchCallback,
    SparsityScheduler,
    SRSTECallback,
    attach_pending,
    sparse_layers,
)


class ShardNet(pl.LightningModule):
    """Layers built in ``__init__``; ``configure_model`` applies ``fully_shard`` per layer and on the root (when a
    device mesh exists). ``fc2`` has 5 output rows: uneven shards of 3 and 2 rows."""

    def __init__(
        self, batch_size: int, same_batches: bool = False, lr: float = 0.1, momentum: float = 0.9, hidden: int = 28
    ) -> None:
        super().__init__()
        self.batch_size, self.same_batches, self.lr, self.momentum = batch_size, same_batches, lr, momentum
        torch.manual_seed(1)
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 16, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(16 * 16, hidden)
        self.fc2 = nn.Linear(hidden, 5)

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=1e-4)

    def train_dataloader(self):
        data = make_data()
        if self.same_batches:  # every step sees the same samples: a resumed run cannot differ by data order
            x, y = make_data(16)[:]
            data = TensorDataset(x.repeat(4, 1, 1), y.repeat(4))
        if torch.distributed.is_initialized() and type(self) is not TensorParallelNet:
            # data-parallel rank r reads samples r, r + dp, ...: two ranks x batch 8 see the same 16 samples as one x
            # batch 16 (the tensor-parallel ranks of a 2-D mesh read the same samples)
            dp = self.device_mesh["data_parallel"]
            sampler = DistributedSampler(data, num_replicas=dp.size(), rank=dp.get_local_rank(), shuffle=False)
            return DataLoader(data, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)


def _callbacks(export: bool, domino: bool = False) -> list[pl.Callback]:
    if domino:
        return [
            DominoSearchCallback(
                target_sparsity=0.6, m=4, check_every=2, penalty_every=1, penalty=2.0, output="found.json",
                plot=False, verbose=False,
            )
        ]  # fmt: skip
    return [
        SRSTECallback(
            1, 4, decay=0.05, verbose=False,
            export_dir="export" if export else None, export_formats=["dense", "packed"],
        ),
        SparsityScheduler(start=0, end=6, schedule="linear", decay_schedule="linear", freeze=9, plot=False),
    ]  # fmt: skip


def _fit(
    out: Path,
    run: str,
    devices: int,
    batch_size: int,
    *,
    same_batches: bool = False,
    max_steps: int = -1,
    max_epochs: int = 3,
    ckpt: Path | None = None,
    save: Path | None = None,
    sharded: bool = False,
    domino: bool = False,
    checkpoint_at: int | None = None,
    tp: bool = False,
    two_d: bool = False,
) -> None:
    pl.seed_everything(0, workers=True)
    opt = {"lr": 0.01, "momentum": 0.0} if domino else {}
    model = (TwoDNet(batch_size, same_batches, hidden=32, **opt) if two_d
             else TensorParallelNet(batch_size, same_batches, hidden=32, **opt) if tp
             else ShardNet(batch_size, same_batches, **opt))  # fmt: skip
    dp, tp_size = (2, devices // 2) if two_d else (1, devices) if tp else (devices, 1)
    strategy = (
        ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp_size, save_distributed_checkpoint=sharded)
        if devices > 1 else "auto"
    )  # fmt: skip
    trainer = pl.Trainer(
        default_root_dir=out / run, accelerator="cpu", devices=devices, strategy=strategy, max_epochs=max_epochs,
        max_steps=max_steps, callbacks=_callbacks(export=ckpt is None and save is None, domino=domino) + (
            [ModelCheckpoint(out / run, "at_{step}", every_n_train_steps=checkpoint_at, save_top_k=-1)]
            if checkpoint_at else []
        ),
        logger=CSVLogger(out / run, name="logs"), log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=checkpoint_at is not None, num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(model, ckpt_path=ckpt, weights_only=True)
    if save is not None:
        trainer.save_checkpoint(save)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = (
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if devices > 1 else model.state_dict()
    )  # fmt: skip
    layers = sparse_layers(model)
    record = {
        "step": trainer.global_step,
        "full": {k: v.detach().clone() for k, v in full.items() if isinstance(v, torch.Tensor)},
        "masks": {k: v.sparsity.mask.clone() for k, v in layers.items()},
        "nm": {k: (v.state.n, v.state.m, v.state.frozen) for k, v in layers.items()},
        "shards": {
            k: None if v.sparsity.shard is None else (v.sparsity.shard.start, v.sparsity.shard.stop)
            for k, v in layers.items()
        },  # fmt: skip
        "placements": {k: str(getattr(v.original, "placements", None)) for k, v in layers.items()},
        "effective": {k: v.effective() for k, v in layers.items()},  # gathered on every rank (a collective)
    }
    if two_d and devices > 1:  # local_part of the gathered weight is this rank's part (a collective)
        from nm_lightning.distributed import local_part

        record["local_part_ok"] = {
            k: torch.equal(local_part(v.original.full_tensor(), v.original), v.original.to_local())
            for k, v in layers.items()
        }  # fmt: skip
    torch.save(record, out / f"{run}_rank{trainer.global_rank}_of_{devices}.pt")


class TensorParallelNet(ShardNet):
    """Tensor parallelism: ``fc1`` column-wise (output rows), ``fc2`` row-wise (its inputs in slices of
    ``hidden / 2``: 14 by default, not a multiple of 4); the convolutions stay whole on every rank. Every rank reads
    the whole batch (the ranks hold parts of one model)."""

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
        parallelize_module(self, self.device_mesh["tensor_parallel"], plan)


class TwoDNet(TensorParallelNet):
    """A 2-D mesh: ``fc1`` column-wise, ``fc2`` row-wise on the tensor-parallel mesh, then N:M attached
    (:func:`nm_lightning.attach_pending`), then ``fully_shard`` per layer and on the root on the data-parallel mesh.
    The tensor-parallel ranks of one data-parallel group read the same samples."""

    attach = True  # False: the missing attach_pending call

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        super().configure_model()  # parallelize_module on the tensor-parallel mesh
        if self.attach:
            attach_pending(self)
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def _missing_attach(out: Path, devices: int) -> None:
    """A 2-D configure_model without attach_pending: the error names the line to add (every rank)."""
    model = TwoDNet(8, hidden=32)
    model.attach = False
    trainer = pl.Trainer(
        default_root_dir=out / "missing", accelerator="cpu", devices=devices, max_steps=1,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=devices // 2),
        callbacks=[SRSTECallback(1, 4, verbose=False)], logger=CSVLogger(out / "missing", name="logs"),
        log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
    )  # fmt: skip
    try:
        trainer.fit(model)
        message = "missing_attach: no error"
    except Exception as err:  # noqa: BLE001 - the message is the result
        message = f"missing_attach: {type(err).__name__}: {err}"
    (out / f"errors_rank{trainer.global_rank}.txt").write_text(message + "\n")


def _rowwise_check(devices: int) -> str:
    """The placement check on a row-wise sharded weight: fc2's 28 inputs in slices of 14, for m=4 and m=2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from nm_lightning.distributed import ShardingError, check_placements
    from nm_lightning.state import NMLayerState

    weight = distribute_tensor(torch.randn(5, 28), init_device_mesh("cpu", (devices,)), [Shard(1)])
    messages = []
    for m in (4, 2):
        try:
            check_placements(NMLayerState("fc2.weight", (5, 28), m=m, target_n=1, n=m), weight)
            messages.append(f"rowwise_m{m}: no error")
        except ShardingError as err:
            messages.append(f"rowwise_m{m}: {err}")
    return "\n".join(messages)


def _attach_after_fully_shard(devices: int) -> str:
    """The wrong order, by hand: N:M attached after ``fully_shard`` would mask the sharded weight; it is refused
    naming the layer and the right order (the callbacks attach before ``fully_shard``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from nm_lightning import attach, plan_layers

    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    mesh = init_device_mesh("cpu", (devices,))
    for layer in net:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    try:
        attach(net, plan_layers(net, 2, 4))
        net(torch.randn(2, 8))
        return "attach_after: no error"
    except Exception as err:  # noqa: BLE001 - the message is the result
        return f"attach_after: {type(err).__name__}: {err}"


def _placed_numerics(out: Path, devices: int) -> None:
    """The tensor-parallel forward on each placement equals the unsharded ``ste_nm`` bit for bit (``+0.0`` where
    pruned, a kept ``-0.0`` stays ``-0.0``), with the straight-through gradient, or the kept-only gradient of the
    fixed-mask rule; the gathered mask equals the whole one. Every rank writes one line per placement."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from nm_lightning.distributed import placed_mask, placed_masked
    from nm_lightning.srste import ste_nm
    from nm_lightning.state import NMLayerState

    mesh = init_device_mesh("cpu", (devices,))
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    w[0, :4] = torch.tensor([-0.0, -0.0, 0.0, -0.0])  # ties among zeros: kept -0.0 entries
    ref, mask = ste_nm(w, 2, 4)
    lines = []
    for placement in (Shard(0), Shard(1), Replicate()):
        results = []
        for straight_through in (True, False):
            dw = distribute_tensor(w, mesh, [placement]).requires_grad_()
            full, local = placed_mask(dw, NMLayerState("w", (6, 16), m=4, target_n=2, n=2))
            got = placed_masked(dw, local, straight_through)
            whole = got.full_tensor()
            got.sum().backward()
            grad = torch.ones_like(w) if straight_through else mask.float()
            results.append(
                torch.equal(full, mask) and torch.equal(whole, ref) and torch.equal(whole.signbit(), ref.signbit())
                and torch.equal(dw.grad.full_tensor(), grad)
            )  # fmt: skip
        lines.append(f"{placement}: {results}")
    (out / f"numerics_rank{torch.distributed.get_rank()}.txt").write_text("\n".join(lines) + "\n")


class LateLayerNet(ShardNet):
    """A selectable layer built in ``configure_model`` (after the N:M attach)."""

    def configure_model(self) -> None:
        self.head = nn.Linear(8, 4)  # N:M-able (8 inputs), never used in forward
        super().configure_model()


def _other_configuration(out: Path, devices: int) -> str:
    """A sharded folder written with SR-STE 1:4, resumed with 2:4: refused, naming the layer and both N:M."""
    path = out / "one_of_four.ckpt"
    for n, ckpt in ((1, None), (2, path)):
        trainer = pl.Trainer(
            default_root_dir=out / "other", accelerator="cpu", devices=devices, max_steps=2,
            strategy=ModelParallelStrategy(devices, 1, save_distributed_checkpoint=True),
            callbacks=[SRSTECallback(n, 4, verbose=False)], logger=CSVLogger(out / "other", name=f"logs_{n}"),
            log_every_n_steps=1, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
        )  # fmt: skip
        try:
            trainer.fit(ShardNet(8), ckpt_path=ckpt, weights_only=True)
        except RuntimeError as err:
            return f"other_configuration: {err}"
        if ckpt is None:
            trainer.save_checkpoint(path)
    return "other_configuration: no error"


class _Payload:
    """Pickled, it would create ``marker`` when unpickled (what a crafted checkpoint would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _malicious_folder(out: Path, devices: int) -> str:
    """A copy of a real sharded folder whose ``.metadata`` is a pickle with code: refused on every rank before
    torch.distributed.checkpoint unpickles it (the marker is never created)."""
    import pickle
    import shutil

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    evil = out / f"evil_rank{rank}.ckpt"
    shutil.copytree(out / "one_of_four.ckpt", evil)
    marker = out / f"pwned_rank{rank}"
    (evil / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    trainer = pl.Trainer(
        default_root_dir=out / "evil", accelerator="cpu", devices=devices, max_steps=2,
        strategy=ModelParallelStrategy(devices, 1, save_distributed_checkpoint=True),
        callbacks=[SRSTECallback(1, 4, verbose=False)], logger=CSVLogger(out / "evil", name="logs"),
        log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
    )  # fmt: skip
    try:
        trainer.fit(ShardNet(8), ckpt_path=evil, weights_only=True)
        result = "malicious_folder: no error"
    except Exception as err:  # noqa: BLE001 - the message is the result
        result = f"malicious_folder: {type(err).__name__}: {str(err)[:300]}"
    return f"{result} | marker exists: {marker.exists()}"


def _errors(out: Path, devices: int) -> None:
    """Every rank records the error of each refused setup (one line per case)."""
    messages = []
    for name, model, strategy in (
        (
            "tensor_parallel",
            TensorParallelNet(8),
            ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=devices),
        ),
        ("late_layer", LateLayerNet(8), ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)),
    ):
        trainer = pl.Trainer(
            default_root_dir=out / name, accelerator="cpu", devices=devices, strategy=strategy, max_steps=1,
            callbacks=[SRSTECallback(1, 4, verbose=False)], logger=CSVLogger(out / name, name="logs"),
            log_every_n_steps=1, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
        )  # fmt: skip
        try:
            trainer.fit(model)
            messages.append(f"{name}: no error")
        except Exception as err:  # noqa: BLE001 - the message is the result
            messages.append(f"{name}: {type(err).__name__}: {err}")
    messages.append(_rowwise_check(devices))
    messages.append(_attach_after_fully_shard(devices))
    messages.append(_other_configuration(out, devices))
    messages.append(_malicious_folder(out, devices))
    (out / f"errors_rank{trainer.global_rank}.txt").write_text("\n".join(messages) + "\n")


def main(out: Path, mode: str, devices: int, batch_size: int) -> None:
    if mode == "errors":
        _errors(out, devices)
    elif mode == "domino":
        _fit(out, "main", devices, batch_size, max_epochs=30, domino=True, save=out / "domino.ckpt")
        if devices > 1:  # a sharded folder saved mid-epoch during the search: resuming from it ends the same
            same = {"same_batches": True, "max_epochs": 5, "domino": True, "sharded": True}
            _fit(out, "straight", devices, batch_size, max_steps=14, checkpoint_at=6, **same)
            saved = out / "straight" / "at_step=6.ckpt"
            _fit(out, "resume", devices, batch_size, max_steps=14, ckpt=saved, **same)
    elif mode == "tp":
        _srste(out, devices, batch_size, tp=True)
        _fit(out, "domino", devices, batch_size, max_epochs=30, domino=True, tp=True, save=out / "domino.ckpt")
        if devices > 1:
            _placed_numerics(out, devices)
            # a sharded folder saved mid-search (each rank takes its part of the thresholds back): bit-identical. (A
            # full file would need optimizer state: Lightning's full-file load fails on SGD without momentum)
            same = {"same_batches": True, "max_epochs": 5, "domino": True, "tp": True, "sharded": True}
            _fit(out, "domino_straight", devices, batch_size, max_steps=14, checkpoint_at=6, **same)
            saved = out / "domino_straight" / "at_step=6.ckpt"
            _fit(out, "domino_resume", devices, batch_size, max_steps=14, ckpt=saved, **same)
    elif mode == "2d":  # 4 devices: data_parallel_size=2 x tensor_parallel_size=2; 1 device: the reference
        same = {"same_batches": True, "max_epochs": 5, "max_steps": 10, "two_d": True}
        if devices > 1:
            _missing_attach(out, devices)
        _fit(out, "main", devices, batch_size, **same)  # also the unbroken run the resumed ones must equal
        if devices > 1:
            for sharded, name in ((False, "full.ckpt"), (True, "sharded.ckpt")):
                path = out / name
                _fit(out, f"stop_{name}", devices, batch_size, **{**same, "max_steps": 6}, save=path, sharded=sharded)
                _fit(out, f"resume_{name}", devices, batch_size, ckpt=path, sharded=sharded, **same)
        # DominoSearch: vote counts summed over the whole mesh, thresholds gathered for the checkpoint
        _fit(out, "domino", devices, batch_size, max_epochs=30, domino=True, two_d=True, save=out / "domino.ckpt")
    elif mode != "srste":
        raise SystemExit(f"unknown mode {mode!r}")
    else:
        _srste(out, devices, batch_size)
    if torch.distributed.is_initialized():
        # leave together: a rank exiting while the other still holds the gloo group can abort at interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _srste(out: Path, devices: int, batch_size: int, tp: bool = False) -> None:
    _fit(out, "main", devices, batch_size, tp=tp)
    if devices > 1:
        same = {"same_batches": True, "max_epochs": 5, "tp": tp}
        _fit(out, "straight", devices, batch_size, max_steps=10, **same)
        for sharded, name in ((False, "full.ckpt"), (True, "sharded.ckpt")):
            path = out / name
            _fit(out, f"stop_{name}", devices, batch_size, max_steps=6, save=path, sharded=sharded, **same)  # mid-epoch
            _fit(out, f"resume_{name}", devices, batch_size, max_steps=10, ckpt=path, sharded=sharded, **same)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
