"""STEP vs SR-STE under AdamW: MNIST-1D with the package's transformer, 2:4 and 1:8, differences paired by seed.

Arms (every pattern, every seed, same budget, AdamW with a cosine schedule and a short LR warm-up):
    dense                   no sparsity (shared by both patterns)
    STE                     N:M from the start, λ = 0
    SR-STE (λ val)          N:M from the start, λ = c / (lr · steps), c chosen on the validation split
    warm-up + SR-STE        dense for ``switch`` of the steps, then SR-STE (λ val) without freezing v
    STEP fixed              recipe="step", switch_at=<same fraction>, λ val
    STEP fixed λ=0          the same without the decay (does λ help once v is frozen?)
    STEP auto               recipe="step", switch_at="auto" (AutoSwitch defaults), λ val

    python benchmarks/step.py [--quick] [--seeds 3] [--workers 2] [--out benchmarks]

Writes ``step.json`` (every run), ``step.png`` and prints a markdown table (mean ± std of test accuracy and the
paired differences per seed). Run it under ``flock /work/bench.lock``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package (also in the workers)

LR, WD, WARMUP = 2e-3, 0.01, 30
PATTERNS = [(2, 4), (1, 8)]
SWITCH = 0.15  # the fixed switch (and the warm-up of the unfrozen arm), as a fraction of the budget


def config(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "num_samples": 2000 if quick else 5000,
        "batch_size": 128,
        "epochs": args.epochs or (6 if quick else 38),
        "seeds": list(range(args.seeds or (2 if quick else 3))),
        "sweep_c": args.sweep or ([0.3] if quick else [0.01, 0.1, 1.0]),
        "model": {"dim": 64, "depth": 2, "heads": 4, "mlp_ratio": 2, "dropout": 0.0},
        "workdir": args.workdir or tempfile.mkdtemp(prefix="nm_step_"),
        "workers": args.workers,
    }


def _quiet() -> None:
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "nm_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def arm_callbacks(task: dict[str, Any], **selection: Any) -> list[Any]:
    """The callbacks of one arm (``task["kind"]``: dense, srste, warmup, step), with ``n``, ``m``, ``c`` (λ = c /
    (lr · steps)), ``start`` (warmup) and ``switch_at`` (step) from the task; ``selection`` goes to the callback."""
    from nm_lightning import SparsityScheduler, SRSTECallback

    kind, n, m, c = task["kind"], task.get("n"), task.get("m"), task.get("c", 0.0)
    common = {"verbose": False, "log_layers": False, **selection}
    if kind == "dense":
        return []
    if kind == "srste":
        return [SRSTECallback(n, m, decay_c=c, **common)]
    if kind == "warmup":
        return [SRSTECallback(n, m, decay_c=c, **common), SparsityScheduler("constant", start=task["start"],
                                                                             plot=False)]  # fmt: skip
    if kind == "step":
        return [SRSTECallback(n, m, decay_c=c, recipe="step", switch_at=task["switch_at"], **common)]
    raise ValueError(f"unknown arm kind {kind!r}")


def arm_record(task: dict[str, Any], callbacks: list[Any]) -> dict[str, Any]:
    """What an arm's run reports besides its metrics: λ, and for STEP the switch step and AutoSwitch's history."""
    out: dict[str, Any] = {}
    if callbacks and task["kind"] == "step":
        recipe = callbacks[0]._step
        out["switch_step"] = recipe.switch_step
        if recipe.auto is not None:
            out["variance_change"] = [[s, round(r, 4)] for s, r in recipe.auto.history]
    if callbacks:
        out["lambda"] = callbacks[0].decay
    return out


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """One arm on one seed, in a worker process."""
    _quiet()
    import lightning.pytorch as pl

    from nm_lightning.data import MNIST1DDataModule
    from nm_lightning.models import Classifier, transformer

    cfg, seed = task["cfg"], task["seed"]
    start = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = MNIST1DDataModule(data_dir=str(Path(cfg["workdir"]) / "data"), num_samples=cfg["num_samples"],
                           batch_size=cfg["batch_size"])  # fmt: skip
    model = Classifier(net=transformer(**cfg["model"]), optimizer="adamw", lr=LR, weight_decay=WD,
                       warmup_steps=WARMUP)  # fmt: skip
    c = task.get("c", 0.0)
    callbacks = arm_callbacks(task)
    trainer = pl.Trainer(
        default_root_dir=str(Path(cfg["workdir"]) / "runs"), max_epochs=cfg["epochs"], callbacks=callbacks,
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    out: dict[str, Any] = {"arm": task["arm"], "pattern": task.get("pattern", "dense"), "seed": seed, "c": c,
                           "steps": int(trainer.global_step)}  # fmt: skip
    out.update(arm_record(task, callbacks))
    ev = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    out["val_acc"] = float(ev.validate(model, datamodule=dm, verbose=False)[0]["val/acc"])
    out["test_acc"] = float(ev.test(model, datamodule=dm, verbose=False)[0]["test/acc"])
    out["seconds"] = time.perf_counter() - start
    return out


def run_all(tasks: list[dict[str, Any]], workers: int, sink: Any = None, fn: Any = None) -> list[dict[str, Any]]:
    """Run ``fn`` (default :func:`run_task`) on the tasks in order (``workers`` at a time, spawned processes: ``fn``
    must be importable); ``sink(results)`` after each one (partial results survive)."""
    fn = fn or run_task
    results: list[dict[str, Any]] = []
    if workers <= 1:
        for t in tasks:
            results.append(fn(t))
            if sink:
                sink(results)
        return results
    with mp.get_context("spawn").Pool(workers) as pool:
        for r in pool.imap_unordered(fn, tasks):
            results.append(r)
            if sink:
                sink(results)
    return results


def _task(cfg: dict[str, Any], arm: str, kind: str, seed: int, nm: tuple[int, int] | None = None, **kw: Any):
    extra = {"n": nm[0], "m": nm[1], "pattern": f"{nm[0]}:{nm[1]}"} if nm else {}
    return {"cfg": cfg, "arm": arm, "kind": kind, "seed": seed, **extra, **kw}


def run_arms(
    cfg: dict[str, Any], seeds: list[int], start: int, skip_lambda0: bool, save: Any, val_score: Any, fn: Any = None
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Both phases of the comparison with ``fn`` (default :func:`run_task`); returns ``(results, best c)``.

    Phase 1 (only with several c values): the SR-STE λ sweep, c chosen per pattern as the highest
    ``val_score(results, arm, pattern)`` (a mean over seeds). Phase 2: every arm with the chosen c, pattern by
    pattern (1:8 first), arm by arm, seed by seed, so that a run stopped early still holds complete, paired arms.
    The chosen sweep arm is also reported as "SR-STE (λ val)". ``save(results, best)`` after each run.
    """
    results: list[dict[str, Any]] = []
    best = {f"{n}:{m}": cfg["sweep_c"][0] for n, m in PATTERNS}
    if len(cfg["sweep_c"]) > 1:
        tasks = [_task(cfg, f"SR-STE c={c:g}", "srste", s, nm, c=c) for nm in PATTERNS for c in cfg["sweep_c"]
                 for s in seeds]  # fmt: skip
        results = run_all(tasks, cfg["workers"], save, fn=fn)
        for nm in PATTERNS:
            pat = f"{nm[0]}:{nm[1]}"
            val = {c: val_score(results, f"SR-STE c={c:g}", pat) for c in cfg["sweep_c"]}
            best[pat] = max(val, key=val.get)
    done = list(results)
    tasks = [_task(cfg, "dense", "dense", s) for s in seeds]
    for nm in PATTERNS[::-1]:
        c = best[f"{nm[0]}:{nm[1]}"]
        arms = [("STEP fixed", "step", {"c": c, "switch_at": SWITCH}),
                ("STEP auto", "step", {"c": c, "switch_at": "auto"}), ("STE", "srste", {"c": 0.0}),
                ("warm-up + SR-STE", "warmup", {"c": c, "start": start})]  # fmt: skip
        if len(cfg["sweep_c"]) == 1:  # otherwise run in the sweep
            arms.insert(0, (f"SR-STE c={c:g}", "srste", {"c": c}))
        if not skip_lambda0:
            arms.append(("STEP fixed λ=0", "step", {"c": 0.0, "switch_at": SWITCH}))
        tasks += [_task(cfg, arm, kind, s, nm, **kw) for arm, kind, kw in arms for s in seeds]
    results = done + run_all(tasks, cfg["workers"], lambda rs: save(done + rs, best), fn=fn)
    for nm in PATTERNS:
        pat = f"{nm[0]}:{nm[1]}"
        results += [{**r, "arm": "SR-STE (λ val)"} for r in list(results)
                    if r["pattern"] == pat and r["arm"] == f"SR-STE c={best[pat]:g}"]  # fmt: skip
    return results, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small data, few epochs, 2 seeds (a smoke run)")
    ap.add_argument("--seeds", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=0, help="epochs of 29 steps (default 38: ~1100 steps)")
    ap.add_argument("--skip-lambda0", action="store_true", help="leave out the 'STEP fixed λ=0' arm")
    ap.add_argument("--sweep", type=float, nargs="+", default=None, help="the c values of the SR-STE λ sweep")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--report-only", default=None, help="print the table and plot from an existing step.json")
    args = ap.parse_args()
    if args.report_only:
        data = json.loads(Path(args.report_only).read_text())
        runs, best = data["runs"], data["best_c"] or {}
        for pat, c in best.items():
            if not any(r["arm"] == "SR-STE (λ val)" and r["pattern"] == pat for r in runs):
                runs += [
                    {**r, "arm": "SR-STE (λ val)"}
                    for r in runs
                    if r["pattern"] == pat and r["arm"] == f"SR-STE c={c:g}"
                ]
        report(runs, best, sorted({r["seed"] for r in runs}))
        plot(runs, Path(args.out) / "step.png")
        return
    cfg = config(args)
    seeds = cfg["seeds"]
    t0 = time.perf_counter()
    steps_guess = cfg["epochs"] * -(-int(cfg["num_samples"] * 0.8 * 0.9) // cfg["batch_size"])
    start = max(1, round(SWITCH * steps_guess))
    out = Path(args.out)

    def save(results: list[dict[str, Any]], best: dict[str, float] | None = None) -> None:
        (out / "step.json").write_text(json.dumps({"config": {k: v for k, v in cfg.items() if k != "workdir"},
                                                   "best_c": best, "wall_seconds": time.perf_counter() - t0,
                                                   "runs": results}, indent=1))  # fmt: skip

    val_acc = lambda results, arm, pat: statistics.mean(  # noqa: E731
        r["val_acc"] for r in results if r["pattern"] == pat and r["arm"] == arm
    )
    results, best = run_arms(cfg, seeds, start, args.skip_lambda0, save, val_acc)
    wall = time.perf_counter() - t0
    report(results, best, seeds)
    save(results, best)
    plot(results, out / "step.png")
    print(f"\nwall time {wall / 60:.1f} min; wrote {out / 'step.json'} and {out / 'step.png'}")


ARMS = ["STE", "SR-STE (λ val)", "warm-up + SR-STE", "STEP fixed", "STEP fixed λ=0", "STEP auto"]


def _acc(results: list[dict[str, Any]], arm: str, pattern: str) -> dict[int, float]:
    pat = "dense" if arm == "dense" else pattern
    return {r["seed"]: 100 * r["test_acc"] for r in results if r["arm"] == arm and r["pattern"] == pat}


def report(results: list[dict[str, Any]], best: dict[str, float], seeds: list[int]) -> dict[str, Any]:
    """Print the markdown table; return the numbers (mean, std, paired differences per seed)."""
    summary: dict[str, Any] = {}
    lines = ["| pattern | arm | test acc % (mean ± std) | vs dense (per seed) | vs SR-STE (per seed) | switch step |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for nm in PATTERNS:
        pat = f"{nm[0]}:{nm[1]}"
        dense, sr = _acc(results, "dense", pat), _acc(results, "SR-STE (λ val)", pat)
        for arm in ["dense", *ARMS]:
            acc = _acc(results, arm, pat)
            if not acc:
                continue
            vals = [acc[s] for s in seeds if s in acc]
            if not vals:
                continue
            mean, std = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
            d_dense = [acc[s] - dense[s] for s in seeds if s in acc and s in dense]
            d_sr = [acc[s] - sr[s] for s in seeds if s in acc and s in sr]
            sw = sorted({r.get("switch_step") for r in results if r["arm"] == arm and r["pattern"] == pat} - {None})
            summary[f"{pat} {arm}"] = {"mean": mean, "std": std, "vs_dense": d_dense, "vs_srste": d_sr,
                                       "switch_steps": sw}  # fmt: skip
            fmt = lambda d: f"{statistics.mean(d):+.2f} ({', '.join(f'{x:+.1f}' for x in d)})" if d else "—"  # noqa: E731
            lines.append(f"| {pat} | {arm} | {mean:.2f} ± {std:.2f} | {fmt(d_dense)} | {fmt(d_sr)} | "
                         f"{', '.join(map(str, sw)) or '—'} |")  # fmt: skip
    print("\n".join(lines))
    print("chosen c (validation): " + ", ".join(f"{k}: {v:g}" for k, v in best.items()))
    return summary


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PATTERNS), figsize=(12, 4), sharey=False)
    for ax, nm in zip(axes, PATTERNS, strict=True):
        pat = f"{nm[0]}:{nm[1]}"
        arms = [a for a in ["dense", *ARMS] if _acc(results, a, pat)]
        for i, arm in enumerate(arms):
            acc = _acc(results, arm, pat)
            ax.scatter([i] * len(acc), list(acc.values()), color="tab:gray", s=12)
            if acc:
                ax.bar(i, statistics.mean(acc.values()), color="tab:blue" if "STEP" in arm else "tab:orange", alpha=0.6)
        lo = min(min(_acc(results, a, pat).values()) for a in arms)
        ax.set_ylim(lo - 2, None)
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"MNIST-1D transformer, AdamW, {pat}")
        ax.set_ylabel("test accuracy %")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
