"""The code's shape, read from the AST: no import cycle between metis modules or packages, no
function over 60 lines in metis/ or bench/ (issue 25). Nothing is imported or run."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60

# Known cycles, each as the set of modules it goes through; a cycle not listed here fails the test.
ALLOWED_MODULE_CYCLES: list[set[str]] = []
ALLOWED_PACKAGE_CYCLES: list[set[str]] = []

# Known long functions, in files whose owners are rewriting them: none left (issue 25).
ALLOWED_LONG_FUNCTIONS: set[str] = set()


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the metis package (a package is its __init__)."""
    found = {}
    for path in sorted((ROOT / "metis").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imported(node: ast.AST, package: str, known: dict[str, Path]) -> list[str]:
    """The metis modules one import statement names. `from p import m` names the submodule p.m
    where one exists, else the module p (a name defined in it)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parent + ([node.module] if node.module else []))
        subs = [f"{base}.{alias.name}" for alias in node.names]
        names = [s for s in subs if s in known] + ([base] if any(s not in known for s in subs) else [])
    else:
        return []
    out = []
    for name in names:
        while name and name not in known:  # `import metis.tiny.world as w` names metis.tiny.world
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the metis modules it imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            graph[name] |= {t for t in _imported(node, package, known) if t != name}
    return graph


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """metis.a.b.c -> metis.a: subpackages of metis as nodes; top-level modules stay themselves."""

    def package(name: str) -> str:
        return ".".join(name.split(".")[:2])

    out: dict[str, set[str]] = defaultdict(set)
    for source, targets in graph.items():
        out[package(source)] |= {package(t) for t in targets if package(t) != package(source)}
    return dict(out)


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [{"a", "b", "c"}]


def test_import_graph_reads_relative_and_submodule_imports():
    graph = import_graph()
    assert "metis.tiny.world" in graph["metis.tiny.router_sample"]  # from metis.tiny import world
    assert "metis.configuration" in graph["metis.conversion"]  # from .configuration import ...
    assert "metis.finetune.trainer" in graph["metis.finetune"]  # from .trainer import ...


def test_no_import_cycle_between_metis_modules():
    unexpected = [sorted(c) for c in cycles(import_graph()) if c not in ALLOWED_MODULE_CYCLES]
    assert not unexpected, f"import cycles: {unexpected}"


def test_no_import_cycle_between_metis_packages():
    unexpected = [sorted(c) for c in cycles(package_graph(import_graph())) if c not in ALLOWED_PACKAGE_CYCLES]
    assert not unexpected, f"package import cycles: {unexpected}"


def long_functions() -> dict[str, int]:
    """'path:name' -> lines, for every function or method over the limit in metis/ and bench/."""
    found = {}
    for folder in ("metis", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        found[f"{path.relative_to(ROOT).as_posix()}:{node.name}"] = lines
    return found


def test_no_function_over_60_lines():
    over = {name: n for name, n in long_functions().items() if name not in ALLOWED_LONG_FUNCTIONS}
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: {over}"
