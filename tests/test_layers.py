"""The package's layers import only downward, so that it reads as its pipeline (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lancet

ROOT = Path(lancet.__file__).resolve().parent
# lower first; a module may import its own layer and any lower one. evaluate (judges, metrics) sits below influence
# and correct: the IQs are the answers a judge flags, and the correction's checkpoint choice is judged the same way
LAYERS = [
    {"errors", "constants", "options", "artifacts", "hardware", "distributed"},
    {"data"},
    {"models"},
    {"curvature", "train", "finetune"},
    {"evaluate"},
    {"influence"},
    {"correct"},
    {"report"},
    {"pipeline", "demo"},
    {"cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _room(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0] if len(rel) > 1 else path.stem


def _imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lancet."):
            rooms.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "lancet":
            rooms.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            rooms.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lancet."))
    return rooms


def test_every_room_has_a_layer():
    rooms = {_room(p) for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT}
    assert rooms <= set(RANK), f"no layer for {sorted(rooms - set(RANK))}: add it to LAYERS"


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path: Path):
    if path.parent == ROOT and path.name == "__init__.py":
        return
    own = _room(path)
    upward = {r for r in _imported_rooms(path) if RANK.get(r, -1) > RANK[own]}
    assert not upward, f"{path.relative_to(ROOT)} ({own}) imports the later stage(s) {sorted(upward)}"


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from lancet.evaluate.judges import RuleJudge\n")
    assert "evaluate" in _imported_rooms(bad) and RANK["evaluate"] > RANK["data"]
