"""Field hardening of the callbacks (issue 13) and the consolidated N:M state (issue 14): arguments checked at
construction, checkpoints validated on resume, honest fit-start titles, a budget warning for DominoSearch, one-way
scheduler wiring, and the package's import graph."""

from __future__ import annotations

import ast
import pathlib

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nm_lightning import DominoSearchCallback, SparsityScheduler, SRSTECallback, attach, plan_layers, sparse_layers
from nm_lightning.sparsify import nm_state
from nm_lightning.state import NMLayerState


def _fit(tmp_path, callbacks, max_epochs=1, model=None, ckpt_path=None, **kw):
    pl.seed_everything(0, workers=True)
    model = model or TinyNet()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=max_epochs, callbacks=callbacks, **kw))
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


# ---------------------------------------------------------------------------------------------- arguments (item 9)
@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: SRSTECallback(decay=float("inf")), ValueError, r"decay must be a finite float >= 0, got inf"),
        (lambda: SRSTECallback(decay=float("nan")), ValueError, r"decay must be a finite float >= 0, got nan"),
        (lambda: SRSTECallback(strict="no"), TypeError, r"strict must be True or False, got 'no'"),
        (lambda: SRSTECallback(scheme=123), TypeError, r"scheme must be a mapping .* or a scheme file path.*got 123"),
        (lambda: SRSTECallback(export_dir=123), TypeError, r"export_dir must be a path .* got 123"),
        (lambda: SRSTECallback(include=[1]), TypeError, r"include must be a string or a list of strings"),
        (lambda: SRSTECallback(freeze_at_step=2.0), TypeError, r"freeze_at_step must be an int >= 0 or None"),
        (lambda: SRSTECallback(init_weights="nope.pt"), FileNotFoundError, r"init_weights file not found: nope.pt"),
        (lambda: SparsityScheduler(end=4, decay_initial=-0.1), ValueError, r"decay_initial must be a float >= 0"),
        (lambda: SparsityScheduler(end=4, decay_factor=float("inf")), ValueError, r"decay_factor must be a finite"),
        (lambda: SparsityScheduler(end=4, plot="yes"), TypeError, r"plot must be True or False"),
        (lambda: SparsityScheduler(end=4, levels=[2.0]), TypeError, r"levels entry must be an int >= 1"),
        (lambda: DominoSearchCallback(target_sparsity=0.5, m=16.0), TypeError, r"\bm must be an int >= 1, got 16.0"),
        (lambda: DominoSearchCallback(target_sparsity="0.8"), TypeError, r"target_sparsity must be a float.*'0.8'"),
        (lambda: DominoSearchCallback(target_sparsity=0.5, output=123), TypeError, r"output must be a path"),
        (lambda: DominoSearchCallback(target_sparsity=0.5, strict="no"), TypeError, r"strict must be True or False"),
        (lambda: DominoSearchCallback(target_sparsity=0.5, check_every=0), ValueError, r"check_every must be an int"),
    ],
)
def test_arguments_are_checked_at_construction(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


def test_one_string_is_one_pattern(tmp_path):
    """Hydra passes `sparsity.exclude=fc2` as a string: it is one pattern, not the characters 'f', 'c', '2'."""
    cb = SRSTECallback(2, 4, exclude="fc2", include_types="Linear")
    _, model = _fit(tmp_path, [cb], max_steps=1)
    assert set(sparse_layers(model)) == {"fc1"}
    cb = SRSTECallback(2, 4, include="conv*")  # a glob string selects the convs only, not every layer
    _, model = _fit(tmp_path / "b", [cb], max_steps=1)
    assert set(sparse_layers(model)) == {"conv1", "conv2"}  # not fc1/fc2, as with the old per-character globs
    reasons = {p.name: p.reason for p in cb.plans}
    assert reasons["fc1"] == "not matched by include" and reasons["conv2"] == ""


def test_unwritable_outputs_fail_at_setup_not_after_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for cb in (
        SRSTECallback(export_dir=str(blocker / "export")),
        DominoSearchCallback(target_sparsity=0.5, m=4, output=str(blocker / "scheme.json")),
    ):
        model = TinyNet()
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1))
        with pytest.raises(NotADirectoryError, match="a_file is a file"):
            trainer.fit(model)
        assert trainer.global_step == 0  # nothing was trained before the error


