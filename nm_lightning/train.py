"""``nm-train``: the Hydra training app (configs in :mod:`nm_lightning.conf`).

With no arguments it trains a 1-D CNN on MNIST-1D with SR-STE 2:4 on the CPU, tests the sparse model,
prints a per-layer N:M report and writes, into Hydra's run directory, ``checkpoints/last.ckpt`` (the state
the run ended with, written at every epoch end: resume from it with ``ckpt_path=...``), the best
checkpoint by ``val/acc``, CSV logs and, through :func:`nm_lightning.export.write_artifacts`,
``export/model_dense.pt`` (the LightningModule's plain state dict with the N:M zeros, loadable with
``weights_only=True`` and ``strict=True``), ``export/model_packed.pt``, ``export/model_2to4_cutlass.pt``
and ``export/scheme.json`` (per-layer n:m and measured sparsity, reusable as ``sparsity.scheme=...``,
plus the test metrics). Checkpoints are only ever loaded with ``weights_only=True``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from nm_lightning.callbacks.last_checkpoint import LastCheckpoint
from nm_lightning.callbacks.model_parallel import export_gathered
from nm_lightning.export.artifacts import FILE_NAMES, FORMATS, METADATA, check_formats
from nm_lightning.masks import nm_mask
from nm_lightning.scheme import NMScheme
from nm_lightning.sparsify import sparse_layers

__all__ = [
    "CONFIG_DIR", "ExportCallback", "check_checkpoint", "export_rows", "instantiate_group", "main", "print_report",
    "run", "run_search", "sparsity_rows",
]  # fmt: skip

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def _has_tensorboard() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def instantiate_group(node: Any, what: str) -> list[Any]:
    """Instantiate a config node that is one object (has ``_target_``) or a mapping of named objects.

    ``None``/empty gives ``[]``; entries set to ``null`` are skipped; anything else is an error naming the key.
    """
    if node is None:
        return []
    if not isinstance(node, (DictConfig, Mapping)):
        raise TypeError(f"config '{what}' must be a mapping with _target_ or of named entries, got {node!r}")
    if "_target_" in node:
        return [hydra.utils.instantiate(node)]
    out = []
    for key, value in node.items():
        if value is None:
            continue
        if not isinstance(value, (DictConfig, Mapping)) or "_target_" not in value:
            raise TypeError(f"config '{what}.{key}' must have a _target_, got {value!r}")
        if what == "logger" and str(value["_target_"]).endswith("TensorBoardLogger") and not _has_tensorboard():
            rank_zero_info(f"nm-train: skipping logger '{key}' (pip install tensorboard to enable it)")
            continue
        out.append(hydra.utils.instantiate(value))
    return out


def sparsity_rows(model: nn.Module) -> list[dict[str, Any]]:
    """Per N:M layer of ``model``: n, m, layout, shape, params, nonzeros, measured sparsity and N:M check."""
    rows = []
    for name, layer in sparse_layers(model).items():
        sp = layer.sparsity
        w = layer.effective().detach().cpu()
        nonzero = int((w != 0).sum())
        # every group of m holds at most n nonzeros <=> nothing outside the top-n mask is nonzero
        ok = not bool(((w != 0) & ~nm_mask(w, sp.n, sp.m, sp.layout)).any())
        rows.append({
            "layer": name, "type": type(layer.module).__name__.replace("Parametrized", ""), "n": sp.n, "m": sp.m,
            "layout": sp.layout, "shape": list(w.shape), "params": w.numel(), "nonzero": nonzero,
            "sparsity": 1.0 - nonzero / w.numel(), "nm_ok": ok, "frozen": bool(sp.frozen),
        })
    return rows


def _metrics(trainer: pl.Trainer, prefixes: tuple[str, ...] | None = None) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()
            if v.numel() == 1 and (prefixes is None or k.split("/")[0] in prefixes)}


class ExportCallback(Callback):
    """Write the export through :func:`nm_lightning.export.export_artifacts` at the end of ``test`` (or of ``fit``
    when not testing): global rank 0 writes, every rank waits at barriers around it; under
    ``ModelParallelStrategy`` (FSDP2) the full weights are gathered to rank 0 first.

    The LightningModule itself is exported, so layer names (``net.features.3``) and the keys of
    ``model_dense.pt`` (``net.features.3.weight``) are those of the sparsity callback and of the module:
    ``scheme.json`` can be passed back as ``sparsity.scheme=...`` and ``model_dense.pt`` loads with
    ``weights_only=True``/``strict=True`` into the never-sparsified module. ``scheme.json`` also holds the
    test/val metrics, ``total_params``, the global step and epoch, and ``extra``. Running as a callback
    puts the export inside the training processes, so it also sees the sparsified model under
    ``ddp_spawn`` (where the launching process never attaches the N:M parametrizations).
    """

    def __init__(self, out_dir: str | Path, extra: Mapping[str, Any] | None = None, stage: str = "test",
                 formats: Sequence[str] = FORMATS) -> None:
        if stage not in ("test", "fit"):
            raise ValueError(f"ExportCallback stage must be 'test' or 'fit', got {stage!r}")
        self.out_dir, self.extra, self.stage = Path(out_dir), dict(extra or {}), stage
        self.formats = check_formats(list(formats))
        self.meta: dict[str, Any] | None = None

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        extra = {
            "metrics": _metrics(trainer, ("test", "val")),
            "total_params": sum(p.numel() for p in pl_module.parameters()), **self.extra,
        }  # fmt: skip
        # under ModelParallelStrategy (FSDP2) the full weights are gathered to rank 0 first
        self.meta = export_gathered(trainer, pl_module, self.out_dir, self.formats, extra=extra)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage == "test":
            self._export(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage == "fit":
            self._export(trainer, pl_module)


def export_rows(export_dir: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Report rows (as :func:`sparsity_rows`) for the N:M layers in ``<export_dir>/scheme.json``, checked on
    the written ``model_dense.pt`` (loaded with ``weights_only=True``), and the model's total parameters.

    Without a dense file the N:M check is ``None`` and the nonzero counts come from ``scheme.json``.
    """
    export_dir = Path(export_dir)
    meta = json.loads((export_dir / METADATA).read_text(encoding="utf-8"))
    dense_file = (meta.get("files") or {}).get("dense", {}).get("file")
    state = torch.load(export_dir / dense_file, map_location="cpu", weights_only=True) if dense_file else None
    rows = []
    for name, layer in meta["layers"].items():
        params = math.prod(layer["shape"])
        nonzero, ok = round(params * (1.0 - layer["sparsity"])), None
        if state is not None:
            w = state[layer["key"]]
            nonzero = int((w != 0).sum())
            ok = not bool(((w != 0) & ~nm_mask(w, layer["n"], layer["m"], layer["layout"])).any())
        rows.append({"layer": name, "n": layer["n"], "m": layer["m"], "layout": layer["layout"],
                     "shape": layer["shape"], "params": params, "nonzero": nonzero,
                     "sparsity": 1.0 - nonzero / params, "nm_ok": ok})
    return rows, int(meta.get("total_params") or sum(v.numel() for v in (state or {}).values()))


