"""No import cycle between siclip's modules, counting imports inside functions too.

A lazy (function-level) import still makes two modules depend on each other: ``demo`` calling ``cli.main``
while ``cli`` runs ``demo`` was such a circle. The graph is read from the source with ``ast``, so nothing is
imported to build it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "siclip"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(me: str, source: str, modules: set[str], *, is_package: bool = False) -> set[str]:
    """The siclip modules module ``me`` imports anywhere in ``source`` (``from pkg import mod`` names
    ``pkg.mod`` when that is a module)."""
    package = me if is_package else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != me}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {
        module_name(p): imports_of(module_name(p), p.read_text(), modules, is_package=p.name == "__init__.py")
        for p in paths
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as a path ``[a, b, ..., a]``, or [] when the graph is acyclic (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return []


def test_find_cycle_on_toy_graphs() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"e"}, "e": {"d"}}) == ["d", "e", "d"]


def test_reads_function_level_and_relative_imports() -> None:
    modules = {
        "siclip.demo",
        "siclip.cli",
        "siclip.config",
        "siclip.eval",
        "siclip.eval.suite",
        "siclip.eval.metrics",
    }
    source = (
        "import json\n"
        "from siclip.config import SiclipCfg\n"
        "def f():\n"
        "    from siclip.cli import main\n"
        "    from siclip.eval import suite\n"
        "    class A:\n"
        "        def g(self):\n"
        "            from .eval.metrics import eval_mode\n"
    )
    assert imports_of("siclip.demo", source, modules) == {
        "siclip.config",
        "siclip.cli",
        "siclip.eval.suite",
        "siclip.eval.metrics",
    }


def test_siclip_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "siclip.eval.suite" in graph["siclip.demo"]  # the graph sees function-level imports
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)
