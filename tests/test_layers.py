"""The layer-type registry: built-ins, MRO lookup, user registration, the lazy Hugging Face Conv1D."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from nm_lightning import layers
from nm_lightning.layers import input_dim_of, input_major, known_types, register_layer_type, registered_params
from nm_lightning.masks import nm_mask

_MHA_PARAMS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so registrations made by a test do not leak."""
    monkeypatch.setattr(layers, "_REGISTRY", dict(layers._REGISTRY))
    return layers._REGISTRY


def test_builtins():
    for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
        assert input_dim_of(cls) == 1
        assert registered_params(cls) == ("weight",)
    assert input_dim_of(nn.Linear(4, 2)) == 1
    assert input_dim_of(nn.Conv2d(4, 8, 3)) == 1
    mha = nn.MultiheadAttention(8, 2)
    assert registered_params(mha) == _MHA_PARAMS
    assert all(input_dim_of(mha, p) == 1 for p in _MHA_PARAMS)
    assert input_dim_of(mha, "weight") is None
    assert input_dim_of(nn.Linear, "bias") is None
    # not registered: embeddings, norms, transposed convs
    for cls in (nn.Embedding, nn.LayerNorm, nn.ConvTranspose2d, nn.BatchNorm2d):
        assert input_dim_of(cls) is None
        assert registered_params(cls) == ()
    types = known_types()
    assert types[nn.Linear].input_dim == 1 and nn.Embedding not in types


def test_subclasses_inherit_and_own_entries_win(registry):
    class MyLinear(nn.Linear):
        pass

    class Transposed(nn.Linear):  # stores its weight [in, out]
        pass

    assert input_dim_of(MyLinear) == 1
    assert input_dim_of(MyLinear(4, 4)) == 1
    register_layer_type(Transposed, 0)
    assert input_dim_of(Transposed) == 0
    assert input_dim_of(nn.Linear) == 1

    class Sub(Transposed):
        pass

    assert input_dim_of(Sub(2, 2)) == 0


def test_parametrized_module_is_looked_up_by_its_class(registry):
    from torch.nn.utils import parametrize

    class Ident(nn.Module):
        def forward(self, w):
            return w

    lin = nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", Ident())
    assert input_dim_of(lin) == 1


def test_user_registration(registry):
    class Bilinear2(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_a = nn.Parameter(torch.zeros(3, 8))
            self.w_b = nn.Parameter(torch.zeros(8, 3))

    register_layer_type(Bilinear2, 1, ("w_a",))
    assert registered_params(Bilinear2) == ("w_a",)
    assert input_dim_of(Bilinear2, "w_a") == 1 and input_dim_of(Bilinear2, "w_b") is None
    register_layer_type(Bilinear2, 1, ["w_a", "w_b"])  # same dim: replaces the params
    assert registered_params(Bilinear2) == ("w_a", "w_b")
    register_layer_type(Bilinear2, 1, "w_a")  # one name as a string
    assert registered_params(Bilinear2) == ("w_a",)
    assert known_types()[Bilinear2].params == ("w_a",)


def test_bad_registrations(registry):
    class L(nn.Module):
        pass

    with pytest.raises(TypeError, match="needs a class"):
        register_layer_type(nn.Linear(2, 2), 1)
    with pytest.raises(TypeError, match="input_dim must be an int"):
        register_layer_type(L, 1.0)
    with pytest.raises(TypeError, match="input_dim must be an int"):
        register_layer_type(L, True)
    with pytest.raises(ValueError, match="input_dim must be >= 0"):
        register_layer_type(L, -1)
    with pytest.raises(ValueError, match="at least one parameter"):
        register_layer_type(L, 1, ())
    with pytest.raises(TypeError, match="non-empty strings"):
        register_layer_type(L, 1, ("weight", ""))
    with pytest.raises(TypeError, match="non-empty strings"):
        register_layer_type(L, 1, ("weight", 3))
    with pytest.raises(ValueError, match="duplicates"):
        register_layer_type(L, 1, ("weight", "weight"))
    with pytest.raises(ValueError, match=r"nn\.modules\.linear\.Linear is already registered with input dim 1; .* 0"):
        register_layer_type(nn.Linear, 0)
    assert input_dim_of(nn.Linear) == 1  # a refused registration changes nothing
    with pytest.raises(TypeError, match="expected an nn.Module or a class"):
        input_dim_of("Linear")


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_importing_the_registry_does_not_import_transformers():
    # The module is loaded on its own: the package's __init__ imports Lightning, whose torchmetrics imports
    # transformers when it is installed; the registry itself must not.
    path = layers.__file__
    out = _run(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("nm_layers_alone", {path!r})
        L = sys.modules["nm_layers_alone"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(L)
        import torch.nn as nn
        print(L.input_dim_of(nn.Linear), len(L.known_types()))
        print(sorted(k for k in sys.modules if k.split(".")[0] in ("transformers", "nm_lightning", "lightning")))
        """
    )
    assert out == "1 5\n[]"


def test_hf_conv1d_registered_lazily_with_input_dim_0():
    pytest.importorskip("transformers")
    out = _run(
        """
        import nm_lightning.layers as L
        before = [c.__name__ for c in L.known_types()]
        from transformers.pytorch_utils import Conv1D
        conv = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs: weight [8, 12] = [in, out]
        print("Conv1D" in before, L.input_dim_of(conv), L.input_dim_of(Conv1D), L.registered_params(Conv1D))
        """
    )
    assert out == "False 0 0 ('weight',)"


def test_user_registration_of_hf_conv1d_wins_over_the_lazy_one():
    pytest.importorskip("transformers")
    out = _run(
        """
        import nm_lightning.layers as L
        from transformers.pytorch_utils import Conv1D
        L.register_layer_type(Conv1D, 0, ("weight", "bias"))
        print(L.registered_params(Conv1D))
        """
    )
    assert out == "('weight', 'bias')"


def test_input_major_view_groups_along_the_input():
    w = torch.randn(8, 12)  # a Conv1D weight [in=8, out=12]
    view = input_major(w, 0)
    assert view.shape == (12, 8) and view.data_ptr() == w.data_ptr()
    mask = nm_mask(view, 2, 4).movedim(1, 0)
    assert mask.shape == w.shape
    # groups of 4 consecutive inputs (dim 0) per output column hold exactly 2 kept entries
    assert (mask.reshape(2, 4, 12).sum(1) == 2).all()
    conv = torch.randn(4, 8, 3, 3)
    assert input_major(conv, 1) is conv
    with pytest.raises(ValueError, match="out of range"):
        input_major(w, 2)
    with pytest.raises(ValueError, match=">= 2 dims"):
        input_major(torch.randn(4), 0)
