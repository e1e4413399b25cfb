"""FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) and tensor parallelism (``parallelize_module``) on two CPU
processes (gloo), through ``tests/fsdp2_script.py``: masks computed on each rank's part, identical on every rank
and equal to one process with the same global batch; exactly N:M gathered weights; one set of files; bit-exact
resume from a full file and from a sharded folder; row-wise slices that split groups refused. Both together on a 2-D
mesh (4 processes: tensor parallelism, then nm_lightning.attach_pending, then FSDP2) equal one process too."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyNet, metrics_rows
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from nm_lightning import SRSTECallback, nm_mask, sparse_layers

SCRIPT = Path(__file__).resolve().parent / "fsdp2_script.py"
ROOT = Path(__file__).resolve().parent.parent


def _script(tmp_path: Path, mode: str, devices: int, batch_size: int) -> Path:
    out = tmp_path / f"{mode}_{devices}"
    out.mkdir()
    # the worktree's package, whatever is installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, str(SCRIPT), str(out), mode, str(devices), str(batch_size)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


NM_KEYS = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")
EXTRA = ".parametrizations.weight.0._extra_state"


def _check_like_one_process(single: Any, ranks: list[Any], one: Path, many: Path, steps: int, logged: int) -> Any:
    """A sharded SR-STE + schedule run against one process: the same steps, N:M states and masks on every rank
    (fixed at 1:4), the full weights gathered on rank 0 only and equal within 1e-5, one set of export files whose
    weights are exactly 1:4 along the input dim and equal one process's, and the N:M metrics logged every step.
    Returns the sharded run's exported dense state dict."""
    for r, got in enumerate(ranks):
        assert got["step"] == single["step"] == steps and got["nm"] == single["nm"], r
        for k in single["masks"]:
            assert torch.equal(got["masks"][k], single["masks"][k]), (r, k)
        assert bool(got["full"]) == (r == 0), r  # gathered on rank 0 only
    assert all(n == 1 and frozen for n, _, frozen in single["nm"].values())  # fixed from step 9 on
    assert set(ranks[0]["full"]) == set(single["full"])
    for k, v in single["full"].items():
        torch.testing.assert_close(ranks[0]["full"][k], v, rtol=0, atol=1e-5)
    # the export (gathered, rank 0 writes): plain keys, exactly 1:4 along the input dim, equal to one process
    dense_many = torch.load(next(many.glob("main/**/model_dense.pt")), weights_only=True)
    dense_one = torch.load(next(one.glob("main/**/model_dense.pt")), weights_only=True)
    assert set(dense_many) == set(dense_one)
    for k in NM_KEYS:
        w = dense_many[k]
        assert torch.equal(w != 0, nm_mask(w, 1, 4) & (w != 0)) and int((w != 0).sum()) == w.numel() // 4, k
        torch.testing.assert_close(w, dense_one[k], rtol=0, atol=1e-5)
    assert _files(many / "main") == _files(one / "main")  # one set of files, the same names as one process
    rows = metrics_rows(many / "main")
    assert sum(1 for r in rows if r.get("nm/sparsity")) >= logged
    assert float([r for r in rows if r.get("nm/sparsity")][-1]["nm/sparsity"]) == pytest.approx(0.75)
    return dense_many


