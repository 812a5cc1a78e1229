"""The package's import structure: no cycles, and the layers of DESIGN.md import one way.

Imports are read from the source (every `import` statement, at module level
or inside a function: a function-level import that closes a loop is still a
loop between two modules' responsibilities).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffusers_unified"
NAME = "diffusers_unified"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """The package modules that module `name` imports (explicitly)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # `from pkg import sub` imports the submodule when there is one, else pkg itself.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A loop of the directed graph (its nodes in order, first repeated at the end), or None."""
    state: dict[str, str] = {}  # "active" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "active"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "active":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_the_cycle_this_package_once_had():
    """train imported sample, and sample imported train: the loop the check must catch."""
    graph = {k: set(v) for k, v in GRAPH.items()}
    train, sample = (f"{NAME}.experiment.{m}" for m in ("train", "sample"))
    assert sample in graph[train]
    graph[sample].add(train)
    assert find_cycle(graph) == [sample, train, sample]


def _importers(prefix: str, where) -> list[str]:
    return sorted(
        f"{name} imports {target}"
        for name in GRAPH
        if where(name)
        for target in GRAPH[name]
        if target == prefix or target.startswith(prefix + ".")
    )


def test_library_layers_import_nothing_from_the_experiment_layer():
    # `python -m diffusers_unified` is the launcher's other entry point.
    entry_points = (f"{NAME}.__main__",)
    outside = lambda name: not name.startswith(f"{NAME}.experiment") and name not in entry_points
    assert _importers(f"{NAME}.experiment", outside) == []


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("nets", "processes"),
        ("samplers", "training"),
        ("samplers", "losses"),
        ("nets", "experiment"),
        ("data", "training"),
    ],
)
def test_layers_import_one_way(layer, forbidden):
    inside = lambda name: name == f"{NAME}.{layer}" or name.startswith(f"{NAME}.{layer}.")
    assert _importers(f"{NAME}.{forbidden}", inside) == []


def test_only_the_experiment_layer_reads_configs():
    readers = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] == "ml_collections" for n in names):
                readers.append(name)
    assert readers and all(r.startswith(f"{NAME}.experiment") for r in readers), readers


def test_fault_injection_reads_the_environment_in_one_module():
    readers = sorted(
        name
        for name, path in MODULES.items()
        if "DU_FAULT_" in path.read_text() or "DU_DUMP_" in path.read_text()
    )
    assert readers == [f"{NAME}.faults"]
