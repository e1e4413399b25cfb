"""nm_mask: exactly n kept per group, largest magnitudes, deterministic ties, both layouts, all dtypes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nm_lightning import _native, nm_mask
from nm_lightning.masks import _mask_generic, check_nm, group_view, nm_masked

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def reference_mask(w: torch.Tensor, n: int, m: int, layout: str) -> torch.Tensor:
    """Independent reference: move the grouped dim last, then rank by (|w| desc, index asc) per group."""
    if layout == "flat" or w.dim() == 1:
        groups = w.reshape(-1, m)
        keep = _rank_keep(groups, n)
        return keep.reshape(w.shape)
    perm = [0, *range(2, w.dim()), 1]
    wp = w.permute(perm).contiguous()  # [out, *k, in]
    keep = _rank_keep(wp.reshape(-1, m), n).reshape(wp.shape)
    inv = [0, w.dim() - 1, *range(1, w.dim() - 1)]
    return keep.permute(inv).contiguous()


def sort_oracle(weight: torch.Tensor, n: int, m: int, gv) -> torch.Tensor:
    """The previous PyTorch path, kept as an oracle: a stable descending sort keeps the lower index on ties."""
    w = weight.detach().reshape(gv.outer, gv.length // m, m, gv.inner).abs()
    keep_idx = torch.sort(w, dim=2, descending=True, stable=True).indices.narrow(2, 0, n)
    mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    mask.scatter_(2, keep_idx, True)
    return mask.reshape(weight.shape)


def _rank_keep(groups: torch.Tensor, n: int) -> torch.Tensor:
    a = groups.abs().double()
    keep = torch.zeros(groups.shape, dtype=torch.bool)
    for g in range(a.shape[0]):
        order = sorted(range(a.shape[1]), key=lambda i: (-a[g, i].item(), i))
        keep[g, order[:n]] = True
    return keep


@st.composite
def nm_case(draw):
    m = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 32]))
    n = draw(st.integers(1, m))
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d", "conv3d"]))
    out = draw(st.integers(1, 5))
    groups_in = draw(st.integers(1, 3))
    k = {
        "linear": [],
        "conv1d": [draw(st.integers(1, 3))],
        "conv2d": [draw(st.integers(1, 3))] * 2,
        "conv3d": [1, 2, draw(st.integers(1, 2))],
    }[kind]
    shape = (out, groups_in * m, *k)
    dtype = draw(st.sampled_from(DTYPES))
    ties = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct magnitudes, both signs, zeros: many exact ties
        w = torch.randint(-2, 3, shape, generator=g).to(dtype)
    else:
        w = torch.randn(shape, generator=g).to(dtype)
    layout = draw(st.sampled_from(["input_channel", "flat"]))
    return w, n, m, layout


@settings(max_examples=300, deadline=None)
@given(nm_case())
def test_mask_matches_reference(case):
    w, n, m, layout = case
    mask = nm_mask(w, n, m, layout)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, reference_mask(w, n, m, layout))
    gv = group_view(w.shape, layout)
    per_group = mask.reshape(gv.outer, gv.length // m, m, gv.inner).sum(2)
    assert bool((per_group == n).all())
    # the PyTorch path (used on CUDA and as the fallback) gives the same bits
    assert torch.equal(mask, _mask_generic(w, n, m, gv))


@settings(max_examples=50, deadline=None)
@given(nm_case())
def test_kept_magnitudes_dominate(case):
    w, n, m, layout = case
    mask = nm_mask(w, n, m, layout)
    gv = group_view(w.shape, layout)
    a = w.abs().double().reshape(gv.outer, gv.length // m, m, gv.inner)
    mk = mask.reshape(a.shape)
    kept_min = torch.where(mk, a, torch.full_like(a, float("inf"))).amin(2)
    dropped_max = torch.where(mk, torch.full_like(a, -1.0), a).amax(2)
    assert bool((kept_min >= dropped_max).all())


@st.composite
def generic_case(draw):
    """Shapes, dtypes and values for the sort-free path: many exact ties, both signs, +-0, m up to 64."""
    m = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 24, 32, 48, 64]))
    n = draw(st.integers(1, m))
    layout = draw(st.sampled_from(["input_channel", "flat"]))
    ndim = draw(st.integers(2, 4))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    input_dim = draw(st.integers(0, ndim - 1))
    shape[input_dim if layout == "input_channel" else 0] *= m * draw(st.integers(1, 2))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["few", "zeros", "randn"]))
    if kind == "few":
        w = torch.randint(-2, 3, shape, generator=g).to(dtype)
    elif kind == "zeros":  # +0.0 and -0.0 (which tie) among a few magnitudes
        w = torch.randint(0, 2, shape, generator=g).to(dtype) * torch.where(torch.rand(shape, generator=g) < 0.5, -1, 1)
        w = w.to(dtype) * torch.tensor(0.0, dtype=dtype)
        w[torch.rand(shape, generator=g) < 0.3] = 1.5
    else:
        w = torch.randn(shape, generator=g).to(dtype)
    return w, n, m, layout, input_dim


@settings(max_examples=400, deadline=None)
@given(generic_case())
def test_generic_mask_equals_stable_sort(case):
    w, n, m, layout, input_dim = case
    gv = group_view(w.shape, layout, input_dim)
    expected = sort_oracle(w, n, m, gv)
    assert torch.equal(_mask_generic(w, n, m, gv), expected)
    assert torch.equal(nm_mask(w, n, m, layout, input_dim=input_dim), expected if n < m else torch.ones_like(expected))


def test_ties_keep_lowest_index():
    w = torch.ones(2, 8)
    assert nm_mask(w, 2, 4).tolist() == [[True, True, False, False] * 2] * 2
    w = torch.tensor([[0.5, -1.0, 1.0, 0.5]])
    assert nm_mask(w, 2, 4).tolist() == [[False, True, True, False]]
    assert nm_mask(w, 3, 4).tolist() == [[True, True, True, False]]


def test_input_channel_layout_groups_along_in_at_each_tap():
    w = torch.zeros(1, 4, 3)
    w[0, :, 0] = torch.tensor([4.0, 3, 2, 1])  # tap 0: channels 0, 1 largest
    w[0, :, 1] = torch.tensor([1.0, 2, 3, 4])  # tap 1: channels 2, 3 largest
    w[0, :, 2] = torch.tensor([1.0, 4, 1, 4])
    mask = nm_mask(w, 2, 4, "input_channel")
    assert mask[0, :, 0].tolist() == [True, True, False, False]
    assert mask[0, :, 1].tolist() == [False, False, True, True]
    assert mask[0, :, 2].tolist() == [False, True, False, True]


def test_flat_layout_is_the_flattened_order():
    w = torch.arange(24.0).reshape(2, 4, 3)  # flat groups: [0..3], [4..7], ...
    mask = nm_mask(w, 1, 4, "flat").flatten()
    assert mask.nonzero().flatten().tolist() == [3, 7, 11, 15, 19, 23]


def test_layouts_agree_for_linear_and_1x1_conv():
    w = torch.randn(8, 16)
    assert torch.equal(nm_mask(w, 2, 4, "flat"), nm_mask(w, 2, 4, "input_channel"))
    c = torch.randn(8, 16, 1, 1)
    assert torch.equal(nm_mask(c, 2, 4, "flat"), nm_mask(c, 2, 4, "input_channel"))


def test_flat_layout_is_2_of_4_along_unfold_k():
    """With 'flat', the masked conv equals an im2col GEMM whose K rows are 2:4 (im2col equivalence)."""
    conv = torch.nn.Conv2d(4, 8, 3, bias=False)
    x = torch.randn(2, 4, 6, 6)
    w = conv.weight.detach() * nm_mask(conv.weight, 2, 4, "flat")
    rows = w.view(8, -1)
    assert bool((rows.view(8, -1, 4).ne(0).sum(-1) <= 2).all())
    cols = torch.nn.functional.unfold(x, 3)
    gemm = (rows @ cols).view(2, 8, 4, 4)
    torch.testing.assert_close(gemm, torch.nn.functional.conv2d(x, w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_dtype_and_device_follow_weight(dtype):
    w = torch.randn(4, 8).to(dtype)
    mask = nm_mask(w, 2, 4)
    assert mask.dtype == torch.bool and mask.device == w.device and mask.shape == w.shape


@pytest.mark.parametrize("native", [True, False])
def test_weight_is_not_modified_and_outputs_are_detached(native, monkeypatch):
    if not native:
        monkeypatch.setattr(_native, "supports", lambda *a: False)
    w = torch.randn(4, 8)
    w[0, 0], w[1, 1] = -0.0, float("-1e-30")
    w.requires_grad_(True)
    before, version = w.detach().clone(), w._version
    mask = nm_mask(w, 2, 4)
    masked, mask2 = nm_masked(w, 2, 4)
    # the weight is untouched, bit for bit, and not modified in place (version counter)
    assert torch.equal(w.detach().view(torch.int32), before.view(torch.int32)) and w._version == version
    # no autograd graph from the outputs back to w (nm_masked is not differentiable; ste_nm is)
    assert masked.grad_fn is None and not masked.requires_grad and torch.equal(mask, mask2)


def test_n_equal_m_keeps_all():
    assert bool(nm_mask(torch.randn(3, 8), 4, 4).all())


def test_large_m_uses_torch_path():
    w = torch.randn(2, 512)
    mask = nm_mask(w, 100, 512)
    assert torch.equal(mask, reference_mask(w, 100, 512, "input_channel"))


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((torch.randn(4, 8), 0, 4), ValueError, r"1 <= n <= m, got n=0, m=4"),
        ((torch.randn(4, 8), 5, 4), ValueError, r"n=5, m=4"),
        ((torch.randn(4, 8), 2, 0), ValueError, r"m must be >= 1, got m=0"),
        ((torch.randn(4, 8), 2.0, 4), TypeError, r"n must be an int, got 2.0"),
        ((torch.randn(4, 8), 2, "4"), TypeError, r"m must be an int, got '4'"),
        ((torch.randn(4, 8), True, 4), TypeError, r"n must be an int"),
        (
            (torch.randn(4, 6), 2, 4),
            ValueError,
            r"input features \(dim 1 of shape \(4, 6\)\) = 6 is not divisible by m=4",
        ),
        ((torch.randn(4, 6, 3), 2, 4), ValueError, r"input channels per group .* = 6 is not divisible by m=4"),
        ((torch.randn(10), 2, 4), ValueError, r"needs a weight with >= 2 dims"),
        ((torch.arange(8), 2, 4), TypeError, r"floating-point tensor"),
    ],
)
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        nm_mask(*args)


def test_bad_layout():
    with pytest.raises(ValueError, match=r"layout must be one of \('input_channel', 'flat'\), got 'nhwc'"):
        nm_mask(torch.randn(4, 8), 2, 4, "nhwc")  # type: ignore[arg-type]


def test_flat_needs_numel_divisible():
    with pytest.raises(ValueError, match=r"numel 15 .* not divisible by m=4 \(layout 'flat'\)"):
        nm_mask(torch.randn(3, 5), 2, 4, "flat")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_rejected(bad, dtype):
    w = torch.randn(4, 8).to(dtype)
    w[1, 3] = bad
    with pytest.raises(ValueError, match=r"contains 1 NaN/Inf value\(s\)"):
        nm_mask(w, 2, 4)
    with pytest.raises(ValueError, match=r"NaN/Inf"):
        nm_mask(w, 4, 4)


def test_check_nm_reports_reason():
    assert check_nm((16, 3, 7, 7), 2, 4) is not None
    assert check_nm((16, 8, 3, 3), 2, 4) is None
    assert "empty" in check_nm((0, 8), 2, 4)


def test_native_and_torch_agree_on_big_conv():
    w = torch.randn(64, 32, 3, 3)
    for n, m in [(2, 4), (1, 4), (3, 4), (4, 8), (2, 16), (13, 16), (1, 32)]:
        gv = group_view(w.shape, "input_channel")
        assert torch.equal(nm_mask(w, n, m), _mask_generic(w, n, m, gv))
        assert torch.equal(nm_mask(w, n, m), sort_oracle(w, n, m, gv))


# ---------------------------------------------------------------------------------------------- input_dim
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 8), (3, 16), (4, 4)])
def test_input_dim_0_is_the_transpose(dtype, n, m):
    """A weight stored ``[in, out]`` (GPT-2 ``Conv1D``) with ``input_dim=0`` == the ``[out, in]`` mask, transposed."""
    w = torch.randint(-3, 4, (32, 12)).to(dtype)  # many ties
    mask = nm_mask(w, n, m, input_dim=0)
    assert torch.equal(mask, nm_mask(w.t().contiguous(), n, m).t())
    masked, mask2 = nm_masked(w, n, m, input_dim=0)
    assert torch.equal(mask2, mask) and torch.equal(masked, torch.where(mask, w, 0))


def test_input_dim_views_and_default():
    assert group_view((6, 8, 3, 5), "input_channel") == group_view((6, 8, 3, 5), "input_channel", 1)
    assert group_view((6, 8, 3, 5), "input_channel", 0) == group_view((6, 8, 3, 5), "flat", 0).__class__(1, 6, 120)
    assert group_view((6, 8, 3, 5), "input_channel", 2) == group_view((6, 8, 3, 5), "input_channel", 1).__class__(
        48, 3, 5
    )
    assert group_view((6, 8, 3, 5), "flat", 3).length == 720  # ignored for flat
    w = torch.randn(4, 3, 8, 2)  # groups along dim 2
    mask = nm_mask(w, 2, 4, input_dim=2)
    ref = nm_mask(w.permute(0, 1, 3, 2).reshape(-1, 8), 2, 4).reshape(4, 3, 2, 8).permute(0, 1, 3, 2)
    assert torch.equal(mask, ref)


@pytest.mark.parametrize(
    ("shape", "input_dim", "exc", "match"),
    [
        ((8, 16), 2, ValueError, r"input_dim must be in \[0, 1\] for a weight of shape \(8, 16\), got input_dim=2"),
        ((8, 16), -1, ValueError, r"input_dim must be in \[0, 1\] .* got input_dim=-1"),
        ((8, 16), 1.0, TypeError, r"input_dim must be an int, got 1.0 \(float\)"),
        ((8, 16), True, TypeError, r"input_dim must be an int, got True"),
        ((6, 16), 0, ValueError, r"input features \(dim 0 of shape \(6, 16\)\) = 6 is not divisible by m=4"),
        ((8, 6, 5), 2, ValueError, r"input channels \(dim 2 of shape \(8, 6, 5\)\) = 5 is not divisible by m=4"),
    ],
)
def test_bad_input_dim(shape, input_dim, exc, match):
    with pytest.raises(exc, match=match):
        nm_mask(torch.randn(shape), 2, 4, input_dim=input_dim)
    with pytest.raises(exc, match=match):
        nm_masked(torch.randn(shape), 2, 4, input_dim=input_dim)
    if exc is ValueError and "divisible" in match:
        assert check_nm(shape, 2, 4, input_dim=input_dim) is not None
    else:
        with pytest.raises(exc, match=match):
            check_nm(shape, 2, 4, input_dim=input_dim)
