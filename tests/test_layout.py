"""The package layout stays readable: imports point one way (no cycles among difflora's modules), and no
module reaches into another's private (`_name`) helpers. Read from the source with `ast`, lazy imports
inside functions included, so nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "difflora"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported difflora module, names taken from it) for every import statement in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name in known]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:  # `from difflora.formats import kohya`
                    found.append((submodule, []))
                elif base in known:
                    found.append((base, [alias.name]))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the difflora modules it imports. Importing a module also runs its ancestors' __init__,
    but that implicit edge is left out: a package's __init__ that imports none of its children cannot
    close a loop through them."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {target for target, _ in _imports(path, name, set(modules))}
        graph[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    modules = _modules()
    assert "difflora.training.trainer" in modules and "difflora.formats.read" in modules
    graph = import_graph()
    # formats.read dispatches to the readers (an arrow down the flow), the readers never import it back
    assert {"difflora.formats.kohya", "difflora.formats.native"} <= graph["difflora.formats.read"]
    assert "difflora.formats.read" not in graph["difflora.formats.kohya"]


def test_difflora_has_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (break each by moving the shared name down):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offenders = [
        f"{name} imports {target}.{item}"
        for name, path in modules.items()
        for target, items in _imports(path, name, set(modules))
        for item in items
        if item.startswith("_") and not item.startswith("__") and target != name
    ]
    assert not offenders, "promote these helpers or move them next to their user:\n" + "\n".join(offenders)


@pytest.mark.parametrize("stage", ["data", "training", "adapter", "composition", "generation", "formats"])
def test_each_stage_package_says_what_it_takes_in_and_hands_on(stage):
    init = PACKAGE / stage / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
    assert docstring and len(docstring.split()) >= 20, f"{init} needs a docstring describing the stage"


def test_config_is_at_the_bottom_of_the_import_graph():
    """Every package reads configs, so config/ reads nothing above it: only leaves (modules that import
    nothing of difflora, such as errors and the default LoRA target names)."""
    graph = import_graph()
    upward = [
        f"{name} imports {target}"
        for name, targets in graph.items()
        if name.startswith("difflora.config")
        for target in sorted(targets)
        if not target.startswith("difflora.config") and graph[target]
    ]
    assert not upward, "config/ must import nothing above it (move the shared name down):\n" + "\n".join(
        upward
    )
