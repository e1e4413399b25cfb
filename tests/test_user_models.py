"""Models users have: layers built in ``configure_model``, lazy layers, tied weights, grouped/depthwise convs,
stems narrower than M, bias=False, nn.MultiheadAttention and nn.TransformerEncoderLayer. Each is either made
N:M (and trained) or reported with its reason."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_data, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from nm_lightning import DominoSearchCallback, SparsityScheduler, SRSTECallback, check_nm, sparse_layers


class Base(pl.LightningModule):
    """Data of ``make_data`` ([B, 4, 16], 4 classes); subclasses define ``net``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(make_data(), batch_size=16)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


class BuiltInConfigureModel(Base):
    """The layers exist only after ``configure_model`` (Lightning calls it after the callbacks' ``setup``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = _mlp()


class Lazy(Base):
    def __init__(self, example: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 4))
        if example:
            self.example_input_array = torch.zeros(2, 4, 16)


def _fit(tmp_path, model, callbacks, **kw):
    pl.seed_everything(0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **{"max_epochs": 1, **kw}))
    trainer.fit(model)
    return trainer


def _assert_nm(model: nn.Module, names: set[str], n: int, m: int) -> None:
    layers = sparse_layers(model)
    assert set(layers) == names
    for name, layer in layers.items():
        w = layer.module.weight.detach()
        assert check_nm(w.shape, n, m) is None
        per_group = (w != 0).reshape(w.shape[0], w.shape[1] // m, m, -1).sum(2)  # groups along inputs, per tap
        assert int(per_group.max()) <= n and int(per_group.min()) >= 1, name


def test_layers_built_in_configure_model_are_sparsified(tmp_path):
    model = BuiltInConfigureModel()
    _fit(tmp_path, model, [SRSTECallback(2, 4, decay=0.01)])
    _assert_nm(model, {"net.1", "net.3"}, 2, 4)


def test_configure_model_resume_restores_the_exact_state(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = BuiltInConfigureModel()
    _fit(tmp_path, first, [SRSTECallback(2, 4, decay=0.01), ckpt], enable_checkpointing=True)
    resumed = BuiltInConfigureModel()
    pl.seed_everything(0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[SRSTECallback(2, 4, decay=0.01)], max_epochs=1))
    trainer.fit(resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")  # already at max_epochs: restores only
    for name, layer in sparse_layers(first).items():
        other = sparse_layers(resumed)[name]
        assert torch.equal(layer.original, other.original) and torch.equal(layer.sparsity.mask, other.sparsity.mask)


def test_configure_model_with_scheduler_and_domino(tmp_path):
    model = BuiltInConfigureModel()
    sched = SparsityScheduler(start=0, end=6, schedule="linear", plot=False)
    _fit(tmp_path / "a", model, [sched, SRSTECallback(1, 4, verbose=False)], max_epochs=2)  # scheduler listed first
    _assert_nm(model, {"net.1", "net.3"}, 1, 4)

    search = DominoSearchCallback(
        target_sparsity=0.5, m=4, check_every=1, penalty_every=1, penalty=5.0, output="s.json", plot=False,
        verbose=False,
    )  # fmt: skip
    _fit(tmp_path / "b", BuiltInConfigureModel(), [search], max_epochs=30)
    assert search.scheme_path is not None and search.scheme_path.exists()


def test_lazy_layers_are_initialized_from_example_input_array(tmp_path):
    model = Lazy(example=True)
    _fit(tmp_path, model, [SRSTECallback(2, 4)])
    _assert_nm(model, {"net.1", "net.3"}, 2, 4)


def test_lazy_layers_without_example_input_are_reported(tmp_path):
    model = Lazy(example=False)
    with pytest.warns(UserWarning, match=r"net\.1 \(LazyLinear .*stays dense: lazy parameter not initialized"):
        _fit(tmp_path, model, [SRSTECallback(2, 4)])
    assert set(sparse_layers(model)) == {"net.3"}
    with pytest.raises(MisconfigurationException, match="net.1: lazy parameter"):
        _fit(tmp_path / "strict", Lazy(example=False), [SRSTECallback(2, 4, strict=True)])


class Tied(Base):
    """An embedding-style tied pair: the head's weight is the first layer's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 32, bias=False)
        self.hidden = nn.Linear(32, 64, bias=False)
        self.hidden.weight = nn.Parameter(self.inp.weight.t().contiguous())
        self.out = nn.Linear(64, 32, bias=False)
        self.out.weight = self.inp.weight  # tied
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        return self.head(torch.relu(self.out(torch.relu(self.hidden(h)))))


def test_tied_weights_are_reported_not_sparsified(tmp_path):
    model = Tied()
    with pytest.warns(UserWarning, match=r"inp .*stays dense: weight is shared with out\.weight"):
        _fit(tmp_path, model, [SRSTECallback(2, 4)])
    assert set(sparse_layers(model)) == {"hidden", "head"}
    assert model.out.weight is model.inp.weight  # the tie survives


class Convs(Base):
    """Stem with in_channels < M, grouped and depthwise convs, bias=False."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(4, 16, 3, padding=1, bias=False),  # stem: 4 inputs x 3 taps
            nn.Conv1d(16, 16, 3, padding=1, groups=2, bias=False),  # grouped: 8 inputs per group
            nn.Conv1d(16, 16, 3, padding=1, groups=16, bias=False),  # depthwise: 1 input x 3 taps
            nn.Flatten(),
            nn.Linear(256, 4, bias=False),
        )


def test_grouped_depthwise_and_narrow_stem(tmp_path):
    model = Convs()
    with pytest.warns(UserWarning) as record:
        _fit(tmp_path, model, [SRSTECallback(2, 8)])
    text = "\n".join(str(w.message) for w in record)
    assert "net.0 (Conv1d" in text and "= 4 is not divisible by m=8" in text  # stem: in_channels < M
    assert "net.2 (Conv1d" in text and "depthwise" in text
    _assert_nm(model, {"net.1", "net.4"}, 2, 8)  # grouped conv: N:M along each group's input channels


class Attention(Base):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = x.transpose(1, 2)  # [B, 16 tokens, 4] -> project to width 16 by repetition
        x = x.repeat(1, 1, 4)
        x = self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.block(x).mean(1))


def test_multihead_attention_and_transformer_layer_are_trained_sparse(tmp_path):
    model = Attention()
    _fit(tmp_path, model, [SRSTECallback(2, 4, decay=0.01)], max_epochs=2)
    expected = {"attn.in_proj_weight", "attn.out_proj", "block.self_attn.in_proj_weight", "block.self_attn.out_proj",
                "block.linear1", "block.linear2", "head"}  # fmt: skip
    layers = sparse_layers(model)
    assert set(layers) == expected
    for name, layer in layers.items():
        w = getattr(layer.module, layer.param_name).detach()
        assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2, name


def test_strict_reports_tied_and_depthwise(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"inp: weight is shared with out\.weight \(tied weights\)"):
        _fit(tmp_path / "a", Tied(), [SRSTECallback(2, 4, strict=True)])
    with pytest.raises(MisconfigurationException, match=r"net\.2: .*depthwise conv"):
        _fit(tmp_path / "b", Convs(), [SRSTECallback(2, 8, strict=True)])
