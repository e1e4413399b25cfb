"""MNIST1DDataModule (generated, cached) and ImageFolderDataModule (Pillow, no torchvision)."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nm_lightning.data.mnist1d as mnist1d_mod
from nm_lightning.data import ImageFolderDataModule, MNIST1DDataModule

ROOT = Path(__file__).resolve().parents[1]


def test_mnist1d_generates_splits_and_caches(tmp_path, monkeypatch):
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    dm = MNIST1DDataModule(data_dir=str(tmp_path), num_samples=200, val_fraction=0.25, batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    # make_dataset reseeds the global RNGs; we restore them
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert dm.cache_path.exists() and dm.cache_path.parent == tmp_path
    assert "n200" in dm.cache_path.name and "seed42" in dm.cache_path.name and "split0.8" in dm.cache_path.name
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (120, 40, 40)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(torch.cat([b[1] for b in dm.test_dataloader()]).tolist()) <= set(range(10))
    # train and val are disjoint pieces of the training part
    tr = {tuple(v.tolist()) for v in dm.train_set.tensors[0].flatten(1)}
    va = {tuple(v.tolist()) for v in dm.val_set.tensors[0].flatten(1)}
    assert not tr & va

    # a second module with the same arguments loads the cache instead of regenerating
    def boom(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(mnist1d_mod, "generate_mnist1d", boom)
    dm2 = MNIST1DDataModule(data_dir=str(tmp_path), num_samples=200, val_fraction=0.25, batch_size=16)
    dm2.prepare_data()
    dm2.setup("fit")
    assert torch.equal(dm2.train_set.tensors[0], dm.train_set.tensors[0])
    # other generation arguments -> another file
    assert MNIST1DDataModule(data_dir=str(tmp_path), num_samples=200, seed=7).cache_path != dm.cache_path


def test_mnist1d_seed_changes_data(tmp_path):
    a = mnist1d_mod.generate_mnist1d(100, seed=1)
    b = mnist1d_mod.generate_mnist1d(100, seed=1)
    c = mnist1d_mod.generate_mnist1d(100, seed=2)
    assert a["x"].shape == (80, 40) and a["x_test"].shape == (20, 40)
    assert np.array_equal(a["x"], b["x"]) and not np.array_equal(a["x"], c["x"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 5}, "num_samples"),
        ({"num_samples": "many"}, "num_samples"),
        ({"train_split": 1.5}, "train_split"),
        ({"val_fraction": 0}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_samples": 20, "val_fraction": 0.01}, "empty"),
    ],
)
def test_mnist1d_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNIST1DDataModule(data_dir=str(tmp_path), **kwargs)


def _write_images(root, split, classes, per_class, size, ext):
    for ci, cls in enumerate(classes):
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(per_class):
            value = 255 if ci == 0 else 0
            Image.new("RGB", size, (value, value, value)).save(d / f"img{i}.{ext}")


def test_image_folder_reads_resizes_normalizes(tmp_path):
    _write_images(tmp_path, "train", ["cat", "dog"], 3, (20, 12), "png")
    _write_images(tmp_path, "val", ["cat", "dog"], 2, (7, 9), "jpg")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(str(tmp_path), image_size=[8, 6], batch_size=4, mean=[0.5, 0.5, 0.5],
                               std=[0.25, 0.25, 0.25], hflip=True)
    dm.setup("fit")
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 4, 4)  # no test/ -> val
    xs, ys = zip(*[dm.val_set[i] for i in range(len(dm.val_set))], strict=True)
    x = torch.stack(xs)
    assert x.shape == (4, 3, 8, 6)
    # white (cat) -> (1 - 0.5) / 0.25 = 2, black (dog) -> -2
    for xi, yi in zip(x, ys, strict=True):
        assert torch.allclose(xi, torch.full_like(xi, 2.0 if yi == 0 else -2.0), atol=0.05)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 8, 6) and yb.dtype == torch.int64


def test_image_folder_grayscale_and_test_dir(tmp_path):
    _write_images(tmp_path, "train", ["a", "b", "c"], 1, (5, 5), "png")
    _write_images(tmp_path, "val", ["a", "c"], 1, (5, 5), "png")
    _write_images(tmp_path, "test", ["b"], 2, (5, 5), "png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=4, grayscale=True)
    dm.setup()
    x, y = dm.test_set[0]
    assert x.shape == (1, 4, 4) and y == 1 and len(dm.test_set) == 2
    assert [label for _, label in dm.val_set.samples] == [0, 2]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "nope")).setup()
    _write_images(tmp_path, "train", ["a"], 1, (4, 4), "png")
    _write_images(tmp_path, "val", ["zebra"], 1, (4, 4), "png")
    with pytest.raises(ValueError, match="'zebra'"):
        ImageFolderDataModule(str(tmp_path)).setup()
    with pytest.raises(ValueError, match="mean"):
        ImageFolderDataModule(str(tmp_path), mean=[0.5])
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderDataModule(str(tmp_path), image_size=[8, 8, 8])


def _block(monkeypatch, *modules: str) -> None:
    """Make ``import <module>`` raise ImportError, as on an install without the [apps] extra."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_mnist1d_without_the_package_names_the_extra(tmp_path, monkeypatch):
    cached = MNIST1DDataModule(data_dir=str(tmp_path / "cached"), num_samples=100)
    cached.prepare_data()
    _block(monkeypatch, "mnist1d", "mnist1d.data")
    dm = MNIST1DDataModule(data_dir=str(tmp_path / "fresh"), num_samples=100)
    with pytest.raises(ImportError, match=r"MNIST1DDataModule .*'mnist1d' package.*pip install 'nm-lightning\[apps\]'"):
        dm.prepare_data()
    # a dataset generated earlier is still served from its cache
    again = MNIST1DDataModule(data_dir=str(tmp_path / "cached"), num_samples=100)
    again.prepare_data()
    again.setup("fit")
    assert len(again.train_set) > 0


