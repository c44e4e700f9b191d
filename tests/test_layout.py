"""The package's imports point one way: no module imports, at its top or inside a function, a module that
imports it back (directly or through others). A cycle hidden in a function runs fine until someone moves the
import, and it says two modules are one job split in two."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "specserve"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its body (a name imported from a package that
    is not a module of it counts as the package)."""
    known = modules()

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name] |= {m for t in targets if (m := owner(t)) is not None and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            if component:
                found.append(sorted([node, *component]))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_check_sees_a_cycle_and_the_package_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "specserve.engine.loop" in graph["specserve.runtime"]  # a top-level import
    assert "specserve.runtime" in graph["specserve.cluster.verifier.service"]  # one inside a function


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def test_the_cluster_client_and_the_verifier_share_only_the_wire():
    """The front-end's client and the verifier service each import the shared wire format, never each other
    (the service reaches the client only through the runtime that loads its model, as a user would)."""
    graph = import_graph()
    sides = {
        "specserve.cluster.client": "specserve.cluster.verifier",
        "specserve.cluster.verifier": "specserve.cluster.client",
    }
    for side, other in sides.items():
        for module, imported in graph.items():
            if module == side or module.startswith(f"{side}."):
                assert not any(m == other or m.startswith(f"{other}.") for m in imported), (module, imported)
