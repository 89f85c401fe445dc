"""The package's shape: the import graph has no cycles, and the library never imports the research wing.

The graph is read statically (every ``import`` statement, at module level or inside functions), so a
lazy import inside a function counts as much as one at the top of a file.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LIBRARY = ("adaclip.methods", "adaclip.engine", "adaclip.privacy", "adaclip._validate")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in SRC.rglob("*.py")}


def imported(name: str) -> set[str]:
    """The adaclip modules that ``name`` imports (``from package import module`` counts as the module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                )
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imported(name) for name in MODULES}


def test_the_import_graph_has_no_cycles():
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(GRAPH[node]):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target] if target in path else [node, target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_library_never_imports_the_research_wing():
    offenders = {
        name: sorted(t for t in targets if t.startswith("adaclip.research"))
        for name, targets in GRAPH.items()
        if name.startswith(LIBRARY) or name == "adaclip"
    }
    offenders = {name: targets for name, targets in offenders.items() if targets}
    assert not offenders, f"library modules importing adaclip.research: {offenders}"


def test_the_graph_is_read_at_all():
    # the checks above pass vacuously on an empty graph: make sure known edges are seen
    assert "adaclip.methods.base" in GRAPH["adaclip.methods.fixed"]
    assert "adaclip.research.sweeps" in GRAPH["adaclip.research.cli"]  # a function-level import
