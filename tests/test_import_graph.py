"""The import graph of orchestrator/ and model/ has no cycle.

Imports at any depth count (a function-local import is as much a dependency as a module-top one),
so a cycle cannot be hidden by moving one side of it into a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "model")

# Cycles allowed for now, each named, so that any other cycle fails the test (none today).
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``name`` imports, at any depth of its source."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    # A module's own packages are initialised before it and import it in turn (a package's
    # __init__ re-exporting its submodules): those edges are not cycles.
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}

    def add(target: str) -> None:
        # "from a.b.c import x" runs a/__init__.py and a/b/__init__.py first: importing from
        # another package depends on that package's __init__ too.
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix != name and prefix not in own_packages:
                out.add(prefix)

    tree = ast.parse(path.read_text(), str(path))
    # Imports only for type checkers never run, so they cannot form a cycle.
    typing_only = {id(n) for guard in ast.walk(tree) if isinstance(guard, ast.If) and _is_type_checking(guard.test)
                   for stmt in guard.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # "from package import name": the submodule when name is one, else the package's
                # __init__ that defines name.
                sub = f"{target}.{alias.name}"
                add(sub if sub in known else target)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), each printed
    as a path that returns to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def test_graph_sees_function_local_and_submodule_imports():
    # The parser must follow what the test relies on, or an empty graph would pass.
    g = import_graph()
    assert "orchestrator.config" in g["orchestrator.plan"]  # module top, "from package import name"
    assert "orchestrator.train.launch" in g["orchestrator.train.driver"]  # function-local
    assert "orchestrator.train.checkpoint.elastic" in g["orchestrator.train.checkpoint.files"]  # "from package.module import"
    assert "model._random" in g["model.objectives"]  # "from . import _random"
    assert "orchestrator.train" in g["orchestrator.bench.step"]  # another package's __init__ runs first
    assert "orchestrator.data" not in g["orchestrator.data.formats.base"]  # its own package
    assert "orchestrator.config" not in g["orchestrator.data.formats.base"]  # under TYPE_CHECKING only
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    cycles = [c for c in find_cycles(import_graph()) if frozenset(c) not in KNOWN_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
