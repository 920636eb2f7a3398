"""The runner's modules import each other without a cycle.

A cycle works only while some import stays lazy (inside a function) or the import order is
just so; one moved line turns it into an ImportError at start-up.  The graph is read from the
source with `ast`: every `import`/`from … import` of an ntng module is an edge, at module level
and inside functions alike (a lazy import still closes the cycle at run time).  Imports under
`if TYPE_CHECKING:` are left out: they never run.  A package's own `__init__` is not implied by
importing one of its submodules (`backends.make` loading `backends.qemu` lazily is fine).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "ntng"
ROOT = Path(__file__).resolve().parents[2] / "python" / PACKAGE


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: all but those under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ntng modules `name` imports at run time."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    edges: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from .x import y`: y may be a submodule of x (then that is imported) or a name in x.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        for target in targets:
            while target and target not in known:  # `import ntng.a.b` names ntng.a.b, or a part
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, …, a], or None (iterative DFS, three colours)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        colour[start] = GREY
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = BLACK
                stack.pop()
                continue
            nxt = todo.pop(0)
            if colour.get(nxt) == GREY:
                path = [n for n, _ in stack]
                return path[path.index(nxt):] + [nxt]
            if colour.get(nxt) == WHITE:
                colour[nxt] = GREY
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_the_scan_sees_lazy_imports_and_skips_type_checking_ones(tmp_path: Path) -> None:
    pkg = tmp_path / "ntng"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n"
                              "def f():\n    from . import c\n")
    (pkg / "b.py").write_text("from .a import f\n")
    (pkg / "c.py").write_text("import ntng.b\n")
    known = {"ntng", "ntng.a", "ntng.b", "ntng.c"}
    graph = {m: imports_of(m, pkg / (m.split(".")[-1] + ".py") if m != "ntng" else pkg / "__init__.py",
                           known) for m in known}
    assert graph["ntng.a"] == {"ntng.c"} and graph["ntng.b"] == {"ntng.a"} and graph["ntng.c"] == {"ntng.b"}
    assert find_cycle(graph) == ["ntng.a", "ntng.c", "ntng.b", "ntng.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "ntng.machine" in graph and "ntng.backends.qemu" in graph  # the scan found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


# Leaf modules (docs/architecture.md, "Import rules"): what many import, importing (almost) nothing.
LEAVES = {"ntng.errors": set(), "ntng.protocol": set(), "ntng.api_names": set(),
          "ntng.plan": {"ntng.errors"}, "ntng.retry": {"ntng.errors"}}


def test_leaf_modules_stay_leaves() -> None:
    graph = import_graph()
    wrong = {m: sorted(graph[m] - allowed) for m, allowed in LEAVES.items() if graph[m] - allowed}
    assert not wrong, f"leaf modules importing more of ntng than they may: {wrong}"