def print_report(rows: Sequence[Mapping[str, Any]], total_params: int, metrics: Mapping[str, float],
                 paths: Mapping[str, Any], seconds: float) -> None:
    """Rich table of the N:M layers (:func:`sparsity_rows` / :func:`export_rows`), the test accuracy and the
    output files."""
    console = Console(width=None if sys.stdout.isatty() else 140)
    table = Table(title="N:M sparse model", title_justify="left")
    for col, just in [("layer", "left"), ("shape", "left"), ("n:m", "right"), ("params", "right"),
                      ("nonzero", "right"), ("sparsity", "right"), ("N:M check", "center")]:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        check = "-" if r["nm_ok"] is None else "[green]ok[/]" if r["nm_ok"] else "[red]FAIL[/]"
        table.add_row(r["layer"], "x".join(map(str, r["shape"])), f"{r['n']}:{r['m']}", f"{r['params']:,}",
                      f"{r['nonzero']:,}", f"{r['sparsity']:.1%}", check)
    covered = sum(r["params"] for r in rows)
    zeros = sum(r["params"] - r["nonzero"] for r in rows)
    if rows:
        table.caption = (f"N:M layers hold {covered:,} of {total_params:,} parameters ({covered / total_params:.1%}); "
                         f"{zeros:,} are zero: {zeros / covered:.1%} of those layers, {zeros / total_params:.1%} "
                         "of the model")
        console.print(table)
    else:
        console.print(f"[bold]Dense model[/] (no N:M layers): {total_params:,} parameters")
    for key in ("test/acc", "test/loss", "val/acc"):
        if key in metrics and not math.isnan(metrics[key]):
            value = f"{metrics[key]:.2%}" if key.endswith("acc") else f"{metrics[key]:.4f}"
            console.print(f"[bold]{key}[/]: {value}")
    console.print(f"time: {seconds:.1f} s")
    for label, path in paths.items():
        console.print(f"{label}: {path}", soft_wrap=True)


