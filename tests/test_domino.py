"""DominoSearch: pure core (thresholds, votes, commits, η, ERK), the callback, scheme files and accounting."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from nm_lightning import DominoSearchCallback, NMScheme, SRSTECallback, scheme_stats, sparse_layers
from nm_lightning.search.domino import (
    DominoLayer,
    DominoSearch,
    erk_sparsities,
    group_thresholds,
    penalty_factors,
    powers_of_two,
    vote,
)

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------------- a torchvision-layout ResNet-50
class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


class ResNet50(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]):
            layers = []
            for b in range(blocks):
                down = None
                if b == 0 and (stride != 1 or inplanes != planes * 4):
                    down = nn.Sequential(
                        nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
                    )
                layers.append(Bottleneck(inplanes, planes, stride if b == 0 else 1, down))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def test_readme_example_scheme_on_resnet50():
    model = ResNet50()
    scheme = NMScheme.load(DATA / "resnet50_M16_0.80.txt", model=model)
    assert len(scheme) == 54
    assert scheme["conv1"] == (16, 16) and scheme["layer1.0.conv1"] == (16, 16)
    assert scheme["layer1.0.downsample.0"] == (8, 16)  # SparseConv4
    assert scheme["layer4.0.downsample.0"] == (2, 16)  # SparseConv46
    assert scheme["fc"] == (4, 16)
    with torch.no_grad():
        stats = scheme_stats(model, scheme, torch.randn(1, 3, 224, 224))
    # the numbers recomputed in the spec: 4,907,200 kept of 25,502,912 conv+FC weights, 1.141 G MACs
    assert stats["kept_params"] == 4_907_200 and stats["total_params"] == 25_502_912
    assert stats["sparsity"] == pytest.approx(0.80758, abs=1e-5)
    assert stats["macs"] / 1e9 == pytest.approx(1.141, abs=1e-3)
    assert stats["dense_macs"] / 1e9 == pytest.approx(4.089, abs=1e-3)
    # exactly: Σ Kh·Kw·Cin·Cout·Hout·Wout (+ 2048·1000 for the FC), and Σ of those · n/m
    assert stats["dense_macs"] == 4_089_184_256 and stats["macs"] == 1_141_313_536
    # and the SR-STE fine-tune takes it as is (16:16 layers stay dense)
    from nm_lightning import plan_layers

    plans = {p.name: p for p in plan_layers(model, scheme=scheme)}
    assert plans["conv1"].status == "excluded" and plans["layer4.2.conv2"].n == 2


def test_domino_file_errors(tmp_path):
    model = ResNet50()
    line = (DATA / "resnet50_M16_0.80.txt").read_text().strip()
    entries = eval_free = __import__("ast").literal_eval(line)  # the test itself reads the literal safely
    assert isinstance(eval_free, dict)

    def write(d) -> Path:
        p = tmp_path / "s.txt"
        p.write_text(repr(d) + "\n")
        return p

    missing = dict(entries)
    missing.pop("SparseConv5_256-64-(1, 1)")
    with pytest.raises(ValueError, match=r"no entry for \['SparseConv5_256-64-\(1, 1\) \(layer1.1.conv1\)'\]"):
        NMScheme.load(write(missing), model=model)
    extra = dict(entries, **{"SparseConv53_512-2048-(1, 1)": [4, 16]})
    with pytest.raises(ValueError, match=r"the model has no conv number 53"):
        NMScheme.load(write(extra), model=model)
    wrong = {("SparseConv2_64-64-(5, 5)" if k.startswith("SparseConv2_") else k): v for k, v in entries.items()}
    with pytest.raises(
        ValueError, match=r"'SparseConv2_64-64-\(5, 5\)' does not match the model's layer 'layer1.0.conv2'"
    ):
        NMScheme.load(write(wrong), model=model)
    bad_nm = dict(entries, **{"Linear0_2048-1000": [17, 16]})
    with pytest.raises(ValueError, match=r"n=17, m=16"):
        NMScheme.load(write(bad_nm), model=model)
    with pytest.raises(ValueError, match=r"pass model="):
        NMScheme.load(DATA / "resnet50_M16_0.80.txt")
    code = tmp_path / "evil.txt"
    code.write_text("{'SparseConv0_3-64-(7, 7)': __import__('os').system('echo hacked')}\n")
    with pytest.raises(ValueError, match=r"not a Python dict literal"):
        NMScheme.load(code, model=model)


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".txt"])
def test_scheme_round_trip(tmp_path, suffix):
    model = TinyNet()
    scheme = NMScheme({"conv1": (4, 4), "conv2": (2, 4), "fc1": (1, 4), "fc2": [4, 4]})
    path = scheme.save(tmp_path / f"s{suffix}", model=model)
    assert NMScheme.load(path, model=model) == scheme


def test_scheme_file_errors(tmp_path):
    p = tmp_path / "s.json"
    p.write_text('{"fc1": [2, 4, 1]}')
    with pytest.raises(ValueError, match=r"s.json: scheme entry 'fc1' must be \(n, m\)"):
        NMScheme.load(p)
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"must be a mapping"):
        NMScheme.load(p)
    with pytest.raises(ValueError, match=r"unknown scheme file extension '.csv'"):
        NMScheme({"fc1": (2, 4)}).save(tmp_path / "s.csv")


# ---------------------------------------------------------------------- pure core
def test_thresholds_are_mean_of_half_smallest():
    w = torch.tensor([[4.0, -1.0, 3.0, 2.0, 8.0, 7.0, -6.0, 5.0]])
    t = group_thresholds(w, 4, "input_channel")
    assert t.flatten().tolist() == [1.5, 5.5]


def test_vote_counts_weights_above_threshold():
    w = torch.tensor([[4.0, 1.0, 3.0, 2.0] * 4])
    t = group_thresholds(w, 4, "input_channel")  # 1.5 in every group: 3 weights above
    assert vote(w, t, 4, 4, "input_channel", 0.75) == (True, 1.0)  # 3 < 4 in every group
    assert vote(w, t, 3, 4, "input_channel", 0.75) == (False, 0.0)
    w2 = w.clone()
    w2[0, :12] = 0.0  # three of four groups now have 0 above
    assert vote(w2, t, 3, 4, "input_channel", 0.75) == (True, 0.75)


def test_commits_only_powers_of_two_and_stops_at_target():
    layers = {"a": DominoLayer(m=16, params=1000, macs=10.0, n_int=16, n_committed=16)}
    search = DominoSearch(layers, target_sparsity=0.875)
    search.init_erk({"a": (10, 100)})
    w = torch.randn(10, 16 * 6)
    layers["a"].thresholds = torch.full((10, 6, 1, 1), 1e9)  # nothing above: every check votes
    seen = []
    for step in range(20):
        search.check({"a": w}, "input_channel", step)
        seen.append((layers["a"].n_int, layers["a"].n_committed))
        if search.done:
            break
    assert [n for n, _ in seen][:4] == [15, 14, 13, 12]
    assert {c for _, c in seen} == {16, 8, 4, 2}
    assert search.done and layers["a"].n_committed == 2 and search.sparsity() == pytest.approx(0.875)
    assert [c[2] for c in search.commits] == [8, 4, 2]


def test_erk_matches_rigl_solve():
    shapes = {"stem": (64, 3, 7, 7), "mid": (128, 128, 3, 3), "fc": (1000, 2048)}
    erk = erk_sparsities(shapes, 0.9)
    total = sum(math.prod(s) for s in shapes.values())
    kept = sum(math.prod(s) * (1 - erk[k]) for k, s in shapes.items())
    assert kept == pytest.approx(0.1 * total, rel=1e-9)
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    dens = {k: 1 - v for k, v in erk.items()}
    assert dens["stem"] / dens["mid"] == pytest.approx(raw["stem"] / raw["mid"])  # density ∝ Σdims/Πdims
    small = erk_sparsities({"tiny": (8, 8), "big": (4096, 4096)}, 0.5)
    assert small["tiny"] == 0.0 and 0 < small["big"] < 1  # a layer that would exceed density 1 is dense


def test_eta_formula():
    layers = {
        "a": DominoLayer(m=16, params=100, macs=1000.0, n_int=16, n_committed=16),
        "b": DominoLayer(m=16, params=400, macs=500.0, n_int=8, n_committed=8),
    }
    erk = {"a": 0.2, "b": 0.9}
    eta = penalty_factors(layers, erk, beta_flops=0.8, beta_erk=0.2)
    # c: remaining work 1000 vs 250 -> 1, 0.25; gaps: 0.2 - 0, 0.9 - 0.5 -> r = 0.5, 1
    assert eta["a"] == pytest.approx(0.8 * 1.0 + 0.2 * 0.5)
    assert eta["b"] == pytest.approx(0.8 * 0.25 + 0.2 * 1.0)
    assert powers_of_two(32) == [1, 2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match=r"m to be a power of two .* got m=12"):
        powers_of_two(12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"exactly one target"),
        ({"target_sparsity": 0.8, "target_flops": 0.8}, r"exactly one target"),
        ({"target_sparsity": 1.2}, r"target must be in \(0, 1\), got 1.2"),
        ({"target_sparsity": 0.8, "m": 12}, r"power of two"),
        ({"target_sparsity": 0.8, "check_every": 0}, r"check_every must be an int >= 1, got 0"),
        ({"target_sparsity": 0.8, "vote_ratio": 0.0}, r"vote_ratio must be in \(0, 1\], got 0.0"),
        ({"target_sparsity": 0.8, "beta_flops": 2.0}, r"beta_flops must be in \[0, 1\], got 2.0"),
        ({"target_sparsity": 0.8, "output": "s.csv"}, r"output must end in .txt, .json, .yaml or .yml, got 's.csv'"),
    ],
)
def test_bad_callback_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DominoSearchCallback(**kwargs)


# ---------------------------------------------------------------------- the callback
def _search(tmp_path, max_epochs=30, ckpt_path=None, callbacks=(), **kw):
    pl.seed_everything(0, workers=True)
    cb = DominoSearchCallback(m=4, check_every=2, penalty_every=1, penalty=2.0, output="found.json", **kw)
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path, max_epochs=max_epochs, callbacks=[cb, *callbacks], enable_checkpointing=bool(callbacks)
        )
    )
    model = TinyNet(lr=0.01, momentum=0.0)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, cb, model


def test_search_stops_at_size_target(tmp_path):
    trainer, cb, model = _search(tmp_path, target_sparsity=0.6)
    assert cb.search.done and trainer.should_stop and trainer.global_step < 4 * 30
    assert cb.search.sparsity() >= 0.6 - 1e-3
    scheme = NMScheme.load(tmp_path / "found.json")
    assert dict(scheme) == cb.search.scheme()
    assert all(n in (1, 2, 4) for n, _ in scheme.values())
    assert (tmp_path / "found.png").stat().st_size > 0 and (tmp_path / "found.dense.pt").exists()
    # the live layers follow the intermediate N
    for name, layer in sparse_layers(model).items():
        assert layer.sparsity.n == cb.search.layers[name].n_int


def test_search_stops_at_flops_target(tmp_path):
    trainer, cb, _ = _search(tmp_path, target_flops=0.5)
    assert cb.search.done and cb.search.flops_reduction() >= 0.5 - 1e-3
    assert cb.search.beta_flops == 0.8


def test_search_that_runs_out_of_steps_writes_best_so_far(tmp_path):
    with pytest.warns(UserWarning, match=r"training ended before the target was met: reached .* of 0.74"):
        _, cb, _ = _search(tmp_path, max_epochs=1, target_sparsity=0.74)
    assert not cb.search.done and (tmp_path / "found.json").exists()


def test_search_resume_is_bit_exact(tmp_path):
    _, full, full_model = _search(tmp_path / "full", target_sparsity=0.6)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "part", save_top_k=-1, every_n_epochs=1)
    _search(tmp_path / "part", max_epochs=5, callbacks=[ckpt], target_sparsity=0.6)
    path = tmp_path / "part" / "epoch=4-step=20.ckpt"
    _, resumed, resumed_model = _search(tmp_path / "resumed", ckpt_path=path, target_sparsity=0.6)
    assert resumed.search.commits == full.search.commits
    assert resumed.search.scheme() == full.search.scheme()
    for name, layer in sparse_layers(full_model).items():
        assert torch.equal(layer.original, sparse_layers(resumed_model)[name].original)


def test_fine_tune_from_found_scheme_and_dense_start(tmp_path):
    _, cb, _ = _search(tmp_path / "search", target_sparsity=0.6)
    pl.seed_everything(1)
    ft = SRSTECallback(
        scheme=str(tmp_path / "search" / "found.json"), init_weights=str(tmp_path / "search" / "found.dense.pt")
    )
    model = TinyNet()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "ft", max_epochs=1, callbacks=[ft]))
    dense = torch.load(tmp_path / "search" / "found.dense.pt", weights_only=True)
    trainer.fit(model)
    expected = {k: v for k, v in cb.search.scheme().items() if v[0] != v[1]}
    assert ft.layer_nm() == expected
    assert not torch.equal(dense["fc1.weight"], TinyNet().fc1.weight)  # the file holds the search's start
