"""``export_artifacts``: write the inference exports at the end of training (rank 0, barriers around I/O)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nm_lightning.export._util import dtype_name, nm_infos, sha256_file
from nm_lightning.export.dense import dense_state_dict, save_dense
from nm_lightning.export.packed import save_packed
from nm_lightning.export.semi_structured import save_semi_structured

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["export_artifacts", "write_artifacts", "check_formats", "FORMATS", "FILE_NAMES"]

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


def write_artifacts(
    model: torch.nn.Module,
    out_dir: str | Path,
    formats: Sequence[str] = FORMATS,
    *,
    semi_structured_dtype: torch.dtype = torch.float16,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the requested files and ``scheme.json`` into ``out_dir`` (no distributed logic); return the metadata.

    ``scheme.json`` holds per-layer n, m, layout, shape, dtype and measured sparsity, and per file its
    name, size and sha256 (plus ``extra``, e.g. the global step).
    """
    formats = check_formats(formats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    files: dict[str, Any] = {}
    for fmt in formats:
        path = out / FILE_NAMES[fmt]
        info: dict[str, Any] = {}
        if fmt == "dense":
            save_dense(plain, path)
        elif fmt == "packed":
            save_packed(sd, path)
        else:
            skipped = save_semi_structured(sd, path, dtype=semi_structured_dtype)
            info = {"dtype": dtype_name(semi_structured_dtype), "dense_layers": skipped}
        files[fmt] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), **info}
    if "dense" in files and "packed" in files:
        meta["packed_over_dense"] = files["packed"]["bytes"] / files["dense"]["bytes"]
    meta["files"] = files
    tmp = out / f".{METADATA}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(out / METADATA)
    return meta


def export_artifacts(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    out_dir: str | Path,
    formats: Sequence[str] = FORMATS,
    **kwargs: Any,
) -> dict[str, Any] | None:
    """Call from ``on_fit_end``: rank 0 writes :func:`write_artifacts`; every rank waits at barriers.

    Returns the metadata on global rank 0 and ``None`` elsewhere. All ranks must call it (it issues
    two ``trainer.strategy.barrier()`` collectives).
    """
    formats = check_formats(formats)  # fail the same way on every rank, before any collective
    trainer.strategy.barrier("nm_lightning_export_start")
    meta = None
    try:
        if trainer.is_global_zero:
            extra = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
            meta = write_artifacts(pl_module, out_dir, formats, extra=extra, **kwargs)
    finally:
        trainer.strategy.barrier("nm_lightning_export_end")
    return meta
