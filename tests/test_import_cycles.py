"""No import cycles among graphprune's modules.

Every ``import`` statement of every module (at module level and inside functions, since a
function-level import is still a dependency, only a deferred one) is read with :mod:`ast`
and becomes an edge of a directed graph over graphprune's modules, ``graphprune.passes``
and ``graphprune.codegen`` included.  A cycle means two modules know about each other, so
neither can be read, tested or replaced alone.

Only the imports written count: importing ``a.b.c`` also runs ``a/__init__.py`` and
``a/b/__init__.py``, but a package's ``__init__`` re-exporting its modules is not a
dependency of those modules on each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
# where each package's files live (see [tool.setuptools.package-dir] in pyproject.toml)
PACKAGE_DIRS = {
    "graphprune": ROOT / "graphprune",
    "graphprune.passes": ROOT / "passes",
    "graphprune.codegen": ROOT / "codegen",
}



def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of graphprune."""
    out: dict[str, Path] = {}
    for pkg, base in PACKAGE_DIRS.items():
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            out[name] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name ``from <node.module> import ...`` refers to, inside ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except what sits under ``if TYPE_CHECKING:`` (annotations
    only: never executed, so never part of a runtime cycle)."""
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of graphprune that ``module`` imports anywhere in its body, functions included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            # ``from pkg import name``: the submodule pkg.name if there is one, else pkg itself
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # ``import graphprune.x.y`` names y, or an attribute of it
                t = t.rpartition(".")[0]
            if t and t != module:
                found.add(t)
    return found


def import_graph() -> nx.DiGraph:
    mods = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        graph.add_edges_from((name, t) for t in _imports(name, path, set(mods)))
    return graph


def test_the_walk_sees_graphprunes_imports() -> None:
    graph = import_graph()
    # a function-level import (trace imports the ONNX frontend lazily) and both installed
    # subpackages are seen: a walk that missed them could not find a cycle through them
    assert graph.has_edge("graphprune.trace", "graphprune.frontends.onnx_import")
    # an import only for annotations is not a runtime dependency (the registry names
    # Shrink in its Rule signatures)
    assert not graph.has_edge("graphprune.ops.registry", "graphprune.passes.shrink")
    assert any(u.startswith("graphprune.passes.") for u, _ in graph.edges)
    assert any(u.startswith("graphprune.codegen.") for u, _ in graph.edges)


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles)
