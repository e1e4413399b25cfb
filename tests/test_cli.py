"""nm-lightning (LightningCLI): the YAML example and the command-line forms parse; a tiny fit runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from nm_lightning import SRSTECallback
from nm_lightning.cli import build_cli
from nm_lightning.data import MNIST1DDataModule
from nm_lightning.models import CNN1D, Classifier, TransformerClassifier

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cli_srste.yaml"


def _srste(cli) -> SRSTECallback:
    found = [c for c in cli.trainer.callbacks if isinstance(c, SRSTECallback)]
    assert len(found) == 1
    return found[0]


def test_yaml_example_parses(tmp_path):
    cli = build_cli(["--config", str(EXAMPLE), f"--data.data_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"],
               run=False)
    cb = _srste(cli)
    assert (cb.n, cb.m, cb.decay) == (2, 4, 2e-4)
    assert isinstance(cli.model, Classifier) and isinstance(cli.model.net, CNN1D)
    assert isinstance(cli.datamodule, MNIST1DDataModule) and cli.datamodule.batch_size == 128
    assert cli.trainer.max_epochs == 20 and cli.trainer.checkpoint_callback.monitor == "val/acc"


def test_command_line_forms(tmp_path):
    cli = build_cli([
        "--model", "nm_lightning.models.Classifier", "--model.lr", "0.05",
        "--model.net", "TransformerClassifier", "--model.net.dim", "32", "--model.net.heads", "2",
        "--data", "nm_lightning.data.MNIST1DDataModule", f"--data.data_dir={tmp_path}", "--data.batch_size=64",
        "--trainer.callbacks+=nm_lightning.SRSTECallback", "--trainer.callbacks.n=1", "--trainer.callbacks.m=8",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
    ], run=False)
    cb = _srste(cli)
    assert (cb.n, cb.m) == (1, 8)
    assert isinstance(cli.model.net, TransformerClassifier) and cli.model.hparams.lr == 0.05
    assert cli.datamodule.batch_size == 64
    # short class names resolve because nm_lightning is imported; defaults are Classifier + MNIST-1D
    cli = build_cli(["--trainer.callbacks+=SRSTECallback", "--trainer.callbacks.n=2", f"--data.data_dir={tmp_path}",
                f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert _srste(cli).n == 2 and isinstance(cli.model, Classifier) and isinstance(cli.datamodule, MNIST1DDataModule)


def test_bad_values_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_cli(["--trainer.callbacks+=SRSTECallback", "--trainer.callbacks.n=two"], run=False)
    assert "n" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_cli(["--model.optimizer=adam"], run=False)


def test_fit_subcommand_runs(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_cli(["fit", "--config", str(EXAMPLE), f"--data.data_dir={tmp_path / 'data'}", "--data.num_samples=200",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
              "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--trainer.callbacks.init_args.verbose=false"])
    finally:
        torch.set_num_threads(before)
    (saved,) = tmp_path.glob("lightning_logs/version_*/config.yaml")
    cfg = yaml.safe_load(saved.read_text())
    assert cfg["trainer"]["callbacks"][0]["class_path"] == "nm_lightning.SRSTECallback"
    (ckpt,) = tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    w = state["net.classifier.1.weight"]
    assert float((w == 0).float().mean()) == pytest.approx(0.5)


def test_every_callback_parses_from_the_command_line(tmp_path):
    from nm_lightning import DominoSearchCallback, SparsityScheduler

    cli = build_cli([
        "--trainer.callbacks+=SRSTECallback", "--trainer.callbacks.n=1", "--trainer.callbacks.m=4",
        "--trainer.callbacks.scheme={net.classifier.1: [2, 16]}",
        "--trainer.callbacks+=SparsityScheduler", "--trainer.callbacks.schedule=cubic", "--trainer.callbacks.end=100",
        "--trainer.callbacks.unit=step", "--trainer.callbacks.levels=[8, 4, 2]",
        f"--data.data_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
    ], run=False)  # fmt: skip
    (sched,) = [c for c in cli.trainer.callbacks if isinstance(c, SparsityScheduler)]
    assert (sched.schedule, sched.end, sched.levels) == ("cubic", 100, [8, 4, 2])
    assert dict(_srste(cli).scheme) == {"net.classifier.1": (2, 16)}
    cli = build_cli([
        "--trainer.callbacks+=DominoSearchCallback", "--trainer.callbacks.target_flops=0.875",
        "--trainer.callbacks.m=32", "--trainer.callbacks.output=found.json",
        f"--data.data_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
    ], run=False)  # fmt: skip
    (dom,) = [c for c in cli.trainer.callbacks if isinstance(c, DominoSearchCallback)]
    assert (dom.target_flops, dom.m, dom.output) == (0.875, 32, "found.json")
    with pytest.raises(SystemExit):
        build_cli(["--trainer.callbacks+=SparsityScheduler", "--trainer.callbacks.unit=batch"], run=False)


def _console_script(name: str) -> str:
    """The ``module:function`` that pip's console-script wrapper calls for ``name`` (from pyproject.toml)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    return scripts[name]


def test_console_script_exits_zero(tmp_path):
    """`nm-lightning fit ...` as installed: pip's wrapper runs ``sys.exit(main())``, which must give status 0."""
    module, func = _console_script("nm-lightning").split(":")
    wrapper = f"import sys; from {module} import {func}; sys.argv[0] = 'nm-lightning'; sys.exit({func}())"
    args = ["fit", "--config", str(EXAMPLE), f"--data.data_dir={tmp_path / 'data'}", "--data.num_samples=100",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for cmd in ([sys.executable, "-c", wrapper, *args], [sys.executable, "-m", "nm_lightning.cli", *args]):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "NMLightningCLI object" not in proc.stdout + proc.stderr
        assert "Running in `fast_dev_run` mode" in proc.stdout + proc.stderr
    # a usage error still exits non-zero
    proc = subprocess.run([sys.executable, "-c", wrapper, "fit", "--trainer.callbacks+=SRSTECallback",
                           "--trainer.callbacks.n=two"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
