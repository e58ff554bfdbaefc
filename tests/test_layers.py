"""The dependency arrow points one way (DESIGN section 2): jobs -> pipeline -> catkd,
and inside pipeline train -> cache -> data."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Package -> packages its modules must not import.
FORBIDDEN = {
    "catkd": ("pipeline", "jobs"),
    "pipeline/data": ("pipeline.cache", "pipeline.train", "jobs"),
    "pipeline/cache": ("pipeline.train", "jobs"),
    "pipeline/train": ("jobs",),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up_the_layers(package):
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _imports(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package])
    ]
    assert wrong == []
