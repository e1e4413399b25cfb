"""Exports: dense-with-zeros, packed N:M files, 2:4 semi-structured (CUTLASS CPU pack, CUDA), CPU kernels."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
from nm_lightning.export._util import sha256_file
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
def test_packed_keeps_signed_zeros_and_nan(dtype):
    w = torch.randn(16, 32).to(dtype)
    w = w * nm_mask(w, 2, 4)  # pruned entries become -0.0 where w < 0
    w[0, 0], w[0, 1] = float("nan"), -0.0  # kept NaN, kept -0.0 (group 0 has 2 kept entries at most)
    w[0, 2:4] = 0.0
    w[1, 4:8] = torch.tensor([0.0, -0.0, -0.0, 1.0])  # -0.0 beyond n: one stored, one via the sign bits
    out = unpack_state_dict(pack_state_dict({"w": w}, {"w": (2, 4)}))["w"]
    assert bits_equal(out, w)


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

    def write(obj, name="bad.pt"):
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    with pytest.raises(FileNotFoundError):
        load_packed(tmp_path / "missing.pt")
    path = save_packed(sd, tmp_path / "p.pt", {"fc": (2, 4)})
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        load_packed(tmp_path / "trunc.pt")
    corrupt = {**good, "layers": {"fc.weight": {**good["layers"]["fc.weight"]}}}
    corrupt["layers"]["fc.weight"]["values"] = good["layers"]["fc.weight"]["values"].clone()
    corrupt["layers"]["fc.weight"]["values"][5] += 1
    with pytest.raises(ValueError, match="'fc.weight': checksum mismatch"):
        load_packed(write(corrupt))
    wrong_shape = {**good, "layers": {"fc.weight": {**good["layers"]["fc.weight"], "shape": [16, 64]}}}
    with pytest.raises(ValueError, match="'fc.weight'.*groups="):
        load_packed(write(wrong_shape))
    bad_dtype = {**good, "layers": {"fc.weight": {**good["layers"]["fc.weight"], "dtype": "complex64"}}}
    with pytest.raises(ValueError, match="field 'dtype'.*complex64"):
        load_packed(write(bad_dtype))
    with pytest.raises(ValueError, match="format=None"):
        load_packed(write({"fc.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match="unsupported packed version 99"):
        load_packed(write({**good, "version": 99}))
    with pytest.raises(ValueError, match="missing \\['fc.bias'\\]"):
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
        to_cpu_sparse(model.cpu().float(), torch.randn(8, 128), repeats=1, warmup=0, verbose=False)
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
    report = to_semi_structured(model, torch.randn(64, 256), backend=backend, dtype=dtype)
    assert report.converted == ["0", "2"] and report.ok, report


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
    report = to_cpu_sparse(model, x, min_speedup=0.0, repeats=2, warmup=1)  # take any working sparse kernel
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
