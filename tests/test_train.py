"""nm-train end to end on tiny settings: fit, test, checkpoint, export, multirun, installed wheel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch

from nm_lightning.export.artifacts import FILE_NAMES
from nm_lightning.masks import nm_mask
from nm_lightning.models import Classifier, cnn1d
from nm_lightning.scheme import NMScheme
from nm_lightning.train import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.num_samples=300", "data.batch_size=32", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0", "threads=1"]


@pytest.fixture
def tiny_cfg(compose_train):
    """compose(overrides) on top of the tiny settings, outputs in tmp_path/run."""
    return lambda *overrides: compose_train(*TINY, *overrides)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_train_srste_end_to_end(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("sparsity.n=1", "sparsity.m=4")
    metrics = run(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and "val/acc" in metrics
    out = tmp_path / "run"
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert list((out / "csv").glob("version_*/metrics.csv"))
    # nm-train writes through nm_lightning.export: the same files as SRSTECallback(export_dir=...)
    assert sorted(p.name for p in (out / "export").iterdir()) == sorted([*FILE_NAMES.values(), "scheme.json"])
    # the dense export loads strictly into the never-sparsified module, with weights_only=True
    state = torch.load(out / "export" / "model_dense.pt", weights_only=True)
    model = Classifier(net=cnn1d())
    model.load_state_dict(state, strict=True)
    meta = json.loads((out / "export" / "scheme.json").read_text())
    assert meta["format"] == "nm_lightning.export"
    layers = meta["layers"]
    assert set(layers) == {"net.features.3", "net.features.6", "net.classifier.1", "net.classifier.4"}
    for name, entry in layers.items():
        w = state[entry["key"]]
        assert (entry["n"], entry["m"]) == (1, 4)
        assert entry["sparsity"] == pytest.approx(0.75) and entry["sparsity"] == 1 - int((w != 0).sum()) / w.numel()
        assert torch.equal(w != 0, nm_mask(w, 1, 4) & (w != 0)), name  # at most 1 nonzero per group of 4
    # the test metrics travel in the export's metadata
    assert meta["metrics"]["test/acc"] == pytest.approx(metrics["test/acc"])
    assert meta["total_params"] == sum(p.numel() for p in model.parameters())
    printed = capsys.readouterr().out
    assert "N:M sparse model" in printed and "1:4" in printed and "test/acc" in printed and "FAIL" not in printed
    assert str(out / "export" / "model_dense.pt") in printed
    # the exported module reproduces the sparse model's test accuracy
    from nm_lightning.data import MNIST1DDataModule

    dm = MNIST1DDataModule(data_dir=str(tmp_path / "data"), num_samples=300, batch_size=32)
    dm.setup("test")
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in dm.test_dataloader())
    assert correct / len(dm.test_set) == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_export_scheme_round_trips_through_sparsity_scheme(tiny_cfg, tmp_path):
    """A run's export/scheme.json is accepted as sparsity.scheme=... and gives the same per-layer n:m."""
    run(tiny_cfg("sparsity.n=1", "sparsity.m=4", "sparsity.exclude=[net.classifier.4]", "logger=none",
                 "trainer.max_epochs=1", "export_formats=[dense]"))
    first = tmp_path / "run" / "export" / "scheme.json"
    layers = json.loads(first.read_text())["layers"]
    assert {k: (v["n"], v["m"]) for k, v in layers.items()} == {
        "net.features.3": (1, 4), "net.features.6": (1, 4), "net.classifier.1": (1, 4)}
    assert dict(NMScheme.load(first)) == {k: (v["n"], v["m"]) for k, v in layers.items()}
    saved = tmp_path / "first_scheme.json"
    saved.write_text(first.read_text())
    run(tiny_cfg(f"sparsity.scheme={saved}", "logger=none", "trainer.max_epochs=1", "export_formats=[dense]"))
    again = json.loads(first.read_text())["layers"]
    assert {k: (v["n"], v["m"]) for k, v in again.items()} == {k: (v["n"], v["m"]) for k, v in layers.items()}


def test_train_dense(tiny_cfg, tmp_path):
    metrics = run(tiny_cfg("sparsity=none", "logger=none", "test_ckpt=null"))
    assert "test/acc" in metrics
    assert json.loads((tmp_path / "run" / "export" / "scheme.json").read_text())["layers"] == {}
    state = torch.load(tmp_path / "run" / "export" / "model_dense.pt", weights_only=True)
    Classifier(net=cnn1d()).load_state_dict(state, strict=True)


def test_train_bad_threads(tiny_cfg):
    with pytest.raises(ValueError, match="threads must be"):
        run(tiny_cfg("threads=0"))


