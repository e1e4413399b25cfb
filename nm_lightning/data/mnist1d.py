"""MNIST-1D (Greydanus, 2020) generated locally with the ``mnist1d`` package and cached as ``.npz``."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from nm_lightning.data.base import SplitDataModule, require_app_module

__all__ = ["MNIST1DDataModule", "DEFAULT_DATA_DIR", "generate_mnist1d"]

DEFAULT_DATA_DIR = "~/.cache/nm_lightning/data"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MNIST1DDataModule {name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"MNIST1DDataModule {name} must be a float in (0, 1), got {value!r}")
    return float(value)


def generate_mnist1d(num_samples: int = 5000, train_split: float = 0.8, seed: int = 42,
                     shuffle_seq: bool = False) -> dict[str, np.ndarray]:
    """Generate MNIST-1D with ``mnist1d.data.make_dataset`` (never its download path).

    Returns ``x``/``y`` (train) and ``x_test``/``y_test`` as float32 ``[N, 40]`` and int64 ``[N]`` arrays.
    Needs the ``mnist1d`` package (the ``[apps]`` extra); without it raises ``ImportError`` saying so. A
    cached dataset is loaded without it.
    The global ``random``/``numpy`` RNG states, which ``make_dataset`` reseeds, are restored afterwards.
    """
    mnist1d_data = require_app_module("mnist1d.data", "MNIST1DDataModule (generating MNIST-1D)", "mnist1d")
    args = mnist1d_data.get_dataset_args()
    args.num_samples, args.train_split, args.seed, args.shuffle_seq = num_samples, train_split, seed, shuffle_seq
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = mnist1d_data.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float32), "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32), "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


class MNIST1DDataModule(SplitDataModule):
    """MNIST-1D: 10 classes of 40-sample 1-D signals, batches of ``[B, 1, 40]`` float32 and ``[B]`` labels.

    The data are generated with ``mnist1d.data.make_dataset`` (no download) in :meth:`prepare_data` and
    cached under ``data_dir`` in a file whose name holds the generation arguments and seed, so later runs
    (and the other DDP ranks) just load it. ``num_samples`` is split ``train_split`` / ``1 - train_split``
    into train and test as in the package (default 5000 -> 4000 train + 1000 test, the original dataset);
    ``val_fraction`` of the training part becomes the validation set (a fixed, ``split_seed``-ed split).

    Args:
        data_dir: cache directory for the generated arrays (``~`` is expanded).
        num_samples: total number of samples generated (train + test); a multiple of 10 is used per class.
        train_split: share of ``num_samples`` used for training (+ validation); the rest is the test set.
        val_fraction: share of the training part held out for validation.
        seed: generation seed passed to ``make_dataset``.
        split_seed: seed of the train/validation split.
        shuffle_seq: ``mnist1d``'s option to permute the time axis (the "shuffled" MNIST-1D variant).
        batch_size: batch size of all loaders.
        num_workers: DataLoader workers.
        pin_memory: DataLoader ``pin_memory``.
    """

    num_classes = 10
    input_shape = (1, 40)

    train_set: TensorDataset | None
    val_set: TensorDataset | None
    test_set: TensorDataset | None

    def __init__(
        self,
        data_dir: str = DEFAULT_DATA_DIR,
        num_samples: int = 5000,
        train_split: float = 0.8,
        val_fraction: float = 0.1,
        seed: int = 42,
        split_seed: int = 0,
        shuffle_seq: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.num_samples = _check_int("num_samples", num_samples, 20)
        self.train_split = _check_fraction("train_split", train_split)
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.seed = _check_int("seed", seed, 0)
        self.split_seed = _check_int("split_seed", split_seed, 0)
        self.shuffle_seq = bool(shuffle_seq)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.pin_memory = bool(pin_memory)
        self.data_dir = str(data_dir)
        n_total = (self.num_samples // 10) * 10
        n_train = int(n_total * self.train_split)
        n_val = int(n_train * self.val_fraction)
        if min(n_total - n_train, n_val, n_train - n_val) < 1:
            raise ValueError(
                f"MNIST1DDataModule num_samples={num_samples} with train_split={train_split} and "
                f"val_fraction={val_fraction} leaves an empty train, val or test set"
            )
        self.save_hyperparameters()

    @property
    def generation_args(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "train_split": self.train_split, "seed": self.seed,
                "shuffle_seq": self.shuffle_seq, "final_seq_length": 40}

    @property
    def cache_path(self) -> Path:
        """``<data_dir>/mnist1d_n<num_samples>_split<train_split>_seed<seed>[_shuffled]_<hash>.npz``."""
        args = self.generation_args
        digest = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:8]
        shuffled = "_shuffled" if self.shuffle_seq else ""
        name = f"mnist1d_n{self.num_samples}_split{self.train_split:g}_seed{self.seed}{shuffled}_{digest}.npz"
        return Path(os.path.expanduser(self.data_dir)) / name

    def prepare_data(self) -> None:
        """Generate and cache the arrays once (rank 0 only under DDP)."""
        path = self.cache_path
        if path.exists():
            return
        data = generate_mnist1d(self.num_samples, self.train_split, self.seed, self.shuffle_seq)
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic write: concurrent runs (multirun, DDP) never see a half-written file
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez(tmp, **data, args=json.dumps(self.generation_args))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_arrays(self) -> dict[str, np.ndarray]:
        if not self.cache_path.exists():
            self.prepare_data()
        with np.load(self.cache_path) as f:
            return {k: f[k] for k in ("x", "y", "x_test", "y_test")}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = self.load_arrays()
        x = torch.from_numpy(data["x"]).unsqueeze(1)
        y = torch.from_numpy(data["y"])
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(len(y) * self.val_fraction)
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(torch.from_numpy(data["x_test"]).unsqueeze(1), torch.from_numpy(data["y_test"]))
