"""The package's import rule (docs/ARCHITECTURE.md): each layer imports only its own and the layers below it, and
no modules import each other around a circle. scripts/import_graph.py checks it; the controls show it notices."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "import_graph.py"
PACKAGE = ROOT / "python" / "specdec"

sys.path.insert(0, str(SCRIPT.parent))
import_graph = importlib.import_module("import_graph")


def test_the_package_keeps_the_rule():
    graph = import_graph.imports(PACKAGE)
    assert "specdec.engine.core" in graph and "specdec.serving.server" in graph  # it read the real tree
    assert import_graph.violations(graph) == []


def test_nothing_below_serving_imports_the_wire_format():
    graph = import_graph.imports(PACKAGE)
    below = [m for m in graph if import_graph.layer(m) < import_graph.layer("specdec.serving") and not m.startswith("specdec.v1")]
    assert "specdec.engine.scheduler" in below
    assert [m for m in below if any(d.startswith("specdec.v1") for d in graph[m])] == []


@pytest.mark.parametrize(
    "module,added,expected",
    [
        ("types.py", "import specdec.cli\n", "specdec.types (layer specdec) imports specdec.cli"),
        ("engine/sequence.py", "from specdec.engine import core\n", "import cycle"),
        ("kernels/sampling.py", "if False:\n    from specdec import tt\n", "imports specdec.tt"),
    ],
    ids=["upward", "cycle", "deferred upward"],
)
def test_controls_an_upward_import_and_a_cycle_are_caught(tmp_path, module, added, expected):
    copy = tmp_path / "specdec"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    with open(copy / module, "a", encoding="utf-8") as f:
        f.write(added)
    bad = import_graph.violations(import_graph.imports(copy))
    assert any(expected in line for line in bad), bad
    proc = subprocess.run([sys.executable, str(SCRIPT), "--root", str(copy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "VIOLATION" in proc.stdout


def _importable() -> list[str]:
    # tt needs ttnn only when it runs; killed_client is a program. Both import alone too, but add nothing here.
    return sorted(m for m in import_graph.imports(PACKAGE) if m != "specdec.loadtest.killed_client")


def test_every_module_imports():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *_importable()], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]


@pytest.mark.slow
@pytest.mark.parametrize("module", _importable())
def test_each_module_imports_alone(module):
    """``python -c "import specdec.X"`` works for every module: a cycle can hide behind import order."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"import {module}: {proc.stderr[-1500:]}"
