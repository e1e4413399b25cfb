"""Exports: dense-with-zeros, packed N:M files, 2:4 semi-structured (CUTLASS CPU pack, CUDA), CPU kernels."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, trainer_kwargs
from lightning.pytorch.callbacks import Callback
from torch import nn

from nm_lightning import SRSTECallback, attach, nm_mask, plan_layers
from nm_lightning.export import (
    SparseConv2dCPU,
    SparseLinearCPU,
    dense_state_dict,
    export_artifacts,
    load_packed,
    load_semi_structured,
    pack_state_dict,
    save_dense,
    save_packed,
    save_semi_structured,
    to_cpu_sparse,
    to_semi_structured,
    unpack_state_dict,
)
from nm_lightning.export._util import payload_digest, sha256_file
from nm_lightning.export.packed import pack_bits, unpack_bits

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
NMS = [(1, 4), (2, 4), (4, 8), (3, 8), (2, 16), (1, 16)]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))
    )


def nm_weight(shape, n, m, layout="input_channel", dtype=torch.float32, seed=0, ties=True):
    """An N:M weight with ties, zero kept entries and whole zero groups (masked with +0.0)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2, 3, shape, generator=g).to(dtype) if ties else torch.randn(shape, generator=g).to(dtype)
    w.view(-1)[: max(1, w.numel() // 7)] = 0  # a run of all-zero groups
    return torch.where(nm_mask(w, n, m, layout), w, torch.zeros((), dtype=dtype))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.pw = nn.Conv2d(32, 32, 1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.pw(F.relu(self.conv(x))))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def sparse_net(scheme=None, layout="input_channel", seed=0):
    torch.manual_seed(seed)
    model = Net()
    scheme = scheme or {"conv": (2, 4), "pw": (1, 8), "fc1": (2, 16), "fc2": (1, 4)}
    attach(model, plan_layers(model, layout=layout, scheme=scheme), layout)
    return model


# ---------------------------------------------------------------------------------------------- dense
@pytest.mark.parametrize("frozen", [False, True])
def test_dense_export_loads_strict_with_identical_outputs(tmp_path, frozen):
    model = sparse_net().eval()
    if frozen:
        for mod in model.modules():
            if hasattr(mod, "parametrizations"):
                mod.parametrizations.weight[0].freeze(mod.parametrizations.weight.original)
    path = save_dense(model, tmp_path / "dense.pt")
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(Net().state_dict())
    plain = Net().eval()
    plain.load_state_dict(sd, strict=True)
    x = torch.randn(3, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    assert float((sd["fc1.weight"] != 0).float().mean()) <= 2 / 16
    assert sd.keys() == dense_state_dict(model).keys()


# ---------------------------------------------------------------------------------------------- packed
def test_bit_stream_round_trip():
    g = torch.Generator().manual_seed(0)
    for bits in (1, 2, 3, 4, 5, 7, 8, 13):
        codes = torch.randint(0, 1 << bits, (1001,), generator=g).numpy()
        stream = pack_bits(codes, bits)
        assert stream.size == (1001 * bits + 7) // 8
        assert (unpack_bits(stream, bits, 1001) == codes).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["input_channel", "flat"])
@pytest.mark.parametrize("coding", ["bits", "combinatorial"])
def test_packed_round_trip_bit_exact(dtype, layout, coding):
    for n, m in NMS:
        for shape in [(8, 16, 3, 3), (32, 48)]:
            if shape[1] % m:
                continue
            w = nm_weight(shape, n, m, layout, dtype, seed=n * 31 + m)
            bias = torch.randn(shape[0]).to(dtype)
            packed = pack_state_dict({"weight": w, "bias": bias}, {"weight": (n, m)}, layout=layout, coding=coding)
            entry = packed["layers"]["weight"]
            assert (entry["n"], entry["m"], entry["layout"], entry["coding"]) == (n, m, layout, coding)
            assert entry["values"].numel() == w.numel() * n // m
            assert "zero_signs" not in entry and "sha256" in packed
            out = unpack_state_dict(packed)
            assert list(out) == ["weight", "bias"]
            assert bits_equal(out["weight"], w), (n, m, shape)
            assert bits_equal(out["bias"], bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_keeps_kept_signed_zeros_and_nan(dtype):
    """Exact up to the sign of a pruned zero: NaN and kept -0.0 round-trip bit for bit, pruned -0.0 become +0.0."""
    w = torch.randn(16, 32).to(dtype)
    w = torch.where(nm_mask(w, 2, 4), w, torch.zeros((), dtype=dtype))  # pruned entries +0.0
    w[0, 0], w[0, 1] = float("nan"), -0.0  # kept NaN, kept -0.0 (group 0 has 2 kept entries at most)
    w[0, 2:4] = 0.0
    w[1, 4:8] = torch.tensor([0.0, -0.0, 0.0, 1.0])  # a -0.0 in a group with a free slot: kept
    out = unpack_state_dict(pack_state_dict({"w": w}, {"w": (2, 4)}))["w"]
    assert bits_equal(out, w)
    w[2, 8:12] = torch.tensor([-0.0, -0.0, -0.0, 1.0])  # three -0.0 for one free slot: two are pruned
    out = unpack_state_dict(pack_state_dict({"w": w}, {"w": (2, 4)}))["w"]
    expect = w.clone()
    expect[2, 9:11] = 0.0  # the pruned ones decode as +0.0
    assert bits_equal(out, expect) and not bits_equal(out, w) and torch.equal(out.nan_to_num(), w.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_packed_size_does_not_depend_on_the_sign_of_pruned_zeros(tmp_path, dtype):
    """A model pruned with ``w.mul_(mask)`` (ASP, torch.ao) has -0.0 in pruned positions: same file size as one
    with +0.0 (2:16 fp16 about 0.153 of dense; one sign bit per pruned weight made it 0.208)."""
    torch.manual_seed(0)
    lin = nn.Linear(1024, 1024).to(dtype)
    with torch.no_grad():
        mask = nm_mask(lin.weight, 2, 16)
        plus = torch.where(mask, lin.weight, torch.zeros((), dtype=dtype))
        lin.weight.mul_(mask)  # pruned entries -0.0 where the weight was negative
    minus = lin.weight.detach().clone()
    ints = INT_VIEW[dtype]
    assert int(((minus.view(ints) != 0) & (minus == 0)).sum()) > 400_000  # many -0.0 entries
    dense = save_dense(lin, tmp_path / "d.pt").stat().st_size
    p_minus = save_packed(lin, tmp_path / "minus.pt", scheme={"weight": (2, 16)}).stat().st_size
    p_plus = save_packed({"weight": plus, "bias": lin.bias}, tmp_path / "plus.pt", {"weight": (2, 16)}).stat().st_size
    assert p_minus == p_plus
    if dtype == torch.float16:
        assert p_minus / dense == pytest.approx(0.153, abs=0.005)
    out = load_packed(tmp_path / "minus.pt")["weight"]
    assert torch.equal(out, minus)  # equal in value
    assert torch.equal(out.view(ints), torch.where(mask, minus.view(ints), 0))  # pruned: +0.0, kept: the bits


def test_packed_kept_negative_zero_of_a_sparsified_model_round_trips(tmp_path):
    """A layer whose mask keeps a -0.0 (a group with fewer non-zeros than n): bit for bit through the file."""
    lin = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 8))
        lin.weight[0, :4] = torch.tensor([-0.0, 0.0, 0.0, 5.0])  # the mask keeps 5.0 and the -0.0 (lower index)
    attach(lin, plan_layers(lin, 2, 4))
    ref = dense_state_dict(lin)["weight"]
    assert ref[0, 0].view(torch.int32) != 0  # the kept -0.0
    out = load_packed(save_packed(lin, tmp_path / "p.pt"))["weight"]
    assert bits_equal(out, ref)


def test_packed_from_sparsified_model_per_layer_schemes(tmp_path):
    model = sparse_net(layout="input_channel")
    path = save_packed(model, tmp_path / "p.pt")
    raw = torch.load(path, weights_only=True)
    assert {k: (v["n"], v["m"]) for k, v in raw["layers"].items()} == {
        "conv.weight": (2, 4),
        "pw.weight": (1, 8),
        "fc1.weight": (2, 16),
        "fc2.weight": (1, 4),
    }
    sd = load_packed(path)
    ref = dense_state_dict(model)
    assert list(sd) == list(ref)
    for k in ref:
        assert bits_equal(sd[k], ref[k]), k
    Net().load_state_dict(sd, strict=True)


def test_packed_flat_layout_model(tmp_path):
    model = sparse_net(scheme={"conv": (3, 8), "fc1": (1, 16)}, layout="flat")
    sd = load_packed(save_packed(model, tmp_path / "p.pt"))
    for k, v in dense_state_dict(model).items():
        assert bits_equal(sd[k], v), k


def test_packed_rejects_non_nm_weight_naming_the_layer():
    w = nm_weight((8, 16), 2, 4)
    w[3, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # 3 non-zeros
    with pytest.raises(ValueError, match=r"layer 'fc'.*group 13 \(row 3, input 4\.\.7\) has 3 non-zeros"):
        pack_state_dict({"fc.weight": w}, {"fc": (2, 4)})


def test_packed_scheme_errors():
    sd = {"fc.weight": nm_weight((8, 16), 2, 4)}
    with pytest.raises(ValueError, match="neither 'nope' nor 'nope.weight'"):
        pack_state_dict(sd, {"nope": (2, 4)})
    with pytest.raises(ValueError, match="scheme entry 'fc'"):
        pack_state_dict(sd, {"fc": (5, 4)})
    with pytest.raises(ValueError, match="not divisible by m=16"):
        pack_state_dict({"fc.weight": torch.zeros(8, 24)}, {"fc": (2, 16)})
    with pytest.raises(ValueError, match="says 2:4 .* N:M state says 2:16"):
        pack_state_dict(sparse_net(), {"fc1": (2, 4)})
    with pytest.raises(TypeError, match="holds a object"):
        pack_state_dict({"fc.weight": sd["fc.weight"], "odd": object()})


def _file_ratio(tmp_path, n, m, dtype, shape=(1024, 1024)) -> float:
    lin = nn.Linear(shape[1], shape[0]).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(nm_weight(shape, n, m, dtype=dtype, ties=False))
    packed = save_packed(lin, tmp_path / "p.pt", scheme={"weight": (n, m)})
    dense = save_dense(lin, tmp_path / "d.pt")
    return packed.stat().st_size / dense.stat().st_size


def test_packed_size_bounds(tmp_path):
    assert _file_ratio(tmp_path, 2, 4, torch.float16) <= 0.57
    assert _file_ratio(tmp_path, 2, 16, torch.float16) <= 0.16
    assert _file_ratio(tmp_path, 1, 16, torch.float32) <= 0.10


def test_packed_corrupted_and_mismatched_files(tmp_path):
    sd = {"fc.weight": nm_weight((16, 32), 2, 4), "fc.bias": torch.ones(16)}
    good = pack_state_dict(sd, {"fc": (2, 4)})

    def write(obj, name="bad.pt", reseal=True):
        obj = dict(obj)
        if reseal:
            obj["sha256"] = payload_digest(obj)
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    def with_layer(**fields):
        return {**good, "layers": {"fc.weight": {**good["layers"]["fc.weight"], **fields}}}

    corrupt = good["layers"]["fc.weight"]["values"].clone()
    corrupt[5] += 1
    with pytest.raises(ValueError, match="bad.pt: checksum mismatch"):
        load_packed(write(with_layer(values=corrupt), reseal=False))
    with pytest.raises(ValueError, match="'fc.weight'.*groups="):
        load_packed(write(with_layer(shape=[16, 64])))
    with pytest.raises(ValueError, match="field 'dtype'.*complex64"):
        load_packed(write(with_layer(dtype="complex64")))
    with pytest.raises(ValueError, match="format=None"):
        load_packed(write({"fc.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match="unsupported nm_lightning packed version 99"):
        load_packed(write({**good, "version": 99}))
    with pytest.raises(ValueError, match="stored but not listed \\['fc.bias'\\]"):
        load_packed(write({**good, "order": ["fc.weight"]}))
    missing = {**good, "layers": {"fc.weight": {k: v for k, v in good["layers"]["fc.weight"].items() if k != "n"}}}
    with pytest.raises(ValueError, match="missing field\\(s\\) \\['n'\\]"):
        load_packed(write(missing))


class _Evil:
    pass


def test_packed_loading_is_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "nm_lightning.packed", "payload": _Evil()}, path)
    with pytest.raises(ValueError, match="not a readable nm_lightning packed file"):
        load_packed(path)
    ok = save_packed(sparse_net(), tmp_path / "ok.pt")
    torch.load(ok, weights_only=True)  # only tensors and plain containers


# ---------------------------------------------------------------------------------------------- 2:4 semi-structured
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (96, 256)])
def test_cutlass_cpu_pack_round_trip_of_our_masks(dtype, shape):
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    for ties in (True, False):
        w = nm_weight(shape, 2, 4, dtype=dtype, ties=ties)
        packed, meta = sparse_semi_structured_from_dense_cutlass(w)
        assert packed.shape == (shape[0], shape[1] // 2) and meta.dtype == torch.int16
        assert bits_equal(sparse_semi_structured_to_dense_cutlass(packed, meta), w)


def test_save_semi_structured_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 40), nn.Conv2d(128, 64, 1))
    attach(model, plan_layers(model, 2, 4))
    skipped = save_semi_structured(model, tmp_path / "s.pt", dtype=torch.float16)
    assert set(skipped) == {"2.weight"} and "64" in skipped["2.weight"]  # 40x64: rows not a multiple of 32
    raw = torch.load(tmp_path / "s.pt", weights_only=True)
    assert set(raw["layers"]) == {"0.weight", "3.weight"}
    sd = load_semi_structured(tmp_path / "s.pt")
    ref = dense_state_dict(model)
    assert list(sd) == list(ref)
    assert bits_equal(sd["0.weight"], ref["0.weight"].half())
    assert bits_equal(sd["3.weight"], ref["3.weight"].half())
    assert bits_equal(sd["2.weight"], ref["2.weight"])


def test_to_semi_structured_without_cuda_reports_clearly(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.Conv2d(16, 16, 3))
    attach(model, plan_layers(model, 2, 4, exclude=["3"]))
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    report = to_semi_structured(model, torch.randn(4, 64))
    assert not report.cuda and "CUDA is not available" in report.reason
    assert report.converted == []
    status = {r.name: r.status for r in report.layers}
    assert status == {"0": "eligible", "2": "skipped", "3": "skipped"}
    assert "16x16" in report.skipped["2"] and "only 1x1" in report.skipped["3"]
    assert "nothing converted" in capsys.readouterr().out
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # model untouched
    with pytest.raises(ValueError, match="dtype must be"):
        to_semi_structured(model, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend must be"):
        to_semi_structured(model, backend="triton")  # type: ignore[arg-type]


def test_export_path_is_triton_free(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, torch
        from torch import nn
        from nm_lightning import attach, plan_layers
        from nm_lightning.export import save_semi_structured, load_semi_structured, to_semi_structured
        from nm_lightning.export import save_packed, load_packed, to_cpu_sparse
        # importing lightning already imports parts of torch._inductor (never run); the export path adds none
        before = set(sys.modules)
        model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64))
        attach(model, plan_layers(model, 2, 4))
        save_semi_structured(model, r"{tmp_path / "s.pt"}", dtype=torch.float16)
        load_semi_structured(r"{tmp_path / "s.pt"}")
        load_packed(save_packed(model, r"{tmp_path / "p.pt"}"))
        report = to_semi_structured(model, torch.randn(32, 128), verbose=False)
        if torch.cuda.is_available():
            assert report.ok is not False, report
        model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64))  # a fresh CPU model
        attach(model, plan_layers(model, 2, 4))
        to_cpu_sparse(model, torch.randn(8, 128), repeats=1, warmup=0, verbose=False)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("triton", "torchao"))
        bad += sorted(m for m in set(sys.modules) - before if "inductor" in m or "_dynamo" in m)
        assert not bad, bad
        print("TRITON_FREE")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "TRITON_FREE" in res.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_semi_structured_on_cuda(backend, dtype):
    from nm_lightning.export.semi_structured import cuda_reason

    if cuda_reason(backend):
        pytest.skip(cuda_reason(backend))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10))
    attach(model, plan_layers(model, 2, 4, exclude=["4"]))
    x = torch.randn(64, 256)
    report = to_semi_structured(model, x, backend=backend, dtype=dtype, min_speedup=0, end_to_end_min_speedup=0)
    assert report.converted == ["0", "2"] and report.ok, report  # every eligible layer when speed is no criterion
    assert all(set(r.times_ms) == {"dense", backend} for r in report.layers if r.status == "converted")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_semi_structured_on_cuda_converts_only_what_wins():
    from nm_lightning.export.semi_structured import cuda_reason

    if cuda_reason("cusparselt") and cuda_reason("cutlass"):
        pytest.skip(cuda_reason("cusparselt"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 16384), nn.GELU(), nn.Linear(16384, 4096), nn.GELU(), nn.Linear(4096, 64))
    attach(model, plan_layers(model, 2, 4))
    report = to_semi_structured(model, torch.randn(2048, 4096), min_speedup=1.05, verbose=True)
    assert report.ok and report.end_to_end is not None, report
    for r in report.layers:
        if r.status == "converted":
            assert r.times_ms["dense"] >= 1.05 * r.times_ms[r.kernel], r
    assert report.end_to_end.speedup >= 1.0 or not report.converted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_packed_cutlass_file_runs_on_cuda(tmp_path):
    from nm_lightning.export.semi_structured import cuda_reason, semi_structured_weight

    if cuda_reason("cutlass"):
        pytest.skip(cuda_reason("cutlass"))
    lin = nn.Linear(128, 64)
    attach(lin, plan_layers(lin, 2, 4))
    save_semi_structured(lin, tmp_path / "s.pt", dtype=torch.float16)
    raw = torch.load(tmp_path / "s.pt", weights_only=True)
    w = semi_structured_weight(raw["layers"]["weight"])
    x = torch.randn(32, 128, device="cuda", dtype=torch.float16)
    ref = F.linear(x, dense_state_dict(lin)["weight"].cuda().half())
    torch.testing.assert_close(F.linear(x, w), ref, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------- CPU kernels
@pytest.mark.parametrize("kernel", ["ell", "csr"])
def test_sparse_cpu_modules_match_dense(kernel):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    w = nm_weight((48, 64), 1, 8, ties=False)
    x = torch.randn(2, 5, 64)
    mod = SparseLinearCPU(w, lin.bias, kernel)
    torch.testing.assert_close(mod(x), F.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)
    assert mod(x[:, :0]).shape == (2, 0, 48)
    for conv in [
        nn.Conv2d(16, 8, 3, padding=1),
        nn.Conv2d(16, 8, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.Conv2d(16, 8, 1),
        nn.Conv2d(16, 8, (3, 1), padding="same"),
    ]:
        wc = nm_weight(tuple(conv.weight.shape), 2, 8, "flat", ties=False)
        with torch.no_grad():
            conv.weight.copy_(wc)
        xc = torch.randn(2, 16, 9, 7)
        torch.testing.assert_close(SparseConv2dCPU(conv, wc, kernel)(xc), conv(xc), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grouped conv"):
        SparseConv2dCPU(nn.Conv2d(16, 8, 3, groups=2), torch.zeros(8, 8, 3, 3))


def test_to_cpu_sparse_outputs_and_report():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.Flatten(),
        nn.Linear(32 * 36, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    attach(model, plan_layers(model, 1, 8, exclude=["6"]))
    x = torch.randn(4, 16, 6, 6)
    with torch.no_grad():
        ref = model(x)
    # take any working sparse kernel, and keep it whatever the whole model's timing
    report = to_cpu_sparse(model, x, min_speedup=0.0, end_to_end_min_speedup=0.0, repeats=2, warmup=1)
    assert report.ok, report
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    choices = report.choices
    assert list(choices) == ["0", "2", "4", "6"]
    assert all(choices[k] in ("ell", "csr") for k in ("0", "2", "4")) and choices["6"] == "dense"
    assert isinstance(model[4], SparseLinearCPU) and isinstance(model[0], SparseConv2dCPU)
    row = {c.name: c for c in report.layers}
    assert row["4"].input_shape == (4, 32 * 36) and row["4"].density == pytest.approx(1 / 8)
    assert set(row["4"].times_ms) == {"dense", "ell", "csr"} and row["4"].speedup is not None
    assert "density 1.00" in row["6"].reason


def test_to_cpu_sparse_never_slower_keeps_dense_and_validates():
    model = nn.Sequential(nn.Linear(32, 32))
    attach(model, plan_layers(model, 2, 4))
    report = to_cpu_sparse(model, torch.randn(4, 32), min_speedup=1e9, repeats=1, verbose=False)
    assert report.choices == {"0": "dense"} and "no sparse kernel" in report.layers[0].reason
    assert isinstance(model[0], nn.Linear) and report.ok
    with pytest.raises(ValueError, match="unknown CPU kernel"):
        to_cpu_sparse(model, torch.randn(4, 32), kernels=("gpu",))


def _fake_timer(layer_ms, model_ms, calls=None):
    """Each layer: dense and sparse times from ``layer_ms[name]``; whole model: ``model_ms(converted)``.

    It runs every function once (so the layer swaps really happen), and records what it was asked to time.
    """

    def timer(fns, *, repeats, warmup, context, setup=None):
        for k, f in fns.items():
            if setup and k in setup:
                setup[k]()
            f()
        if calls is not None:
            calls.append(context)
        if context.kind == "layer":
            dense, sparse = layer_ms[context.layer]
            return {k: dense if k == "dense" else sparse for k in fns}
        return {"dense": 10.0, "sparse": model_ms(context.converted)}

    return timer


def _mlp(widths=(64, 64, 64, 64, 64)):
    torch.manual_seed(0)
    mods = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def test_to_cpu_sparse_reverts_layers_until_the_whole_model_is_not_slower():
    """Each layer wins alone, the whole converted model loses (ConvNeXt-tiny was 4% slower): the layers with the
    smallest measured gain are reverted first, until the model as a whole is not slower."""
    model = _mlp()
    attach(model, plan_layers(model, 1, 8))
    x = torch.randn(8, 64)
    with torch.no_grad():
        ref = model(x)
    gains = {"0": (10.0, 6.0), "2": (10.0, 9.0), "4": (10.0, 8.0), "6": (10.0, 7.0)}  # gains 4, 1, 2, 3 ms
    calls: list = []
    # the whole model: 10 ms dense; converted = 8 ms + 1.5 ms per converted layer (slower with 2 or more)
    timer = _fake_timer(gains, lambda conv: 8.0 + 1.5 * len(conv), calls)
    report = to_cpu_sparse(model, x, min_speedup=1.05, timer=timer, verbose=False)
    assert report.end_to_end.reverted == ["2", "4", "6"]  # smallest gain first
    assert report.choices["0"] in ("ell", "csr") and [report.choices[k] for k in "246"] == ["dense"] * 3
    assert isinstance(model[0], (SparseLinearCPU,)) and all(isinstance(model[i], nn.Linear) for i in (2, 4, 6))
    assert [c.converted for c in calls if c.kind == "model"] == [("0", "2", "4", "6"), ("0", "4", "6"), ("0", "6"),
                                                                 ("0",)]  # fmt: skip
    assert report.end_to_end.speedup == pytest.approx(10 / 9.5)
    assert "reverted" in {c.name: c for c in report.layers}["2"].reason
    assert report.ok
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    # a whole model that is always slower: every layer reverted, the model is the dense one
    model = _mlp()
    attach(model, plan_layers(model, 1, 8))
    report = to_cpu_sparse(model, x, timer=_fake_timer(gains, lambda conv: 11.0), verbose=False)
    assert set(report.choices.values()) == {"dense"} and len(report.end_to_end.reverted) == 4
    assert not any(isinstance(mod, SparseLinearCPU) for mod in model.modules())
    assert report.end_to_end.speedup == 1.0 and "reverted" in report.table().caption


try:  # transformers is optional: only this output type needs it
    from transformers.utils import ModelOutput

    @dataclasses.dataclass
    class _HFOut(ModelOutput):
        logits: torch.Tensor | None = None
        hidden: torch.Tensor | None = None

except ImportError:  # pragma: no cover - depends on the environment
    _HFOut = None  # type: ignore[assignment,misc]


class _Outputs(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x, scale=1.0):
        h = self.a(x)
        y = self.b(torch.relu(h)) * scale
        if self.kind == "dict":
            return {"hidden": h, "logits": y, "n": 3}
        if self.kind == "tuple":
            return h, (y, [y.argmax(-1)])
        return _HFOut(logits=y, hidden=h)


@pytest.mark.parametrize("kind", ["dict", "tuple", "model_output"])
def test_to_cpu_sparse_checks_every_output_tensor(kind):
    if kind == "model_output" and _HFOut is None:
        pytest.skip("transformers is not installed")
    model = _Outputs(kind)
    attach(model, plan_layers(model, 1, 8))
    example = {"x": torch.randn(4, 64), "scale": 2.0} if kind == "dict" else (torch.randn(4, 64),)
    report = to_cpu_sparse(model, example, min_speedup=0.0, end_to_end_min_speedup=0.0, repeats=1, verbose=False)
    assert report.ok is True  # was None: only a plain tensor output was checked
    assert len(report.output_check.tensors) == {"dict": 2, "tuple": 3, "model_output": 2}[kind]
    assert report.choices["a"] in ("ell", "csr")


def test_compare_outputs_names_the_tensor_that_differs():
    from nm_lightning.export._convert import compare_outputs

    ref = {"a": torch.ones(3), "b": (torch.zeros(2), [torch.tensor([1, 2])]), "n": 3}
    assert compare_outputs(ref, {"a": torch.ones(3), "b": (torch.zeros(2), [torch.tensor([1, 2])]), "n": 3}).ok
    bad = compare_outputs(ref, {"a": torch.ones(3), "b": (torch.full((2,), 0.5), [torch.tensor([1, 2])]), "n": 3})
    assert not bad.ok and bad.worst.path == "output['b'][0]" and bad.worst.max_abs_diff == 0.5
    ids = compare_outputs(ref, {"a": torch.ones(3), "b": (torch.zeros(2), [torch.tensor([1, 3])]), "n": 3})
    assert not ids.ok and ids.worst.path == "output['b'][1][0]"  # integer outputs: exact
    assert "keys" in compare_outputs(ref, {"a": torch.ones(3)}).problems[0]
    assert not compare_outputs(torch.tensor([float("nan")]), torch.tensor([1.0])).ok
    assert compare_outputs(torch.tensor([float("nan")]), torch.tensor([float("nan")])).ok
    assert "shape" in compare_outputs(torch.ones(2), torch.ones(3)).problems[0]


# ---------------------------------------------------------------------------------------------- measured 2:4 (CPU)
def _kernels(wrong=()):
    """Stand-ins for torch's cuSPARSELt/CUTLASS weights on CPU: the dense weight (or a wrong one)."""

    def make(name):
        def kernel(w2d):
            return w2d * 2 if name in wrong else w2d.clone()

        return kernel

    return {"cusparselt": make("cusparselt"), "cutlass": make("cutlass")}


def test_to_semi_structured_decisions_with_an_injected_timer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(),
        nn.Linear(64, 24), nn.Linear(24, 8),
    )  # fmt: skip
    attach(model, plan_layers(model, 2, 4, exclude=["7"]))
    x = torch.randn(16, 128)
    layer_ms = {"0": (10.0, 5.0), "2": (10.0, 9.9), "4": (10.0, 7.0), "6": (10.0, 6.0)}
    calls: list = []
    base = _fake_timer(layer_ms, lambda conv: 10.0 - 2.0 * len(conv), calls)

    def timer(fns, **kw):  # cutlass a little faster than cuSPARSELt on layer 4
        t = base(fns, **kw)
        if kw["context"].layer == "4":
            t["cutlass"] = 6.5
        return t

    report = to_semi_structured(model, x, dtype=torch.bfloat16, timer=timer, kernels=_kernels(), verbose=False)
    status = {r.name: r.status for r in report.layers}
    assert status == {"0": "converted", "2": "dense", "4": "converted", "6": "skipped", "7": "skipped"}
    assert report.choices["0"] == "cusparselt" and report.choices["4"] == "cutlass"
    assert "no sparse kernel >= 1.05x faster" in report.layers[1].reason
    assert "multiples of 16x16" in report.skipped["6"]  # 24x64 fits neither cuSPARSELt's nor CUTLASS's blocks
    assert report.end_to_end.speedup == pytest.approx(10 / 6) and report.ok
    assert [c.layer for c in calls if c.kind == "layer"] == ["0", "2", "4"]
    assert report.backends == ("cusparselt", "cutlass") and "cutlass ms" in report._columns()
    report.table()  # renders


def test_to_semi_structured_reverts_and_refuses_wrong_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    attach(model, plan_layers(model, 2, 4))
    x = torch.randn(16, 128)
    timer = _fake_timer({"0": (10.0, 5.0), "2": (10.0, 8.0)}, lambda conv: 9.0 if len(conv) == 1 else 12.0)
    report = to_semi_structured(model, x, dtype=torch.float16, timer=timer, kernels=_kernels(), verbose=False)
    assert report.converted == ["0"] and report.end_to_end.reverted == ["2"]
    assert isinstance(model[2], nn.Linear) and report.ok
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    attach(model, plan_layers(model, 2, 4))
    timer = _fake_timer({"0": (10.0, 5.0), "2": (10.0, 5.0)}, lambda conv: 5.0)
    report = to_semi_structured(model, x, timer=timer, kernels=_kernels(wrong=("cusparselt",)), verbose=False)
    assert report.choices == {"0": "cutlass", "2": "cutlass"}  # the wrong kernel is never used
    assert all("cusparselt: output differs" in r.reason for r in report.layers)
    with pytest.raises(ValueError, match="needs example_input"):
        to_semi_structured(model)


def test_gpu_check_script_is_ready(tmp_path):
    """benchmarks/gpu_check.sh parses, and its Python sections run end to end on the CPU (``--dry-run``)."""
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(["bash", "-n", str(root / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "gpu", "amp", "mask", "mlp", "--dry-run"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "gpu: OK, amp: OK, mask: OK, mlp: OK" in res.stdout


# ---------------------------------------------------------------------------------------------- export_artifacts
class _Export(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.meta = None

    def on_fit_end(self, trainer, pl_module):
        self.meta = export_artifacts(trainer, pl_module, self.out_dir)


def test_export_artifacts_at_fit_end(tmp_path):
    pl.seed_everything(0, workers=True)
    model = TinyNet()
    exporter = _Export(tmp_path / "export")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, callbacks=[SRSTECallback(2, 4, verbose=False), exporter])
    )
    trainer.fit(model)
    out = tmp_path / "export"
    meta = json.loads((out / "scheme.json").read_text())
    assert meta == json.loads(json.dumps(exporter.meta))
    assert meta["layers"]["fc1"]["n"] == 2 and meta["layers"]["fc1"]["sparsity"] >= 0.5
    for info in meta["files"].values():
        assert sha256_file(out / info["file"]) == info["sha256"]
    dense = torch.load(out / meta["files"]["dense"]["file"], weights_only=True)
    plain = TinyNet()
    plain.load_state_dict(dense, strict=True)
    packed = load_packed(out / meta["files"]["packed"]["file"])
    assert all(
        bits_equal(packed[k], v) if v.is_floating_point() else torch.equal(packed[k], v) for k, v in dense.items()
    )
    assert meta["packed_over_dense"] < 0.75
    assert "fc2.weight" in meta["files"]["semi_structured"]["dense_layers"]  # 4x32: below the CUTLASS minimum


def test_export_artifacts_barriers_and_rank(tmp_path):
    calls = []

    class Strategy:
        def barrier(self, name=None):
            calls.append(name)

    class FakeTrainer:
        strategy = Strategy()
        is_global_zero = False
        global_step = 3
        current_epoch = 1

    model = sparse_net()
    assert export_artifacts(FakeTrainer(), model, tmp_path / "r1") is None
    assert not (tmp_path / "r1").exists() and len(calls) == 2
    FakeTrainer.is_global_zero = True
    meta = export_artifacts(FakeTrainer(), model, tmp_path / "r0", formats=("packed",))
    assert len(calls) == 4 and meta["global_step"] == 3 and set(meta["files"]) == {"packed"}
    with pytest.raises(ValueError, match="export formats"):
        export_artifacts(FakeTrainer(), model, tmp_path, formats=("onnx",))
    assert len(calls) == 4  # bad formats fail before any collective
