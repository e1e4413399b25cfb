"""The README's commands: set-up installs what its test command needs, and CI runs that command verbatim."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from nm_lightning.export.artifacts import FILE_NAMES

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _bash_blocks() -> list[list[str]]:
    return [block.strip().splitlines() for block in re.findall(r"^```bash\n(.*?)^```$", README, re.M | re.S)]


def test_setup_and_test_commands():
    (setup,), (test,) = _bash_blocks()[0], _bash_blocks()[1]
    # the main job: the CPU torch build first, then the package with the apps' data stack
    assert setup == 'pip install torch==2.13.0 && pip install -e ".[apps]" && nm-train'
    # the test command installs its own needs (pytest came only with the test extra: "No module named pytest")
    assert test == 'pip install -e ".[test]" && python -m pytest -q'
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert any(r.startswith("pytest") for r in extras["test"])


def test_ci_runs_the_readme_test_command_verbatim():
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-test-command"], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.strip() == _bash_blocks()[1][0]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'bash -c "$test_cmd"' in ci
    assert ci.index("pip install -q torch==2.13.0") < ci.index('bash -c "$test_cmd"')


def test_readme_names_the_files_nm_train_writes():
    assert "model_dense_with_zeros" not in README
    for name in (*FILE_NAMES.values(), "scheme.json", "checkpoints/last.ckpt"):
        assert name in README, name
    row = next(line for line in README.splitlines() if line.startswith("| `torch.compile`"))
    assert "self.log" in row and "model.net.compile()" in row
