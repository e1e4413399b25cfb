"""LM benchmark (issue 15): one-shot N:M pruning of a byte-level transformer LM, then fine-tuning, offline.

    flock /work/bench.lock /work/venv/bin/python benchmarks/lm.py            # full: 3 seeds (~10 min, 2 cores)
    flock /work/bench.lock /work/venv/bin/python benchmarks/lm.py --quick    # same code path, small (<= 3 min)
    /work/venv/bin/python benchmarks/lm.py --from-json benchmarks/lm.json     # re-render a saved run

Corpus: the ``.py`` sources of the running CPython's standard library (``sysconfig`` "stdlib" path, without
site-packages), a fixed seeded file list split train/validation/test **by file**. Bytes are tokens (vocab 256).
The numbers therefore depend on the CPython version; the JSON records it and a hash of the file list.

Per seed: a dense causal transformer LM (pre-norm, ``nn.Linear`` q/k/v/o and MLP, untied ``lm_head``) is trained
with AdamW. From that same dense model, at 2:4, 4:8 and 1:4:

* one-shot ``magnitude`` / ``wanda`` / ``sparsegpt`` (``nm_lightning.oneshot.prune_one_shot``) on calibration
  windows from the training files;
* each followed by a short fine-tune with the real product, ``nm_lightning.SRSTECallback`` in a Lightning
  ``Trainer``: ``mode="fixed"`` (the one-shot mask held, ASP-style) and ``mode="dynamic"`` (SR-STE, decay
  ``λ = c / (lr · steps)``), with equal budgets (steps, lr, data order);
* NVIDIA ModelOpt's ``sparsegpt`` and ``sparse_magnitude`` at 2:4 (the only pattern it supports), with its
  defaults, on the same calibration data, when ``modelopt`` is importable (it is not a dependency of the package).

Every run covers the same layers: all ``nn.Linear`` of the blocks; ``lm_head`` stays dense in every arm (ModelOpt
excludes ``*lm_head*`` by default). Reported: held-out test perplexity per byte, one-shot CPU seconds.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import sysconfig
import time
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from nm_lightning.masks import nm_mask  # noqa: E402
from nm_lightning.oneshot import prune_one_shot  # noqa: E402

NMS = ((2, 4), (4, 8), (1, 4))
METHODS = ("magnitude", "wanda", "sparsegpt")
MODELOPT = ("sparsegpt", "sparsegpt_damp0.01", "sparse_magnitude")


# ---------------------------------------------------------------------------------------------- data
def stdlib_files(seed: int = 1234) -> list[Path]:
    """The standard library's ``.py`` files (no site-packages), sorted then shuffled with a fixed seed."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    random.Random(seed).shuffle(files)
    return files


def load_corpus(max_train: int, max_eval: int) -> dict:
    """Byte tensors for train/val/test: files 80/10/10 by position in the seeded list, up to the byte caps."""
    files = stdlib_files()
    n = len(files)
    splits = {"train": files[: int(0.8 * n)], "val": files[int(0.8 * n) : int(0.9 * n)], "test": files[int(0.9 * n) :]}
    caps = {"train": max_train, "val": max_eval, "test": max_eval}
    out: dict = {"files": n, "root": sysconfig.get_paths()["stdlib"]}
    h = hashlib.sha256()
    for split, paths in splits.items():
        buf, used = bytearray(), 0
        for p in paths:
            if len(buf) >= caps[split]:
                break
            data = p.read_bytes()
            buf += data + b"\n"
            used += 1
            h.update(f"{split}:{p.relative_to(out['root'])}\n".encode())
        out[split] = torch.frombuffer(bytearray(buf[: caps[split]]), dtype=torch.uint8).long()
        out[f"{split}_files"] = used
    out["sha256"] = h.hexdigest()[:16]
    return out


