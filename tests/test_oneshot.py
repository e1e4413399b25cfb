"""prune_one_shot: exact N:M along the input dim, SparseGPT against an independent reference, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from nm_lightning.layers import input_dim_of, input_major
from nm_lightning.masks import nm_mask
from nm_lightning.oneshot import prune_one_shot, sparsegpt_prune

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 96


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def token_batches(k: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 24), generator=g) for _ in range(k)]


def assert_nm_along_input(model: nn.Module, names: list[str], n: int, m: int) -> None:
    """Every named layer's weight has <= n non-zeros in each group of m along its *input* dim."""
    for name in names:
        mod = model.get_submodule(name)
        assert not parametrize.is_parametrized(mod)
        w = mod.weight.detach()
        in_dim = 0 if isinstance(mod, Conv1D) else 1  # checked by hand, not through the registry
        assert input_dim_of(mod) == in_dim
        view = w.t() if in_dim == 0 else w
        keep = nm_mask(view, n, m)
        assert (view[~keep] == 0).all(), name
        nz = (view != 0).reshape(view.shape[0], -1, m).sum(-1)
        assert int(nz.max()) <= n, name
        assert int((nz == n).sum()) > nz.numel() * 0.9, name  # kept weights are (almost all) non-zero


# ---------------------------------------------------------------------------------------------- HF models
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_hf_models_exact_nm_along_the_input(build, nm):
    n, m = nm
    model = build()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    batches = token_batches()
    report = prune_one_shot(model, batches, n, m, progress=False)
    names = [r.name for r in report.layers]
    assert_nm_along_input(model, names, n, m)
    sd = model.state_dict()
    if isinstance(model, GPT2LMHeadModel):
        assert len(names) == 8 and all(r.type_name == "Conv1D" for r in report.layers)
        assert dict(report.excluded)["lm_head"].startswith("weight is shared with transformer.wte.weight")
        assert torch.equal(sd["transformer.wte.weight"], dense["transformer.wte.weight"])
    else:
        assert len(names) == 15 and names[-1] == "lm_head"  # untied head is covered
        assert torch.equal(sd["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])
    assert all(0 <= r.rel_error < 1 and r.n == n and r.m == m for r in report.layers)
    changed = [k for k in sd if not torch.equal(sd[k], dense[k])]
    assert sorted(changed) == sorted(f"{x}.weight" for x in names)  # biases, norms, embeddings untouched
    out = model(batches[0]).logits
    assert torch.isfinite(out).all()
    assert not model.training


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_other_methods_on_gpt2(method):
    model = tiny_gpt2()
    report = prune_one_shot(model, token_batches(2), 2, 4, method=method, progress=False)
    assert_nm_along_input(model, [r.name for r in report.layers], 2, 4)
    assert {r.method for r in report.layers} == {method}


def test_siblings_share_one_calibration_pass():
    """q/k/v (and gate/up) read the same tensor: pruned from one forward, so 9 passes, not 15, per batch."""
    model = tiny_llama()
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    batches = token_batches(2)
    report = prune_one_shot(model, [{"input_ids": b} for b in batches], 2, 4, progress=False)
    assert len(report.layers) == 15
    # one checking forward per batch + per batch one forward for each of 9 groups (4 per block + lm_head)
    assert len(calls) == 2 + 2 * 9


def test_hf_layers_with_input_dim_0_use_the_transposed_view():
    """A Conv1D [in, out] is pruned along dim 0; SparseGPT on it equals SparseGPT on the equivalent Linear."""
    torch.manual_seed(0)
    conv = Conv1D(8, 16).double()  # 16 inputs -> 8 outputs, weight [16, 8]
    lin = nn.Linear(16, 8).double()
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    x = [correlated_inputs(64, 16, seed=s) for s in range(2)]
    r1 = prune_one_shot(conv, x, 2, 4, progress=False)
    r2 = prune_one_shot(lin, x, 2, 4, progress=False)
    torch.testing.assert_close(conv.weight.t(), lin.weight, rtol=0, atol=1e-12)
    assert r1.layers[0].rel_error == pytest.approx(r2.layers[0].rel_error, rel=1e-9)


# ---------------------------------------------------------------------------------------------- reference
def correlated_inputs(tokens: int, features: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, features // 4, generator=g, dtype=dtype)
    mix = torch.randn(features // 4, features, generator=g, dtype=dtype)
    scale = torch.logspace(-1, 1, features, dtype=dtype)  # outlier features, as in LLM activations
    return (base @ mix + 0.3 * torch.randn(tokens, features, generator=g, dtype=dtype)) * scale


def reference_sparsegpt(w: torch.Tensor, x: torch.Tensor, n: int, m: int, percdamp: float) -> torch.Tensor:
    """Unblocked SparseGPT written from the OBS formulas with explicit inverses (no Cholesky, no blocks).

    Columns are visited left to right. With ``Hinv_j = (H[j:, j:])⁻¹`` the inverse Hessian of the columns
    not yet fixed, at the first column of a group the m − n smallest ``w_k² / (H[k:, k:])⁻¹_00`` are pruned;
    fixing column j to q_j moves the remaining columns by ``−(w_j − q_j) / Hinv_j[0, 0] · Hinv_j[0, :]``.
    """
    w = w.double().clone()
    h = 2 * x.t() @ x / x.shape[0]
    h = h + percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    cols = w.shape[1]
    d = torch.stack([torch.linalg.inv(h[k:, k:])[0, 0] for k in range(cols)])
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for j in range(cols):
        if j % m == 0:
            sal = w[:, j : j + m] ** 2 / d[j : j + m]
            idx = torch.argsort(sal, dim=1)[:, : m - n]
            pruned[:, j : j + m].scatter_(1, idx, True)
        hinv = torch.linalg.inv(h[j:, j:])
        q = torch.where(pruned[:, j], 0.0, w[:, j])
        err = (w[:, j] - q) / hinv[0, 0]
        w[:, j:] -= err[:, None] * hinv[0][None, :]
        w[:, j] = q
    return w


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_sparsegpt_matches_an_unblocked_reference(nm):
    n, m = nm
    torch.manual_seed(0)
    lin = nn.Linear(32, 12, bias=False).double()
    dense = lin.weight.detach().clone()
    x = correlated_inputs(200, 32)
    batches = [x[:80], x[80:]]  # two batches: the Hessian is accumulated across them
    report = prune_one_shot(lin, batches, n, m, blocksize=8, percdamp=0.01, progress=False)
    ref = reference_sparsegpt(dense, x, n, m, 0.01)
    torch.testing.assert_close(lin.weight.detach(), ref, rtol=1e-9, atol=1e-10)
    # the reported error is ‖W X − W' X‖² / ‖W X‖² on the calibration inputs
    direct = ((x @ (dense - ref).t()) ** 2).sum() / ((x @ dense.t()) ** 2).sum()
    assert report.layers[0].rel_error == pytest.approx(float(direct), rel=1e-9)
    assert report.layers[0].tokens == 200
    # blocking does not change the result
    w2 = sparsegpt_prune(dense, 2 * x.t() @ x / 200, n, m, blocksize=1000)
    torch.testing.assert_close(w2, ref, rtol=1e-9, atol=1e-10)


def test_sparsegpt_beats_wanda_and_magnitude_on_correlated_inputs():
    torch.manual_seed(0)
    base = nn.Linear(64, 32).double()
    x = [correlated_inputs(128, 64, seed=s) for s in range(3)]
    errors = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        lin = nn.Linear(64, 32).double()
        lin.load_state_dict(base.state_dict())
        rep = prune_one_shot(lin, x, 2, 4, method=method, progress=False)
        # the error measured directly on the layer's outputs (bias cancels)
        xx, w0, w1 = torch.cat(x), base.weight.detach(), lin.weight.detach()
        direct = ((xx @ (w0 - w1).t()) ** 2).sum() / ((xx @ w0.t()) ** 2).sum()
        assert rep.layers[0].rel_error == pytest.approx(float(direct), rel=1e-9)
        errors[method] = rep.layers[0].rel_error
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_wanda_and_magnitude_masks():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False).double()
    w = lin.weight.detach().clone()
    x = correlated_inputs(50, 16)
    prune_one_shot(lin, [x], 2, 4, method="wanda", progress=False)
    score = w.abs() * x.norm(dim=0)
    torch.testing.assert_close(lin.weight.detach(), torch.where(nm_mask(score, 2, 4), w, 0.0), rtol=0, atol=0)
    lin.weight.data.copy_(w)
    prune_one_shot(lin, [x], 1, 4, method="magnitude", progress=False)
    torch.testing.assert_close(lin.weight.detach(), torch.where(nm_mask(w, 1, 4), w, 0.0), rtol=0, atol=0)


def test_layers_are_pruned_sequentially_from_pruned_inputs():
    """Layer 2's error is measured (and its Hessian built) on the outputs of the *pruned* layer 1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8)).double()
    dense = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    x = correlated_inputs(100, 16)
    rep = prune_one_shot(net, [x], 2, 4, progress=False)
    h_pruned = torch.tanh(net[0](x))
    h_dense = torch.tanh(F.linear(x, dense[0], net[0].bias))
    ref_from_pruned = reference_sparsegpt(dense[1], h_pruned.detach(), 2, 4, 0.01)
    ref_from_dense = reference_sparsegpt(dense[1], h_dense.detach(), 2, 4, 0.01)
    assert not torch.allclose(ref_from_pruned, ref_from_dense)
    torch.testing.assert_close(net[2].weight.detach(), ref_from_pruned, rtol=1e-9, atol=1e-10)
    d = dense[1] - net[2].weight.detach()
    direct = ((h_pruned @ d.t()) ** 2).sum() / ((h_pruned @ dense[1].t()) ** 2).sum()
    assert rep.layers[1].rel_error == pytest.approx(float(direct), rel=1e-9)


# ---------------------------------------------------------------------------------------------- convs, MHA, scheme
def test_convs_exact_nm_and_error_matches_the_conv_output():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=2, stride=2, bias=False, padding_mode="reflect"),
        nn.ReLU(),
    ).double()
    x = [torch.randn(2, 8, 9, 9, dtype=torch.float64) for _ in range(2)]
    dense = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    rep = prune_one_shot(net, x, 2, 4, progress=False)
    for w in (net[0].weight, net[2].weight):
        keep = nm_mask(w.detach(), 2, 4)  # groups along input channels at each kernel position
        assert (w.detach()[~keep] == 0).all()
    xx = torch.cat(x)
    for row, idx, d in zip(rep.layers, (0, 2), dense, strict=True):
        conv = net[idx]
        inp = xx if idx == 0 else torch.relu(net[0](xx))
        y_dense = conv._conv_forward(inp, d, None)
        y_sparse = conv._conv_forward(inp, conv.weight, None)
        direct = ((y_dense - y_sparse) ** 2).sum() / (y_dense**2).sum()
        assert row.rel_error == pytest.approx(float(direct), rel=1e-8), row.name


def test_conv3d_and_flat_layout():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(4, 8, 2, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3)).double()
    x = [torch.randn(1, 4, 5, 5, 5, dtype=torch.float64)]
    dense = net[2].weight.detach().clone()
    rep = prune_one_shot(net, x, 1, 4, progress=False)
    assert (net[2].weight.detach()[~nm_mask(net[2].weight.detach(), 1, 4)] == 0).all()
    inp = torch.relu(net[0](x[0]))
    y0, y1 = F.conv3d(inp, dense), F.conv3d(inp, net[2].weight)
    assert rep.layers[1].rel_error == pytest.approx(float(((y0 - y1) ** 2).sum() / (y0**2).sum()), rel=1e-8)
    flat = nn.Sequential(nn.Conv2d(3, 8, 2)).double()  # 12 weights per output row: flat 2:4 works, channels don't
    prune_one_shot(flat, [torch.randn(2, 3, 5, 5, dtype=torch.float64)], 2, 4, layout="flat", progress=False)
    w = flat[0].weight.detach()
    assert (w[~nm_mask(w, 2, 4, "flat")] == 0).all()


def test_multihead_attention_projections():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.cross = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)

        def forward(self, x, mem):
            y = self.attn(x, x, x, need_weights=False)[0]
            return self.cross(y, key=mem, value=mem, need_weights=False)[0]

    block = Block()
    batches = [(torch.randn(2, 5, 16), torch.randn(2, 7, 8)) for _ in range(2)]
    x = torch.cat([b[0] for b in batches])
    dense_o = block.attn.out_proj.weight.detach().clone()
    rep = prune_one_shot(block, batches, 2, 4, progress=False)
    names = [r.name for r in rep.layers]
    assert names == [
        "attn.in_proj_weight",
        "attn.out_proj",
        "cross.q_proj_weight",
        "cross.k_proj_weight",
        "cross.v_proj_weight",
        "cross.out_proj",
    ]
    for r in rep.layers:
        mod_name, _, param = r.name.rpartition(".") if r.name.endswith("_weight") else (r.name, "", "weight")
        w = block.get_submodule(mod_name)._parameters[param].detach()
        assert (w[~nm_mask(w, 2, 4)] == 0).all()
        assert 0 < r.rel_error < 1
    # out_proj's input is the attention output of the already pruned in_proj (recomputed, not hooked)
    with torch.no_grad():
        lin = block.attn.out_proj
        ctx = F.multi_head_attention_forward(
            x.transpose(0, 1),
            x.transpose(0, 1),
            x.transpose(0, 1),
            16,
            2,
            block.attn.in_proj_weight,
            block.attn.in_proj_bias,
            None,
            None,
            False,
            0.0,
            torch.eye(16),
            None,
            need_weights=False,
        )[0].transpose(0, 1)
        y0, y1 = ctx @ dense_o.t(), ctx @ lin.weight.t()
    assert rep.layers[1].rel_error == pytest.approx(float(((y0 - y1) ** 2).sum() / (y0**2).sum()), rel=1e-4)
    assert torch.isfinite(block(*batches[0])).all()
    assert not any(m._forward_pre_hooks for m in block.modules())


def test_scheme_include_exclude_and_report():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = [torch.randn(8, 16)]
    rep = prune_one_shot(net, x, scheme={"0": (1, 4), "2": (4, 8), "4": (4, 4)}, progress=False)
    assert [(r.name, r.n, r.m) for r in rep.layers] == [("0", 1, 4), ("2", 4, 8)]
    assert dict(rep.excluded) == {"4": "kept dense (4:4)"}
    assert_nm_along_input(net, ["0"], 1, 4)
    assert_nm_along_input(net, ["2"], 4, 8)
    d = rep.to_dict()
    assert d["method"] == "sparsegpt" and len(d["layers"]) == 2 and d["calibration_batches"] == 1
    net2 = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    rep2 = prune_one_shot(net2, x, include=["0"], progress=True)
    assert [r.name for r in rep2.layers] == ["0"] and dict(rep2.excluded) == {"2": "not matched by include"}
    rep3 = prune_one_shot(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), x, exclude="2", progress=False)
    assert dict(rep3.excluded) == {"2": "matched exclude '2'"}
    from rich.console import Console

    console = Console(record=True, width=200)
    rep.print(console)
    text = console.export_text()
    assert "kept dense (4:4)" in text and "1:4" in text


def test_model_state_and_dtype_are_kept():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 8)).to(torch.bfloat16).train()
    x = [torch.randn(8, 16, dtype=torch.bfloat16) for _ in range(2)]
    prune_one_shot(net, x, 2, 4, progress=False)
    assert net.training and net[0].weight.dtype == torch.bfloat16
    assert_nm_along_input(net, ["0", "2"], 2, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    model = tiny_llama().cuda()
    rep = prune_one_shot(model, token_batches(2), 2, 4, progress=False)  # CPU batches are moved to the model
    assert model.lm_head.weight.is_cuda
    assert_nm_along_input(model, [r.name for r in rep.layers], 2, 4)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_layer():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    good = [torch.randn(4, 8)]
    with pytest.raises(ValueError, match="no calibration batches: `batches` is empty"):
        prune_one_shot(net, [], progress=False)
    with pytest.raises(ValueError, match="no calibration batches"):
        prune_one_shot(net, iter(()), progress=False)
    with pytest.raises(ValueError, match=r"calibration batch 0 \(Tensor of shape \(4, 5\)\) does not fit .* layer '0'"):
        prune_one_shot(net, [torch.randn(4, 5)], progress=False)
    with pytest.raises(ValueError, match=r"batch 1 .* does not fit"):
        prune_one_shot(net, [torch.randn(4, 8), (torch.randn(4, 8), torch.randn(1))], progress=False)
    with pytest.raises(TypeError, match="got a single Tensor; wrap it in a list"):
        prune_one_shot(net, torch.randn(4, 8), progress=False)
    bad = torch.randn(4, 8)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^layer '0': its calibration inputs contain 1 NaN/Inf value\(s\) \(batch 0"):
        prune_one_shot(net, [bad], progress=False)
    inf_net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        inf_net[0].bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"^layer '2': its calibration inputs contain .* NaN/Inf"):
        prune_one_shot(inf_net, good, progress=False)
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\): its input size .* = 6 is not divisible by m=4"):
        prune_one_shot(nn.Sequential(nn.Linear(6, 8)), [torch.randn(2, 6)], progress=False)
    with pytest.raises(ValueError, match=r"layer '0': the input Hessian is singular after dampening \(percdamp=0"):
        prune_one_shot(nn.Sequential(nn.Linear(8, 4)), [torch.randn(3, 8)], percdamp=0.0, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        prune_one_shot(net, good, method="obs", progress=False)
    with pytest.raises(ValueError, match="n must satisfy"):
        prune_one_shot(net, good, 5, 4, progress=False)
    with pytest.raises(ValueError, match="percdamp must be a finite float >= 0"):
        prune_one_shot(net, good, percdamp=-0.1, progress=False)
    with pytest.raises(ValueError, match="blocksize must be an int >= 1"):
        prune_one_shot(net, good, blocksize=0, progress=False)
    with pytest.raises(ValueError, match=r"scheme names layers the model does not have: \['fc'\]"):
        prune_one_shot(net, good, scheme={"fc": (2, 4)}, progress=False)
    with pytest.raises(ValueError, match="scheme entry '0': N:M n must satisfy"):
        prune_one_shot(net, good, scheme={"0": (5, 4)}, progress=False)
    with pytest.raises(ValueError, match=r"found no layer to prune \(0: matched exclude"):
        prune_one_shot(net, good, exclude=["*"], progress=False)
    with pytest.raises(ValueError, match=r"found no layer to prune \(the model has no layer"):
        prune_one_shot(nn.Sequential(nn.ReLU()), good, progress=False)
    with pytest.raises(ValueError, match="layout 'flat' groups the stored weight"):
        prune_one_shot(Conv1D(8, 8), [torch.randn(2, 8)], layout="flat", progress=False)
    unused = nn.ModuleDict({"used": nn.Linear(8, 8), "spare": nn.Linear(8, 8)})
    unused.forward = lambda x: unused["used"](x)
    with pytest.raises(ValueError, match=r"layers \['spare'\] received no input during the calibration forward"):
        prune_one_shot(unused, good, progress=False)
    par = nn.Sequential(nn.Linear(8, 8))
    parametrize.register_parametrization(par[0], "weight", nn.Identity())
    with pytest.raises(ValueError, match=r"layer '0': weight is parametrized; .* plain modules"):
        prune_one_shot(par, good, progress=False)
    # a failed call leaves no hooks behind and the model usable
    assert not net[0]._forward_pre_hooks and not net[0]._forward_hooks
    assert input_major(net[0].weight, 1).shape == (8, 8)