def run_search(cfg: DictConfig, datamodule: pl.LightningDataModule, out_dir: Path) -> tuple[Path, Path]:
    """The DominoSearch phase of ``experiment=domino_then_finetune``: returns (scheme file, dense weights).

    ``cfg.search``: ``pretrain_epochs`` of dense training with the normal recipe (0 = start from the model as
    built, e.g. with pretrained weights), then a search fit with ``model`` overrides (the paper: constant lr
    0.01, no momentum, no weight decay) and the ``callback`` (a ``DominoSearchCallback``) for at most
    ``max_epochs``. The fine-tune then restarts from the dense weights the search started from.
    """
    search = cfg.search
    search_dir = out_dir / "search"
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model)
    trainer_cfg = {"logger": False, "enable_checkpointing": False, "default_root_dir": str(search_dir)}
    if search.get("pretrain_epochs", 0):
        pre = hydra.utils.instantiate(cfg.trainer, max_epochs=search.pretrain_epochs, max_steps=-1, **trainer_cfg)
        pre.fit(model, datamodule=datamodule)
    search_model_cfg = OmegaConf.merge(cfg.model, search.get("model") or {})
    search_model: pl.LightningModule = hydra.utils.instantiate(search_model_cfg)
    search_model.load_state_dict(model.state_dict(), strict=True)
    callback = hydra.utils.instantiate(search.callback, output=str(search_dir / "scheme.txt"))
    from nm_lightning.callbacks.domino import DominoSearchCallback

    if not isinstance(callback, DominoSearchCallback):
        raise TypeError(f"nm-train: search.callback must be a DominoSearchCallback, got {type(callback).__name__}")
    trainer = hydra.utils.instantiate(
        cfg.trainer, max_epochs=search.max_epochs, max_steps=-1, callbacks=[callback], **trainer_cfg
    )
    trainer.fit(search_model, datamodule=datamodule)
    scheme_path = search_dir / "scheme.txt"  # written by the callback (also from a spawned worker)
    if not scheme_path.exists():
        raise RuntimeError(f"nm-train: the search wrote no scheme at {scheme_path}")
    scheme = NMScheme.load(scheme_path, model=model)
    if not any(n < m for n, m in scheme.values()):
        steps = f" ({trainer.global_step} optimizer steps)" if trainer.global_step else ""
        raise RuntimeError(
            f"nm-train: the DominoSearch committed no N:M layer within its budget: every layer in {scheme_path} "
            f"is still dense (M:M) after search.max_epochs={search.max_epochs}{steps} with "
            f"search.callback.check_every={search.callback.get('check_every')}, so the fine-tune would have "
            "nothing to sparsify. Give the search more optimizer steps (raise search.max_epochs) or vote more "
            "often (lower search.callback.check_every; a layer needs several votes to commit each halving of N)."
        )
    return scheme_path, scheme_path.with_suffix(".dense.pt")