def windows(data: torch.Tensor, ctx: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``ctx + 1`` bytes."""
    starts = torch.randint(0, data.numel() - ctx - 1, (count,), generator=gen)
    return torch.stack([data[s : s + ctx + 1] for s in starts.tolist()])


def chunks(data: torch.Tensor, ctx: int, count: int) -> torch.Tensor:
    """``count`` windows of ``ctx + 1`` bytes at evenly spaced starts over ``data`` (a fixed evaluation set)."""
    last = data.numel() - ctx - 1
    starts = sorted({round(i * last / max(count - 1, 1)) for i in range(count)})
    return torch.stack([data[s : s + ctx + 1] for s in starts])


# ---------------------------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(nn.Module):
    """A byte-level causal transformer: embedding + learned positions, pre-norm blocks, untied ``lm_head``."""

    def __init__(self, d: int = 128, layers: int = 4, heads: int = 4, ctx: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, 256)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor, bs: int = 32) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, data.shape[0], bs):
        b = data[i : i + bs]
        total += float(lm_loss(model, b)) * b.shape[0]
        count += b.shape[0]
    model.train(was)
    return math.exp(total / count)


def train_dense(cfg: argparse.Namespace, corpus: dict, seed: int) -> tuple[ByteLM, float]:
    torch.manual_seed(seed)
    model = ByteLM(cfg.d, cfg.layers, cfg.heads, cfg.ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = lm_loss(model, windows(corpus["train"], cfg.ctx, cfg.batch, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval(), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- fine-tune
def lit_lm(
    net: nn.Module, data: torch.Tensor, lr: float, steps: int, batch: int, warmup: int = 0, weight_decay: float = 0.0
):
    """A LightningModule training ``net`` on the windows ``data`` in order: AdamW (β = 0.9, 0.95), linear LR
    warm-up over ``warmup`` steps then cosine to 0 over ``steps`` (per step)."""
    import lightning.pytorch as pl

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return lm_loss(self.net, batch)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))

            def factor(s: int) -> float:
                ramp = min(1.0, (s + 1) / warmup) if warmup else 1.0
                return ramp * 0.5 * (1 + math.cos(math.pi * s / steps))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def train_dataloader(self):
            return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)

    return LM()


def plain_copy(template: nn.Module, lit: nn.Module) -> nn.Module:
    """A copy of ``template`` holding the trained (masked, plain) weights of ``lit.net``, in eval mode."""
    from nm_lightning import plain_state_dict

    out = copy.deepcopy(template)
    sd = {k.removeprefix("net."): v for k, v in plain_state_dict(lit).items()}
    out.load_state_dict(sd, strict=True)
    return out.eval()


def finetune(cfg: argparse.Namespace, model: ByteLM, corpus: dict, n: int, m: int, mode: str, seed: int) -> ByteLM:
    """Fine-tune ``model`` (already N:M) with ``SRSTECallback(n, m, mode=...)`` in a Lightning Trainer."""
    import lightning.pytorch as pl

    from nm_lightning import SRSTECallback

    gen = torch.Generator().manual_seed(10_000 + seed)
    data = windows(corpus["train"], cfg.ctx, cfg.ft_steps * cfg.batch, gen)
    lm = lit_lm(copy.deepcopy(model).train(), data, cfg.ft_lr, cfg.ft_steps, cfg.batch)
    decay = cfg.c / (cfg.ft_lr * cfg.ft_steps)
    cb = SRSTECallback(n, m, decay=decay if mode == "dynamic" else 0.0, mode=mode, exclude=["*lm_head"], verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cfg.ft_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        gradient_clip_val=1.0,
    )
    torch.manual_seed(seed)
    trainer.fit(lm)
    return plain_copy(model, lm)


def check_nm(model: ByteLM, n: int, m: int) -> None:
    """Every block Linear is exactly n:m along its input dim (the plain weight, zeros included)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            w = mod.weight.detach()
            if not bool((w[~nm_mask(w, n, m)] == 0).all()):
                raise AssertionError(f"{name} is not {n}:{m}")


# ---------------------------------------------------------------------------------------------- ModelOpt
def modelopt_prune(model: ByteLM, calib: list[torch.Tensor], mode: str) -> tuple[nn.Module | None, float, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.sparsity as mts
    except Exception as exc:  # noqa: BLE001 - report exactly why ModelOpt is not there
        return None, float("nan"), f"{type(exc).__name__}: {exc}"
    net = copy.deepcopy(model)
    t0 = time.perf_counter()
    try:
        with redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode.startswith("sparsegpt"):
                config = {"data_loader": calib, "collect_func": lambda x: x}
                if mode == "sparsegpt_damp0.01":  # our percdamp default, to separate damping from the update
                    config["hessian_damp"] = 0.01
                net = mts.sparsify(net, "sparsegpt", config=config)
            else:
                net = mts.sparsify(net, "sparse_magnitude")
    except Exception as exc:  # noqa: BLE001
        return None, float("nan"), f"{type(exc).__name__}: {exc}"
    return net.eval(), time.perf_counter() - t0, ""


# ---------------------------------------------------------------------------------------------- one seed
def run_seed(cfg: argparse.Namespace, corpus: dict, seed: int, test: torch.Tensor) -> dict:
    res: dict = {"seed": seed}
    dense, secs = train_dense(cfg, corpus, seed)
    res["dense"] = {
        "test_ppl": perplexity(dense, test),
        "val_ppl": perplexity(dense, corpus["val_eval"]),
        "train_seconds": secs,
    }
    print(f"[seed {seed}] dense: test ppl {res['dense']['test_ppl']:.3f} ({secs:.0f} s)", flush=True)
    gen = torch.Generator().manual_seed(20_000 + seed)
    calib_all = windows(corpus["train"], cfg.ctx, cfg.calib, gen)[:, :-1]
    calib = list(calib_all.split(cfg.calib_bs))
    for n, m in NMS:
        key = f"{n}:{m}"
        res[key] = {}
        for method in METHODS:
            net = copy.deepcopy(dense)
            t0 = time.perf_counter()
            rep = prune_one_shot(net, calib, n, m, method=method, exclude=["lm_head"], progress=False)
            oneshot_s = time.perf_counter() - t0
            check_nm(net, n, m)
            row = {
                "oneshot_ppl": perplexity(net, test),
                "oneshot_seconds": oneshot_s,
                "mean_rel_error": rep.mean_rel_error,
            }
            for mode in ("fixed", "dynamic"):
                ft = finetune(cfg, net, corpus, n, m, mode, seed)
                check_nm(ft, n, m)
                row[f"ft_{mode}_ppl"] = perplexity(ft, test)
            res[key][method] = row
            print(
                f"[seed {seed}] {key} {method:9s} one-shot {row['oneshot_ppl']:.3f} ({oneshot_s:.1f} s) "
                f"fixed {row['ft_fixed_ppl']:.3f} SR-STE {row['ft_dynamic_ppl']:.3f}",
                flush=True,
            )
        if (n, m) == (2, 4):
            for mode in MODELOPT:
                net, s, err = modelopt_prune(dense, calib, mode)
                res[key][f"modelopt_{mode}"] = (
                    {"error": err} if net is None else {"oneshot_ppl": perplexity(net, test), "oneshot_seconds": s}
                )
                print(f"[seed {seed}] 2:4 ModelOpt {mode}: {res[key][f'modelopt_{mode}']}", flush=True)
    return res


# ---------------------------------------------------------------------------------------------- report
def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(out: dict) -> str:
    runs = out["runs"]
    cfg = out["config"]
    lines = [
        f"### LM benchmark: one-shot N:M on a byte-level transformer LM ({'quick' if cfg['quick'] else 'full'})",
        "",
        f"Machine: {out['machine']}. Command: `{out['command']}` ({out['seconds'] / 60:.1f} min).",
        f"Corpus: CPython {out['python']} stdlib, {out['corpus']['files']} .py files (list sha256 "
        f"{out['corpus']['sha256']}), split by file; {out['corpus']['train_bytes']} train bytes, "
        f"{out['corpus']['test_tokens']} test tokens. Model: {out['params']} parameters (d={cfg['d']}, "
        f"{cfg['layers']} layers, ctx {cfg['ctx']}), {cfg['steps']} dense AdamW steps; calibration "
        f"{cfg['calib']} windows; fine-tunes {cfg['ft_steps']} steps at lr {cfg['ft_lr']}, SR-STE λ = "
        f"{cfg['c']}/(lr·steps). Seeds: {[r['seed'] for r in runs]}. Test perplexity per byte, mean ± std.",
        "",
        f"Dense: {mean_std([r['dense']['test_ppl'] for r in runs])}",
        "",
        "| N:M | method | one-shot | + fixed-mask FT | + SR-STE FT | one-shot CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for n, m in NMS:
        key = f"{n}:{m}"
        for method in METHODS:
            rows = [r[key][method] for r in runs]
            lines.append(
                f"| {key} | {method} | {mean_std([x['oneshot_ppl'] for x in rows])} | "
                f"{mean_std([x['ft_fixed_ppl'] for x in rows])} | {mean_std([x['ft_dynamic_ppl'] for x in rows])} | "
                f"{statistics.median([x['oneshot_seconds'] for x in rows]):.2f} |"
            )
        if key == "2:4":
            for mode in MODELOPT:
                rows = [r[key].get(f"modelopt_{mode}", {}) for r in runs]
                if any("error" in x for x in rows):
                    lines.append(f"| 2:4 | ModelOpt {mode} | not run: {rows[0].get('error', '')} | | | |")
                else:
                    lines.append(
                        f"| 2:4 | ModelOpt {mode} | {mean_std([x['oneshot_ppl'] for x in rows])} | (n/a) | (n/a) | "
                        f"{statistics.median([x['oneshot_seconds'] for x in rows]):.2f} |"
                    )
        if key != "2:4":
            lines.append(f"| {key} | ModelOpt | cannot run: it supports 2:4 only | | | |")
    lines += ["", "Targets (paired by seed):", ""]

    def paired(f) -> list[float]:
        return [f(r) for r in runs]

    if all("oneshot_ppl" in r["2:4"].get("modelopt_sparsegpt", {}) for r in runs):
        ratio = paired(lambda r: r["2:4"]["sparsegpt"]["oneshot_ppl"] / r["2:4"]["modelopt_sparsegpt"]["oneshot_ppl"])
        ok = statistics.mean(ratio) <= 0.85
        lines.append(
            f"* our SparseGPT 2:4 / ModelOpt sparsegpt 2:4 (one-shot ppl): {mean_std(ratio)} "
            f"(target ≤ 0.85: {'PASS' if ok else 'FAIL'})"
        )
        ratio = paired(
            lambda r: r["2:4"]["magnitude"]["oneshot_ppl"] / r["2:4"]["modelopt_sparse_magnitude"]["oneshot_ppl"]
        )
        lines.append(f"* our magnitude 2:4 / ModelOpt sparse_magnitude 2:4: {mean_std(ratio)} (same algorithm: ≈ 1)")
        sp = paired(lambda r: r["2:4"]["modelopt_sparsegpt"]["oneshot_seconds"])
        ours = paired(lambda r: r["2:4"]["sparsegpt"]["oneshot_seconds"])
        lines.append(
            f"* one-shot CPU time at 2:4: ours {statistics.median(ours):.2f} s, ModelOpt sparsegpt "
            f"{statistics.median(sp):.2f} s (medians)"
        )
    for n, m in NMS:
        key = f"{n}:{m}"
        d = paired(lambda r, k=key: r[k]["sparsegpt"]["oneshot_ppl"] - r[k]["magnitude"]["oneshot_ppl"])
        win = all(x < 0 for x in d)
        lines.append(
            f"* {key}: SparseGPT − magnitude one-shot ppl {mean_std(d)} "
            f"({'SparseGPT lower on every seed' if win else 'NOT lower on every seed'})"
        )
    for n, m in NMS:
        key = f"{n}:{m}"
        d = paired(lambda r, k=key: r[k]["sparsegpt"]["ft_dynamic_ppl"] - r[k]["sparsegpt"]["ft_fixed_ppl"])
        lines.append(
            f"* {key}: from SparseGPT, SR-STE FT − fixed-mask FT ppl {mean_std(d)} "
            f"({'SR-STE ≤ fixed' if statistics.mean(d) <= 0 else 'SR-STE worse'} on average)"
        )
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = out["runs"]
    fig, axes = plt.subplots(1, len(NMS), figsize=(5 * len(NMS), 4), sharey=False)
    dense = statistics.mean(r["dense"]["test_ppl"] for r in runs)
    stages = (("oneshot_ppl", "one-shot"), ("ft_fixed_ppl", "+ fixed FT"), ("ft_dynamic_ppl", "+ SR-STE FT"))
    for ax, (n, m) in zip(axes, NMS, strict=True):
        key = f"{n}:{m}"
        width = 0.25
        for j, (field_, label) in enumerate(stages):
            means = [statistics.mean(r[key][meth][field_] for r in runs) for meth in METHODS]
            stds = [statistics.stdev(r[key][meth][field_] for r in runs) if len(runs) > 1 else 0 for meth in METHODS]
            xs = [i + (j - 1) * width for i in range(len(METHODS))]
            ax.bar(xs, means, width, yerr=stds, label=label, capsize=2)
        labels = list(METHODS)
        if key == "2:4":
            for i, mode in enumerate(("sparsegpt", "sparse_magnitude")):  # ModelOpt's defaults
                vals = [r[key].get(f"modelopt_{mode}", {}).get("oneshot_ppl") for r in runs]
                if all(v is not None for v in vals):
                    ax.bar(
                        len(METHODS) + i,
                        statistics.mean(vals),
                        width,
                        color="grey",
                        label="ModelOpt one-shot" if i == 0 else None,
                    )
                    labels.append(f"MO {mode.replace('sparse_', '')}")
        ax.axhline(dense, color="black", ls="--", lw=1, label="dense")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20)
        ax.set_title(f"{key}")
        ax.set_ylabel("test perplexity per byte")
        ax.set_ylim(bottom=0.98 * dense)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"byte-level LM on the CPython stdlib, {len(runs)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--from-json", type=Path)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.from_json:
        out = json.loads(args.from_json.read_text())
        print(report(out))
        plot(out, args.from_json.with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    if args.quick:
        cfg = argparse.Namespace(
            d=48,
            layers=2,
            heads=4,
            ctx=48,
            steps=60,
            batch=16,
            lr=3e-3,
            ft_steps=3,
            ft_lr=3e-4,
            c=0.3,
            calib=32,
            calib_bs=16,
            max_train=500_000,
            max_eval=100_000,
            eval_windows=32,
            quick=True,
        )
        seeds = args.seeds or [0, 1, 2]
    else:
        cfg = argparse.Namespace(
            d=96,
            layers=3,
            heads=4,
            ctx=96,
            steps=400,
            batch=16,
            lr=3e-3,
            ft_steps=16,
            ft_lr=3e-4,
            c=0.3,
            calib=64,
            calib_bs=16,
            max_train=3_000_000,
            max_eval=300_000,
            eval_windows=128,
            quick=False,
        )
        seeds = args.seeds or [0, 1, 2]
    t0 = time.perf_counter()
    corpus = load_corpus(cfg.max_train, cfg.max_eval)
    test = chunks(corpus["test"], cfg.ctx, cfg.eval_windows)
    corpus["val_eval"] = chunks(corpus["val"], cfg.ctx, cfg.eval_windows)
    runs = [run_seed(cfg, corpus, s, test) for s in seeds]
    out = {
        "config": vars(cfg),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/lm.py", *sys.argv[1:]]),
        "corpus": {
            "files": corpus["files"],
            "sha256": corpus["sha256"],
            "train_bytes": int(corpus["train"].numel()),
            "test_tokens": int(test[:, 1:].numel()),
            "train_files": corpus["train_files"],
            "test_files": corpus["test_files"],
        },
        "params": sum(p.numel() for p in ByteLM(cfg.d, cfg.layers, cfg.heads, cfg.ctx).parameters()),
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }
    stem = HERE / ("lm_quick" if cfg.quick else "lm")
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    text = report(out)
    stem.with_suffix(".md").write_text(text + "\n")
    plot(out, stem.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
