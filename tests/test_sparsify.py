"""Layer selection, the eligibility report, attach/detach, and plain state dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nm_lightning import attach, detach, nm_mask, plain_state_dict, plan_layers, sparse_layers, split_state_dict


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)  # in_channels 3 < m
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, groups=2)  # 8 input channels per group
        self.depthwise = nn.Conv2d(16, 16, 3, groups=16)
        self.c1 = nn.Conv1d(8, 8, 3)
        self.c3 = nn.Conv3d(8, 4, (1, 2, 2))
        self.bn = nn.BatchNorm2d(16)
        self.emb = nn.Embedding(10, 16)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.up = nn.ConvTranspose2d(16, 8, 2)
        self.lazy = nn.LazyLinear(8)
        self.fc = nn.Linear(16, 4)


def _by_name(plans):
    return {p.name: p for p in plans}


def test_plan_reports_every_weight_with_reason():
    plans = _by_name(
        plan_layers(
            Zoo(),
            2,
            4,
            include_types=[
                "Linear",
                "Conv1d",
                "Conv2d",
                "Conv3d",
                "MultiheadAttention",
                "ConvTranspose2d",
                "LazyLinear",
            ],
        )
    )
    covered = {k for k, p in plans.items() if p.status == "covered"}
    assert covered == {"conv", "grouped", "c1", "c3", "attn.in_proj_weight", "attn.out_proj", "fc"}
    assert plans["stem"].status == "skipped" and "= 3 is not divisible by m=4" in plans["stem"].reason
    assert plans["depthwise"].status == "skipped" and "= 1 is not divisible" in plans["depthwise"].reason
    # an output head tied to the input embedding is a default exclusion (transformers' tied lm_head)
    assert plans["head"].status == "excluded" and "shared with emb.weight (tied to an embedding" in plans["head"].reason
    assert plans["up"].status == "skipped" and "transposed conv" in plans["up"].reason
    assert plans["lazy"].status == "skipped" and "lazy parameter" in plans["lazy"].reason
    assert plans["bn"].status == "excluded" and "BatchNorm2d not selected" in plans["bn"].reason
    assert plans["emb"].status == "excluded"


def test_include_exclude_globs_and_types():
    model = Zoo()
    names = {p.name for p in plan_layers(model, 2, 4, include=["c*", "fc"]) if p.status == "covered"}
    assert names == {"conv", "c1", "c3", "fc"}
    names = {p.name for p in plan_layers(model, 2, 4, exclude=["attn*", "fc"]) if p.status == "covered"}
    assert names == {"conv", "grouped", "c1", "c3"}
    names = {p.name for p in plan_layers(model, 2, 4, exclude_types=["Conv2d", "nn.Conv3d"]) if p.status == "covered"}
    assert names == {"c1", "attn.in_proj_weight", "attn.out_proj", "fc"}
    names = {p.name for p in plan_layers(model, 2, 4, include_types=[nn.Conv1d]) if p.status == "covered"}
    assert names == {"c1"}


def test_unknown_type_is_an_error():
    with pytest.raises(ValueError, match=r"unknown layer type 'Lineer'"):
        plan_layers(Zoo(), 2, 4, include_types=["Lineer"])


def test_scheme_per_layer_and_errors():
    model = Zoo()
    plans = _by_name(plan_layers(model, 2, 4, scheme={"conv": (1, 4), "fc": [2, 8], "c1": (8, 8)}))
    assert (plans["conv"].n, plans["conv"].m, plans["conv"].status) == (1, 4, "covered")
    assert (plans["fc"].n, plans["fc"].m, plans["fc"].status) == (2, 8, "covered")
    assert plans["c1"].status == "excluded" and "dense (8:8)" in plans["c1"].reason
    assert plans["grouped"].status == "excluded" and plans["grouped"].reason == "not in scheme"
    with pytest.raises(ValueError, match=r"scheme names layers the model does not have: \['nope'\]"):
        plan_layers(model, 2, 4, scheme={"nope": (2, 4)})
    with pytest.raises(ValueError, match=r"n=5, m=4"):
        plan_layers(model, 2, 4, scheme={"conv": (5, 4)})


def test_attach_keeps_parameters_and_masks_every_read():
    torch.manual_seed(0)
    model = Zoo()
    params_before = {id(p) for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter)}
    opt = torch.optim.SGD(
        [p for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter)], lr=0.1
    )
    layers = attach(model, plan_layers(model, 2, 4))
    params_after = {id(p) for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter)}
    assert params_before == params_after
    assert {id(p) for g in opt.param_groups for p in g["params"]} == params_before
    # MultiheadAttention reads out_proj.weight and in_proj_weight directly: both must be masked
    assert bool((model.attn.out_proj.weight.view(16, 4, 4).ne(0).sum(-1) <= 2).all())
    assert bool((model.attn.in_proj_weight.view(48, 4, 4).ne(0).sum(-1) <= 2).all())
    x = torch.randn(2, 5, 16)
    model.eval()
    out = model.attn(x, x, x, need_weights=False)[0]
    ref = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    ref.in_proj_weight.data = model.attn.in_proj_weight.detach().clone()
    ref.in_proj_bias.data = model.attn.in_proj_bias.detach().clone()
    ref.out_proj.weight.data = model.attn.out_proj.weight.detach().clone()
    ref.out_proj.bias.data = model.attn.out_proj.bias.detach().clone()
    torch.testing.assert_close(out, ref(x, x, x, need_weights=False)[0])
    assert set(layers) == set(sparse_layers(model))
    # attaching twice is idempotent
    again = attach(model, plan_layers(model, 2, 4))
    assert all(again[k].sparsity is layers[k].sparsity for k in layers)


def test_transformer_encoder_layer_is_masked():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    names = set(attach(layer, plan_layers(layer, 2, 4)))
    assert names == {"self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2"}
    layer.train()
    out = layer(torch.randn(2, 3, 16))
    out.sum().backward()
    assert layer.linear1.parametrizations.weight.original.grad is not None


def test_plain_state_dict_loads_strictly_into_plain_model():
    torch.manual_seed(0)
    model = Zoo()
    model.lazy = nn.Linear(16, 8)  # materialized
    attach(model, plan_layers(model, 2, 4))
    sd = model.state_dict()
    assert any(".parametrizations." in k for k in sd)
    plain = plain_state_dict(model)
    fresh = Zoo()
    fresh.lazy = nn.Linear(16, 8)
    fresh.load_state_dict(plain, strict=True)
    assert torch.equal(fresh.conv.weight, model.conv.weight)
    assert bool((fresh.conv.weight.permute(0, 2, 3, 1).reshape(-1, 4).ne(0).sum(-1) <= 2).all())
    # pure function of the state dict: same result without the model
    plain2, nm_entries = split_state_dict(sd)
    assert plain2.keys() == plain.keys() and all(torch.equal(plain[k], plain2[k]) for k in plain)
    assert all(".parametrizations." in k for k in nm_entries)


def test_sparsified_model_loads_plain_and_parametrized_state_dicts():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    dense_sd = {k: v.clone() for k, v in src.state_dict().items()}
    dst = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    attach(dst, plan_layers(dst, 2, 4))
    dst.load_state_dict(dense_sd, strict=True)  # a dense pretrained checkpoint loads into the sparse model
    assert torch.equal(dst[0].parametrizations.weight.original, dense_sd["0.weight"])
    assert torch.equal(dst[0].weight, dense_sd["0.weight"] * nm_mask(dense_sd["0.weight"], 2, 4))
    other = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    attach(other, plan_layers(other, 2, 4))
    other.load_state_dict(dst.state_dict(), strict=True)
    assert torch.equal(other[0].weight, dst[0].weight)


def test_fixed_mask_survives_state_dict_round_trip():
    torch.manual_seed(0)
    a = nn.Linear(8, 4)
    la = attach(a, plan_layers(a, 2, 4))["weight"]
    la.sparsity.freeze(la.original)
    with torch.no_grad():  # all-zero rows: magnitudes no longer determine the mask, only the stored one does
        la.original.zero_()
    assert not torch.equal(nm_mask(la.original, 2, 4), la.sparsity.mask)
    b = nn.Linear(8, 4)
    lb = attach(b, plan_layers(b, 2, 4))["weight"]
    b.load_state_dict(a.state_dict())
    assert lb.sparsity.frozen and torch.equal(lb.sparsity.mask, la.sparsity.mask)
    assert torch.equal(b.weight, a.weight)


def test_extra_state_restores_n_m():
    a = nn.Linear(16, 4)
    attach(a, plan_layers(a, 1, 4))
    b = nn.Linear(16, 4)
    lb = attach(b, plan_layers(b, 2, 4))["weight"]
    b.load_state_dict(a.state_dict())
    assert (lb.sparsity.n, lb.sparsity.m) == (1, 4)


def test_detach_leaves_masked_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    w = model[0].weight
    attach(model, plan_layers(model, 2, 4))
    masked = model[0].weight.detach().clone()
    assert detach(model) == ["0"]
    assert type(model[0]) is nn.Linear and model[0].weight is w and torch.equal(w, masked)


def test_included_type_without_input_dim_is_an_error_and_registered_types_are_covered():
    with pytest.raises(ValueError, match=r"torch.nn.modules.sparse.Embedding has no known input dimension.*register"):
        plan_layers(Zoo(), 2, 4, include_types=["Embedding"])

    class Bilinear2(nn.Module):  # a user layer storing [in, out]
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 3))

    from nm_lightning import register_layer_type

    model = nn.Sequential(Bilinear2(), nn.Linear(3, 4))
    with pytest.raises(ValueError, match="Bilinear2 has no known input dimension"):
        plan_layers(model, 2, 4, include_types=[Bilinear2])
    register_layer_type(Bilinear2, input_dim=0)
    plans = _by_name(plan_layers(model, 2, 4))
    assert plans["0"].status == "covered" and plans["0"].state.input_dim == 0
    assert plans["1"].status == "skipped"  # 3 inputs: not divisible by 4
