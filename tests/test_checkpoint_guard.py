"""Sharded checkpoint folders (torch.distributed.checkpoint, ``save_distributed_checkpoint=True``) are checked
before anything in them is unpickled: DCP itself reads ``.metadata`` with ``pickle.load`` and non-tensor entries
with ``torch.load(weights_only=False)``."""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from nm_lightning.callbacks.checkpoint_guard import (
    UnsafeCheckpointError,
    check_sharded_folder,
    guard_checkpoint_loading,
)


def _save(folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    extra = {"n": 2, "m": 4, "frozen": False}
    state = {"state_dict": {"w": torch.randn(4, 8), "m": torch.ones(4, 8, dtype=torch.bool),
                            "fc.parametrizations.weight.0._extra_state": extra}}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)


class _Boom:
    """Unpickling it would create the marker file (what an attacker's payload would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "sharded.ckpt"
    _save(path)
    return path


def test_a_real_folder_passes(folder):
    check_sharded_folder(folder)


def test_malicious_metadata_is_refused_unexecuted(folder, tmp_path):
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused before anything in it ran.*os\.makedirs"):
        check_sharded_folder(folder)
    assert not marker.exists()


def test_malicious_entry_is_refused_unexecuted(folder, tmp_path):
    """The N:M state is a non-tensor entry: DCP would torch.load it with weights_only=False."""
    from torch.distributed.checkpoint import FileSystemReader

    marker = tmp_path / "pwned"
    meta = FileSystemReader(str(folder)).read_metadata()
    key = next(k for k in meta.storage_data if "_extra_state" in k.fqn)  # DCP flattens the dict: one entry a key
    info = meta.storage_data[key]
    buf = io.BytesIO()
    torch.save({"n": _Boom(marker)}, buf)
    payload = buf.getvalue()
    data = (folder / info.relative_path).read_bytes()
    # append the payload and point the entry at it (a consistent, crafted folder)
    (folder / info.relative_path).write_bytes(data + payload)
    meta.storage_data[key] = type(info)(info.relative_path, len(data), len(payload), info.transform_descriptors)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UnsafeCheckpointError, match=r"_extra_state\.\w+' is not a plain value \(refused before it"):
        check_sharded_folder(folder)
    assert not marker.exists()


def test_truncated_metadata(folder):
    data = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused"):
        check_sharded_folder(folder)


def _rewrite(folder: Path, change) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata()
    key = next(k for k in meta.storage_data if k.fqn.endswith(".w"))
    info = meta.storage_data[key]
    meta.storage_data[key] = type(info)(*change(info))
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def test_huge_claims_and_paths_outside_the_folder(folder):
    _rewrite(folder, lambda i: (i.relative_path, i.offset, 1 << 40, i.transform_descriptors))
    with pytest.raises(UnsafeCheckpointError, match=r"entry 'state_dict\.w' claims bytes .* which has"):
        check_sharded_folder(folder)
    _rewrite(folder, lambda i: ("../outside.distcp", 0, 8, i.transform_descriptors))
    with pytest.raises(UnsafeCheckpointError, match=r"points outside the folder \('\.\./outside\.distcp'\)"):
        check_sharded_folder(folder)
    _rewrite(folder, lambda i: ("__0_0.distcp", -1, 8, i.transform_descriptors))
    with pytest.raises(UnsafeCheckpointError, match=r"offset -1"):
        check_sharded_folder(folder)
    _rewrite(folder, lambda i: ("__0_0.distcp", 0, 8, ["zstd"]))
    with pytest.raises(UnsafeCheckpointError, match=r"through transforms"):
        check_sharded_folder(folder)


def test_not_a_folder_or_not_metadata(tmp_path):
    with pytest.raises(UnsafeCheckpointError, match=r"no \.metadata file"):
        check_sharded_folder(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeCheckpointError, match=r"holds a dict, not checkpoint metadata"):
        check_sharded_folder(tmp_path)


def test_the_strategy_checks_a_folder_before_its_own_loader(folder, tmp_path):
    """Installed by the N:M callbacks under ModelParallelStrategy: a bad folder never reaches the strategy's
    loader; files and good folders do, unchanged; installing twice wraps once."""
    calls = []

    class FakeStrategy:
        def load_checkpoint(self, path, weights_only=None):
            calls.append(Path(path))
            return {}

    strategy = FakeStrategy()
    guard_checkpoint_loading(strategy)
    guard_checkpoint_loading(strategy)
    strategy.load_checkpoint(folder, weights_only=True)
    file = tmp_path / "full.ckpt"
    file.write_bytes(b"x")
    strategy.load_checkpoint(file)
    assert calls == [folder, file]
    (folder / ".metadata").write_bytes(pickle.dumps(_Boom(tmp_path / "pwned")))
    with pytest.raises(UnsafeCheckpointError):
        strategy.load_checkpoint(folder)
    assert calls == [folder, file] and not (tmp_path / "pwned").exists()
