"""The shape of workflow_scripts/ (issue 13): no import circle between its modules, and no function longer than
100 lines (the developers' guide). Both are read from the source with `ast`; nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path
import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "workflow_scripts"
MAX_FUNCTION_LINES = 100


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of this package it imports, anywhere in its body (a function-level import is an
    edge too: it would still be a circle, only a delayed one)."""
    sources = _sources()
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, path in sources.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                # `from . import train` names a module; `from .io_utils import x` names one too
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base for a in node.names]
            for name in names:
                while name and name not in sources:  # `a.b.c` where only `a.b` is a module of ours
                    name = name.rpartition(".")[0]
                if name and name != module:
                    graph[module].add(name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`file:line name (N lines)` for every function or method longer than `limit` lines (decorators included)."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                n = node.end_lineno - first + 1
                if n > limit:
                    out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_import_graph_is_read():
    """The scan sees the edges it should (a scan that found nothing would pass the circle test vacuously)."""
    g = import_graph()
    assert "workflow_scripts.synth_framework" in g["workflow_scripts.entigraph"]
    assert {"workflow_scripts.synth_framework", "workflow_scripts.entigraph"} <= g["workflow_scripts.synthesis"]
    assert "workflow_scripts.train" in g["workflow_scripts.gpu_check"]  # `from . import train as T`


def test_no_import_circle():
    assert find_cycles(import_graph()) == []


def test_synthesis_methods_import_only_the_framework():
    """Methods (entigraph, strategies) never import the runner; the framework imports no method."""
    g = import_graph()
    for method in ("workflow_scripts.entigraph", "workflow_scripts.strategies"):
        assert "workflow_scripts.synthesis" not in g[method], method
    assert not g["workflow_scripts.synth_framework"] & {"workflow_scripts.synthesis", "workflow_scripts.entigraph",
                                                         "workflow_scripts.strategies"}


def test_cycle_finder_finds_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_longer_than_100_lines():
    assert long_functions() == []
