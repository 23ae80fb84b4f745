"""Imports point down: core (facelake/) < facelake.index < facelake.review < facelake.cluster <
facelake.jobs.work < the commands in facelake.jobs. Every import in every module counts, those
inside functions too, so a new upward arrow or an import cycle fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder on disk -> package name it installs as
FOLDERS = {"facelake": "facelake", "index": "facelake.index", "cluster": "facelake.cluster",
           "jobs": "facelake.jobs"}
# layers from the bottom up; a module may import its own layer and those below it
LAYERS = ["facelake", "facelake.index", "facelake.review", "facelake.cluster", "facelake.jobs.work",
          "facelake.jobs"]


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO)
    parts = [FOLDERS[relative.parts[0]], *relative.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The rank of the most specific layer holding ``module``."""
    matches = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    return LAYERS.index(max(matches, key=len)) if matches else 0


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name == "facelake" or name.startswith("facelake.")]


def all_modules() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            found[module_name(path)] = path
    return found


MODULES = all_modules()


def resolve(name: str) -> str | None:
    """The module an imported name lives in (``facelake.faces.reader.resolve`` -> its module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_imports_point_down(module: str):
    own = layer_of(module)
    wrong = [f"{module}:{line} imports {name}" for line, name in imports(MODULES[module])
             if layer_of(name) > own]
    assert not wrong, "imports that point up:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {module: {target for _, name in imports(path)
                      if (target := resolve(name)) and target != module and MODULES[target].name != "__init__.py"}
             for module, path in MODULES.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_function_local_imports_and_cycles(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from facelake.jobs.search import run_search\n")
    assert (2, "facelake.jobs.search") in imports(module)
    assert layer_of("facelake.jobs.search") > layer_of("facelake.jobs.work.counts") > layer_of("facelake.index.load")
    assert layer_of("facelake.index.load") > layer_of("facelake.storage")
    assert resolve("facelake.faces.reader.resolve") == "facelake.faces.reader"
