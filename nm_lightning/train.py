"""``nm-train``: the Hydra training app (configs in :mod:`nm_lightning.conf`).

With no arguments it trains a 1-D CNN on MNIST-1D with SR-STE 2:4 on the CPU, tests the sparse model,
prints a per-layer N:M report and writes, into Hydra's run directory, ``checkpoints/last.ckpt`` (plus the
best one), CSV logs, ``export/model_dense_with_zeros.pt`` (the plain network's state dict with the N:M
zeros, loadable with ``weights_only=True`` and ``strict=True``), ``export/scheme.json`` (per-layer n:m and
measured sparsity, reusable as ``sparsity.scheme=...``) and ``export/summary.json``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from collections.abc import Mapping
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

from nm_lightning.masks import nm_mask
from nm_lightning.sparsify import plain_state_dict, sparse_layers

__all__ = [
    "CONFIG_DIR", "ExportCallback", "main", "run", "run_search", "instantiate_group", "export_model", "sparsity_rows",
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


def _net(model: nn.Module) -> tuple[nn.Module, str]:
    """The plain network inside a ``Classifier`` (and the key prefix it has in the LightningModule)."""
    net = getattr(model, "net", None)
    return (net, "net.") if isinstance(net, nn.Module) else (model, "")


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


def export_model(model: nn.Module, out_dir: str | Path, extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``model_dense_with_zeros.pt``, ``scheme.json`` and ``summary.json`` into ``out_dir``.

    The ``.pt`` file is ``plain_state_dict`` of the plain network (``model.net`` for a ``Classifier``): it
    loads with ``torch.load(..., weights_only=True)`` and ``net.load_state_dict(sd, strict=True)`` into a
    freshly built, never-sparsified network. ``scheme.json`` maps layer names (as the sparsity callback
    names them, so the file can be passed back as ``sparsity.scheme``) to n, m and the measured sparsity;
    ``weight_key`` is the entry in the ``.pt`` file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net, prefix = _net(model)
    state = plain_state_dict(net)
    weights = out / "model_dense_with_zeros.pt"
    torch.save(state, weights)
    rows = sparsity_rows(model)
    scheme = {}
    for row in rows:
        key = row["layer"][len(prefix):] if row["layer"].startswith(prefix) else row["layer"]
        weight_key = key if key in state else f"{key}.weight"
        scheme[row["layer"]] = {**{k: row[k] for k in ("type", "n", "m", "layout", "shape", "params", "nonzero",
                                                       "sparsity", "nm_ok")}, "weight_key": weight_key}
    scheme_path = out / "scheme.json"
    scheme_path.write_text(json.dumps(scheme, indent=2) + "\n", encoding="utf-8")
    total = sum(p.numel() for p in net.parameters())
    covered = sum(r["params"] for r in rows)
    zeros = sum(r["params"] - r["nonzero"] for r in rows)
    summary = {
        "total_params": total, "nm_params": covered, "nm_nonzero": covered - zeros,
        "nm_sparsity": zeros / covered if covered else 0.0, "model_sparsity": zeros / total if total else 0.0,
        "all_layers_nm_ok": all(r["nm_ok"] for r in rows), "state_dict": weights.name, **dict(extra or {}),
    }
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return {"weights": weights, "scheme": scheme_path, "summary": summary_path}


class ExportCallback(Callback):
    """Write the export at the end of ``test`` (or of ``fit`` when not testing), on global rank 0.

    Running as a callback puts the export inside the training processes, so it also sees the sparsified
    model under ``ddp_spawn`` (where the launching process never attaches the N:M parametrizations).
    """

    def __init__(self, out_dir: str | Path, extra: Mapping[str, Any] | None = None, stage: str = "test") -> None:
        self.out_dir, self.extra, self.stage = Path(out_dir), dict(extra or {}), stage
        self.files: dict[str, Path] = {}

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                       if v.numel() == 1 and k.split("/")[0] in ("test", "val")}
            self.files = export_model(pl_module, self.out_dir, {"metrics": metrics, **self.extra})

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage == "test":
            self._export(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage == "fit":
            self._export(trainer, pl_module)


def print_report(scheme: Mapping[str, Mapping[str, Any]], total_params: int, metrics: Mapping[str, float],
                 paths: Mapping[str, Any], seconds: float) -> None:
    """Rich table of the N:M layers (as in ``scheme.json``), the test accuracy and the output files."""
    console = Console(width=None if sys.stdout.isatty() else 140)
    table = Table(title="N:M sparse model", title_justify="left")
    for col, just in [("layer", "left"), ("type", "left"), ("shape", "left"), ("n:m", "right"), ("params", "right"),
                      ("nonzero", "right"), ("sparsity", "right"), ("N:M check", "center")]:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for name, r in scheme.items():
        table.add_row(name, str(r.get("type", "")), "x".join(map(str, r["shape"])), f"{r['n']}:{r['m']}",
                      f"{r['params']:,}", f"{r['nonzero']:,}", f"{r['sparsity']:.1%}",
                      "[green]ok[/]" if r["nm_ok"] else "[red]FAIL[/]")
    covered = sum(r["params"] for r in scheme.values())
    zeros = sum(r["params"] - r["nonzero"] for r in scheme.values())
    if scheme:
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
        console.print(f"{label}: {path}")


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
    return scheme_path, scheme_path.with_suffix(".dense.pt")


def run(cfg: DictConfig) -> dict[str, float]:
    """Train/test/export as configured; returns the final metrics (``test/acc``, ``val/acc``, ...)."""
    start = time.perf_counter()
    threads = cfg.get("threads")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"nm-train: threads must be an int >= 1 or null, got {threads!r}")
        torch.set_num_threads(threads)
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
    if cfg.get("export", True):
        extra = {"model": cfg.model.get("_target_"), "net": OmegaConf.select(cfg, "model.net._target_"),
                 "sparsity": OmegaConf.to_container(cfg.sparsity, resolve=True) if cfg.get("sparsity") else None}
        exporter = ExportCallback(out_dir / "export", extra, stage="test" if cfg.get("test", True) else "fit")
        callbacks.append(exporter)
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks + sparsity, logger=loggers or False)

    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test", True):
        ckpt = cfg.get("test_ckpt")
        checkpoint = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
        if ckpt == "best" and not (checkpoint and checkpoint.best_model_path):
            rank_zero_info("nm-train: no best checkpoint (no ModelCheckpoint, fast_dev_run); testing the final weights")
            ckpt = None
        if ckpt == "last" and not (checkpoint and checkpoint.last_model_path):
            rank_zero_info("nm-train: no last checkpoint; testing the final weights")
            ckpt = None
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})

    if trainer.is_global_zero:
        paths: dict[str, Any] = {"run dir": out_dir}
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.last_model_path:
            paths["checkpoint"] = checkpoint.last_model_path
        export_dir = out_dir / "export"
        if exporter is not None and (export_dir / "summary.json").exists():
            # written by ExportCallback (possibly in a spawned worker process)
            scheme = json.loads((export_dir / "scheme.json").read_text(encoding="utf-8"))
            total = int(json.loads((export_dir / "summary.json").read_text(encoding="utf-8"))["total_params"])
            paths.update({"export": export_dir / "model_dense_with_zeros.pt", "scheme": export_dir / "scheme.json"})
        else:
            scheme = {r["layer"]: r for r in sparsity_rows(model)}
            total = sum(p.numel() for p in _net(model)[0].parameters())
        print_report(scheme, total, metrics, paths, time.perf_counter() - start)
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