# ---------------------------------------------------------------------------------------------- resume (item 8)
def _checkpoint(tmp_path, cb):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit(tmp_path, [cb, ckpt], max_epochs=1, enable_checkpointing=True)
    return tmp_path / "last.ckpt"


def _tamper(path, edit):
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt["nm_lightning"]["state"])
    torch.save(ckpt, path)


def test_resume_refuses_an_altered_fixed_mask(tmp_path):
    """A fixed-mode checkpoint whose mask was set to all-True would train the layer dense while reporting 2:4."""
    path = _checkpoint(tmp_path / "a", SRSTECallback(2, 4, mode="fixed"))
    _tamper(path, lambda s: s["fc1.parametrizations.weight.0.mask"].fill_(True))
    with pytest.raises(ValueError, match=r"layer 'fc1': the fixed mask is not 2:4: \d+ of \d+ groups keep 4 weights"):
        _fit(tmp_path / "b", [SRSTECallback(2, 4, mode="fixed")], max_epochs=2, ckpt_path=path)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("frozen", "no", r"field 'frozen' must be bool, got 'no'"),
        ("n", 2.0, r"field 'n' must be int, got 2.0"),
        ("layout", 7, r"field 'layout' must be str, got 7"),
        ("shape", [1, 2], r"N:M state is for shape \[1, 2\]"),
    ],
)
def test_resume_refuses_malformed_state(tmp_path, field, value, match):
    path = _checkpoint(tmp_path / "a", SRSTECallback(2, 4))
    _tamper(path, lambda s: s["fc1.parametrizations.weight.0._extra_state"].__setitem__(field, value))
    with pytest.raises(ValueError, match=match):
        _fit(tmp_path / "b", [SRSTECallback(2, 4)], max_epochs=2, ckpt_path=path)


def test_state_round_trip_and_types():
    state = NMLayerState("block.0.conv.weight", (8, 16, 3), m=4, target_n=2, n=4)
    again = NMLayerState.from_dict(state.fqn, state.to_dict(), shape=(8, 16, 3))
    assert again == state and again.name == "block.0.conv"
    with pytest.raises(ValueError, match=r"layer 'block.0.conv': cannot be 2:4: .* = 6 is not divisible by m=4"):
        NMLayerState("block.0.conv.weight", (8, 6, 3), m=4, target_n=2, n=2)
    with pytest.raises(TypeError, match="frozen must be a bool"):
        NMLayerState("w", (4, 4), m=4, target_n=2, n=2, frozen="no")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- one owner of n (14)
def test_n_has_one_owner(tmp_path):
    """The callback, the plans, the parametrization and the model-wide view all read the same state object."""
    cb = SRSTECallback(2, 4, scheme={"conv2": (1, 8), "fc1": (2, 16)})
    _, model = _fit(tmp_path, [cb], max_steps=1)
    states = nm_state(model)
    assert set(states) == {"conv2.weight", "fc1.weight"}
    for plan in cb.plans:
        if plan.status == "covered":
            assert plan.state is states[plan.fqn] is cb.layers[plan.name].sparsity.state
    states["fc1.weight"].set_n(4)
    assert model.fc1.parametrizations.weight[0].n == 4 and cb.layer_nm()["fc1"] == (4, 16)


def test_second_fit_with_the_same_callbacks_gives_the_same_lambda(tmp_path):
    """The scheduler supplies a factor; it never overwrites the SR-STE decay, so λ does not compound (0.01 ->
    0.02 -> 0.04 before) when the same callback objects fit twice."""
    srste = SRSTECallback(2, 4, decay=0.01, verbose=False)
    sched = SparsityScheduler("linear", start=0, end=4, decay_schedule="step", decay_milestones=[2], plot=False)
    seen: list[list[float]] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen[-1].append(srste.current_decay())

    for run in range(2):
        seen.append([])
        _fit(tmp_path / str(run), [srste, sched, Spy()], max_steps=6, model=TinyNet())
    assert seen[0] == seen[1] and max(seen[0]) == pytest.approx(0.02) and srste.decay == 0.01