def _env(checkout: bool = True) -> dict[str, str]:
    """With ``checkout``, the subprocess imports this checkout's package (not another installed copy)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NM_LIGHTNING_DATA_DIR="")
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


def _run_killable(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (spawned DDP workers included)
    and fail with the output so far."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s (hung?)\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_multirun_cli(tmp_path):
    """`nm-train -m sparsity.n=1,2 sparsity.m=4` launches two jobs with their own exports."""
    cmd = [sys.executable, "-m", "nm_lightning.train", "-m", "sparsity.n=1,2", "sparsity.m=4", *TINY,
           "trainer.max_epochs=1", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}",
           "logger=csv"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    schemes = sorted((tmp_path / "logs" / "train" / "multiruns").glob("*/*/export/scheme.json"))
    assert len(schemes) == 2
    ns = sorted({v["n"] for s in schemes for v in json.loads(s.read_text())["layers"].values()})
    assert ns == [1, 2]
    assert all(s.parent.parent.joinpath("checkpoints", "last.ckpt").exists() for s in schemes)


@pytest.mark.slow
def test_wheel_ships_configs(tmp_path):
    """Build the wheel, install it into a fresh venv (reusing this environment's dependencies) and run it."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, timeout=120, capture_output=True)
    (wheel,) = wheels.glob("nm_lightning-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # dependencies come from the current environment (a plain path entry: its editable finder is not loaded)
    Path(site, "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=120, capture_output=True)
    check = (
        "import nm_lightning, pathlib, sys;"
        "from hydra import compose, initialize_config_module;"
        "assert pathlib.Path(nm_lightning.__file__).is_relative_to(sys.prefix), nm_lightning.__file__;"
        "initialize_config_module('nm_lightning.conf', version_base='1.3');"
        "cfg = compose('train', overrides=['experiment=srste_1x4', 'data=image_folder', 'data.root=x']);"
        "print(cfg.sparsity.n, cfg.sparsity.m, cfg.data._target_)"
    )
    proc = subprocess.run([str(py), "-c", check], cwd=tmp_path, env=_env(checkout=False), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "4", "nm_lightning.data.ImageFolderDataModule"]
    # the console script trains (fast_dev_run) from outside the checkout
    proc = subprocess.run(
        [str(env_dir / "bin" / "nm-train"), "debug=fdr", "data.num_samples=100", "threads=1",
         f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=_env(checkout=False), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "run" / "export" / "model_dense.pt").exists()
    assert "N:M sparse model" in proc.stdout


def test_domino_then_finetune_experiment(tiny_cfg, tmp_path):
    """Search (tiny, with an easy target) then fine-tune with the found scheme from the dense start."""
    cfg = tiny_cfg(
        "experiment=domino_then_finetune", "search.pretrain_epochs=1", "search.max_epochs=6",
        "search.callback.target_sparsity=0.5", "search.callback.check_every=1", "search.callback.penalty_every=1",
        "search.callback.penalty=5.0", "search.callback.m=4", "+search.callback.plot=false",
        "trainer.max_epochs=1", "trainer.limit_train_batches=3",
    )  # fmt: skip
    metrics = run(cfg)
    search_dir = tmp_path / "run" / "search"
    net = cnn1d(**{k: v for k, v in cfg.model.net.items() if k != "_target_"})
    model = Classifier(net=net)
    scheme = NMScheme.load(search_dir / "scheme.txt", model=model)
    assert scheme and all(n in (1, 2, 4) and m == 4 for n, m in scheme.values())
    assert (search_dir / "scheme.dense.pt").exists()
    exported = json.loads((tmp_path / "run" / "export" / "scheme.json").read_text())["layers"]
    sparse_in_scheme = {k: v for k, v in scheme.items() if v[0] < v[1]}
    assert {k: (v["n"], v["m"]) for k, v in exported.items()} == sparse_in_scheme
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_last_checkpoint_is_the_end_of_the_run(tiny_cfg, tmp_path, capsys):
    """checkpoints/last.ckpt holds the final epoch and step even when the monitored metric got worse.

    Monitoring ``epoch`` in ``min`` mode makes every epoch after the first worse than the best; Lightning's
    ``save_last`` then kept last.ckpt at epoch 0.
    """
    cfg = tiny_cfg("trainer.max_epochs=3", "callbacks.model_checkpoint.monitor=epoch",
                   "callbacks.model_checkpoint.mode=min", "logger=none", "export=false")
    run(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 9)  # 3 epochs of 3 batches
    best = torch.load(ckpts / "epoch_000.ckpt", weights_only=True)
    assert (best["epoch"], best["global_step"]) == (0, 3)
    printed = capsys.readouterr().out
    assert f"last checkpoint (resume with ckpt_path=...): {ckpts / 'last.ckpt'}" in printed
    # resuming from it continues where the run ended (epoch 3 of 4, steps 10..12)
    metrics = run(tiny_cfg("trainer.max_epochs=4", f"ckpt_path={ckpts / 'last.ckpt'}", "logger=none", "export=false",
                           "test=false"))
    assert "val/acc" in metrics
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (3, 12)
    # training stopped mid-epoch (max_steps): the fit-end write still makes last.ckpt the final state
    run(tiny_cfg("trainer.max_epochs=3", "trainer.max_steps=4", "logger=none", "export=false", "test=false"))
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 4


class _Planted:
    """Pickles as a call to ``Path.touch(marker)``: loading the file without ``weights_only`` creates it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("key", ["test_ckpt", "ckpt_path"])
def test_checkpoint_with_code_is_refused(tiny_cfg, tmp_path, key):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Planted(marker)}, evil)
    with pytest.raises(ValueError, match=rf"refusing {key}='{evil}'.*weights_only=True"):
        run(tiny_cfg(f"{key}={evil}", "logger=none"))
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training
    with pytest.raises(FileNotFoundError, match=rf"{key}='{tmp_path / 'missing.ckpt'}' is not a file"):
        run(tiny_cfg(f"{key}={tmp_path / 'missing.ckpt'}", "logger=none"))


def test_search_that_commits_nothing_says_what_to_change(tiny_cfg):
    """A search budget too small to commit any layer stops with an actionable error, not in the fine-tune."""
    cfg = tiny_cfg(
        "experiment=domino_then_finetune", "search.pretrain_epochs=0", "search.max_epochs=1",
        "search.callback.check_every=1000", "+search.callback.plot=false", "logger=none",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"committed no N:M layer within its budget.*search.max_epochs=1 "
                                           r"\(3 optimizer steps\).*check_every=1000.*raise search.max_epochs"):
        run(cfg)


@pytest.mark.slow
def test_ddp_sim_with_the_csv_logger(tmp_path):
    """`nm-train trainer=ddp_sim` (2 CPU processes, ddp_spawn) with the CSV logger writing every step.

    A collective issued by rank 0 alone while logging (a metric sync) deadlocks this run at its first logged
    step; it must finish, log the N:M metrics and export once.
    """
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "nm_lightning.train", "trainer=ddp_sim", "logger=csv", "trainer.log_every_n_steps=1",
           *TINY, "trainer.max_epochs=1", f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run_dir}"]
    proc = _run_killable(cmd, tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # fit and test are two spawns under ddp_spawn: the CSV logger starts a version for each
    headers = [f.read_text().splitlines()[0].split(",") for f in run_dir.glob("csv/version_*/metrics.csv")]
    assert any("nm/sparsity" in h and "nm/flip_rate" in h and "train/loss_step" in h for h in headers), headers
    meta = json.loads((run_dir / "export" / "scheme.json").read_text())
    assert {v["n"] for v in meta["layers"].values()} == {2} and "test/acc" in meta["metrics"]
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert "N:M sparse model" in proc.stdout


@pytest.mark.slow
def test_fsdp2_sim_runs_end_to_end_with_the_csv_logger(tmp_path):
    """`nm-train trainer=fsdp2_sim logger=csv` as the README writes it (2 gloo processes, FSDP2 through
    ModelParallelStrategy, the bundled classifier's configure_model shards it): fit, test and one export that
    loads strictly into the plain network with exact 2:4 along the input dim."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "nm_lightning.train", "trainer=fsdp2_sim", "logger=csv", "trainer.log_every_n_steps=1",
           *TINY, "trainer.max_epochs=1", f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run_dir}"]
    proc = _run_killable(cmd, tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    headers = [f.read_text().splitlines()[0].split(",") for f in run_dir.glob("csv/version_*/metrics.csv")]
    assert any("nm/sparsity" in h and "train/loss_step" in h for h in headers), headers
    meta = json.loads((run_dir / "export" / "scheme.json").read_text())
    assert {v["n"] for v in meta["layers"].values()} == {2} and "test/acc" in meta["metrics"]
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == sorted(
        p.name for p in (run_dir / "export").iterdir() if not p.name.startswith(".")
    )  # no leftover temporary files from a second writer
    plain = Classifier(net=cnn1d(num_classes=10))
    sd = torch.load(run_dir / "export" / FILE_NAMES["dense"], weights_only=True)
    plain.load_state_dict(sd, strict=True)
    for name in meta["layers"]:
        w = plain.get_submodule(name).weight.detach()
        assert torch.equal(w != 0, nm_mask(w, 2, 4) & (w != 0)), name
        assert int((w != 0).sum()) <= w.numel() // 2, name
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_bad_export_formats_fail_before_training(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"export formats must be a non-empty subset.*\['onnx'\]"):
        run(tiny_cfg("export_formats=[onnx]", "logger=none"))
    assert not (tmp_path / "run" / "checkpoints").exists()
