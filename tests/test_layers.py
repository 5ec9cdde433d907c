"""The import-linter contracts of pyproject.toml: Qt only in ui/, layers that point one way.

`lint-imports` follows imports transitively (a core module importing a helper that imports Qt
breaks the contract too). The tree is checked as it is, and copies of it with one bad import
added show that each contract does break.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("workbench", "exporters", "ui")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
RUFF = Path(sys.executable).with_name("ruff")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_tree_keeps_its_contracts():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_ruff_finds_nothing():
    """ruff with the rules of pyproject.toml."""
    result = subprocess.run([str(RUFF), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def tree_copy(tmp_path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def add_import(root: Path, module: str, line: str) -> None:
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}\n", encoding="utf-8")


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("workbench.layout", "import PySide6.QtCore", "Qt only in ui"),
        # Transitive: the core reaches Qt through a GUI module.
        ("workbench.quantization.blockquant", "from ui import widgets", "Qt only in ui"),
        ("workbench.quantization.int4_graph", "from exporters.onnx_export import export_onnx", "Layers"),
        ("workbench.run.pipeline", "from workbench.cli import main", "Layers"),
    ],
)
def test_a_bad_import_breaks_a_contract(tree_copy, module, line, broken):
    add_import(tree_copy, module, line)
    result = lint_imports(tree_copy)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout
    assert module in result.stdout
