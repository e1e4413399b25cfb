"""FSDP2 (``fully_shard``) on CPU processes (gloo): the per-rank N:M mask work at world size 1 and 2, and the SR-STE
train step over the dense train step.

Model: an MLP of ``--layers`` square ``Linear(--width, --width)`` layers (N:M 2:4 on every one), batch 64.

Part 1, mask time per rank (the same model at world size 1 and 2): what one rank does in each N:M forward under
FSDP2 (:func:`nm_lightning.distributed.sharded_mask` as called by the parametrization): the N:M mask of its own
rows, then the all-gather of the bool mask. Both are timed separately; every timing is the median of ``--reps``
rounds. At world size 2 each rank masks half the rows, so the compute should halve (1/world size); the gather is
extra communication (1 byte per weight, a quarter of FSDP2's own float32 weight gather).

Part 2, step time at world size 2: an FSDP2 dense model and an FSDP2 SR-STE 2:4 model (N:M attached before
``fully_shard``, shards bound with ``bind_shards``), the same weights and batch; one step = zero_grad + forward +
loss + backward (+ the SR-STE decay on the local shards, as ``SRSTECallback`` adds it) + SGD step. Steps of the two
models alternate (rotating the order) and the ratio of medians is reported.

Run under the shared lock: ``flock /work/bench.lock python benchmarks/fsdp2.py [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nm_lightning.distributed import decay_operands, gather_rows, local_rows, row_shard  # noqa: E402
from nm_lightning.masks import nm_mask  # noqa: E402
from nm_lightning.sparsify import attach, bind_shards, plan_layers, sparse_layers  # noqa: E402
from nm_lightning.srste import add_decay_  # noqa: E402


def _mlp(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods)


def _shard(model: nn.Sequential, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for mod in model:
        if isinstance(mod, nn.Linear):
            fully_shard(mod, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _mask_times(args, mesh) -> tuple[float, float, float]:
    """Per rank, summed over the layers, medians: (mask compute CPU time, mask compute wall time, all-gather wall
    time) in seconds. CPU time (``time.thread_time``, one torch thread per rank) is the work itself; wall time also
    counts waiting for a core on a shared machine."""
    model = _mlp(args.width, args.layers)
    _shard(model, mesh)
    weights = [mod.weight for mod in model if isinstance(mod, nn.Linear)]
    shards = [row_shard(w) for w in weights]
    full = [w.full_tensor() for w in weights]  # the unsharded weight FSDP2 hands to the forward
    cpu, compute, gather = [], [], []
    for _ in range(args.reps):
        dist.barrier()
        c0, t0 = time.thread_time(), time.perf_counter()
        locals_ = [nm_mask(local_rows(w, s), 2, 4) for w, s in zip(full, shards, strict=True)]
        c1, t1 = time.thread_time(), time.perf_counter()
        for local, s in zip(locals_, shards, strict=True):
            gather_rows(local, s)
        t2 = time.perf_counter()
        cpu.append(c1 - c0)
        compute.append(t1 - t0)
        gather.append(t2 - t1)
    return statistics.median(cpu), statistics.median(compute), statistics.median(gather)


def _step_times(args, mesh) -> dict[str, float]:
    base = _mlp(args.width, args.layers)
    dense, sparse = base, copy.deepcopy(base)
    attach(sparse, plan_layers(sparse, 2, 4, "input_channel"))
    _shard(dense, mesh)
    _shard(sparse, mesh)
    bind_shards(sparse)
    layers = list(sparse_layers(sparse).values())
    opts = {
        "dense": torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9),
        "srste": torch.optim.SGD(sparse.parameters(), lr=0.01, momentum=0.9),
    }
    models = {"dense": dense, "srste": sparse}
    torch.manual_seed(1 + dist.get_rank())
    x, y = torch.randn(64, args.width), torch.randn(64, args.width)

    def step(name: str) -> float:
        model, opt = models[name], opts[name]
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if name == "srste":
            for layer in layers:
                w = layer.original
                add_decay_(*decay_operands(w.grad, w, layer.sparsity.mask), 2e-4)
        opt.step()
        return time.perf_counter() - t0

    for name in models:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for r in range(args.reps):
        for name in order[r % 2 :] + order[: r % 2]:
            times[name].append(step(name))
    return {name: statistics.median(v) for name, v in times.items()}


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out = {"mask": _mask_times(args, mesh)}
    if world == 2 or args.steps_at_world_1:
        out["step"] = _step_times(args, mesh)
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def _run(world: int, args) -> dict[int, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a rank failed with exit code {p.exitcode}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--steps-at-world-1", action="store_true")
    parser.add_argument("--quick", action="store_true", help="width 512, 7 reps")
    args = parser.parse_args()
    if args.quick:
        args.width, args.reps = 512, 7
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.threads} thread(s) per rank; MLP {args.layers} x Linear({args.width}, {args.width}), 2:4, "
          f"{args.reps} reps (medians)")  # fmt: skip
    one, two = _run(1, args), _run(2, args)
    cpu1, c1, g1 = one[0]["mask"]
    print("\nmask work per rank (all layers, one forward; CPU = the rank's own work, wall = incl. waiting for a core)")
    print(
        f"  world 1:         compute CPU {cpu1 * 1e3:7.2f} ms  wall {c1 * 1e3:7.2f} ms   all-gather {g1 * 1e3:6.2f} ms"
    )
    for rank in (0, 1):
        cpu2, c2, g2 = two[rank]["mask"]
        print(f"  world 2, rank {rank}: compute CPU {cpu2 * 1e3:7.2f} ms  wall {c2 * 1e3:7.2f} ms   all-gather "
              f"{g2 * 1e3:6.2f} ms   CPU ratio vs world 1: {cpu2 / cpu1:.2f}, wall ratio {c2 / c1:.2f} "
              "(1/world size = 0.50)")  # fmt: skip
    print("\nFSDP2 train step at world size 2 (median per rank)")
    for rank in (0, 1):
        st = two[rank]["step"]
        print(f"  rank {rank}: dense {st['dense'] * 1e3:8.2f} ms   SR-STE {st['srste'] * 1e3:8.2f} ms   "
              f"SR-STE / dense {st['srste'] / st['dense']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
