"""Memory kept alive for backward by N:M sparse layers, per sparse weight, relative to the dense model.

For a Linear, a Conv2d and the CIFAR ResNet-18 it runs one training-mode forward (no backward) of a dense,
an nm_lightning (``plan_layers`` + ``attach``, 2:4) and a reference (README ``Sparse``/``SparseConv``) model
from the same weights and input, and counts what autograd holds until backward. The single-layer inputs
require grad (as for any layer inside a network): otherwise ``F.linear`` would not save its weight at all.

1. ``raw``: every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` (``numel * element_size``,
   counted once per save). A Parameter saved for backward counts here although it costs nothing extra:
   it exists anyway.
2. ``excl. params``: the same without the tensors that share storage with a model Parameter (the real extra
   memory seen by the hooks).
3. ``+ ctx attrs``: (2) plus tensors stored as plain attributes of custom-Function contexts (``ctx.mask = ...``
   in the reference). ``save_for_backward`` goes through the hooks; attributes on ``ctx`` do not, so they are
   found by walking the autograd graph (a custom Function's ``grad_fn`` node *is* its ``ctx``). Storages are
   de-duplicated, so this is the memory alive between forward and backward, beyond the Parameters.

Each figure is reported as ``(sparse - dense) / number of sparse weights`` in bytes. Target: <= 1 byte.
Persistent state (nm_lightning's bool ``mask`` buffer, 1 byte per weight, kept in the model all the time) is
not "saved for backward" and is listed separately.

Run: ``python benchmarks/saved_memory.py [--reference-readme PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_README, ResNet18, load_reference, machine_line, print_table, reference_conv_factory  # noqa: E402,I001

from nm_lightning.sparsify import attach, plan_layers  # noqa: E402
from nm_lightning.srste import _pack as _nm_pack  # noqa: E402
from nm_lightning.srste import _unpack as _nm_unpack  # noqa: E402


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def measure(model: nn.Module, x: torch.Tensor, recompute: bool = False) -> dict[str, int]:
    """Bytes held by autograd after one training forward of ``model`` on ``x``.

    ``recompute``: pack with nm_lightning's ``recompute_masked_weights`` hooks (what SRSTECallback enables by
    default); a masked weight is then kept as (its Parameter, its bool mask), so the mask is what is counted.
    """
    model.train()
    params = {_storage_key(p) for p in model.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> object:
        packed = _nm_pack(t) if recompute else t
        if isinstance(packed, tuple):  # ("_nm_source", W, mask, version, view): W is a Parameter
            saved.extend([packed[1], packed[2]])
            return packed
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, _nm_unpack if recompute else (lambda t: t)):
        loss = model(x).float().sum()

    raw = sum(t.numel() * t.element_size() for t in saved)
    not_param = [t for t in saved if _storage_key(t) not in params]
    excl = sum(t.numel() * t.element_size() for t in not_param)

    # tensors kept as ctx attributes of custom autograd Functions (invisible to saved_tensors_hooks)
    ctx_tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            if isinstance(value, torch.Tensor):
                ctx_tensors.append(value)
        stack.extend(nxt for nxt, _ in node.next_functions)
    ctx_bytes = sum(t.numel() * t.element_size() for t in ctx_tensors)
    unique: dict[int, int] = {}
    for t in (*not_param, *ctx_tensors):
        if _storage_key(t) not in params:
            unique[_storage_key(t)] = t.untyped_storage().nbytes()
    return {"raw": raw, "excl": excl, "ctx": ctx_bytes, "alive": sum(unique.values())}


class RefLinear(nn.Linear):
    """Linear through the reference ``Sparse`` function (the README has no SparseLinear; built the same way)."""

    sparse_fn: Callable[..., torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, type(self).sparse_fn(self.weight, 2, 4), self.bias)


def cases(ns: dict) -> list[tuple[str, Callable[[], nn.Module], Callable[[], nn.Module], torch.Tensor]]:
    RefLinear.sparse_fn = ns["Sparse"].apply
    ref_conv = reference_conv_factory(ns, 2, 4)
    torch.manual_seed(0)
    return [
        ("Linear(1024, 1024), x [64, 1024]", lambda: nn.Linear(1024, 1024), lambda: RefLinear(1024, 1024),
         torch.randn(64, 1024, requires_grad=True)),
        ("Conv2d(64, 128, 3), x [8, 64, 16, 16]", lambda: nn.Conv2d(64, 128, 3, padding=1),
         lambda: ref_conv(64, 128, 3, padding=1), torch.randn(8, 64, 16, 16, requires_grad=True)),
        ("ResNet-18 CIFAR, x [32, 3, 32, 32]", ResNet18, lambda: ResNet18(conv=ref_conv), torch.randn(32, 3, 32, 32)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-readme", type=Path, default=DEFAULT_README)
    args = parser.parse_args()
    ns = load_reference(args.reference_readme)
    print(f"# memory held for backward, per sparse weight; {machine_line()}")
    print(f"reference README: {args.reference_readme}")
    rows, persistent = [], []
    for title, make_dense, make_ref, x in cases(ns):
        torch.manual_seed(0)
        dense_model = make_dense()
        state = copy.deepcopy(dense_model.state_dict())
        dense = measure(dense_model, x)
        variants: list[tuple[str, nn.Module, int, bool]] = []
        for label, exclude, recompute in (
            ("ours, recompute_masked=False", None, False),
            ("ours (callback default: recompute_masked=True)", None, True),
            ("ours, fc dense", ["fc"], True),
        ):
            if exclude and "ResNet" not in title:
                continue
            model = make_dense()
            model.load_state_dict(state)
            plans = plan_layers(model, 2, 4, exclude=exclude)
            layers = attach(model, plans)
            n_sparse = sum(p.numel for p in plans if p.status == "covered")
            variants.append((label, model, n_sparse, recompute))
            buf = sum(layer.sparsity.mask.numel() * layer.sparsity.mask.element_size() for layer in layers.values())
            persistent.append([title, label, f"{buf:,}", f"{buf / n_sparse:.2f}"])
        ref = make_ref()
        ref.load_state_dict(state)
        n_ref = sum(mod.weight.numel() for mod in ref.modules() if isinstance(mod, (ns["SparseConv"], RefLinear)))
        variants.append(("reference" + (" (Sparse.apply + F.linear)" if "Linear(" in title else ""), ref, n_ref, False))
        for label, model, n_sparse, recompute in variants:
            got = measure(model, x, recompute)
            per = {k: (got[k] - dense[k]) / n_sparse for k in got}
            rows.append([
                title, label, f"{n_sparse:,}",
                f"{per['raw']:+.2f}", f"{per['excl']:+.2f}", f"{got['ctx']:,}", f"{per['alive']:+.2f}",
                "yes" if per["alive"] <= 1 else "NO",
            ])
    print("\n## extra bytes per sparse weight vs dense ((sparse - dense) / sparse weights)")
    print_table(
        ["model", "variant", "sparse weights", "raw saved", "excl. params", "ctx-attr bytes",
         "excl. params + ctx attrs (alive)", "alive <= 1 B?"],
        rows,
    )
    print("\n## persistent state (not saved for backward; lives in the model between steps)")
    print_table(["model", "variant", "mask buffer bytes", "bytes / sparse weight"], persistent)
    print("reference: no persistent mask (ctx.mask, float32, lives from forward to backward; counted above)")
    print(
        "\nnotes: a dense layer saves its weight Parameter for backward (free: it exists anyway). Without the\n"
        "recompute hooks a sparse layer saves the masked weight W*E instead, a new tensor of the weight's dtype:\n"
        "same raw bytes, but 4 B/weight (fp32) of real extra memory. With them (the callback's default) it keeps\n"
        "W (the Parameter) and the bool mask, 1 B/weight, and rebuilds W*E in backward. The reference keeps a\n"
        "float32 mask on ctx (4 B/weight, not visible to saved_tensors_hooks) and saves W itself."
    )


if __name__ == "__main__":
    main()
