"""The package's shape: its modules stand in layers, each importing only from its own layer or those below.

The layers, from the bottom: ``adaclip._validate`` (the argument checks) → ``adaclip.methods`` (the rules
and their registry) → ``adaclip.privacy`` (accounting) → ``adaclip.engine`` (``make_private``, the
optimizer) → ``adaclip.audit`` (runs the engine's optimizer) → ``adaclip`` (the package's own
``__init__``, which re-exports library names) → ``adaclip.research`` and ``python -m adaclip``.  A
module may import from its own layer or a layer below; an import upwards is a back-import.  Besides,
the import graph has no cycles at all (within a layer neither).

The graph is read statically from the source with :mod:`ast` (every ``import`` statement, at module
level, inside functions or under ``TYPE_CHECKING``), so a lazy import counts as much as one at the
top of a file.  The checks take the source folder as an argument, so the tests can show them failing
on a copy of the package with a back-import added.
"""

import ast
import shutil
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("adaclip._validate",),
    ("adaclip.methods",),
    ("adaclip.privacy",),
    ("adaclip.engine",),
    ("adaclip.audit",),
    ("adaclip",),  # the package's __init__ only: names re-exported from the layers below
    ("adaclip.research", "adaclip.__main__"),
)


def module_name(src: Path, path: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(src: Path) -> dict[str, Path]:
    return {module_name(src, path): path for path in src.rglob("*.py")}


def imported(name: str, found_modules: dict[str, Path]) -> set[str]:
    """The adaclip modules that ``name`` imports (``from package import module`` counts as the module)."""
    path = found_modules[name]
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
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in found_modules else base)
    return {m for m in found if m in found_modules and m != name}


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module -> the adaclip modules it imports, for every module under ``src``."""
    found_modules = modules(src)
    return {name: imported(name, found_modules) for name in found_modules}


def layer(module: str) -> int:
    """The index in :data:`LAYERS` of ``module``'s layer; ``adaclip`` itself matches only exactly."""
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "adaclip" and module.startswith(prefix + ".")):
                return index
    raise LookupError(f"module {module} is in no layer of {LAYERS}")


def back_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a module into a layer above its own, as ``"importer -> imported"``."""
    return sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if layer(target) > layer(source)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first search (an empty list: the graph is acyclic)."""
    state: dict[str, str] = {}
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


GRAPH = import_graph(SRC)


def test_every_module_is_in_a_layer():
    unplaced = []
    for name in GRAPH:
        try:
            layer(name)
        except LookupError:
            unplaced.append(name)
    assert not unplaced, f"modules in no layer: {unplaced}"


def test_no_module_imports_from_a_layer_above_its_own():
    assert not back_imports(GRAPH), f"back-imports: {back_imports(GRAPH)}"


def test_the_import_graph_has_no_cycles():
    assert not cycles(GRAPH), f"import cycles: {[' -> '.join(cycle) for cycle in cycles(GRAPH)]}"


def test_the_graph_is_read_at_all():
    # the checks above pass vacuously on an empty graph: make sure known edges are seen
    assert "adaclip.methods.base" in GRAPH["adaclip.methods.fixed"]
    assert "adaclip.research.sweeps" in GRAPH["adaclip.research.cli"]  # a function-level import
    assert "adaclip.engine" in GRAPH["adaclip.audit.optimizer"]
    assert "adaclip.privacy.accounting" in GRAPH["adaclip"]  # an import under TYPE_CHECKING


def test_the_checks_fail_on_an_added_back_import(tmp_path):
    shutil.copytree(SRC / "adaclip", tmp_path / "adaclip", ignore=shutil.ignore_patterns("__pycache__"))
    assert not back_imports(import_graph(tmp_path)) and not cycles(import_graph(tmp_path))

    accounting = tmp_path / "adaclip" / "privacy" / "accounting.py"  # accounting reaching up into the engine
    accounting.write_text(accounting.read_text() + "\n\ndef _late():\n    from adaclip.engine import make_private\n")
    graph = import_graph(tmp_path)
    assert back_imports(graph) == ["adaclip.privacy.accounting -> adaclip.engine"]
    assert any(cycle[0] == cycle[-1] and "adaclip.privacy.accounting" in cycle for cycle in cycles(graph))


def test_the_checks_fail_on_a_back_import_within_the_library_without_a_cycle(tmp_path):
    (tmp_path / "adaclip" / "methods").mkdir(parents=True)
    (tmp_path / "adaclip" / "audit").mkdir()
    (tmp_path / "adaclip" / "__init__.py").write_text("")
    (tmp_path / "adaclip" / "audit" / "__init__.py").write_text("")
    (tmp_path / "adaclip" / "methods" / "__init__.py").write_text("from ..audit import something\n")  # relative
    graph = import_graph(tmp_path)
    assert back_imports(graph) == ["adaclip.methods -> adaclip.audit"]
    assert not cycles(graph)


def test_the_library_never_imports_the_research_wing():
    # implied by the layers; kept as its own statement because it is the rule a newcomer most needs
    library = [name for name in GRAPH if layer(name) < layer("adaclip.research")]
    offenders = {name: sorted(t for t in GRAPH[name] if t.startswith("adaclip.research")) for name in library}
    assert not {name: targets for name, targets in offenders.items() if targets}