def test_image_folder_without_pillow_names_the_extra(tmp_path, monkeypatch):
    _write_images(tmp_path, "train", ["a"], 1, (4, 4), "png")
    _write_images(tmp_path, "val", ["a"], 1, (4, 4), "png")
    _block(monkeypatch, "PIL", "PIL.Image")
    with pytest.raises(ImportError, match=r"ImageFolderDataModule needs the 'pillow' package.*nm-lightning\[apps\]"):
        ImageFolderDataModule(str(tmp_path))


def test_library_imports_without_the_apps_extra():
    """`import nm_lightning` (callbacks, export, data and model classes, the apps) works without mnist1d.

    Only mnist1d is blocked: torchmetrics imports scipy and matplotlib (hence Pillow) whenever they are
    installed, so blocking those here would test torchmetrics. That the data modules import mnist1d and
    Pillow only when used, and say which extra to install, is tested above with those imports failing."""
    code = (
        "import sys\n"
        "blocked = ('mnist1d',)\n"
        "sys.modules.update(dict.fromkeys(blocked))  # None: `import mnist1d` raises ImportError\n"
        "import nm_lightning, nm_lightning.export, nm_lightning.data, nm_lightning.models, nm_lightning.cli\n"
        "import nm_lightning.train\n"
        "print(sorted(m for m, v in sys.modules.items() if m.split('.')[0] in blocked and v is not None))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_pyproject_keeps_app_dependencies_in_the_apps_extra():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(reqs):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}

    core, extras = names(project["dependencies"]), project["optional-dependencies"]
    assert not core & {"mnist1d", "pillow", "scipy", "requests"}, core
    assert {"mnist1d", "pillow"} <= names(extras["apps"])
    assert "transformers" in names(extras["test"]) and "nm-lightning[apps]" in extras["test"]
    torch_req = next(r for r in project["dependencies"] if names([r]) == {"torch"})
    assert ">=" in torch_req and "==" not in torch_req, torch_req  # a range, not a pin
