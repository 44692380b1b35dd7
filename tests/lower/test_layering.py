"""Data flows one way: frontends -> passes (the plan) -> lower.  The plan never imports
a frontend or a lowering; a lowering imports no frontend but the leaf modules of ONNX
helpers (skeletons, scopes, and weight forms, which imports only the skeleton's), which
import nothing else of graphprune (the backend and the lowering both use them, so
neither needs the other)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest


def _imports(module: str) -> set[str]:
    """Absolute names of the graphprune modules ``module`` imports, anywhere in it."""
    mod = importlib.import_module(module)
    tree = ast.parse(Path(mod.__file__).read_text())
    package = module if mod.__file__.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.update(f"{name}.{a.name}" if not node.module else name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("graphprune")}


@pytest.mark.parametrize("module", ["graphprune.frontends.onnx_skeleton", "graphprune.frontends.onnx_scopes"])
def test_onnx_helpers_are_leaves(module: str) -> None:
    assert _imports(module) == set()


def test_onnx_weight_forms_imports_only_the_skeleton() -> None:
    assert _imports("graphprune.frontends.onnx_weight_forms") <= {"graphprune.frontends.onnx_skeleton"}


@pytest.mark.parametrize("module", ["graphprune.passes.plan", "graphprune.passes.erase", "graphprune.passes.shrink",
                                   "graphprune.passes.fold_bn"])
def test_the_plan_imports_no_frontend_and_no_lowering(module: str) -> None:
    assert not {m for m in _imports(module) if m.startswith(("graphprune.frontends", "graphprune.lower"))}


@pytest.mark.parametrize("module", ["graphprune.lower.torch", "graphprune.lower.onnx"])
def test_lowerings_import_only_leaf_frontend_helpers(module: str) -> None:
    frontends = {m for m in _imports(module) if m.startswith("graphprune.frontends")}
    assert frontends <= {"graphprune.frontends.onnx_skeleton", "graphprune.frontends.onnx_scopes",
                         "graphprune.frontends.onnx_weight_forms"}
