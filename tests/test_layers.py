"""The shape of the code, checked as CI checks it: the layer contracts of .importlinter
hold, and no module of geproxy imports itself back through others (function-local and
TYPE_CHECKING imports included: grimp reads every import statement)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(module: str) -> None:
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if not imported.startswith("geproxy"):
                continue
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module.startswith("geproxy") and module not in index:
            visit(module)
    return found


def test_no_import_cycle() -> None:
    graph = grimp.build_graph("geproxy")
    # A package's __init__ importing its own modules is how a package exports: not a cycle
    # of the code. Only geproxy's own __init__ does it (the public API).
    for module in graph.find_modules_directly_imported_by("geproxy"):
        graph.remove_import(importer="geproxy", imported=module)
    assert _cycles(graph) == []


def test_a_cycle_is_found() -> None:
    """The check above would see one: a graph with a loop of three has one component."""
    graph = grimp.ImportGraph()
    for module in ("geproxy", "geproxy.a", "geproxy.b", "geproxy.c"):
        graph.add_module(module)
    graph.add_import(importer="geproxy.a", imported="geproxy.b")
    graph.add_import(importer="geproxy.b", imported="geproxy.c")
    graph.add_import(importer="geproxy.c", imported="geproxy.a")
    assert _cycles(graph) == [["geproxy.a", "geproxy.b", "geproxy.c"]]


@pytest.mark.timeout(120)
def test_layer_contracts_hold() -> None:
    """lint-imports, as .ci/run runs it: each layer imports only from those below."""
    script = Path(sys.executable).parent / "lint-imports"  # beside this python, in its venv
    result = subprocess.run([str(script)], cwd=ROOT, capture_output=True, text=True,
                            timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout
