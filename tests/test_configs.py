"""Every shipped Hydra config composes and instantiates; overrides and the pkg:// search path work."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from nm_lightning import SRSTECallback
from nm_lightning.models import Classifier
from nm_lightning.train import CONFIG_DIR, instantiate_group

CONF = Path(CONFIG_DIR)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture
def compose_cfg(compose_train):
    """compose(overrides) -> the train config with output paths in tmp_path."""
    return compose_train


def test_repo_conf_is_the_package_conf():
    top = Path(__file__).resolve().parents[1] / "conf"
    assert top.resolve() == CONF.resolve()
    assert (CONF / "train.yaml").exists()


def test_defaults(compose_cfg):
    cfg = compose_cfg()
    assert cfg.data._target_.endswith("MNIST1DDataModule") and cfg.model.net._target_.endswith("cnn1d")
    assert cfg.trainer.accelerator == "cpu" and cfg.sparsity._target_ == "nm_lightning.SRSTECallback"
    assert (cfg.sparsity.n, cfg.sparsity.m) == (2, 4)
    cb = instantiate_group(cfg.sparsity, "sparsity")
    assert len(cb) == 1 and isinstance(cb[0], SRSTECallback) and (cb[0].n, cb[0].m) == (2, 4)
    checkpoints = {type(c).__name__: c for c in instantiate_group(cfg.callbacks, "callbacks")}
    assert set(checkpoints) == {"ModelCheckpoint", "LastCheckpoint"}
    # the best by val/acc, without Lightning's save_last (that last.ckpt lags the run); last.ckpt is LastCheckpoint's
    assert checkpoints["ModelCheckpoint"].monitor == "val/acc" and not checkpoints["ModelCheckpoint"].save_last
    assert checkpoints["LastCheckpoint"].monitor is None and checkpoints["LastCheckpoint"].filename == "last"


@pytest.mark.parametrize("option", _options("data"))
def test_data_configs_instantiate(compose_cfg, tmp_path, option):
    extra = [f"data.root={tmp_path}"] if option == "image_folder" else []
    cfg = compose_cfg(f"data={option}", *extra)
    dm = instantiate(cfg.data)
    assert isinstance(dm, pl.LightningDataModule) and dm.batch_size == cfg.data.batch_size


def test_image_folder_requires_root(compose_cfg):
    cfg = compose_cfg("data=image_folder")
    with pytest.raises(Exception, match="root"):
        instantiate(cfg.data)


@pytest.mark.parametrize("option, shape", [("cnn1d", (2, 1, 40)), ("transformer", (2, 1, 40)),
                                           ("resnet20", (2, 3, 32, 32)), ("resnet18", (2, 3, 32, 32))])
def test_model_configs_instantiate(compose_cfg, option, shape):
    assert option in _options("model")
    cfg = compose_cfg(f"model={option}", "model.num_classes=7")
    model = instantiate(cfg.model)
    assert isinstance(model, Classifier) and model.num_classes == 7
    with torch.no_grad():
        assert model.eval()(torch.randn(*shape)).shape == (2, 7)


def test_all_model_configs_are_tested():
    assert set(_options("model")) == {"cnn1d", "transformer", "resnet20", "resnet18"}


@pytest.mark.parametrize("option", _options("trainer"))
def test_trainer_configs(compose_cfg, tmp_path, option):
    cfg = compose_cfg(f"trainer={option}")
    if cfg.trainer.accelerator == "gpu":  # composes to what the file says; instantiating needs GPUs
        expected = {"gpu": (1, "auto"), "ddp": (2, "ddp")}[option]
        assert (cfg.trainer.devices, cfg.trainer.get("strategy", "auto")) == expected
        assert cfg.trainer.get("sync_batchnorm", False) == (option == "ddp")
        return
    from lightning.pytorch.loggers import CSVLogger

    trainer = instantiate(cfg.trainer, logger=CSVLogger(tmp_path), enable_checkpointing=False)
    assert isinstance(trainer, pl.Trainer)
    if option == "ddp_sim":
        assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.strategy._start_method == "spawn"
        assert trainer.num_devices == 2


@pytest.mark.parametrize("option", _options("sparsity"))
def test_sparsity_configs(compose_cfg, option):
    cfg = compose_cfg(f"sparsity={option}")
    cbs = instantiate_group(cfg.sparsity, "sparsity")
    expected = {"none": [], "domino": ["DominoSearchCallback"], "srste_cubic": ["SRSTECallback", "SparsityScheduler"]}
    assert [type(c).__name__ for c in cbs] == expected.get(option, ["SRSTECallback"])


def test_sparsity_overrides(compose_cfg):
    cfg = compose_cfg("sparsity=srste", "sparsity.n=1", "sparsity.m=4", "sparsity.decay=0.001",
                      "sparsity.exclude=[net.classifier.4]")
    (cb,) = instantiate_group(cfg.sparsity, "sparsity")
    assert (cb.n, cb.m, cb.decay, list(cb.exclude)) == (1, 4, 0.001, ["net.classifier.4"])
    with pytest.raises(ConfigCompositionException, match="sparsity.nn"):
        compose_cfg("sparsity.nn=1")
    cfg = compose_cfg("sparsity.n=5")
    with pytest.raises(Exception, match="n=5"):
        instantiate(cfg.sparsity)


def test_srste_yaml_matches_callback_signature():
    keys = set(yaml.safe_load((CONF / "sparsity" / "srste.yaml").read_text())) - {"_target_"}
    params = set(inspect.signature(SRSTECallback.__init__).parameters) - {"self"}
    assert keys == params


def test_domino_and_scheduler_yaml_match_signatures():
    from nm_lightning import DominoSearchCallback, SparsityScheduler

    keys = set(yaml.safe_load((CONF / "sparsity" / "domino.yaml").read_text())) - {"_target_"}
    assert keys == set(inspect.signature(DominoSearchCallback.__init__).parameters) - {"self"}
    sched = yaml.safe_load((CONF / "sparsity" / "srste_cubic.yaml").read_text())["scheduler"]
    assert set(sched) - {"_target_"} == set(inspect.signature(SparsityScheduler.__init__).parameters) - {"self"}


@pytest.mark.parametrize("option", _options("experiment"))
def test_experiments_compose(compose_cfg, option):
    cfg = compose_cfg(f"experiment={option}")
    instantiate(cfg.model)
    instantiate_group(cfg.sparsity, "sparsity")
    if option == "srste_1x4":
        assert (cfg.sparsity.n, cfg.sparsity.m) == (1, 4)
    if option == "dense_baseline":
        assert not cfg.sparsity
    if option == "domino_then_finetune":
        assert cfg.search.callback._target_ == "nm_lightning.DominoSearchCallback"
        instantiate(cfg.search.callback)


def test_debug_and_plain_overrides(compose_cfg):
    cfg = compose_cfg("debug=fdr", "trainer.max_epochs=3", "trainer.limit_train_batches=2", "seed=7")
    assert cfg.trainer.fast_dev_run is True and cfg.trainer.max_epochs == 3 and cfg.seed == 7
    cfg = compose_cfg("+trainer.fast_dev_run=2")
    assert cfg.trainer.fast_dev_run == 2


def test_instantiate_group_errors():
    with pytest.raises(TypeError, match="'callbacks.bad'"):
        instantiate_group({"bad": {"x": 1}}, "callbacks")
    with pytest.raises(TypeError, match="sparsity"):
        instantiate_group([1, 2], "sparsity")


def test_pkg_search_path_from_user_config(tmp_path):
    """A user's own primary config reuses the shipped groups via pkg://nm_lightning.conf."""
    (tmp_path / "mine.yaml").write_text(
        "defaults:\n  - sparsity: srste\n  - model: cnn1d\n  - _self_\n"
        "hydra:\n  searchpath:\n    - pkg://nm_lightning.conf\n"
        "sparsity:\n  n: 1\n"
    )
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
            cfg = compose("mine", overrides=["sparsity.m=8"])
        assert (cfg.sparsity.n, cfg.sparsity.m) == (1, 8)
        assert cfg.model.net._target_ == "nm_lightning.models.cnn1d"
    finally:
        GlobalHydra.instance().clear()
