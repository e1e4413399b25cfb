"""A sharded checkpoint folder is checked before anything in it is unpickled.

Under ``ModelParallelStrategy(save_distributed_checkpoint=True)`` Lightning resumes from a folder written by
``torch.distributed.checkpoint`` (DCP). DCP reads the folder's ``.metadata`` with plain ``pickle.load`` and every
non-tensor entry (the N:M state is one) with ``torch.load(weights_only=False)``: a crafted folder runs code on
every rank. :func:`check_sharded_folder` reads ``.metadata`` with an unpickler that only builds DCP's own metadata
records (any other global is refused unexecuted), checks every storage record (a plain file name inside the folder,
offset and length inside that file, no stream transforms), and loads every non-tensor entry with
``torch.load(weights_only=True)``. :func:`guard_checkpoint_loading` makes a strategy run that check before its own
``load_checkpoint`` touches a folder.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePath
from typing import Any

import torch
from lightning.pytorch.strategies import Strategy

__all__ = ["UnsafeCheckpointError", "check_sharded_folder", "guard_checkpoint_loading"]

MAX_METADATA_BYTES = 256 << 20  # a folder's .metadata above this is refused before it is read
MAX_ENTRY_BYTES = 64 << 20  # a non-tensor entry above this is refused before it is read

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_NAMES = frozenset({
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "ChunkStorageMetadata",
    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING", "_StorageInfo",
})  # fmt: skip
_OTHER = frozenset({
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
})  # fmt: skip


class UnsafeCheckpointError(ValueError):
    """A checkpoint folder that cannot be read without running or trusting what it holds."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records, ``torch.Size``, dtypes and paths; refuses every other global unexecuted."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES and name in _DCP_NAMES:
            return super().find_class(module, name)
        if (module, name) in _OTHER:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of a checkpoint's metadata")


def _read_metadata(folder: Path) -> Any:
    path = folder / ".metadata"
    if not path.is_file():
        raise UnsafeCheckpointError(f"{folder}: not a sharded checkpoint folder (no .metadata file)")
    size = path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise UnsafeCheckpointError(f"{path}: {size} bytes, more than the {MAX_METADATA_BYTES} allowed for metadata")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as err:  # a pickle with code, a truncated file, garbage
        raise UnsafeCheckpointError(
            f"{path}: refused before anything in it ran: {type(err).__name__}: {err}"
        ) from None
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
    if not isinstance(metadata.storage_data, dict):
        raise UnsafeCheckpointError(f"{path}: its storage records are a {type(metadata.storage_data).__name__}")
    return metadata, BytesStorageMetadata


def check_sharded_folder(folder: str | Path) -> None:
    """Check a ``torch.distributed.checkpoint`` folder without executing anything in it (see the module docstring);
    raises :class:`UnsafeCheckpointError` naming the file and the entry."""
    folder = Path(folder)
    metadata, bytes_type = _read_metadata(folder)
    files: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        fqn = getattr(index, "fqn", index)
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(rel, str) or PurePath(rel).name != rel or rel in ("", ".", ".."):
            raise UnsafeCheckpointError(f"{folder}: entry {fqn!r} points outside the folder ({rel!r})")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
            raise UnsafeCheckpointError(f"{folder}: entry {fqn!r} has offset {offset!r} and length {length!r}")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(
                f"{folder}: entry {fqn!r} is stored through transforms {info.transform_descriptors!r}, not supported"
            )
        if rel not in files:
            target = folder / rel
            if target.is_symlink() or not target.is_file():
                raise UnsafeCheckpointError(f"{folder}: entry {fqn!r} is in {rel!r}, which is not a regular file")
            files[rel] = target.stat().st_size
        if offset + length > files[rel]:
            raise UnsafeCheckpointError(
                f"{folder}: entry {fqn!r} claims bytes {offset}..{offset + length} of {rel!r}, which has {files[rel]}"
            )
        if isinstance(metadata.state_dict_metadata.get(fqn), bytes_type):
            if length > MAX_ENTRY_BYTES:
                raise UnsafeCheckpointError(
                    f"{folder}: entry {fqn!r} claims {length} bytes (at most {MAX_ENTRY_BYTES})"
                )
            with open(folder / rel, "rb") as f:
                f.seek(offset)
                blob = f.read(length)
            try:
                torch.load(io.BytesIO(blob), weights_only=True)
            except Exception as err:
                raise UnsafeCheckpointError(
                    f"{folder}: entry {fqn!r} is not a plain value (refused before it ran): {type(err).__name__}: "
                    f"{str(err)[:300]}"
                ) from None


def guard_checkpoint_loading(strategy: Strategy) -> None:
    """Make ``strategy.load_checkpoint`` check a folder with :func:`check_sharded_folder` first (once per strategy;
    files go to the strategy unchanged: Lightning loads them with ``torch.load``)."""
    inner = strategy.load_checkpoint
    if getattr(inner, "_nm_guarded", False):
        return

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(checkpoint_path).is_dir():
            check_sharded_folder(checkpoint_path)
        return inner(checkpoint_path, *args, **kwargs)

    load_checkpoint._nm_guarded = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]
