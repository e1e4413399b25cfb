"""MAC accounting: per-layer MACs against hand-computed values (the DominoSearch ResNet-50 totals are in
test_domino.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nm_lightning import attach, plan_layers, scheme_stats
from nm_lightning.accounting import measure_macs


class Mixed(nn.Module):
    """Every covered layer type with stride, padding, dilation, groups and a 3-D linear input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, stride=2, padding=3, dilation=2)  # L 20 -> 9
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False)  # 9x9 -> 5x5
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))  # (B, 8, 9)
        h = F.relu(self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 9)))  # (B, 16, 5, 5)
        tokens = h.flatten(2).transpose(1, 2)  # (B, 25, 16)
        a, _ = self.attn(tokens, tokens, tokens)
        return self.fc(a)  # (B, 25, 8)


# per sample, by hand: weight entries x output positions (tokens for linears and projections)
MIXED_MACS = {
    "c1": (8 * 4 * 5) * 9,  # out length floor((20 + 2*3 - 2*(5-1) - 1) / 2) + 1 = 9
    "c2": (16 * (8 // 2) * 3 * 3) * 5 * 5,  # groups=2: each filter sees 4 input channels
    "attn.in_proj_weight": 3 * 16 * 16 * 25,  # q, k and v projections of 25 tokens
    "attn.out_proj": 16 * 16 * 25,
    "fc": 16 * 8 * 25,
}


def test_per_layer_macs_match_hand_counts():
    model = Mixed()
    macs = measure_macs(model, torch.randn(3, 4, 20), list(MIXED_MACS))
    assert macs == MIXED_MACS
    # scheme_stats builds on the same numbers: kept = int(P·n/m), MACs scaled by n/m
    stats = scheme_stats(model, {name: (2, 4) for name in MIXED_MACS}, torch.randn(2, 4, 20))
    assert stats["dense_macs"] == sum(MIXED_MACS.values())
    assert stats["macs"] == sum(MIXED_MACS.values()) / 2
    assert stats["layers"]["c2"]["params"] == 16 * 4 * 9 and stats["layers"]["c2"]["kept_params"] == 16 * 4 * 9 // 2


def test_macs_unchanged_by_attached_nm_sparsity():
    model = Mixed()
    attach(model, plan_layers(model, 2, 4, scheme={name: (2, 4) for name in MIXED_MACS}))
    training = model.training
    assert measure_macs(model, torch.randn(2, 4, 20), list(MIXED_MACS)) == MIXED_MACS
    assert model.training == training


class CrossAttention(nn.Module):
    def __init__(self, separate: bool) -> None:
        super().__init__()
        kdim, vdim = (8, 12) if separate else (None, None)
        self.attn = nn.MultiheadAttention(16, 2, kdim=kdim, vdim=vdim)  # sequence first

    def forward(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # batch-first inputs (the batch size is read from the first one), a sequence-first module called by keyword
        k, v = kv[0].transpose(0, 1), kv[1].transpose(0, 1)
        return self.attn(query=q.transpose(0, 1), key=k, value=v, need_weights=False)[0]


def test_cross_attention_counts_query_and_key_tokens_separately():
    lq, lk, batch = 5, 7, 3
    model = CrossAttention(separate=False)
    example = (torch.randn(batch, lq, 16), (torch.randn(batch, lk, 16), torch.randn(batch, lk, 16)))
    macs = measure_macs(model, example, ["attn.in_proj_weight", "attn.out_proj"])
    assert macs == {"attn.in_proj_weight": 16 * 16 * (lq + lk + lk), "attn.out_proj": 16 * 16 * lq}

    model = CrossAttention(separate=True)  # kdim=8, vdim=12: q/k/v_proj_weight
    example = (torch.randn(batch, lq, 16), (torch.randn(batch, lk, 8), torch.randn(batch, lk, 12)))
    names = ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj"]
    macs = measure_macs(model, example, names)
    assert macs == {
        "attn.q_proj_weight": 16 * 16 * lq,
        "attn.k_proj_weight": 16 * 8 * lk,
        "attn.v_proj_weight": 16 * 12 * lk,
        "attn.out_proj": 16 * 16 * lq,
    }


class HFConv1D(nn.Module):
    """A transformers-style ``Conv1D`` (weight ``[in, out]``, ``addmm``), covered with ``include_types``."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Gate(nn.Module):
    """A covered module with its own weight and a covered child: each is counted for its own products."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8, bias=False)
        self.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.inner(x), self.weight)


class Others(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
        self.proj = HFConv1D(6, 8)
        self.gate = Gate()
        self.shared = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # (B, 6, 11, 11)
        h = self.proj(h.flatten(2).transpose(1, 2))  # (B, 121, 8)
        h = self.gate(h)  # (B, 121, 4)
        return self.shared(self.shared(h))  # the same layer run twice costs twice


def test_other_layer_types_nesting_and_reuse():
    model = Others()
    names = ["up", "proj", "gate", "gate.inner", "shared"]
    macs = measure_macs(model, torch.randn(2, 4, 5, 5), names)
    assert macs == {
        "up": (4 * 3 * 3 * 3) * 5 * 5,  # transposed: every input pixel multiplies the whole [4, 3, 3, 3] weight
        "proj": 6 * 8 * 121,
        "gate": 4 * 8 * 121,  # its own F.linear only, not gate.inner's
        "gate.inner": 8 * 8 * 121,
        "shared": 2 * 4 * 4 * 121,
    }


def test_measure_macs_errors():
    model = Others()
    with pytest.raises(ValueError, match=r"no layer named 'nope'"):
        measure_macs(model, torch.randn(1, 4, 5, 5), ["nope"])
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"layer 'extra' was not run by the example forward pass"):
        measure_macs(model, torch.randn(1, 4, 5, 5), ["up", "extra"])
    attn = nn.Sequential(nn.MultiheadAttention(4, 1, add_bias_kv=True))
    with pytest.raises(ValueError, match=r"cannot count MACs of '0.bias_k': a MultiheadAttention weight is one of"):
        measure_macs(attn, torch.randn(1, 2, 4), ["0.bias_k"])
    with pytest.raises(ValueError, match=r"cannot find the batch size"):
        measure_macs(model, [[]], ["up"])
