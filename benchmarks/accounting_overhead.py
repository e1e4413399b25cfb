"""Cost of MAC accounting and of reading scheme files at their limits.

1. ``measure_macs`` (FlopCounterMode + per-module call hooks) against one plain eval forward of the same
   model and batch, and against a hooks-only count (output positions x weight size, the method used before
   FlopCounterMode; kept here only as a baseline). Interleaved rounds, medians, ratios to the plain forward.
   Models: the CIFAR ResNet-18 of ``_common.py`` (batch 8, 32x32) and a 4-layer transformer encoder
   (``nn.TransformerEncoderLayer``: MultiheadAttention + two linears; batch 8, 128 tokens, width 256).
2. ``NMScheme.load`` on hostile files at the size limits (a valid 16 MiB JSON scheme of 541k layers, a 16 MiB
   JSON of nested empty lists, a 16 MiB DominoSearch dict of 1M entries, a 1 MiB YAML scheme), next to plain
   ``json.loads`` of the valid JSON; seconds per load (median of the rounds) and the ratio to ``json.loads``.

Run: ``python benchmarks/accounting_overhead.py [--rounds 7]`` (wrap in ``flock /work/bench.lock`` on the
shared machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ResNet18  # noqa: E402

from nm_lightning import NMScheme  # noqa: E402
from nm_lightning.accounting import measure_macs  # noqa: E402
from nm_lightning.scheme import MAX_SCHEME_BYTES, MAX_YAML_BYTES  # noqa: E402


def covered_names(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names += [f"{name}.in_proj_weight", f"{name}.out_proj"]
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and not name.endswith("out_proj"):
            names.append(name)
    return names


@torch.no_grad()
def hooks_only_macs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Baseline: output positions from forward hooks x weight entries (MHA: query tokens)."""
    positions: dict[str, float] = {}
    handles = []
    modules = dict(model.named_modules())
    for module_name, module in modules.items():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.MultiheadAttention)):

            def hook(mod: nn.Module, args: Any, out: Any, key: str = module_name) -> None:
                if isinstance(mod, nn.MultiheadAttention):
                    positions[key] = positions.get(key, 0.0) + args[0].numel() / mod.embed_dim
                else:
                    channels = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
                    positions[key] = positions.get(key, 0.0) + out.numel() / channels

            handles.append(module.register_forward_hook(hook))
    model(x)
    for h in handles:
        h.remove()
    out = {}
    for name in names:
        if name in modules:
            pos = positions.get(name)
            if pos is None:  # out_proj: called functionally by its MultiheadAttention
                pos = positions[name.rpartition(".")[0]]
            out[name] = modules[name].weight.numel() * pos / x.shape[0]
        else:
            head, _, param = name.rpartition(".")
            out[name] = getattr(modules[head], param).numel() * positions[head] / x.shape[0]
    return out


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_accounting(rounds: int) -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True), 4)
    cases = {
        "ResNet-18 (CIFAR), batch 8": (ResNet18().eval(), torch.randn(8, 3, 32, 32)),
        "Transformer encoder x4, batch 8x128": (encoder.eval(), torch.randn(8, 128, 256)),
    }
    print("## measure_macs vs one plain forward (medians of interleaved rounds)")
    print("| model | layers | forward ms | measure_macs ms | hooks-only ms | measure_macs/forward | hooks/forward |")
    print("|---|---|---|---|---|---|---|")
    for label, (model, x) in cases.items():
        names = covered_names(model)
        new = measure_macs(model, x, names)
        old = hooks_only_macs(model, x, names)
        assert new == old, "the two counts differ"

        def forward(model: nn.Module = model, x: torch.Tensor = x) -> None:
            with torch.no_grad():
                model(x)

        med = interleaved(
            {
                "forward": forward,
                "measure_macs": lambda model=model, x=x, names=names: measure_macs(model, x, names),
                "hooks": lambda model=model, x=x, names=names: hooks_only_macs(model, x, names),
            },
            rounds,
        )
        f = med["forward"]
        print(
            f"| {label} | {len(names)} | {f * 1e3:.1f} | {med['measure_macs'] * 1e3:.1f} | {med['hooks'] * 1e3:.1f} "
            f"| {med['measure_macs'] / f:.2f} | {med['hooks'] / f:.2f} |"
        )
    print("(both counts are identical per layer on these models)")


def bench_files(rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nm_scheme_bench_"))
    n = MAX_SCHEME_BYTES
    valid_text = json.dumps({f"layer{i}.weight": [1, 4] for i in range(n // 31)})
    assert len(valid_text) <= n
    files = {
        "valid JSON scheme, 541k layers": valid_text,
        "hostile JSON: nested empty lists": ("[]," * (n // 3))[: n - 2].rstrip(",").join("[]"),
        "hostile DominoSearch dict, 1M entries": (
            "{'SparseConv0_4-8-(3,)': [4, 4], " + "".join(f"'k{i}': [1, 4], " for i in range(n // 16))
        )[: n - 10]
        + "}",
        "YAML scheme just under MAX_YAML_BYTES": "".join(f"l{i}: [1, 4]\n" for i in range(MAX_YAML_BYTES // 15)),
    }
    assert len(files["YAML scheme just under MAX_YAML_BYTES"].encode()) <= MAX_YAML_BYTES
    paths = {}
    for label, text in files.items():
        paths[label] = tmp / f"{len(paths)}.txt"
        paths[label].write_text(text)

    model = ResNet18()  # the DominoSearch format needs a model (the hostile dict is refused before it is used)

    def load(path: Path) -> None:
        try:
            NMScheme.load(path, model=model)
        except ValueError:
            pass  # the hostile files are refused; the time to refuse them is what is measured

    fns: dict[str, Callable[[], Any]] = {"json.loads (valid JSON)": lambda: json.loads(valid_text)}
    fns.update({f"NMScheme.load: {k}": (lambda p=p: load(p)) for k, p in paths.items()})
    med = interleaved(fns, rounds)
    base = med["json.loads (valid JSON)"]
    print("\n## NMScheme.load at the limits (medians of interleaved rounds)")
    print("| input | bytes | seconds | / json.loads of the valid JSON scheme |")
    print("|---|---|---|---|")
    sizes = {"json.loads (valid JSON)": len(valid_text)} | {f"NMScheme.load: {k}": len(v) for k, v in files.items()}
    for key, sec in med.items():
        print(f"| {key} | {sizes[key]:,} | {sec:.2f} | {sec / base:.1f} |")
    for p in paths.values():
        p.unlink()
    tmp.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}")
    bench_accounting(args.rounds)
    bench_files(max(3, args.rounds // 2))


if __name__ == "__main__":
    main()
