"""Imports point down (issue 18): core imports nothing above it; index/ and cluster/ use only the
core; jobs/ may use everything. Every import in every module counts, also those inside
functions, so a new upward arrow fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package folder -> (its package name, the packages it may import)
LAYERS = {
    "facelake": ("facelake", {"facelake"}),
    "index": ("facelake.index", {"facelake", "facelake.index"}),
    "cluster": ("facelake.cluster", {"facelake", "facelake.cluster"}),
}
UPPER = ("facelake.jobs", "facelake.index", "facelake.cluster")
# the notebook reading layer sits above the index (it opens versions for review), below jobs/
READING_LAYER = {"facelake/review.py": {"facelake", "facelake.index"}}


def _layer_of(module: str) -> str:
    for upper in UPPER:
        if module == upper or module.startswith(upper + "."):
            return upper
    return "facelake" if module == "facelake" or module.startswith("facelake.") else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name.startswith("facelake")]


def _modules():
    for folder in LAYERS:
        for path in sorted((REPO / folder).glob("*.py")):
            yield path


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path: Path):
    relative = str(path.relative_to(REPO))
    allowed = READING_LAYER.get(relative) or LAYERS[path.parent.name][1]
    wrong = [f"{relative}:{line} imports {name}" for line, name in _imports(path)
             if _layer_of(name) and _layer_of(name) not in allowed]
    assert not wrong, "imports that point up:\n" + "\n".join(wrong)


def test_the_check_sees_function_local_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from facelake.jobs.search import run_search\n")
    assert (2, "facelake.jobs.search") in _imports(module)
