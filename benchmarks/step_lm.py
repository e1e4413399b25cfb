"""STEP vs SR-STE under AdamW on the byte-level LM (issue 17): 2:4 and 1:8, from scratch, differences paired by seed.

    flock /work/bench.lock /work/venv/bin/python benchmarks/step_lm.py             # full: 3 seeds (~20 min, 2 cores)
    flock /work/bench.lock /work/venv/bin/python benchmarks/step_lm.py --quick     # smoke run (<= 2 min)
    /work/venv/bin/python benchmarks/step_lm.py --report-only benchmarks/step_lm.json   # re-render a saved run

The corpus (CPython stdlib ``.py`` sources, byte tokens, split by file), the model (``ByteLM``: pre-norm causal
transformer, untied ``lm_head``) and the evaluation (held-out perplexity per byte on fixed windows) are those of
``benchmarks/lm.py``; the arms, the pairing and the table follow ``benchmarks/step.py`` (MNIST-1D), whose
process pool this script reuses. Every arm trains the same model from scratch (same init, same data order per
seed) with AdamW (β = 0.9, 0.95, weight decay 0.01), a linear LR warm-up then cosine decay, gradient clipping 1.0,
in a Lightning ``Trainer`` with the real product (``SRSTECallback``); N:M covers every ``nn.Linear`` of the
blocks, ``lm_head`` stays dense:

    dense                   no sparsity (shared by both patterns)
    STE                     N:M from the start, λ = 0
    SR-STE (λ val)          N:M from the start, λ = c / (lr · steps), c chosen on validation (lowest nats/byte)
    warm-up + SR-STE        dense for 15 % of the steps (SparsityScheduler "constant"), then SR-STE (λ val), v not
                            frozen
    STEP fixed              recipe="step", switch_at=0.15, λ val
    STEP fixed λ=0          the same without the decay
    STEP auto               recipe="step", switch_at="auto" (AutoSwitch defaults), λ val

Target (issue 17): the held-out gap to dense of STEP at most half that of SR-STE, mean over seeds, in nats/byte
(perplexity gaps printed too). Writes ``step_lm.json`` (every run) and ``step_lm.png`` next to this file (or
``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmark modules (also in the spawned workers)
sys.path.insert(0, str(HERE.parent))  # this checkout's package

import lm  # noqa: E402
from step import PATTERNS, SWITCH, _quiet, arm_callbacks, arm_record, run_arms  # noqa: E402

ARMS = ["STE", "SR-STE (λ val)", "warm-up + SR-STE", "STEP fixed", "STEP fixed λ=0", "STEP auto"]
STEP_ARMS = ["STEP fixed", "STEP fixed λ=0", "STEP auto"]


def config(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    model = {"d": 48, "layers": 2, "heads": 4, "ctx": 32} if quick else {"d": 128, "layers": 2, "heads": 4, "ctx": 64}
    return {
        "model": model,
        "steps": args.steps or (60 if quick else 600),
        "batch": 8 if quick else 16,
        "lr": 3e-3,
        "warmup": 10 if quick else 50,
        "weight_decay": 0.01,
        "max_train": 300_000 if quick else 3_000_000,
        "max_eval": 50_000 if quick else 300_000,
        "eval_windows": 32 if quick else 256,
        "seeds": list(range(args.seeds or (2 if quick else 3))),
        "sweep_c": args.sweep or ([0.03] if quick else [0.003, 0.03, 0.3]),
        "workers": args.workers,
        "workdir": args.workdir or tempfile.mkdtemp(prefix="nm_step_lm_"),
        "quick": quick,
    }


_CORPUS: dict[str, Any] = {}


def corpus(cfg: dict[str, Any]) -> dict[str, Any]:
    """The training bytes and the fixed validation/test windows (saved once by ``main``, loaded once per worker)."""
    if not _CORPUS:
        import torch

        _CORPUS.update(torch.load(Path(cfg["workdir"]) / "corpus.pt"))
    return _CORPUS


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """One arm on one seed, in a worker process."""
    _quiet()
    import lightning.pytorch as pl
    import torch


    cfg, seed = task["cfg"], task["seed"]
    data = corpus(cfg)
    start = time.perf_counter()
    torch.manual_seed(seed)
    template = lm.ByteLM(**cfg["model"])
    gen = torch.Generator().manual_seed(seed)
    windows = lm.windows(data["train"], cfg["model"]["ctx"], cfg["steps"] * cfg["batch"], gen)
    lit = lm.lit_lm(copy.deepcopy(template).train(), windows, cfg["lr"], cfg["steps"], cfg["batch"], cfg["warmup"],
                    cfg["weight_decay"])  # fmt: skip
    n, m, c = task.get("n"), task.get("m"), task.get("c", 0.0)
    callbacks = arm_callbacks(task, exclude=["*lm_head"])
    trainer = pl.Trainer(
        default_root_dir=str(Path(cfg["workdir"]) / "runs"), max_steps=cfg["steps"], callbacks=callbacks,
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    trainer.fit(lit)
    out: dict[str, Any] = {"arm": task["arm"], "pattern": task.get("pattern", "dense"), "seed": seed, "c": c,
                           "steps": int(trainer.global_step)}  # fmt: skip
    out.update(arm_record(task, callbacks))
    net = lm.plain_copy(template, lit)
    if n is not None:
        lm.check_nm(net, n, m)  # the evaluated model is exactly N:M (every block Linear)
    out["val_nats"] = math.log(lm.perplexity(net, data["val"]))
    out["test_nats"] = math.log(lm.perplexity(net, data["test"]))
    out["test_ppl"] = math.exp(out["test_nats"])
    out["seconds"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------------------------------- report
def _nats(results: list[dict[str, Any]], arm: str, pattern: str, key: str = "test_nats") -> dict[int, float]:
    pat = "dense" if arm == "dense" else pattern
    return {r["seed"]: r[key] for r in results if r["arm"] == arm and r["pattern"] == pat}


def _ms(vals: list[float], digits: int = 3) -> str:
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {std:.{digits}f}"


def _paired(d: list[float]) -> str:
    return f"{statistics.mean(d):+.3f} ({', '.join(f'{x:+.3f}' for x in d)})" if d else "—"


def report(results: list[dict[str, Any]], best: dict[str, float], seeds: list[int]) -> dict[str, Any]:
    """Print the markdown table and the target lines; return the numbers."""
    summary: dict[str, Any] = {}
    lines = ["| pattern | arm | test ppl (mean ± std) | test nats/byte (mean ± std) | gap to dense, nats/byte "
             "(per seed) | vs SR-STE, nats/byte (per seed) | switch step |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for nm in PATTERNS:
        pat = f"{nm[0]}:{nm[1]}"
        dense, sr = _nats(results, "dense", pat), _nats(results, "SR-STE (λ val)", pat)
        for arm in ["dense", *ARMS]:
            nats = _nats(results, arm, pat)
            ss = [s for s in seeds if s in nats]
            if not ss:
                continue
            vals = [nats[s] for s in ss]
            d_dense = [nats[s] - dense[s] for s in ss if s in dense]
            d_sr = [nats[s] - sr[s] for s in ss if s in sr]
            sw = sorted({r.get("switch_step") for r in results if r["arm"] == arm and r["pattern"] == pat} - {None})
            label = f"SR-STE (λ val, c = {best[pat]:g})" if arm == "SR-STE (λ val)" and pat in best else arm
            summary[f"{pat} {arm}"] = {
                "mean_nats": statistics.mean(vals),
                "vs_dense": d_dense,
                "vs_srste": d_sr,
                "mean_ppl": statistics.mean(math.exp(v) for v in vals),
                "switch_steps": sw,
            }
            lines.append(f"| {pat} | {label} | {_ms([math.exp(v) for v in vals])} | {_ms(vals)} | {_paired(d_dense)} | "
                         f"{_paired(d_sr)} | {', '.join(map(str, sw)) or '—'} |")  # fmt: skip
    print("\n".join(lines))
    print("\nchosen c (validation nats/byte, mean over seeds): " + ", ".join(f"{k}: {v:g}" for k, v in best.items()))
    sweep = sorted({r["c"] for r in results if r["arm"].startswith("SR-STE c=")})
    for nm in PATTERNS:
        pat = f"{nm[0]}:{nm[1]}"
        val = {c: _nats(results, f"SR-STE c={c:g}", pat, "val_nats") for c in sweep}
        if len(val) > 1:
            print(f"  {pat} sweep, val nats/byte: "
                  + ", ".join(f"c={c:g}: {statistics.mean(v.values()):.4f}" for c, v in val.items() if v))  # fmt: skip
    print("\nTarget: gap to dense halved against SR-STE, (STEP − dense) ≤ 0.5 × (SR-STE − dense), mean over seeds:")
    for nm in PATTERNS:
        pat = f"{nm[0]}:{nm[1]}"
        dense, sr = _nats(results, "dense", pat), _nats(results, "SR-STE (λ val)", pat)
        for arm in STEP_ARMS:
            st = _nats(results, arm, pat)
            ss = [s for s in seeds if s in st and s in sr and s in dense]
            if not ss:
                continue
            g_step = [st[s] - dense[s] for s in ss]
            g_sr = [sr[s] - dense[s] for s in ss]
            gp_step = [math.exp(st[s]) - math.exp(dense[s]) for s in ss]
            gp_sr = [math.exp(sr[s]) - math.exp(dense[s]) for s in ss]
            met = statistics.mean(g_step) <= 0.5 * statistics.mean(g_sr)
            met_ppl = statistics.mean(gp_step) <= 0.5 * statistics.mean(gp_sr)
            every = all(a <= 0.5 * b for a, b in zip(g_step, g_sr, strict=True))
            summary[f"{pat} {arm} target"] = {"met": met, "met_ppl": met_ppl, "every_seed": every}
            seeds_txt = lambda d: ", ".join(f"{x:+.3f}" for x in d)  # noqa: E731
            print(f"* {pat} {arm}: gap {statistics.mean(g_step):+.3f} nats/byte ({seeds_txt(g_step)})"
                  f" vs SR-STE {statistics.mean(g_sr):+.3f} ({seeds_txt(g_sr)}); "
                  f"ppl gap {statistics.mean(gp_step):+.3f} vs {statistics.mean(gp_sr):+.3f} — gap halved vs SR-STE: "
                  f"{'met' if met else 'not met'} (ppl: {'met' if met_ppl else 'not met'}; "
                  f"every seed: {'yes' if every else 'no'})")  # fmt: skip
    return summary


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PATTERNS), figsize=(12, 4))
    for ax, nm in zip(axes, PATTERNS, strict=True):
        pat = f"{nm[0]}:{nm[1]}"
        arms = [a for a in ["dense", *ARMS] if _nats(results, a, pat)]
        for i, arm in enumerate(arms):
            nats = _nats(results, arm, pat)
            ax.scatter([i] * len(nats), list(nats.values()), color="tab:gray", s=12, zorder=3)
            color = "tab:blue" if "STEP" in arm else "tab:green" if arm == "dense" else "tab:orange"
            ax.bar(i, statistics.mean(nats.values()), color=color, alpha=0.6)
        vals = [v for a in arms for v in _nats(results, a, pat).values()]
        ax.set_ylim(min(vals) - 0.05, max(vals) + 0.03)
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"byte-level LM, AdamW, {pat} (lower is better)")
        ax.set_ylabel("test nats/byte")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 60 steps, 2 seeds, one c (a smoke run)")
    ap.add_argument("--seeds", type=int, default=0, help="number of seeds (default 3; --quick 2)")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default 600; --quick 60)")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each")
    ap.add_argument("--skip-lambda0", action="store_true", help="leave out the 'STEP fixed λ=0' arm")
    ap.add_argument("--sweep", type=float, nargs="+", default=None, help="the c values of the SR-STE λ sweep")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--report-only", default=None, help="print the table and plot from an existing step_lm.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        data = json.loads(Path(args.report_only).read_text())
        report(data["runs"], data["best_c"], data["config"]["seeds"])
        plot(data["runs"], Path(args.report_only).with_suffix(".png"))
        return
    import torch

    cfg = config(args)
    seeds, steps = cfg["seeds"], cfg["steps"]
    t0 = time.perf_counter()
    raw = lm.load_corpus(cfg["max_train"], cfg["max_eval"])
    ctx = cfg["model"]["ctx"]
    evals = {split: lm.chunks(raw[split], ctx, cfg["eval_windows"]) for split in ("val", "test")}
    torch.save({"train": raw["train"], **evals}, Path(cfg["workdir"]) / "corpus.pt")
    meta = {"files": raw["files"], "sha256": raw["sha256"], "train_bytes": int(raw["train"].numel()),
            "eval_tokens": cfg["eval_windows"] * ctx, "python": platform.python_version()}  # fmt: skip
    start = max(1, round(SWITCH * steps))  # the step the fixed switch resolves to (resolve_switch_step)
    stem = "step_lm_quick" if cfg["quick"] else "step_lm"
    info = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{cfg['workers']} workers × 1 thread",
        "command": " ".join(["python", "benchmarks/step_lm.py", *sys.argv[1:]]),
        "corpus": meta,
        "params": sum(p.numel() for p in lm.ByteLM(**cfg["model"]).parameters()),
    }

    def save(results: list[dict[str, Any]], best: dict[str, float] | None = None) -> None:
        (out / f"{stem}.json").write_text(json.dumps({"config": {k: v for k, v in cfg.items() if k != "workdir"},
                                                      **info, "best_c": best, "wall_seconds": time.perf_counter() - t0,
                                                      "runs": results}, indent=1))  # fmt: skip

    neg_val_nats = lambda results, arm, pat: -statistics.mean(  # noqa: E731 - lower nats/byte is better
        _nats(results, arm, pat, "val_nats").values()
    )
    results, best = run_arms(cfg, seeds, start, args.skip_lambda0, save, neg_val_nats, fn=run_task)
    wall = time.perf_counter() - t0
    print(f"byte-level LM: {info['params']} parameters, {steps} AdamW steps × {cfg['batch']} × {ctx} bytes, "
          f"seeds {seeds}; corpus {meta['files']} files ({meta['sha256']}); {info['machine']}\n")  # fmt: skip
    report(results, best, seeds)
    save(results, best)
    plot(results, out / f"{stem}.png")
    print(f"\nwall time {wall / 60:.1f} min; wrote {out / (stem + '.json')} and {out / (stem + '.png')}")


if __name__ == "__main__":
    main()
