"""Hugging Face transformers built from their configs (no downloads): SR-STE through the whole stack.

GPT-2's projections are ``transformers.pytorch_utils.Conv1D`` with weight ``[in, out]``: the N:M groups must run
along dim 0 there (the input), along dim 1 for Llama's ``nn.Linear``. The masks are checked here by hand, along
the input dimension, on the plain model loaded strictly from the Lightning checkpoint.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from nm_lightning import SRSTECallback, load_packed, nm_state, save_packed

transformers = pytest.importorskip("transformers")


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


class CausalLM(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(torch.randint(0, 96, (32, 16), generator=g), batch_size=8)


def _input_groups(weight: torch.Tensor, is_conv1d: bool, m: int) -> torch.Tensor:
    """Non-zeros per group of m consecutive INPUT features: [in, out] for Conv1D, [out, in] for Linear."""
    w = weight.t() if is_conv1d else weight
    return (w.reshape(w.shape[0], -1, m) != 0).sum(-1)


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_hf_model_trains_nm_along_the_input_and_loads_into_the_plain_class(tmp_path, build):
    from transformers.pytorch_utils import Conv1D

    pl.seed_everything(0)
    model = CausalLM(build())
    cb = SRSTECallback(2, 4, decay=0.0, strict=True, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, ckpt], max_steps=4, enable_checkpointing=True))
    trainer.fit(model)
    states = nm_state(model)
    projections = [n for n, mod in model.named_modules() if isinstance(mod, (Conv1D, torch.nn.Linear))]
    assert {f"{n}.weight" for n in projections if "lm_head" not in n} <= set(states)
    if build is gpt2:
        assert states["model.transformer.h.0.attn.c_attn.weight"].input_dim == 0
        assert "model.lm_head.weight" not in states  # tied to the embedding: a default exclusion
        plan = next(p for p in cb.plans if p.name == "model.lm_head")
        assert plan.status == "excluded" and "tied to an embedding" in plan.reason

    # the Lightning checkpoint loads strictly into the never-sparsified HF class
    sd = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    plain = build()
    plain.load_state_dict({k.removeprefix("model."): v for k, v in sd.items()}, strict=True)
    checked = 0
    for name, mod in plain.named_modules():
        if f"model.{name}.weight" in states:
            counts = _input_groups(mod.weight, isinstance(mod, Conv1D), 4)
            assert int(counts.max()) <= 2, name
            checked += 1
    assert checked == len(states)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(ids), rtol=0, atol=0)

    # the packed export honours the input dim too, and restores the weights bit for bit
    save_packed(model.model, tmp_path / "packed.pt")
    restored = load_packed(tmp_path / "packed.pt")
    for key, value in plain.state_dict().items():
        assert torch.equal(restored[key], value), key


def test_one_shot_sparsegpt_at_fit_start_then_fixed_mask_fine_tuning(tmp_path):
    """`SRSTECallback(one_shot="sparsegpt")` prunes exactly the covered layers on the first K training batches
    (dict-free batches: a tensor batch is the input), then trains with the mask it found held fixed."""
    pl.seed_everything(0)
    model = CausalLM(gpt2())
    cb = SRSTECallback(2, 4, mode="fixed", one_shot="sparsegpt", calibration_batches=2, verbose=False)
    masks_at_start = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            masks_at_start.update({k: v.sparsity.mask.clone() for k, v in cb.layers.items()})

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, Spy()], max_steps=3))
    trainer.fit(model)
    report = cb.one_shot_report
    assert report is not None and report.method == "sparsegpt" and report.calibration_batches == 2
    assert {r.name for r in report.layers} == set(cb.layers)
    assert all(0 <= r.rel_error < 1 for r in report.layers)
    for name, layer in cb.layers.items():
        assert torch.equal(layer.sparsity.mask, masks_at_start[name]), name  # fixed: the one-shot mask stays


def test_one_shot_arguments_are_checked():
    with pytest.raises(ValueError, match=r"one_shot must be 'sparsegpt', 'wanda' or 'magnitude', got 'obs'"):
        SRSTECallback(one_shot="obs")
    with pytest.raises(TypeError, match="calibration_input must be a function"):
        SRSTECallback(one_shot="wanda", calibration_input="x")
    with pytest.raises(ValueError, match="calibration_batches must be an int >= 1"):
        SRSTECallback(one_shot="wanda", calibration_batches=0)
