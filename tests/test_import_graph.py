"""No import cycle anywhere in dit_fast: the import graph is read statically (ast) from every module,
counting imports inside functions too (a cycle hidden in a function is still a cycle: it only moves
the failure to the first call), and must have no strongly connected component of two or more
modules. Imports under ``if TYPE_CHECKING:`` never run and are not counted."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of every .py file of ``package`` under ``root``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


class _Imports(ast.NodeVisitor):
    """Every (line, dotted target) a module imports, wherever in the file."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[int, str, list[str]]] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name == "TYPE_CHECKING":  # never executed: only node.orelse runs
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((node.lineno, alias.name, []))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        self.found.append((node.lineno, target, [a.name for a in node.names]))


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """{module: {imported module of the same package: line}}. ``from P import name`` points at the
    submodule P.name when there is one, else at P; importing P.Q from outside package P also runs
    P's ``__init__``, so it points at P too."""
    modules = module_names(root, package)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        edges: dict[str, int] = {}
        for line, target, names in visitor.found:
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]
            for t in targets:
                while t in modules or t.rpartition(".")[0]:
                    inside = name == t or name.startswith(t + ".")
                    if t in modules and not inside:
                        edges.setdefault(t, line)
                    t = t.rpartition(".")[0]
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth = longest import chain: a few dozen at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(graph, component: list[str]) -> str:
    members = set(component)
    edges = [f"{a} -> {b} (line {line})" for a in component for b, line in sorted(graph[a].items())
             if b in members]
    return "cycle among " + ", ".join(component) + ":\n    " + "\n    ".join(edges)


def test_dit_fast_has_no_import_cycle():
    graph = import_graph(REPO, "dit_fast")
    assert len(graph) > 30 and "dit_fast.checkpoint.safe_io" in graph["dit_fast.checkpoint.loading"]
    found = cycles(graph)
    assert not found, "\n".join(describe(graph, c) for c in found)


def test_checkpoint_leaf_imports_only_atomic():
    graph = import_graph(REPO, "dit_fast")
    assert set(graph["dit_fast.checkpoint.safe_io"]) == {"dit_fast.atomic"}


def test_the_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    """The detector itself: a cycle through a function-local relative import, and one through a
    package __init__, are found; a TYPE_CHECKING-only import is not a cycle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import y\n")
    (pkg / "sub" / "leaf.py").write_text("import pkg.c\n")
    (pkg / "c.py").write_text("from pkg.sub.leaf import y\n")  # runs sub/__init__ first
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import e\n")
    (pkg / "e.py").write_text("from . import d\n")
    found = cycles(import_graph(tmp_path, "pkg"))
    assert ["pkg.a", "pkg.b"] in found
    assert ["pkg.c", "pkg.sub", "pkg.sub.leaf"] in found
    assert not any("pkg.d" in c for c in found)
