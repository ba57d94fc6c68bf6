"""The layers of setup.cfg hold (import-linter), and an import against them fails CI naming the
contract it breaks: tried on a copy of the packages with two wrong imports planted."""

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the packages under `root` (found there first), with the project's contracts."""
    env = {"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(REPO / "setup.cfg")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_layers_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_and_deepspeed_in_the_model_fail_by_contract_name(tmp_path):
    for package in ("fusion_train", "data_pipelines"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "fusion_train" / "data" / "packing.py", "a") as f:
        f.write("\nfrom fusion_train.monitor.observer import Observer  # upwards: data below monitor\n")
    with open(tmp_path / "fusion_train" / "model" / "size.py", "a") as f:
        f.write("\nimport deepspeed  # the model must stay plain PyTorch\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    output = result.stdout
    assert "0 kept, 2 broken" in output, output
    assert "layers: commands > train | lab > monitor" in output.split("Broken contracts")[1]
    assert "fusion_train.data is not allowed to import fusion_train.monitor" in output
    assert "fusion_train.data.packing -> fusion_train.monitor.observer" in output
    assert (
        "the model is plain PyTorch: fusion_train.model never imports DeepSpeed" in output.split("Broken contracts")[1]
    )
    assert "fusion_train.model.size -> deepspeed" in output
