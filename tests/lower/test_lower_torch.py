"""The PyTorch lowering applies a rewrite to an fx node, whatever the op: schema
arguments set by name (list entries one by one), targets replaced by a phantom op's
torch function on the fx nodes that hold the IR's inputs, modes set where the registry
says."""
from __future__ import annotations

import torch

from graphprune.ir.graph import Node, Ref
from graphprune.lower.torch import CompactModule, _apply, get_arg
from graphprune.ops.reduction import MEAN_OF_ORIGINAL, mean_of_original
from graphprune.ops.rewrite import Call, Entries, Rewrite

aten = torch.ops.aten


def _graph(op, *args) -> tuple[torch.fx.GraphModule, torch.fx.Node]:
    g = torch.fx.Graph()
    x = g.placeholder("x")
    n = g.call_function(op, (x, *args))
    g.output(n)
    return torch.fx.GraphModule(torch.nn.Module(), g), n


def test_entries_keep_what_the_graph_computes() -> None:
    g = torch.fx.Graph()
    x = g.placeholder("x")
    batch = g.call_function(aten.sym_size.int, (x, 0))
    v = g.call_function(aten.view.default, (x, [batch, 12, -1]))
    node = Node("v", "reshape", None, (Ref("x"), [2, 12, -1]), attrs={"size": [2, 12, -1]},
                source_op="aten.view.default")
    _apply(node, v, Rewrite(args={"size": Entries({1: 3})}), None)
    assert get_arg(v, "size") == [batch, 3, -1]


def test_a_call_becomes_the_phantom_on_the_same_inputs() -> None:
    gm, n = _graph(aten.mean.dim, [-1], True)
    node = Node("m", "reduce", None, (Ref("x"), [-1], True), source_op="aten.mean.dim")
    call = Call(MEAN_OF_ORIGINAL, ("x",), dict(dim=[1], keepdim=True, n=8, dtype=None))
    _apply(node, n, Rewrite(call=call), None)
    gm.recompile()
    x = torch.randn(2, 5)
    assert n.target is mean_of_original
    torch.testing.assert_close(gm(x), torch.cat([x, torch.zeros(2, 3)], 1).mean(1, keepdim=True))


def test_named_arguments_positional_or_keyword() -> None:
    gm, n = _graph(aten.slice.Tensor, 1, 0, 4)
    node = Node("s", "slice", None, (Ref("x"), 1, 0, 4), source_op="aten.slice.Tensor")
    _apply(node, n, Rewrite(args={"start": 1, "end": 3}), None)
    gm.recompile()
    x = torch.arange(10.0).reshape(2, 5)
    torch.testing.assert_close(gm(x), x[:, 1:3])


def test_modes_follow_train_and_eval() -> None:
    """Batch norm's ``training`` and dropout's ``train`` come from their registry entries;
    a batch norm without running statistics (weight standardisation) always uses its
    input's own statistics."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    w, b, mean, var = g.placeholder("w"), g.placeholder("b"), g.placeholder("mean"), g.placeholder("var")
    y = g.call_function(aten.batch_norm.default, (x, w, b, mean, var, False, 0.1, 1e-5, False))
    ws = g.call_function(aten.batch_norm.default, (y, None, None, None, None, True, 0.0, 1e-5, False))
    g.output(g.call_function(aten.dropout.default, (ws, 0.5, False)))
    m = CompactModule(torch.fx.GraphModule(torch.nn.Module(), g))
    bn, ws = [n for n in m.gm.graph.nodes if n.target is aten.batch_norm.default]
    drop = next(n for n in m.gm.graph.nodes if n.target is aten.dropout.default)
    m.train()
    assert bn.args[5] is True and drop.args[2] is True and ws.args[5] is True
    m.eval()
    assert bn.args[5] is False and drop.args[2] is False and ws.args[5] is True
