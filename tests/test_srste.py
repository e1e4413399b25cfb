"""SR-STE gradient rule, STE, fixed mask and freeze at the module level (no Trainer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nm_lightning import attach, nm_mask, plan_layers
from nm_lightning.srste import add_decay_, fixed_mask, ste_nm


def _grad_wrt_masked(layer: nn.Module, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    leaf = masked.detach().clone().requires_grad_(True)
    fn = nn.functional.linear if isinstance(layer, nn.Linear) else nn.functional.conv2d
    out = fn(x, leaf)
    (out**2).sum().backward()
    return leaf.grad


@pytest.mark.parametrize("decay", [0.0, 2e-4, 0.5])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradient_equals_formula(decay, kind):
    torch.manual_seed(0)
    layer = nn.Linear(16, 6, bias=False) if kind == "linear" else nn.Conv2d(8, 4, 3, bias=False)
    x = torch.randn(5, 16) if kind == "linear" else torch.randn(2, 8, 6, 6)
    w = layer.weight
    dense = w.detach().clone()
    layers = attach(layer, plan_layers(layer, 2, 4))
    sp = layers["weight"].sparsity
    assert layer.parametrizations.weight.original is w  # same Parameter object
    (layer(x) ** 2).sum().backward()
    mask = nm_mask(dense, 2, 4)
    assert torch.equal(sp.mask, mask)  # recorded for the decay
    expected = _grad_wrt_masked(layer, x, dense * mask)
    torch.testing.assert_close(w.grad, expected)  # straight-through: pruned weights get dL/dW~ too
    add_decay_(w.grad, w, sp.mask, decay)
    torch.testing.assert_close(w.grad, expected + decay * (~mask) * dense)
    if decay == 0.0:  # STE: exactly the straight-through gradient
        assert torch.equal(w.grad, expected)


@pytest.mark.parametrize("native", [True, False])
def test_add_decay_only_on_pruned(native, monkeypatch):
    """``add_decay_`` adds ``decay * w`` to the gradient of pruned weights only (values written out by hand)."""
    from nm_lightning import _native

    if not native:
        monkeypatch.setattr(_native, "supports_decay", lambda *args: False)
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    mask = nm_mask(w, 2, 4)
    assert mask.tolist() == [[False, False, True, True]]
    grad = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    out = add_decay_(grad, w, mask, 0.1)
    assert out is grad  # in place
    torch.testing.assert_close(grad, torch.tensor([[0.5 + 0.1, 0.5 - 0.2, 0.5, 0.5]]))


def test_ste_saves_nothing_for_backward():
    w = torch.randn(8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, mask = ste_nm(w, 2, 4)
    assert saved == [] and not mask.requires_grad
    assert torch.equal(mask, nm_mask(w, 2, 4)) and torch.equal(out, torch.where(mask, w, 0.0))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fused_masked_weight_matches_both_paths(dtype, monkeypatch):
    from nm_lightning import _native
    from nm_lightning.masks import nm_masked

    w = torch.randn(16, 32, 3).to(dtype)
    masked, mask = nm_masked(w, 2, 8)
    assert torch.equal(masked, torch.where(mask, w, torch.zeros((), dtype=dtype)))
    assert not bool(torch.signbit(masked[~mask]).any())  # pruned entries are +0, never -0
    monkeypatch.setattr(_native, "supports", lambda *a: False)
    masked_t, mask_t = nm_masked(w, 2, 8)
    assert torch.equal(mask_t, mask) and torch.equal(masked_t, masked)
    assert not bool(torch.signbit(masked_t[~mask_t]).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_decay_native_and_torch_agree(dtype, monkeypatch):
    from nm_lightning import _native

    w = torch.randn(64, 64).to(dtype)
    mask = nm_mask(w, 1, 4)
    g = torch.randn_like(w)
    a = add_decay_(g.clone(), w, mask, 0.3)
    monkeypatch.setattr(_native, "supports_decay", lambda *args: False)
    b = add_decay_(g.clone(), w, mask, 0.3)
    torch.testing.assert_close(a, b)
    expected = (g.double() + 0.3 * w.double() * ~mask).to(dtype)
    torch.testing.assert_close(a, expected, atol=2e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


def test_fixed_mask_blocks_gradient():
    w = torch.randn(4, 8, requires_grad=True)
    mask = nm_mask(w, 1, 4)
    fixed_mask(w, mask).sum().backward()
    assert torch.equal(w.grad, mask.float())


def test_freeze_zeroes_pruned_and_keeps_mask():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    sp = attach(layer, plan_layers(layer, 1, 4))["weight"].sparsity
    w = layer.parametrizations.weight.original
    mask = nm_mask(w, 1, 4)
    sp.freeze(w)
    assert sp.frozen and torch.equal(sp.mask, mask)
    assert bool((w[~mask] == 0).all()) and bool((w[mask] != 0).all())
    # training moves kept weights; the mask no longer follows magnitudes and pruned weights get no gradient
    opt = torch.optim.SGD(layer.parameters(), lr=1.0, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(16, 8)).pow(2).sum().backward()
        assert bool((w.grad[~mask] == 0).all())
        opt.step()
    assert bool((w[~mask] == 0).all())
    assert torch.equal(sp.mask, mask)


def test_mask_recomputed_every_training_forward():
    layer = nn.Linear(4, 1, bias=False)
    sp = attach(layer, plan_layers(layer, 2, 4))["weight"].sparsity
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))
    layer(torch.ones(1, 4))
    assert sp.mask.tolist() == [[True, True, False, False]]
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    out = layer(torch.ones(1, 4))
    assert sp.mask.tolist() == [[False, False, True, True]] and out.item() == 7.0


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    attach(layer, plan_layers(layer, 2, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(4, 16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    w = layer.parametrizations.weight.original
    assert w.grad is not None and w.grad.dtype == torch.float32
    eff = layer.weight
    assert bool((eff.view(8, 4, 4).ne(0).sum(-1) <= 2).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(dtype):
    layer = nn.Linear(16, 8).to(dtype)
    attach(layer, plan_layers(layer, 2, 4))
    eff = layer.weight
    assert eff.dtype == dtype and bool((eff.view(8, 4, 4).ne(0).sum(-1) == 2).all())


def test_decay_not_scaled_by_loss_scale():
    """The decay is added to the *unscaled* gradient: the same result with and without a loss scale."""
    torch.manual_seed(0)
    grads = []
    for scale in (1.0, 1024.0):
        layer = nn.Linear(8, 4, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.arange(32.0).view(4, 8) / 10)
        sp = attach(layer, plan_layers(layer, 2, 4))["weight"].sparsity
        x = torch.ones(2, 8)
        (layer(x).sum() * scale).backward()
        w = layer.parametrizations.weight.original
        w.grad.div_(scale)  # what GradScaler.unscale_ does before on_before_optimizer_step
        add_decay_(w.grad, w, sp.mask, 0.1)
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("kind", ["linear", "conv", "mha", "frozen"])
def test_recompute_masked_weights_is_exact_and_keeps_one_byte(kind):
    from nm_lightning.srste import _pack

    torch.manual_seed(0)
    if kind == "mha":
        make, x = (lambda: nn.MultiheadAttention(16, 2, batch_first=True)), torch.randn(2, 5, 16)
    elif kind == "conv":
        make, x = (lambda: nn.Conv2d(8, 4, 3)), torch.randn(2, 8, 6, 6)
    else:
        make, x = (lambda: nn.Linear(16, 8)), torch.randn(4, 16)
    grads = []
    kept_bytes = []
    for recompute in (False, True):
        torch.manual_seed(1)
        layer = make()
        layers = attach(layer, plan_layers(layer, 2, 4))
        if kind == "frozen":
            for la in layers.values():
                la.sparsity.freeze(la.original)

        def counting_pack(t):
            packed = _pack(t)
            if isinstance(packed, tuple):
                kept_bytes.append(packed[2].numel() * packed[2].element_size())
            return packed

        from contextlib import nullcontext

        from nm_lightning import srste

        hooks = torch.autograd.graph.saved_tensors_hooks(counting_pack, srste._unpack)
        xg = x.clone().requires_grad_(True)  # so that backward needs the (masked) weight
        with hooks if recompute else nullcontext():
            out = layer(xg, xg, xg)[0] if kind == "mha" else layer(xg)
        out.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()] + [xg.grad.clone()])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))
    # every masked weight saved for backward was replaced by its bool mask: 1 byte per weight
    weights = {la.original.numel() for la in layers.values()}
    assert kept_bytes and set(kept_bytes) <= weights


def test_recompute_detects_in_place_change():
    from nm_lightning.srste import recompute_masked_weights

    layer = nn.Linear(8, 4)
    attach(layer, plan_layers(layer, 2, 4))
    with recompute_masked_weights():
        out = layer(torch.randn(3, 8, requires_grad=True))
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(1.0)
    with pytest.raises(RuntimeError, match=r"modified in place between forward and backward"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------- -0.0, bit for bit
_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def _signed_zero_weight(dtype: torch.dtype) -> torch.Tensor:
    """Groups of 4 where -0.0 is kept (the others are smaller... none: three more -0.0/+0.0 ties) or pruned."""
    w = torch.tensor(
        [
            [-0.0, 0.0, -0.0, 0.0, 1.0, -2.0, -0.0, 0.0],  # group 1: all zero, ties: keeps indices 0, 1 (-0.0, +0.0)
            [3.0, -0.0, -1.0, 2.0, -5.0, -0.0, 4.0, -3.0],  # -0.0 pruned everywhere; pruned negatives
        ],
        dtype=dtype,
    )
    return w


def _expected_masked(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Independent: the kept entries' exact bits, +0.0 (all-zero bits) elsewhere."""
    it = _INT[w.dtype]
    return torch.where(mask, w.view(it), torch.zeros((), dtype=it)).view(w.dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT[t.dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["native", "torch", "n_equals_m", "fixed_mask", "ste_backward_rebuild",
                                  "frozen_backward_rebuild", "not_straight_through"])
def test_kept_negative_zero_stays_and_pruned_are_positive_zero(dtype, path, monkeypatch):
    from nm_lightning import _native
    from nm_lightning.masks import nm_masked
    from nm_lightning.srste import _pack, _unpack

    w = _signed_zero_weight(dtype)
    n, m = (4, 4) if path == "n_equals_m" else (2, 4)
    if path == "native" and not _native.supports(w, m):
        pytest.skip("no native kernel here")
    if path != "native":
        monkeypatch.setattr(_native, "supports", lambda *a: False)
    mask = nm_mask(w, n, m)
    if n < m:
        assert mask[0, :4].tolist() == [True, True, False, False]  # the kept -0.0 at [0, 0]
    if path in ("native", "torch", "n_equals_m"):
        out, mask2 = nm_masked(w, n, m)
        assert torch.equal(mask2, mask)
    elif path == "fixed_mask":
        out = fixed_mask(w.clone().requires_grad_(True), mask)
        out.sum().backward()  # still differentiable
    elif path in ("ste_backward_rebuild", "frozen_backward_rebuild"):
        src = w.clone().requires_grad_(True)
        fwd = ste_nm(src, n, m)[0] if path == "ste_backward_rebuild" else fixed_mask(src, mask)
        from nm_lightning.srste import tag_masked_weight

        tag_masked_weight(fwd, src, mask)
        assert torch.equal(_bits(fwd), _bits(_expected_masked(w, mask)))
        out = _unpack(_pack(fwd))  # what backward gets in place of the saved masked weight
    else:  # the DominoSearch parametrization: dynamic mask, no straight-through gradient
        layer = nn.Linear(8, 2, bias=False).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
        sp = attach(layer, plan_layers(layer, n, m))["weight"].sparsity
        sp.state.straight_through = False  # the layer's N:M state owns the flag
        out = layer.weight
    assert out.dtype == dtype
    assert torch.equal(_bits(out), _bits(_expected_masked(w, mask))), (path, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_paths_agree_bit_for_bit_on_random_weights_with_signed_zeros(dtype, monkeypatch):
    from nm_lightning import _native
    from nm_lightning.masks import nm_masked

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-2, 3, (16, 32, 3), generator=g).to(dtype)
    w[torch.rand(w.shape, generator=g) < 0.3] = -0.0
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(_native, "supports", lambda *a: False)
        for n, m in [(1, 4), (2, 4), (3, 8), (5, 16), (16, 16)]:
            masked, mask = nm_masked(w, n, m)
            assert torch.equal(_bits(masked), _bits(_expected_masked(w, mask)))
            assert torch.equal(_bits(fixed_mask(w, mask)), _bits(masked))
            assert torch.equal(_bits(ste_nm(w, n, m)[0]), _bits(masked))
            results.append(_bits(masked))
    half = len(results) // 2
    assert all(torch.equal(a, b) for a, b in zip(results[:half], results[half:], strict=True))