def _check_saved_files(out: Path, plain_keys: Any) -> None:
    """The full file holds the plain model's keys with exactly N:M masked weights (and the N:M state aside); the
    sharded folder holds the plain keys too."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = torch.load(out / "full.ckpt", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(plain_keys)
    for k in NM_KEYS:
        w, n = ckpt["state_dict"][k], ckpt["nm_lightning"]["state"][k.replace(".weight", EXTRA)]["n"]
        assert n < 4 and torch.equal(w != 0, nm_mask(w, n, 4) & (w != 0)), k
    saved = set(FileSystemReader(str(out / "sharded.ckpt")).read_metadata().state_dict_metadata)
    assert {f"state_dict.{k}" for k in NM_KEYS} <= saved


@pytest.mark.slow
@pytest.mark.usefixtures("_no_hang")
def test_srste_under_fsdp2_equals_one_process_and_resumes_bit_exact(tmp_path):
    one = _script(tmp_path, "srste", 1, 16)
    two = _script(tmp_path, "srste", 2, 8)
    single = torch.load(one / "main_rank0_of_1.pt", weights_only=True)
    r0 = torch.load(two / "main_rank0_of_2.pt", weights_only=True)
    r1 = torch.load(two / "main_rank1_of_2.pt", weights_only=True)
    # each rank masked its own rows (torch.chunk: fc2's 5 rows split 3 + 2)
    assert r0["shards"] == {"conv1": (0, 4), "conv2": (0, 8), "fc1": (0, 14), "fc2": (0, 3)}
    assert r1["shards"] == {"conv1": (4, 8), "conv2": (8, 16), "fc1": (14, 28), "fc2": (3, 5)}
    dense_two = _check_like_one_process(single, [r0, r1], one, two, steps=12, logged=10)
    assert any(r.get("nm/flip_rate") for r in metrics_rows(two / "main"))

    # stop mid-epoch at step 6, save, resume with a fresh model and callbacks: bit-identical to the unbroken run
    straight = torch.load(two / "straight_rank0_of_2.pt", weights_only=True)
    for name in ("full.ckpt", "sharded.ckpt"):
        resumed = torch.load(two / f"resume_{name}_rank0_of_2.pt", weights_only=True)
        assert resumed["step"] == straight["step"] == 10 and resumed["nm"] == straight["nm"], name
        for k, v in straight["full"].items():
            assert torch.equal(resumed["full"][k], v), (name, k)
        for k, v in straight["masks"].items():
            assert torch.equal(resumed["masks"][k], v), (name, k)
    # the full file: the plain model's keys with masked weights; the exact N:M state aside
    ckpt = torch.load(two / "full.ckpt", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(dense_two)
    for k in NM_KEYS:
        w, n = ckpt["state_dict"][k], ckpt["nm_lightning"]["state"][k.replace(".weight", EXTRA)]["n"]
        assert n < 4 and torch.equal(w != 0, nm_mask(w, n, 4) & (w != 0)), k
    assert {k.split(".parametrizations")[0] for k in ckpt["nm_lightning"]["state"]} == {"conv1", "conv2", "fc1", "fc2"}
    # the sharded folder: the module's keys (N:M state included) and the plain keys with masked weights
    from torch.distributed.checkpoint import FileSystemReader

    saved = set(FileSystemReader(str(two / "sharded.ckpt")).read_metadata().state_dict_metadata)
    for k in NM_KEYS:
        layer = k.rsplit(".", 1)[0]
        assert {f"state_dict.{k}", f"state_dict.{layer}.parametrizations.weight.original",
                f"state_dict.{layer}.parametrizations.weight.0.mask"} <= saved, k  # fmt: skip
    meta = torch.load(two / "sharded.ckpt" / "meta.pt", weights_only=True)
    assert meta["nm_lightning"]["sharded"] is True


@pytest.mark.slow
@pytest.mark.usefixtures("_no_hang")
def test_tensor_parallel_equals_one_process_and_resumes_bit_exact(tmp_path):
    """ColwiseParallel fc1 + RowwiseParallel fc2 (input slices of 16, multiples of 4) under SR-STE + a schedule:
    N:M attached after parallelize_module on the placed weights; both ranks equal one process without tensor
    parallelism on the same batch; one set of export files, exactly 1:4 along the input dim; bit-exact resume from a
    full file and from a sharded folder; the placed forward is bit for bit the unsharded one. A DominoSearch takes
    the decisions of one process (same steps, N, masks, thresholds, MACs, scheme file) and resumes bit-exact."""
    one = _script(tmp_path, "tp", 1, 16)
    two = _script(tmp_path, "tp", 2, 16)
    single = torch.load(one / "main_rank0_of_1.pt", weights_only=True)
    r0 = torch.load(two / "main_rank0_of_2.pt", weights_only=True)
    r1 = torch.load(two / "main_rank1_of_2.pt", weights_only=True)
    placed = {"conv1": "None", "conv2": "None", "fc1": "(Shard(dim=0),)", "fc2": "(Shard(dim=1),)"}
    assert r0["placements"] == r1["placements"] == placed
    dense_two = _check_like_one_process(single, [r0, r1], one, two, steps=12, logged=10)
    for k in NM_KEYS:  # SparseLayer.effective gathers a placed weight on every rank
        layer = k.rsplit(".", 1)[0]
        assert torch.equal(r0["effective"][layer], dense_two[k]) and torch.equal(r1["effective"][layer], dense_two[k])
    straight = torch.load(two / "straight_rank0_of_2.pt", weights_only=True)
    for name in ("full.ckpt", "sharded.ckpt"):
        for rank in (0, 1):
            resumed = torch.load(two / f"resume_{name}_rank{rank}_of_2.pt", weights_only=True)
            assert resumed["step"] == straight["step"] == 10 and resumed["nm"] == straight["nm"], name
            for k, v in straight["masks"].items():
                assert torch.equal(resumed["masks"][k], v), (name, k)
        for k, v in straight["full"].items():
            assert torch.equal(torch.load(two / f"resume_{name}_rank0_of_2.pt", weights_only=True)["full"][k], v)
    _check_saved_files(two, dense_two)
    # DominoSearch: vote counts summed over the ranks, thresholds of each rank's part gathered for the checkpoint
    single = torch.load(one / "domino_rank0_of_1.pt", weights_only=True)
    for rank in (0, 1):
        got = torch.load(two / f"domino_rank{rank}_of_2.pt", weights_only=True)
        assert got["step"] == single["step"] < 90 and got["nm"] == single["nm"], rank
        assert any(n < m for n, m, _ in single["nm"].values())
        for k in single["masks"]:
            assert torch.equal(got["masks"][k], single["masks"][k]), (rank, k)
    found = [[p.read_text() for p in (d / "domino").rglob("found.json")] for d in (two, one)]
    assert len(found[0]) == 1 and found[0] == found[1]
    states = [torch.load(d / "domino.ckpt", weights_only=True)["callbacks"] for d in (two, one)]
    (s2,), (s1,) = ([v for k, v in s.items() if k.startswith("DominoSearchCallback")] for s in states)
    for name, layer in s1["search"]["layers"].items():
        assert torch.equal(s2["search"]["layers"][name]["thresholds"], layer["thresholds"]), name
        assert s2["search"]["layers"][name]["macs"] == layer["macs"], name
    straight = torch.load(two / "domino_straight_rank0_of_2.pt", weights_only=True)
    resumed = torch.load(two / "domino_resume_rank0_of_2.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 14 and resumed["nm"] == straight["nm"]
    for k, v in straight["full"].items():
        assert torch.equal(resumed["full"][k], v), k
    for rank in (0, 1):
        assert (two / f"numerics_rank{rank}.txt").read_text().splitlines() == [
            "S(0): [True, True]", "S(1): [True, True]", "R: [True, True]"
        ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("_no_hang")
def test_two_dimensional_mesh_equals_one_process_and_resumes_bit_exact(tmp_path):
    """A 2-D mesh on 4 processes (data_parallel_size=2 x tensor_parallel_size=2): parallelize_module (fc1
    column-wise, fc2 row-wise in slices of 16), nm_lightning.attach_pending, fully_shard per layer and on the root.
    SR-STE + a schedule equal one process on the concatenated batches of the two data-parallel groups; masks
    identical on every rank, exactly 1:4 along the input dim; one set of export files; local_part of a 2-D DTensor
    (FSDP2's _StridedShard over ColwiseParallel included) matches full_tensor; bit-exact resume from a full file and
    from a sharded folder. A DominoSearch takes the decisions of one process. A configure_model without
    attach_pending fails on every rank naming the line to add."""
    one = _script(tmp_path, "2d", 1, 16)
    four = _script(tmp_path, "2d", 4, 8)
    single = torch.load(one / "main_rank0_of_1.pt", weights_only=True)
    ranks = [torch.load(four / f"main_rank{r}_of_4.pt", weights_only=True) for r in range(4)]
    placed = {"conv1": "(Shard(dim=0),)", "conv2": "(Shard(dim=0),)",
              "fc1": "(_StridedShard(dim=0, sf=2), Shard(dim=0))", "fc2": "(Shard(dim=0), Shard(dim=1))"}  # fmt: skip
    for r, got in enumerate(ranks):
        assert got["placements"] == placed, r
        assert all(got["local_part_ok"].values()), (r, got["local_part_ok"])
    dense_four = _check_like_one_process(single, ranks, one, four, steps=10, logged=9)
    for k in NM_KEYS:
        layer = k.rsplit(".", 1)[0]
        assert all(torch.equal(got["effective"][layer], dense_four[k]) for got in ranks), k
    # stopped at step 6, saved, resumed to step 10: bit-identical to the unbroken main run, on every rank
    for name in ("full.ckpt", "sharded.ckpt"):
        for r, straight in enumerate(ranks):
            resumed = torch.load(four / f"resume_{name}_rank{r}_of_4.pt", weights_only=True)
            assert resumed["step"] == 10 and resumed["nm"] == straight["nm"], (name, r)
            for k, v in straight["masks"].items():
                assert torch.equal(resumed["masks"][k], v), (name, r, k)
            for k, v in straight["effective"].items():
                assert torch.equal(resumed["effective"][k], v), (name, r, k)
            for k, v in straight["full"].items():
                assert torch.equal(resumed["full"][k], v), (name, r, k)
    _check_saved_files(four, dense_four)
    # DominoSearch: vote counts summed over the whole mesh: the decisions of one process, one scheme file
    single = torch.load(one / "domino_rank0_of_1.pt", weights_only=True)
    for r in range(4):
        got = torch.load(four / f"domino_rank{r}_of_4.pt", weights_only=True)
        assert got["step"] == single["step"] < 90 and got["nm"] == single["nm"], r
        for k in single["masks"]:
            assert torch.equal(got["masks"][k], single["masks"][k]), (r, k)
    assert any(n < m for n, m, _ in single["nm"].values())
    found = [[p.read_text() for p in (d / "domino").rglob("found.json")] for d in (four, one)]
    assert len(found[0]) == 1 and found[0] == found[1]
    states = [torch.load(d / "domino.ckpt", weights_only=True)["callbacks"] for d in (four, one)]
    (s4,), (s1,) = ([v for k, v in s.items() if k.startswith("DominoSearchCallback")] for s in states)
    for name, layer in s1["search"]["layers"].items():
        assert torch.equal(s4["search"]["layers"][name]["thresholds"], layer["thresholds"]), name
    for r in range(4):  # configure_model without attach_pending: the same clear error on every rank
        line = (four / f"errors_rank{r}.txt").read_text().strip()
        assert line.startswith("missing_attach: MisconfigurationException: SRSTECallback: under a 2-D mesh "
                               "(data_parallel_size=2, tensor_parallel_size=2)"), line  # fmt: skip
        assert "add `nm_lightning.attach_pending(self)` in configure_model right after `parallelize_module" in line


def test_attach_pending_is_a_no_op_without_a_two_dimensional_mesh():
    """Nothing registered (FSDP2 alone, tensor parallelism alone, no mesh): attach_pending does nothing, so one
    configure_model serves every layout; registered attaches run once, in order."""
    from nm_lightning import attach_pending
    from nm_lightning.callbacks.model_parallel import register_pending

    net = TinyNet()
    attach_pending(net)
    assert not sparse_layers(net)
    ran = []
    register_pending(net, lambda: ran.append(1))
    register_pending(net, lambda: ran.append(2))
    attach_pending(net)
    attach_pending(net)
    assert ran == [1, 2]


def test_attach_pending_after_fully_shard_is_refused():
    """Called after ``fully_shard`` (too late: FSDP2 already took the plain weights), the registered attaches do not
    run and the error says where the call belongs."""
    from torch.distributed.fsdp import FSDPModule

    from nm_lightning import attach_pending
    from nm_lightning.callbacks.model_parallel import register_pending

    net = TinyNet()
    first = next(m for m in net.modules() if isinstance(m, nn.Linear))
    first.__class__ = type(f"FSDP{type(first).__name__}", (FSDPModule, type(first)), {})  # what fully_shard does
    ran = []
    register_pending(net, lambda: ran.append(1))
    with pytest.raises(MisconfigurationException, match=r"called after fully_shard.*right after parallelize_module"):
        attach_pending(net)
    assert ran == []


def test_two_dimensional_mesh_mode_and_missing_attach_error():
    """A 2-D mesh is the "2d" mode; the missing-attach error names both sizes and the line to add."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from nm_lightning.callbacks.model_parallel import missing_attach_error, model_parallel_mode

    class Mesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return types.SimpleNamespace(size=lambda: 2 if name == "data_parallel" else 4)

    strategy = ModelParallelStrategy.__new__(ModelParallelStrategy)
    strategy._device_mesh = Mesh()
    assert model_parallel_mode(strategy, "SRSTECallback") == "2d"
    err = missing_attach_error("SRSTECallback", strategy)
    assert isinstance(err, MisconfigurationException)
    assert "data_parallel_size=2, tensor_parallel_size=4" in str(err)
    assert "nm_lightning.attach_pending(self)" in str(err)


@pytest.mark.parametrize("rows, world", [(5, 2), (28, 2), (3, 4), (16, 3)])
def test_row_shard_follows_torch_chunk(rows, world):
    """FSDP2 shards dim 0 like ``torch.chunk`` (a trailing rank may hold fewer rows or none)."""
    from nm_lightning.distributed import RowShard

    chunks = torch.arange(rows).chunk(world)
    for rank in range(world):
        shard = RowShard(group=None, rank=rank, world=world, rows=rows)
        expected = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(shard.start, shard.stop)) == expected


