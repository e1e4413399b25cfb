"""Two CPU processes (gloo; ``ddp_spawn`` in-process, ``ddp`` through a script): identical masks on every rank, λ
and the DominoSearch penalty not scaled by world size, the caller's model receives the sparse weights, one set of
files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, make_data, metrics_rows, trainer_kwargs
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, DistributedSampler

from nm_lightning import DominoSearchCallback, SparsityScheduler, SRSTECallback, nm_mask, sparse_layers

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("_no_hang")]


class RankCheck(pl.Callback):
    """In every worker, after each step: all ranks hold the same effective weights and masks."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        layers = sparse_layers(pl_module)
        digest = torch.stack(
            [
                torch.stack([la.sparsity.mask.sum().float(), la.module.weight.detach().double().sum().float()])
                for la in layers.values()
            ]
        )
        gathered = trainer.strategy.all_gather(digest)
        assert torch.equal(gathered[0], gathered[1]), "ranks disagree on N:M masks or weights"


class OrderedNet(TinyNet):
    """Rank r reads samples r, r + world, ...: two ranks x batch 8 see the same 16 samples as one x batch 16."""

    def train_dataloader(self):
        data = make_data()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return DataLoader(data, batch_size=self.hparams.batch_size, sampler=DistributedSampler(data, shuffle=False))
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=False)


def _fit(tmp_path, callbacks, devices, batch_size, strategy="auto", max_epochs=2):
    pl.seed_everything(0, workers=True)
    model = OrderedNet(batch_size=batch_size)
    kw = trainer_kwargs(tmp_path, max_epochs=max_epochs, callbacks=callbacks, devices=devices, strategy=strategy)
    # a real logger at every step: the callbacks' logging must not issue a collective on rank 0 alone
    logger = CSVLogger(tmp_path, name="logs")
    trainer = pl.Trainer(
        **{**kw, "deterministic": False, "use_distributed_sampler": False, "logger": logger, "log_every_n_steps": 1}
    )
    trainer.fit(model)
    return model


def _spawn_callbacks() -> list[pl.Callback]:
    return [
        SRSTECallback(2, 4, decay=0.05, export_dir="export", export_formats=["dense", "packed"]),
        SparsityScheduler(start=0, end=4, schedule="linear", decay_schedule="linear", plot=False),
    ]


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """Gradients are averaged before the decay is added once: 2 x batch 8 == 1 x batch 16 (decay 0.05, ramped by
    the scheduler); the export is written once."""
    single = _fit(tmp_path / "one", _spawn_callbacks(), devices=1, batch_size=16)
    double = _fit(tmp_path / "two", [*_spawn_callbacks(), RankCheck()], devices=2, batch_size=8, strategy="ddp_spawn")
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert len(list((tmp_path / "two").rglob("export/scheme.json"))) == 1  # under the logger's log dir
    rows = metrics_rows(tmp_path / "two")
    assert sum(1 for r in rows if r.get("nm/sparsity")) >= 4 and any(r.get("nm/flip_rate") for r in rows)
    # with ddp_spawn the caller's model gets the plain masked weights back (see NMCallback.teardown)
    assert not sparse_layers(double)
    for name, layer in sparse_layers(single).items():
        got = double.get_submodule(name).weight
        torch.testing.assert_close(got, layer.module.weight, rtol=1e-4, atol=1e-5)
        assert torch.equal(got != 0, nm_mask(got, 2, 4) & (got != 0))


def test_domino_search_under_ddp_writes_one_scheme(tmp_path):
    cb = DominoSearchCallback(
        target_sparsity=0.6, m=4, check_every=2, penalty_every=1, penalty=2.0, output="found.json", plot=False
    )
    pl.seed_everything(0, workers=True)
    model = TinyNet(lr=0.01, momentum=0.0, batch_size=8)
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path, max_epochs=30, callbacks=[cb, RankCheck()], devices=2, strategy="ddp_spawn", deterministic=False,
            logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1,
        )
    )  # fmt: skip
    trainer.fit(model)
    files = sorted(p.name for p in tmp_path.rglob("found*"))
    assert files == ["found.dense.pt", "found.json"]
    assert any(r.get("nm/domino/sparsity") for r in metrics_rows(tmp_path))


SCRIPT = Path(__file__).resolve().parent / "ddp_script.py"


def _script(tmp_path: Path, mode: str, devices: int, batch_size: int) -> Path:
    """Run ``ddp_script.py`` (``strategy="ddp"``: Lightning relaunches the script for rank 1)."""
    out = tmp_path / f"{mode}_{devices}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(SCRIPT.parent.parent)}
    cmd = [sys.executable, str(SCRIPT), str(out), mode, str(devices), str(batch_size)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", ["srste", "configure_model", "domino"])
def test_ddp_subprocess_launcher_equals_one_process(tmp_path, mode):
    """``ddp`` (not spawn): identical masks, N:M and weights on both ranks; 2 x batch 8 equals 1 x batch 16 (SR-STE
    decay and scheduler, or DominoSearch penalty and decisions, not scaled by world size); one set of files."""
    one = _script(tmp_path, mode, 1, 16)
    two = _script(tmp_path, mode, 2, 8)
    single = torch.load(one / "rank0_of_1.pt", weights_only=True)
    r0 = torch.load(two / "rank0_of_2.pt", weights_only=True)
    r1 = torch.load(two / "rank1_of_2.pt", weights_only=True)
    assert r0["step"] == single["step"] and r0["nm"] == r1["nm"] == single["nm"]
    assert any(n < m for n, m in single["nm"].values())
    for k in single["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]) and torch.equal(r0["weights"][k], r1["weights"][k]), k
        assert torch.equal(r0["masks"][k], single["masks"][k]), k
        torch.testing.assert_close(r0["weights"][k], single["weights"][k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r0["effective"][k], single["effective"][k], rtol=1e-4, atol=1e-5)
    assert _files(two / "run") == _files(one / "run")  # written once (rank 0), same names as the 1-process run
    assert any(r.get("nm/sparsity") or r.get("nm/domino/sparsity") for r in metrics_rows(two / "run"))
    if mode != "domino":
        assert len(list((two / "run").rglob("export/scheme.json"))) == 1
    else:
        found = [next((d / "run").rglob("found.json")).read_text() for d in (two, one)]
        assert found[0] == found[1]
