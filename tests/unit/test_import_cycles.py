"""The package's modules import each other without cycles of any length.

What counts as an import of module B by module A: any `import` or `from ... import` statement
anywhere in A's source that names B (or names a submodule B in `from pkg import B`) -- at
module level, inside a function, or under `if TYPE_CHECKING:`. A function-level import hides a
cycle from the interpreter (nothing fails at import time) but not from the layering: the two
modules still need each other, and the cycle returns as soon as someone hoists the import.
Module-level imports alone are what would fail at import time; they are checked too, with the
parent packages each import executes (importing `refusal_lab.judge.core` runs
`refusal_lab/judge/__init__.py` first).

Not counted: importing a submodule does not count as importing its parent package in the first
graph (a package's `__init__` may re-export from its own submodules lazily, which is not a
layering cycle); the second graph does count it, because there it is what runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import refusal_lab

PACKAGE_DIR = Path(refusal_lab.__file__).parent


def module_name(path: Path) -> str:
    parts = ["refusal_lab", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _runtime_statements(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (module level, not under TYPE_CHECKING)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                found += _runtime_statements(node.body)
            found += _runtime_statements(node.orelse)
        elif isinstance(node, ast.Try):
            found += _runtime_statements(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                found += _runtime_statements(handler.body)
        elif isinstance(node, ast.With):
            found += _runtime_statements(node.body)
    return found


def _named(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement in `module` names."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        targets = [target] + [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    out = []
    for target in targets:
        while target and target not in MODULES:  # `import refusal_lab.x.y` of a name inside a module
            target = target.rpartition(".")[0]
        if target:
            out.append(target)
    return out


def import_graph(*, runtime_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        if runtime_only:
            statements = _runtime_statements(tree.body)
        else:
            statements = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        deps: set[str] = set()
        for node in statements:
            for target in _named(module, node):
                deps.add(target)
                while runtime_only and "." in target:  # importing a.b.c runs a/__init__ and a/b/__init__ first
                    target = target.rpartition(".")[0]
                    deps.add(target)
        # A module's own package is already importing when the module runs (not a cycle).
        graph[module] = {d for d in deps if d != module and not module.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, c) for c in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, for the failure message."""
    start = min(component)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                todo.append(w)
    raise AssertionError("a strongly connected component has a cycle through every member")


def _report(found: list[list[str]]) -> str:
    return "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_import_cycles_counting_function_level_imports():
    found = cycles(import_graph(runtime_only=False))
    assert not found, _report(found)


def test_no_import_cycles_at_import_time():
    found = cycles(import_graph(runtime_only=True))
    assert not found, _report(found)


def test_cycle_finder_sees_a_cycle_of_three():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_and_relative_imports():
    graph = import_graph(runtime_only=False)
    assert "refusal_lab.pipeline" in graph["refusal_lab.__main__"]  # imported inside main()
    assert "refusal_lab.config" in graph["refusal_lab.pipeline"]
