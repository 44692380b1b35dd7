"""The op registry: one entry per canonical op, reachable from both frontends."""
from __future__ import annotations

import torch

import graphprune as gp
from graphprune.ops.catalog import canonical_aten, canonical_onnx, known_ops, rule_for


def test_both_frontends_share_entries():
    ops = known_ops()
    assert canonical_aten("conv2d") == canonical_onnx("Conv") == "conv"
    assert canonical_aten("layer_norm") == canonical_onnx("LayerNormalization") == "layer_norm"
    assert canonical_aten("view") == canonical_onnx("Reshape") == "reshape"
    assert all(names for names in ops.values())
    assert rule_for(canonical_aten("conv2d")) is rule_for("conv")


def test_unknown_names_are_barriers():
    assert canonical_aten("no_such_op") == "aten::no_such_op"
    assert type(rule_for("aten::no_such_op")).__name__ == "Rule"  # the base rule pins and reports


def test_ir_prints_readably():
    g = gp.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                 torch.randn(2, 4))
    table = g.ir.print_tabular()
    assert "linear" in table and "unary" in table
    assert "groups" in repr(g) and "1 groups" in g.summary()


def test_every_entry_module_is_registered_by_the_catalog():
    """Entries register explicitly (ops/catalog.py imports them): a module that defines
    entries but is missing there would leave its ops barriers without a word."""
    import ast
    from pathlib import Path

    import graphprune.ops.catalog as catalog

    ops_dir = Path(catalog.__file__).parent
    defining = {p.stem for p in ops_dir.glob("*.py") if "@register(" in p.read_text()}
    imported = {alias.name for node in ast.walk(ast.parse(Path(catalog.__file__).read_text()))
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None
                for alias in node.names}
    assert defining and defining <= imported, f"entry modules not in ops/catalog.py: {sorted(defining - imported)}"