def test_masked_straight_through_matches_the_unsharded_forward():
    """The sharded forward's ``W ⊙ E`` is bit-identical to ``ste_nm`` (+0 where pruned) and its gradient passes
    straight through; masks of row blocks equal the rows of the whole mask."""
    from nm_lightning.distributed import RowShard, gather_rows, local_rows, masked_straight_through
    from nm_lightning.srste import ste_nm

    w = torch.randn(5, 16, requires_grad=True)
    ref, mask = ste_nm(w, 2, 4)
    blocks = [nm_mask(local_rows(w, RowShard(None, r, 2, 5)), 2, 4) for r in range(2)]
    assert torch.equal(torch.cat(blocks), mask)
    out = masked_straight_through(w, mask)
    assert torch.equal(out, ref) and torch.equal(torch.signbit(out), torch.signbit(ref))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    with pytest.raises(ValueError, match="this rank's 3 rows"):
        gather_rows(mask, RowShard(None, 0, 2, 5))


@pytest.mark.parametrize("base", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_flattening_strategies_are_refused_naming_the_alternative(base):
    """FSDP1 and DeepSpeed flatten parameters (groups straddle ranks): refused by type, naming FSDP2."""
    import lightning.pytorch.strategies as strategies

    user_cls = type(f"My{base}", (getattr(strategies, base),), {})
    fake = types.SimpleNamespace(strategy=user_cls.__new__(user_cls))
    with pytest.raises(MisconfigurationException, match=rf"does not support My{base} .*ModelParallelStrategy with "
                       "fully_shard"):  # fmt: skip
        SRSTECallback().setup(fake, TinyNet(), "fit")


@pytest.mark.slow
@pytest.mark.usefixtures("_no_hang")
def test_unsupported_model_parallel_setups_fail_clearly(tmp_path):
    """RowwiseParallel on fc2 (28 inputs in slices of 14, m=4) names the layer, the slice size and M; a layer built
    in configure_model (after the FSDP2 attach) is named; the placement check itself; a sharded folder written with
    another N:M configuration is refused on resume."""
    out = _script(tmp_path, "errors", 2, 8)
    for rank in (0, 1):  # every rank fails the same way (no rank waits in a collective)
        lines = (out / f"errors_rank{rank}.txt").read_text().splitlines()
        assert lines[0].startswith("tensor_parallel: MisconfigurationException: SRSTECallback: layer 'fc2': dim 1 ")
        assert "sharded over 2 ranks into slices of 14, not a multiple of m=4" in lines[0]
        assert "layers ['head'] were built in configure_model" in lines[1]
        assert lines[2].startswith("rowwise_m4: layer 'fc2'") and "slices of 14, not a multiple of m=4" in lines[2]
        assert lines[3] == "rowwise_m2: no error"
        # a sharded folder written with 1:4, resumed with 2:4 (the folder's states are checked after loading)
        # attached by hand after fully_shard: refused naming the layer and the order the callbacks use
        assert lines[4].startswith("attach_after: ShardingError: layer '0'"), lines[4]
        assert "attach N:M before fully_shard" in lines[4]
        assert lines[5].startswith("other_configuration: SRSTECallback: the checkpoint's N:M state does not match: ")
        assert "conv1: 1:4 in the checkpoint, 2:4 here" in lines[5]
        # a sharded folder whose .metadata is a pickle with code: refused before torch.distributed.checkpoint reads it
        assert lines[6].startswith("malicious_folder: UnsafeCheckpointError: "), lines[6]
        assert "refused before anything in it ran" in lines[6] and lines[6].endswith("marker exists: False")


def test_fsdp2_sim_trainer_config(compose_train):
    """``trainer=fsdp2_sim``: two CPU processes under ModelParallelStrategy (FSDP2 only, no tensor parallelism)."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import ModelParallelStrategy

    cfg = compose_train("trainer=fsdp2_sim")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    strategy = trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy) and trainer.num_devices == 2
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)
    assert strategy.process_group_backend is None or strategy.process_group_backend == "gloo"


@pytest.mark.slow
@pytest.mark.usefixtures("_no_hang")
def test_domino_search_under_fsdp2_decides_like_one_process(tmp_path):
    """Each rank votes on its own rows; the vote counts are summed over the ranks, so both ranks take the decisions
    of one process with the same global batch: same steps, same N per layer, same scheme file (written once)."""
    one = _script(tmp_path, "domino", 1, 16)
    two = _script(tmp_path, "domino", 2, 8)
    single = torch.load(one / "main_rank0_of_1.pt", weights_only=True)
    r0 = torch.load(two / "main_rank0_of_2.pt", weights_only=True)
    r1 = torch.load(two / "main_rank1_of_2.pt", weights_only=True)
    assert r0["step"] == r1["step"] == single["step"] < 120  # the target was met and fit stopped early
    assert r0["nm"] == r1["nm"] == single["nm"] and any(n < m for n, m, _ in single["nm"].values())
    for k in single["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]) and torch.equal(r0["masks"][k], single["masks"][k]), k
    for k, v in single["full"].items():
        torch.testing.assert_close(r0["full"][k], v, rtol=0, atol=1e-5)
    found = [(d / "main").rglob("found.json") for d in (two, one)]
    texts = [[p.read_text() for p in f] for f in found]
    assert len(texts[0]) == 1 and texts[0] == texts[1]
    assert _files(two / "main") == _files(one / "main")
    assert any(r.get("nm/domino/sparsity") for r in metrics_rows(two / "main"))
    # the callback state in a checkpoint holds every layer's full thresholds (gathered from the ranks' rows)
    states = [torch.load(d / "domino.ckpt", weights_only=True)["callbacks"] for d in (two, one)]
    (s2,), (s1,) = ([v for k, v in s.items() if k.startswith("DominoSearchCallback")] for s in states)
    for name, layer in s1["search"]["layers"].items():
        assert torch.equal(s2["search"]["layers"][name]["thresholds"], layer["thresholds"]), name
    assert s1["search"]["layers"]["fc2"]["thresholds"].shape == (5, 7, 1, 1)
    # resumed mid-search from a sharded folder (each rank takes its rows of the thresholds back): bit-identical
    straight = torch.load(two / "straight_rank0_of_2.pt", weights_only=True)
    resumed = torch.load(two / "resume_rank0_of_2.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 14 and resumed["nm"] == straight["nm"]
    for k, v in straight["full"].items():
        assert torch.equal(resumed["full"][k], v), k
