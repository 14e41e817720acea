"""data/ has no import cycle: every import of a data module by another, at module level and inside functions (ast,
so imports that only run later count too), forms a graph without cycles (issue #22 item 4). Also: the subset
config stays typed down to the readers (no SimpleNamespace / getattr fallbacks in data/sources.py)."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def _modules() -> dict[str, str]:
    """Module name -> file of every module under data/."""
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """data module -> the data modules it imports anywhere in its file (module level, functions, classes).
    `from pkg import name` is an edge to pkg.name when that is a module, else to pkg."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in mods:
                        edges.add(sub)
                    elif base in mods:
                        edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as [a, b, ..., a], or [] (depth-first search, colouring)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_data_has_no_import_cycle():
    graph = import_graph()
    assert {"data.index", "data.store", "data.readers", "data.readers.metadata"} <= set(graph)
    assert "data.store" in graph["data.index"]  # the walker sees real edges (not a vacuous pass)
    cycle = find_cycle(graph)
    assert not cycle, "import cycle in data/: " + " -> ".join(cycle)


def test_data_modules_import_no_private_names_of_each_other():
    """What one data module needs from another is public: no `from .x import _name` (the old cycles were closed
    by function-level imports of private helpers)."""
    bad = []
    for name, path in _modules().items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("data")):
                bad += [f"{name}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__future__"]
    assert not bad, bad


@pytest.mark.parametrize("graph, cyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"b", "c"}, "b": set(), "c": {"c2"}, "c2": {"c"}}, True),
])
def test_find_cycle_finds_cycles(graph, cyclic):
    assert bool(find_cycle(graph)) == cyclic


def test_function_level_imports_count(tmp_path, monkeypatch):
    """An import inside a function is an edge as much as one at the top (the cycles the issue found were of that
    kind)."""
    pkg = tmp_path / "data"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .a import y\n    return y\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(pkg))
    assert find_cycle(import_graph()) in (["data.a", "data.b", "data.a"], ["data.b", "data.a", "data.b"])


def test_sources_keeps_the_subset_config_typed():
    """data/sources.py builds SubsetSpecs from the typed SubsetConfig / DataConfig: no SimpleNamespace copies and
    no getattr(..., default) fallbacks that hide a misspelt field."""
    with open(os.path.join(ROOT, "sources.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "getattr" and len(n.args) == 3]
    assert "SimpleNamespace" not in names and not calls
