"""The package's shape: no import cycles, and a decision core that does no I/O.

Imports are read with ``ast`` (every import in a module, also inside
functions; only ``if TYPE_CHECKING:`` blocks are left out, since they never
run), so a cycle is found even where a lazy import hides it at run time.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PMK = Path(__file__).resolve().parent.parent / "pmk"
# Packages that must stay pure: no event loop, no capture backend.
PURE_PACKAGES = ("pmk.core", "pmk.rpc")
FORBIDDEN_IN_PURE = ("asyncio", "pmk.capture", "pmk.server")


def module_names() -> dict[str, Path]:
    """Every module under pmk/ by dotted name (a package by its __init__.py)."""
    modules = {}
    for path in PMK.rglob("*.py"):
        parts = path.relative_to(PMK.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The pmk modules ``name`` imports (``from pkg import mod`` counts as importing pkg.mod)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names if f"{base}.{alias.name}" in modules)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_import_walk_sees_real_edges() -> None:
    graph = import_graph()
    assert "pmk.core.engine" in graph["pmk.core.service"]
    assert "pmk.core.commands" in graph["pmk.core.service"]  # from pmk.core import commands
    assert "pmk.server.session" in graph["pmk.server.app"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_in_pmk_is_part_of_an_import_cycle() -> None:
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("package", PURE_PACKAGES)
def test_the_pure_packages_import_no_event_loop_and_no_capture_backend(package: str) -> None:
    modules = sorted(m for m in module_names() if m == package or m.startswith(package + "."))
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({FORBIDDEN_IN_PURE!r}))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=PMK.parent, timeout=60
    )
    assert json.loads(done.stdout) == []