def test_scheduler_and_srste_never_import_each_other():
    root = pathlib.Path(__file__).resolve().parent.parent / "nm_lightning" / "callbacks"
    for name, other in (("scheduler.py", "srste"), ("srste.py", "scheduler")):
        text = (root / name).read_text()
        assert f"callbacks.{other}" not in text and f"from .{other}" not in text, name


def test_no_import_cycle_and_no_upward_import():
    """Lower layers never import higher ones; the package has no import cycle."""
    root = pathlib.Path(__file__).resolve().parent.parent / "nm_lightning"
    graph: dict[str, set[str]] = {}
    for f in root.rglob("*.py"):
        mod = ".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nm_lightning"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("nm_lightning"))
        graph[mod] = {d for d in deps if d != mod and not mod.startswith(d + ".") and d != "nm_lightning"}
    rank = {"masks": 0, "_native": 0, "validation": 0, "layers": 0, "state": 1, "srste": 1, "optim": 1,
            "sparsify": 2, "distributed": 2, "scheme": 3, "accounting": 3, "schedules": 3, "search": 3, "metrics": 3,
            "oneshot": 3, "report": 4, "export": 5, "callbacks": 6, "models": 7, "data": 7, "conf": 7, "cli": 8,
            "train": 8}  # fmt: skip
    for mod, deps in graph.items():
        if mod == "nm_lightning":
            continue  # the package root re-exports the public API
        top = mod.split(".")[1]
        for dep in deps:
            dep_top = dep.split(".")[1]
            assert rank[dep_top] <= rank[top], f"{mod} imports the higher layer {dep}"

    def reach(start: str, node: str, seen: set[str]) -> bool:
        for dep in graph.get(node, ()):
            if dep == start or (dep not in seen and (seen.add(dep) or reach(start, dep, seen))):
                return True
        return False

    cycles = [m for m in graph if reach(m, m, set())]
    assert not cycles, f"import cycles through {cycles}"


# ---------------------------------------------------------------------------------------------- titles (item 14)
def test_table_title_says_what_the_run_starts_with(tmp_path, capsys):
    _fit(tmp_path / "a", [SRSTECallback(2, 4), SparsityScheduler(start=2, end=4, plot=False)], max_steps=1)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the title to the table's width
    assert "target 2:4, starts dense (n = m)" in out and "target sparsity of covered weights 50.0%" in out
    _fit(tmp_path / "b", [SRSTECallback(scheme={"conv2": (1, 8), "fc1": (2, 16)})], max_steps=1)
    out = " ".join(capsys.readouterr().out.split())
    assert "mixed N:M target (2 patterns: 1:8, 2:16), from the first step" in out and "2:4" not in out


# ---------------------------------------------------------------------------------------------- search budget (item 12)
def test_domino_warns_at_fit_start_when_the_budget_cannot_reach_the_target(tmp_path):
    cb = DominoSearchCallback(target_sparsity=0.8, m=16, check_every=2, plot=False, verbose=False)
    model = TinyNet()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_steps=4))
    match = r"cannot reach the target: sparsity 0.8 at m=16 needs at least 14 vote rounds"
    with pytest.warns(UserWarning, match=match):
        trainer.fit(model)


def test_attach_then_plan_again_keeps_the_live_state():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    first = attach(model, plan_layers(model, 2, 4))
    first["0"].state.set_n(3)
    plans = plan_layers(model, 2, 4)
    again = attach(model, plans)
    assert again["0"].state is first["0"].state and plans[0].state.n == 3


def test_scheduler_refuses_fixed_layers(tmp_path):
    with pytest.raises(MisconfigurationException, match="decides when masks become fixed"):
        _fit(tmp_path, [SRSTECallback(2, 4, mode="fixed"), SparsityScheduler(end=4, plot=False)], max_steps=2)