def check_checkpoint(path: str | Path, what: str) -> Path:
    """Refuse a checkpoint that ``torch.load(weights_only=True)`` refuses, before Lightning opens it.

    A checkpoint is a pickle: loading one that holds anything but tensors and plain containers could run
    code from the file. Raises ``FileNotFoundError`` or ``ValueError``, naming ``what`` and the path.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"nm-train: {what}={str(path)!r} is not a file")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip/pickle), ...
        raise ValueError(
            f"nm-train: refusing {what}={str(path)!r}: it cannot be loaded with torch.load(weights_only=True), "
            f"which allows only tensors and plain data (loading it fully could run code from the file): "
            f"{type(err).__name__}: {str(err)[:500]}"
        ) from None
    return path


def _checkpoints(trainer: pl.Trainer) -> tuple[ModelCheckpoint | None, LastCheckpoint | None]:
    """(the first monitored ``ModelCheckpoint``, the ``LastCheckpoint``) of ``trainer``, ``None`` when absent."""
    best = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)
                 and not isinstance(c, LastCheckpoint) and c.monitor), None)
    last = next((c for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)), None)
    return best, last


def _test_ckpt(cfg: DictConfig, trainer: pl.Trainer) -> str | None:
    """``test_ckpt`` as a path: ``best`` (the monitored checkpoint), ``last`` (the :class:`LastCheckpoint`),
    a file (checked with :func:`check_checkpoint`) or ``None`` (the weights fit ended with)."""
    ckpt = cfg.get("test_ckpt")
    best, last = _checkpoints(trainer)
    if ckpt == "best":
        if best is not None and best.best_model_path:
            return best.best_model_path
        rank_zero_info("nm-train: no best checkpoint (no monitored ModelCheckpoint, fast_dev_run); testing the "
                       "final weights")
        return None
    if ckpt == "last":
        if last is not None and last.path:
            return last.path
        rank_zero_info("nm-train: no last checkpoint (no LastCheckpoint, fast_dev_run); testing the final weights")
        return None
    if ckpt is None:
        return None
    return str(Path(ckpt).expanduser())  # checked by run() before training


def run(cfg: DictConfig) -> dict[str, float]:
    """Train/test/export as configured; returns the final metrics (``test/acc``, ``val/acc``, ...).

    Every checkpoint given by the config (``ckpt_path``, a ``test_ckpt`` file) is loaded with
    ``weights_only=True``; one holding other objects is refused with an error naming it.
    """
    start = time.perf_counter()
    threads = cfg.get("threads")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"nm-train: threads must be an int >= 1 or null, got {threads!r}")
        torch.set_num_threads(threads)
    if cfg.get("ckpt_path") is not None:
        check_checkpoint(cfg.ckpt_path, "ckpt_path")
    test_ckpt = cfg.get("test_ckpt")
    if test_ckpt not in (None, "best", "last"):
        if not isinstance(test_ckpt, str):
            raise ValueError(
                f"nm-train: test_ckpt must be 'best', 'last', a checkpoint file or null, got {test_ckpt!r}"
            )
        check_checkpoint(test_ckpt, "test_ckpt")  # before training, not after it
    formats = check_formats(list(cfg.get("export_formats") or FORMATS))
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("search"):
        scheme_path, dense_path = run_search(cfg, datamodule, out_dir)
        if not cfg.get("sparsity") or "_target_" not in cfg.sparsity:
            raise ValueError("nm-train: a search needs `sparsity` to be one SRSTECallback to fine-tune with its scheme")
        cfg = cfg.copy()
        OmegaConf.set_struct(cfg, False)
        cfg.sparsity.scheme = str(scheme_path)
        cfg.sparsity.init_weights = str(dense_path) if cfg.search.get("restart_from_dense", True) else None
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks: list[Callback] = instantiate_group(cfg.get("callbacks"), "callbacks")
    sparsity: list[Callback] = instantiate_group(cfg.get("sparsity"), "sparsity")
    for cb in callbacks + sparsity:
        if not isinstance(cb, Callback):
            raise TypeError(f"nm-train: {type(cb).__name__} from the callbacks/sparsity config is not a Callback")
    loggers: list[Logger] = instantiate_group(cfg.get("logger"), "logger")
    exporter = None
    export_dir = out_dir / "export"
    if cfg.get("export", True):
        extra = {"model": cfg.model.get("_target_"), "net": OmegaConf.select(cfg, "model.net._target_"),
                 "sparsity": OmegaConf.to_container(cfg.sparsity, resolve=True) if cfg.get("sparsity") else None}
        exporter = ExportCallback(export_dir, extra, stage="test" if cfg.get("test", True) else "fit",
                                  formats=formats)
        callbacks.append(exporter)
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks + sparsity, logger=loggers or False)

    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = _metrics(trainer)
    if cfg.get("test", True):
        trainer.test(model, datamodule=datamodule, ckpt_path=_test_ckpt(cfg, trainer), weights_only=True)
        metrics.update(_metrics(trainer))

    if trainer.is_global_zero:
        paths: dict[str, Any] = {"run dir": out_dir}
        best, last = _checkpoints(trainer)
        if last is not None and last.path:
            paths["last checkpoint (resume with ckpt_path=...)"] = last.path
        if best is not None and best.best_model_path:
            paths[f"best checkpoint ({best.monitor})"] = best.best_model_path
        if exporter is not None and (export_dir / METADATA).exists():
            # written by ExportCallback (possibly in a spawned worker process)
            rows, total = export_rows(export_dir)
            paths.update({f"export ({fmt})": export_dir / FILE_NAMES[fmt] for fmt in formats})
            paths["scheme"] = export_dir / METADATA
        else:
            rows, total = sparsity_rows(model), sum(p.numel() for p in model.parameters())
        print_report(rows, total, metrics, paths, time.perf_counter() - start)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry ``nm-train``; returns ``cfg.optimized_metric`` (default ``test/acc``) for sweepers."""
    metrics = run(cfg)
    key = cfg.get("optimized_metric") or "test/acc"
    if key not in metrics and not cfg.get("test", True):
        key = "val/acc"
    if key not in metrics:
        return None
    return metrics[key]


if __name__ == "__main__":
    main()
