"""``export_artifacts``: write the inference exports at the end of training (rank 0, barriers around I/O)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nm_lightning.export._util import atomic_write, current_umask, dtype_name, nm_infos, sha256_file, write_error
from nm_lightning.export.dense import dense_state_dict, save_dense
from nm_lightning.export.packed import FORMAT as PACKED_FORMAT
from nm_lightning.export.packed import VERSION as PACKED_VERSION
from nm_lightning.export.packed import save_packed
from nm_lightning.export.semi_structured import FORMAT as SEMI_FORMAT
from nm_lightning.export.semi_structured import VERSION as SEMI_VERSION
from nm_lightning.export.semi_structured import save_semi_structured

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "export_artifacts",
    "write_artifacts",
    "check_export_destination",
    "check_formats",
    "FORMATS",
    "FILE_NAMES",
]

FORMATS = ("dense", "packed", "semi_structured")
FILE_NAMES = {"dense": "model_dense.pt", "packed": "model_packed.pt", "semi_structured": "model_2to4_cutlass.pt"}
METADATA = "scheme.json"


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"export formats must be a non-empty subset of {FORMATS}, got {list(formats)!r}")
    return tuple(dict.fromkeys(formats))


def _own_names(out: Path, extra_files: Mapping[str, Any]) -> set[str]:
    """The entries an export directory may hold: ours, and those a previous export listed in its scheme.json."""
    names = {METADATA, *FILE_NAMES.values(), *extra_files}
    try:
        old = json.loads((out / METADATA).read_text(encoding="utf-8"))
        names |= {str(f.get("file")) for f in old.get("files", {}).values() if isinstance(f, dict)}
        names |= {str(f) for f in old.get("extra_files", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no previous export, or not ours: only the default names count
    return names


def check_export_destination(out_dir: str | Path, extra_files: Mapping[str, Any] | Sequence[str] = ()) -> None:
    """Raise now what :func:`write_artifacts` would refuse for ``out_dir`` (e.g. at setup, before training).

    ``ValueError`` for a destination that is not a directory, is the working directory (or a parent of
    it), or holds entries that are not part of an export; ``OSError`` naming the path when the folder
    that will hold the export cannot be created or written.
    """
    names = dict.fromkeys(extra_files) if not isinstance(extra_files, Mapping) else extra_files
    out = Path(out_dir)
    _check_destination(out, names)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(parent, err, "create the folder for the export") from err
    if not os.access(parent, os.W_OK | os.X_OK):
        raise write_error(out, OSError(errno.EACCES, os.strerror(errno.EACCES)), "write the export next to")


def _check_destination(out: Path, extra_files: Mapping[str, Any]) -> None:
    """Refuse a destination that is not a directory of a previous export (it is replaced as a whole)."""
    for name in extra_files:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"extra_files names must be plain file names, got {name!r}")
        if name in (METADATA, *FILE_NAMES.values()):
            raise ValueError(f"extra_files name {name!r} is one of the export's own files")
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(
            f"export dir {out} is the working directory or one of its parents; the export replaces its "
            "directory as a whole: give a directory of its own (e.g. 'export')"
        )
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise ValueError(f"export dir {out} exists and is not a directory")
    try:
        entries = set(os.listdir(out))
    except OSError as err:
        raise write_error(out, err, "read the export dir") from err
    own = _own_names(out, extra_files)
    # a temporary file an interrupted atomic write of ours left behind (".<name>.<hex>.tmp")
    leftovers = {e for e in entries if e.endswith(".tmp") and any(e.startswith(f".{n}.") for n in own)}
    foreign = sorted(entries - own - leftovers)
    if foreign:
        raise ValueError(
            f"export dir {out} holds entries that are not part of an nm_lightning export: {foreign[:10]}"
            f"{' ...' if len(foreign) > 10 else ''}; the export replaces the directory as a whole, so give "
            "a new or empty directory (or move those entries)"
        )


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # an old kernel or a file system without exchange: fall back to two renames
    raise OSError(code, f"cannot move the new export into place at {b}: {os.strerror(code)}", str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is swapped out atomically where the OS allows, then removed."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous export
        return
    old = out.parent / f".{out.name}.{secrets.token_hex(6)}.old"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _extra_bytes(name: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")


def write_artifacts(
    model: torch.nn.Module,
    out_dir: str | Path,
    formats: Sequence[str] = FORMATS,
    *,
    semi_structured_dtype: torch.dtype = torch.float16,
    extra: dict[str, Any] | None = None,
    extra_files: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the requested files and ``scheme.json`` into ``out_dir`` as one unit (no distributed logic).

    Everything (the model files, ``extra_files`` — ``{name: str | bytes | JSON-able}``, e.g. a run summary
    — and ``scheme.json`` last) is written into a temporary sibling directory, which is then renamed to
    ``out_dir``. An existing export there is replaced atomically where the OS allows it (Linux
    ``renameat2`` exchange; elsewhere two renames, the old export restored if the second fails). So
    ``out_dir`` holds either the previous export or the complete new one, never a partial one, also on a
    full or read-only disk; a failure removes the temporary directory and raises an ``OSError`` naming
    the path. Files and the directory get the modes the umask gives (like ``torch.save`` and ``mkdir``).
    ``out_dir`` must be new, empty, or a previous export (other entries are refused before anything is
    written: the directory is replaced as a whole).

    ``scheme.json``: ``{"format": "nm_lightning.export", "version": 1, "torch", **extra, "layers": {layer
    name: {"key", "n", "m", "layout", "shape", "dtype", "sparsity"}}, "files": {format: {"file",
    "bytes", "sha256", ...}}, "extra_files": [...]}``; layer names are the callbacks' (``"fc1"``,
    ``"attn.in_proj_weight"``), so ``NMScheme.load`` reads n and m from ``"layers"``.
    """
    formats = check_formats(formats)
    extra_files = dict(extra_files or {})
    out = Path(out_dir)
    _check_destination(out, extra_files)
    sd = model.state_dict()
    plain = dense_state_dict(sd)
    layers: dict[str, Any] = {}
    for key, info in nm_infos(sd).items():
        w = plain[key]
        layers[info.name] = {
            "key": key,
            "n": info.n,
            "m": info.m,
            "layout": info.layout,
            "shape": list(w.shape),
            "dtype": dtype_name(w.dtype),
            "sparsity": 1.0 - float((w != 0).sum()) / max(1, w.numel()),
        }
    meta: dict[str, Any] = {"format": "nm_lightning.export", "version": 1, "torch": torch.__version__}
    meta.update(extra or {})
    meta["layers"] = layers

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        raise write_error(out, err, "create a temporary directory next to the export") from err
    current = out / METADATA
    try:
        files: dict[str, Any] = {}
        for fmt in formats:
            current = out / FILE_NAMES[fmt]
            path = tmp / FILE_NAMES[fmt]
            info: dict[str, Any] = {}
            if fmt == "dense":
                save_dense(plain, path)
            elif fmt == "packed":
                save_packed(sd, path)
                info = {"format": PACKED_FORMAT, "version": PACKED_VERSION}
            else:
                skipped = save_semi_structured(sd, path, dtype=semi_structured_dtype)
                info = {
                    "format": SEMI_FORMAT,
                    "version": SEMI_VERSION,
                    "dtype": dtype_name(semi_structured_dtype),
                    "dense_layers": skipped,
                }
            files[fmt] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), **info}
        if "dense" in files and "packed" in files:
            meta["packed_over_dense"] = files["packed"]["bytes"] / files["dense"]["bytes"]
        meta["files"] = files
        for name, value in extra_files.items():
            current = out / name
            data = _extra_bytes(name, value)
            atomic_write(tmp / name, lambda f, d=data: f.write(d))
        if extra_files:
            meta["extra_files"] = sorted(extra_files)
        current = out / METADATA
        text = json.dumps(meta, indent=2, sort_keys=False) + "\n"
        atomic_write(tmp / METADATA, lambda f: f.write(text.encode("utf-8")))
        current = out
        os.chmod(tmp, 0o777 & ~current_umask())
        _fsync_dir(tmp)
        _move_into_place(tmp, out)
        _fsync_dir(out.parent)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        root: BaseException = err
        while root.__cause__ is not None:
            root = root.__cause__
        detail = root.strerror if isinstance(root, OSError) and root.strerror else f"{type(root).__name__}: {root}"
        new = OSError(
            err.errno if isinstance(err, OSError) and err.errno else errno.EIO,
            f"cannot write the export {out}: writing {current.name}: {detail} (left unchanged: {out})",
        )
        new.filename = str(current)
        raise new from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def export_artifacts(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    out_dir: str | Path,
    formats: Sequence[str] = FORMATS,
    *,
    extra: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any] | None:
    """Call from ``on_fit_end`` (or ``on_test_end``): rank 0 writes :func:`write_artifacts`; every rank waits at
    barriers. The metadata holds the global step and epoch, plus the caller's ``extra``.

    Returns the metadata on global rank 0 and ``None`` elsewhere. All ranks must call it (it issues
    two ``trainer.strategy.barrier()`` collectives).
    """
    formats = check_formats(formats)  # fail the same way on every rank, before any collective
    trainer.strategy.barrier("nm_lightning_export_start")
    meta = None
    try:
        if trainer.is_global_zero:
            info = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch), **(extra or {})}
            meta = write_artifacts(pl_module, out_dir, formats, extra=info, **kwargs)
    finally:
        trainer.strategy.barrier("nm_lightning_export_end")
    return meta
