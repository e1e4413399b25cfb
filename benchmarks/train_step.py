"""Train-step time of a CIFAR ResNet-18: dense vs nm_lightning SR-STE 2:4 vs the reference SparseConv.

One step = zero_grad + forward + cross-entropy + backward (+ SR-STE decay) + SGD(momentum) step, batch 32 of
random 3x32x32 input, 10 classes. All variants run in one process, start from the same weights and see
the same batch; they are interleaved round by round (rotating the order) and medians are reported,
because the machine is shared and noisy.

Variants:

* ``dense``: plain ``nn.Conv2d``/``nn.Linear``.
* ``ours``: ``plan_layers(model, 2, 4)`` + ``attach(model, plans)`` (every conv whose input channels divide
  by 4, and fc), plus the SR-STE decay added once per step exactly as ``SRSTECallback.on_before_optimizer_step``
  does (``add_decay_(w.grad, w, layer.sparsity.mask, decay)`` on every attached layer's dense Parameter).
* ``ours-nofc``: the same with ``exclude=["fc"]``, like for like with the reference (no SparseLinear there).
* ``ours-flat-nofc``: ``layout="flat"`` without fc: exactly the reference's coverage (the 3-channel stem
  conv is sparsified too) and grouping.
* ``reference``: the ``SparseConv`` (N=2, M=4) of the reference README for every conv (exec'd from the
  README's python blocks at run time); its decay is inside its autograd backward. fc stays dense.

Target (issue 18): ``ours`` <= 1.05x ``dense`` (median of the step times).

Run: ``python benchmarks/train_step.py [--quick] [--profile] [--reference-readme PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_README,
    ResNet18,
    load_reference,
    machine_line,
    median,
    now,
    print_table,
    reference_conv_factory,
)

from nm_lightning.sparsify import attach, plan_layers  # noqa: E402
from nm_lightning.srste import add_decay_, recompute_masked_weights  # noqa: E402

DECAY = 2e-4  # the reference's default λ, used by both SR-STE variants
OURS_LAYERS: dict = {}  # the attached layers of the "ours" variant, for the overhead breakdown


def make_step(model: nn.Module, layers: dict | None, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        # the callback's default (recompute_masked=True): keep the bool mask, rebuild W*E in backward
        with recompute_masked_weights() if layers is not None else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        if layers is not None:
            # what SRSTECallback.on_before_optimizer_step does, line for line
            in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
            for layer in layers.values():
                w = layer.original
                if layer.sparsity.frozen or w.grad is None or id(w) not in in_opt:
                    continue
                add_decay_(w.grad, w, layer.sparsity.mask, DECAY)
        opt.step()

    return step


def build_variants(readme: Path, names: list[str]) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    torch.manual_seed(0)
    base = ResNet18()
    state = copy.deepcopy(base.state_dict())
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    steps: dict[str, Callable[[], None]] = {}
    notes: dict[str, str] = {}
    for name in names:
        if name == "reference":
            ns = load_reference(readme)
            model = ResNet18(conv=reference_conv_factory(ns, 2, 4))
            model.load_state_dict(state)
            n_sparse = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, ns["SparseConv"]))
            steps[name] = make_step(model, None, x, y)
            notes[name] = f"{sum(isinstance(mod, ns['SparseConv']) for mod in model.modules())} SparseConv, " \
                          f"{n_sparse:,} sparse weights"
            continue
        model = ResNet18()
        model.load_state_dict(state)
        layers = None
        if name != "dense":
            layout = "flat" if "flat" in name else "input_channel"
            exclude = ["fc"] if name.endswith("nofc") else None
            plans = plan_layers(model, 2, 4, layout, exclude=exclude)
            layers = attach(model, plans, layout)
            if name == "ours":
                OURS_LAYERS.update(layers)
            n_sparse = sum(p.numel for p in plans if p.status == "covered")
            skipped = [p.name for p in plans if p.status == "skipped"]
            notes[name] = f"{len(layers)} layers, {n_sparse:,} sparse weights" + (
                f", skipped {skipped}" if skipped else ""
            )
        else:
            notes[name] = "no sparsity"
        steps[name] = make_step(model, layers, x, y)
    return steps, notes


def overhead_parts(rounds: int) -> None:
    """Time, over all layers of "ours", each piece of work a dense step does not do (medians, ms per step)."""
    from nm_lightning.masks import nm_mask
    from nm_lightning.srste import ste_nm

    layers = list(OURS_LAYERS.values())
    masks = [layer.sparsity.mask.clone() for layer in layers]
    parts: dict[str, Callable[[], None]] = {
        "nm_mask (native kernel + checks)": lambda: [
            nm_mask(la.original, la.sparsity.n, la.sparsity.m, la.sparsity.layout) for la in layers
        ],
        "mask buffer copy_": lambda: [la.sparsity.mask.copy_(mk) for la, mk in zip(layers, masks, strict=True)],
        "ste_nm forward (fused mask + masked weight)": lambda: [
            ste_nm(la.original, la.sparsity.n, la.sparsity.m, la.sparsity.layout) for la in layers
        ],
        "parametrized weight read (whole forward of the parametrization)": lambda: [
            getattr(la.module, la.param_name) for la in layers
        ],
        "add_decay_ (native, one pass)": lambda: [
            add_decay_(la.original.grad, la.original, mk, DECAY) for la, mk in zip(layers, masks, strict=True)
        ],
        "(for scale) one dense copy of all sparse weights": lambda: [la.original.detach().clone() for la in layers],
    }
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(rounds):
        for k, fn in parts.items():
            t0 = now()
            fn()
            times[k].append(now() - t0)
    n_w = sum(la.original.numel() for la in layers)
    print(f"\n## ours: overhead pieces over its {len(layers)} layers ({n_w:,} weights), median of {rounds}, ms/step")
    print_table(["piece", "median ms", "min ms"],
                [[k, f"{median(v) * 1e3:.2f}", f"{min(v) * 1e3:.2f}"] for k, v in times.items()])


def profile(steps: dict[str, Callable[[], None]], n_steps: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    totals: dict[str, dict[str, float]] = {}
    for name in ("dense", "ours"):
        for _ in range(2):
            steps[name]()
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n_steps):
                steps[name]()
        totals[name] = {e.key: e.self_cpu_time_total / n_steps / 1e3 for e in prof.key_averages()}
        print(f"\n## profile: {name}, top 12 ops by self CPU time (ms per step)")
        top = sorted(totals[name].items(), key=lambda kv: -kv[1])[:12]
        print_table(["op", "ms/step"], [[k, f"{v:.2f}"] for k, v in top])
    keys = totals["ours"].keys() | totals["dense"].keys()
    diff = {k: totals["ours"].get(k, 0.0) - totals["dense"].get(k, 0.0) for k in keys}
    print("\n## profile: ours - dense, largest per-op self-CPU differences (ms per step)")
    top = sorted(diff.items(), key=lambda kv: -kv[1])[:15]
    print_table(
        ["op", "ours - dense ms/step", "ours ms/step", "dense ms/step"],
        [[k, f"{v:+.2f}", f"{totals['ours'].get(k, 0.0):.2f}", f"{totals['dense'].get(k, 0.0):.2f}"] for k, v in top],
    )
    print(
        f"sum of self CPU: ours {sum(totals['ours'].values()):.1f} ms/step, "
        f"dense {sum(totals['dense'].values()):.1f} ms/step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-readme", type=Path, default=DEFAULT_README)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run; noisier)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 25, quick 3)")
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also profile dense and ours with torch.profiler")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 25)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    names = ["dense", "ours", "ours-nofc", "ours-flat-nofc", "reference"]
    steps, notes = build_variants(args.reference_readme, names)
    print(f"# train step, CIFAR ResNet-18, batch 32, SGD momentum; {machine_line()}")
    print(f"reference README: {args.reference_readme}")
    for name in names:
        print(f"  {name:15s} {notes[name]}")

    load_before = os.getloadavg()
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        this_round: dict[str, float] = {}
        for name in order:
            ts = []
            for _ in range(args.steps_per_round):
                t0 = now()
                steps[name]()
                ts.append(now() - t0)
            times[name].extend(ts)
            this_round[name] = median(ts)
        per_round.append(this_round)

    med = {name: median(times[name]) for name in names}
    dense = med["dense"]
    print(f"\n## step time, {rounds} interleaved rounds x {args.steps_per_round} step(s), warm-up {warmup}")
    rows = []
    for name in names:
        paired = median([rd[name] / rd["dense"] for rd in per_round])
        rows.append([
            name, f"{med[name] * 1e3:.1f}", f"{min(times[name]) * 1e3:.1f}", f"{med[name] / dense:.3f}",
            f"{paired:.3f}", f"{min(times[name]) / min(times['dense']):.3f}",
        ])
    print_table(
        ["variant", "median ms", "min ms", "/dense (medians)", "/dense (median of paired)", "/dense (mins)"], rows
    )
    print(f"load average before: {load_before}, after: {os.getloadavg()} (2 cores; > ~2.5 means other jobs competed)")

    ref_over = med["reference"] - dense
    mins = {name: min(times[name]) for name in names}
    print("\n## targets (on medians; min-based figures alongside, being the least disturbed by other jobs)")
    out = []
    for name in ("ours", "ours-nofc", "ours-flat-nofc"):
        over = med[name] - dense
        # paired: the median over rounds of (variant - dense), over the same for the reference
        paired_over = median([rd[name] - rd["dense"] for rd in per_round])
        paired_ref = median([rd["reference"] - rd["dense"] for rd in per_round])
        paired_ratio = paired_over / paired_ref if paired_ref > 0 else float("nan")
        out.append([
            name,
            f"{med[name] / dense:.3f}",
            "yes" if med[name] / dense <= 1.05 else "NO",
            f"{over * 1e3:+.1f}",
            f"{over / ref_over:.3f}" if ref_over > 0 else "n/a (ref overhead <= 0)",
            f"{paired_ratio:.3f}",
            "yes" if ref_over > 0 and over / ref_over <= 0.5 else "NO",
            f"{mins[name] / mins['dense']:.3f}",
            f"{(mins[name] - mins['dense']) / (mins['reference'] - mins['dense']):.3f}",
        ])
    print(f"reference/dense = {med['reference'] / dense:.3f}  (reference overhead {ref_over * 1e3:+.1f} ms/step)")
    print_table(
        ["variant", "/dense", "<= 1.05?", "overhead ms", "overhead/ref overhead", "same, paired diffs", "<= 0.5?",
         "/dense (mins)", "overhead/ref (mins)"],
        out,
    )
    if args.profile:
        overhead_parts(5 if args.quick else 15)
        profile(steps, 3 if args.quick else 5)


if __name__ == "__main__":
    main()
