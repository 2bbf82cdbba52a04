"""The house keeps its layers (issue 26): the import graph has no circle, no import from a lower layer to a higher
one, and no module takes another's private names (tools/import_graph.py)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402


def test_the_package_keeps_its_layers():
    g = import_graph.graph()
    assert "sd_dmd.training.loop" in g and "sd_dmd.core.losses" in g
    assert import_graph.problems(g) == []


def test_the_checker_sees_a_circle_an_upward_import_and_a_private_name(tmp_path):
    """Planted in a copy of the layout: each kind of fault is reported, so the test above can fail."""
    files = {
        "sd_dmd/__init__.py": "",
        "sd_dmd/core/__init__.py": "",
        "sd_dmd/core/losses.py": "def f():\n    from sd_dmd.training.loop import Trainer\n",  # upward, in a function
        "sd_dmd/training/__init__.py": "",
        "sd_dmd/training/loop.py": "from sd_dmd.training.state import _save\n",
        "sd_dmd/training/state.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sd_dmd.evaluation import x\n"
                                    "def _save():\n    from sd_dmd.training import loop\n",  # a circle with loop.py
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = import_graph.problems(import_graph.graph(tmp_path))
    assert "circle: sd_dmd.training.loop <-> sd_dmd.training.state" in found
    assert ("upward: sd_dmd.core.losses (core) imports sd_dmd.training.loop (training) in a function") in found
    assert "private: sd_dmd.training.loop imports _save from sd_dmd.training.state" in found
    assert not any("evaluation" in f for f in found)  # TYPE_CHECKING imports are annotations only
    assert len(found) == 3, found


def test_no_class_over_200_lines_and_no_function_over_about_60():
    import ast

    long = []
    for path in sorted((ROOT / "sd_dmd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > (200 if isinstance(node, ast.ClassDef) else 65):
                    long.append(f"{path.relative_to(ROOT)}: {node.name} ({lines} lines)")
    assert long == []
