"""The import contracts of ``pyproject.toml`` (issue 15, item 9): stages never import each other,
the command line is on top, the NSD readers and the metrics below everything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is a test dependency (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Check the contracts of ``root/pyproject.toml`` on the ``havir`` package under ``root``, in a new process."""
    script = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports('pyproject.toml', no_cache=True, no_logo=True))"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    return subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, env=env, timeout=120)


def test_the_package_keeps_its_contracts():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 kept, 0 broken" in done.stdout


def lint_with_added_import(tmp_path, module: str, line: str) -> subprocess.CompletedProcess:
    """The contracts checked on a copy of the package where ``havir/<module>.py`` ends with ``line``."""
    shutil.copytree(ROOT / "havir", tmp_path / "havir", ignore=shutil.ignore_patterns("weights", "*.safetensors", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    source = tmp_path / "havir" / f"{module}.py"
    source.write_text(source.read_text() + f"\n{line}  # noqa: E402\n")
    return lint_imports(tmp_path)


def test_a_stage_importing_another_breaks_them(tmp_path):
    """The contracts have teeth: ``train`` reaching into ``features`` is reported."""
    done = lint_with_added_import(tmp_path, "train", "from havir.features import compute_features")
    assert done.returncode == 1
    assert "Stages are independent" in done.stdout and "BROKEN" in done.stdout
    assert "havir.train -> havir.features" in done.stdout


def test_a_stage_reaching_into_versatile_diffusion_breaks_them(tmp_path):
    """Swapping the backbone stays one new module: ``reconstruct`` calling Versatile Diffusion's
    sampler directly is reported."""
    done = lint_with_added_import(tmp_path, "reconstruct", "from havir.models.sampling import sample")
    assert done.returncode == 1
    assert "see the backbone through its interface" in done.stdout and "havir.reconstruct -> havir.models.sampling" in done.stdout
