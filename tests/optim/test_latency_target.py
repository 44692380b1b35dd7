"""Latency targets (graphprune.latency): layers read from the graph, tables, the knapsack
selection and the correction loop, on real traced models with synthetic layer timings.

Timing a compiled model is the benchmark's job (benchmarks/latency_target.py); here the
"measurements" are functions of the widths, so every property is exact and fast.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torchvision
from torch import nn

import graphprune as gp
from graphprune.errors import UnprunableTargetError
from graphprune.latency import (ORDERS, LatencyModel, LatencyPlan, LatencyTable, LayerTime, graph_layers,
                                layer_macs, meet_latency, op_traffic, select_for_latency,
                                select_in_flops_order)
from graphprune.target import kept_widths, select_units


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    return model, gp.trace(model, (torch.randn(1, 3, 32, 32),), verify=False)


@pytest.fixture(scope="module")
def small_vit() -> tuple[nn.Module, gp.PrunableGraph]:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(32, 8, 2, 4, 64, 128, num_classes=10).eval()
    return vit, gp.trace(vit, (torch.randn(2, 3, 32, 32),), verify=False)


def work(layer) -> int:
    """A layer's multiply-accumulates per input channel per output channel."""
    return layer.rows * layer.size[0] * layer.size[1] * layer.kernel[0] * layer.kernel[1]


def staircase(layer, cin: int, cout: int) -> float:
    """A kernel's time that falls only per tile of 8 channels (what SIMD lanes do), scaled by its work."""
    per_group = 1 if layer.depthwise else cin
    return 1e-6 * work(layer) * math.ceil(per_group / 8) * 8 * math.ceil(cout / 8) * 8 + 1e-3


def timed(per_layer, schedules=lambda layer, cin, cout: {}):
    """A table's batch measurement from a time per (layer, in width, out width), and the
    schedules each was timed on."""
    return lambda requests: [LayerTime(per_layer(*r), schedules(*r)) for r in requests]


def test_every_conv_and_linear_is_a_layer_with_its_modules_geometry(mobilenet):
    model, g = mobilenet
    layers = {name: layer for layer, name in graph_layers(g.ir)}
    modules = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(layers) == set(modules)
    for name, m in modules.items():
        layer = layers[name]
        if isinstance(m, nn.Linear):
            assert (layer.kind, layer.channels, layer.rows) == ("dense", (m.in_features, m.out_features), 1)
            continue
        assert layer.kind == "conv2d" and layer.channels == (m.in_channels, m.out_channels)
        assert (layer.kernel, layer.stride, layer.groups) == (m.kernel_size, m.stride, m.groups)
        assert layer.padding == m.padding  # read back from the shapes, equal for these convolutions
        assert layer.depthwise == (m.groups == m.in_channels > 1)


def test_onnx_graphs_have_the_same_layers(mobilenet, tmp_path):
    model, g = mobilenet
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17)
    onnx_layers = [layer for layer, _ in graph_layers(gp.trace(str(path), verify=False).ir)]
    torch_layers = [layer for layer, _ in graph_layers(g.ir)]
    key = lambda l: (l.kind, l.channels, l.rows, l.size, l.kernel, l.stride, l.padding, l.groups,  # noqa: E731
                     l.epilogue)
    assert sorted(map(key, onnx_layers)) == sorted(map(key, torch_layers))


def test_each_layer_carries_the_elementwise_ops_its_kernel_fuses(mobilenet):
    """MobileNetV2: a ReLU6 after every expansion and depthwise convolution (after its batch
    norm), the residual add after the projections of the blocks that keep their shape."""
    model, g = mobilenet
    layers = {name: layer for layer, name in graph_layers(g.ir)}
    for i, block in enumerate(model.features[1:-1], start=1):
        convs = [f"features.{i}.{n}.weight" for n, m in block.named_modules() if isinstance(m, nn.Conv2d)]
        assert [layers[c].epilogue for c in convs[:-1]] == [("relu6",)] * (len(convs) - 1)
        assert layers[convs[-1]].epilogue == (("add",) if block.use_res_connect else ())
    assert layers["features.0.0.weight"].epilogue == ("relu6",) and layers["classifier.1.weight"].epilogue == ()


def test_a_residual_block_and_a_transformer_mlp_read_their_epilogues():
    """ResNet: the add and ReLU after a block's second convolution; ViT: GELU after the first
    MLP layer, whose input is (batch, tokens, channels) and is timed as such."""
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    layers = {n: l for l, n in graph_layers(gp.trace(resnet, (torch.randn(1, 3, 32, 32),), verify=False).ir)}
    assert layers["conv1.weight"].epilogue == ("relu",) == layers["layer1.0.conv1.weight"].epilogue
    assert layers["layer1.0.conv2.weight"].epilogue == ("add", "relu") == layers["layer2.0.downsample.0.weight"].epilogue
    vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10).eval()
    layers = {n: l for l, n in graph_layers(gp.trace(vit, (torch.randn(2, 3, 32, 32),), verify=False).ir)}
    fc1 = layers["encoder.layers.encoder_layer_0.mlp.0.weight"]
    assert (fc1.epilogue, fc1.lead) == (("gelu",), (2, 17))


def test_a_layer_module_computes_its_layer_then_its_epilogue():
    from graphprune.codegen.layer_latency import _ACTIVATIONS, layer_module
    from graphprune.latency import ACTIVATIONS
    from graphprune.ops.registry import Layer

    assert set(_ACTIVATIONS) == ACTIVATIONS | {"relu6"}  # every activation an epilogue names can be built

    layer = Layer("w", "conv2d", 1, 0, (8, 16), size=(6, 6), kernel=(3, 3), padding=(1, 1), epilogue=("add", "relu"))
    module, (x, residual) = layer_module(layer, 4, 8)
    conv = module.core
    assert (conv.in_channels, conv.out_channels) == (4, 8) and residual.shape == (1, 8, 6, 6)
    torch.testing.assert_close(module(x, residual), torch.relu(conv(x) + residual))
    dense = Layer("w", "dense", 1, 0, (8, 16), rows=6, lead=(2, 3), epilogue=("gelu",))
    module, (x,) = layer_module(dense, 8, 4)
    assert x.shape == (2, 3, 8)
    torch.testing.assert_close(module(x), nn.functional.gelu(module.core(x)))


def test_a_table_slower_than_the_whole_model_still_lands():
    """Layers timed alone on worse schedules than the model's (six times its time here): the
    time outside the layers reads negative, so the first try asks for the budget's share of
    the layers' time, and no round asks for less than nothing."""
    from graphprune.latency import _first_layer_budget, _next_layer_budget

    assert _first_layer_budget(213.0, 37.6, 37.6 - 213.0, 22.5) == pytest.approx(213.0 * 22.5 / 37.6)
    assert _first_layer_budget(30.0, 37.6, 7.6, 22.5) == pytest.approx(22.5 - 7.6)
    # two tries at one predicted time, both over: scaled by the miss, not shifted by it
    assert _next_layer_budget([(213.0, 37.6), (213.0, 37.3)], 22.4, 213.0) == pytest.approx(213.0 * 22.4 / 37.3)


@pytest.mark.parametrize("scale", [0.6, 2.5])
def test_correction_lands_when_the_table_is_several_times_the_model(mobilenet, scale):
    """The layers alone predicted 2.4 to 10 times the whole model (default schedules against tuned ones)."""
    _, g = mobilenet
    model, _ = model_for(g)
    whole = lambda masks: model.predict([int(m.sum()) for m in masks]) / 6 * scale + 0.01  # noqa: E731
    dense = whole([torch.zeros(grp.size, dtype=torch.bool) for grp in g.groups])
    scores, levels = random_scores_and_widths(g)
    masks, run = meet_latency(model, scores, gp.Target(latency_ms=0.6 * dense), levels, whole)
    assert abs(whole(masks) / (0.6 * dense) - 1) <= 0.05
    # the first try already lands: asked for the budget less a negative "rest", it removed next to nothing
    assert abs(run.rounds[0]["measured_ms"] / (0.6 * dense) - 1) <= 0.05


def model_for(g, measure=staircase) -> tuple[LatencyModel, LatencyTable]:
    table = LatencyTable(timed(measure))
    return LatencyModel(graph_layers(g.ir), g.groups, table), table


@pytest.mark.parametrize("multiple", [1, 8])
def test_selection_meets_the_predicted_budget_through_plateaus(mobilenet, multiple):
    """With widths that only pay off per 8 channels, single-unit steps save nothing on
    their own: the selection must still reach the budget, on the allowed widths."""
    _, g = mobilenet
    model, _ = model_for(g)
    full = model.predict([0] * len(g.groups))
    scores = [torch.rand(grp.size, generator=torch.Generator().manual_seed(i)) for i, grp in enumerate(g.groups)]
    levels = [kept_widths(grp, gp.Target(latency_ms=1.0, multiple=multiple, min_fraction=0)) for grp in g.groups]
    masks = select_for_latency(model, scores, 0.6 * full, levels)
    assert model.predict([int(m.sum()) for m in masks]) <= 0.6 * full
    for grp, m, s, allowed in zip(g.groups, masks, scores, levels):
        kept = grp.size - int(m.sum())
        assert kept == grp.size or kept in allowed
        if m.any() and not m.all():  # lowest scores go first within a group
            assert s[m].max() <= s[~m].min()


class TwoGroups:
    """A latency model of two groups whose units each save 1 ms, as :func:`select_for_latency` reads one."""

    def __init__(self, sizes: tuple[int, int]) -> None:
        from types import SimpleNamespace

        self.groups = [SimpleNamespace(size=n, flops_per_unit=1.0, params_per_unit=1) for n in sizes]
        self.touching, self.users = [[0], [1]], [[0], [1]]

    def predict(self, removed):
        return float(sum(g.size - r for g, r in zip(self.groups, removed)))

    def saving(self, removed, group, more):
        return float(more)

    def macs_saved(self, removed, group, more):
        return float(more)


def test_the_last_step_is_the_one_that_reaches_the_budget_losing_least():
    """Group 0 loses least per ms but goes in one step of 8 ms; group 1 steps by 2 ms.  A
    budget 1.5 ms under the dense time is met by one step of group 1 (score lost 0.4), not
    by emptying group 0 (lost 0.8, 6.5 ms past the budget)."""
    model = TwoGroups((8, 12))
    scores = [torch.full((8,), 0.1), torch.full((12,), 0.2)]
    masks = select_for_latency(model, scores, 18.5, [[0], [10, 8, 6, 4, 2, 0]])
    assert [int(m.sum()) for m in masks] == [0, 2]
    # a gap only group 0's step covers is still met by it
    masks = select_for_latency(model, scores, 9.0, [[0], [10, 8, 6, 4, 2, 0]])
    assert model.predict([int(m.sum()) for m in masks]) <= 9.0 and int(masks[0].sum()) == 8


def random_scores_and_widths(g):
    """Seeded random scores per group, and each group's widths at a multiple of 8 with no floor."""
    scores = [torch.rand(grp.size, generator=torch.Generator().manual_seed(i)) for i, grp in enumerate(g.groups)]
    levels = [kept_widths(grp, gp.Target(latency_ms=1.0, multiple=8, min_fraction=0)) for grp in g.groups]
    return scores, levels


def test_correction_loop_lands_within_tolerance_when_the_table_misses(mobilenet):
    """The whole compiled model costs more than its layers (a fixed part and 30% on top of
    the layers, as fusion and memory traffic do): measuring and correcting reaches the budget."""
    _, g = mobilenet
    model, table = model_for(g)
    whole = lambda masks: 0.5 + 1.3 * model.predict([int(m.sum()) for m in masks])  # noqa: E731
    dense = whole([torch.zeros(grp.size, dtype=torch.bool) for grp in g.groups])
    scores, levels = random_scores_and_widths(g)
    masks, run = meet_latency(model, scores, gp.Target(latency_ms=0.6 * dense), levels, whole)
    assert abs(whole(masks) / (0.6 * dense) - 1) <= 0.05
    assert run.achieved_ms == pytest.approx(whole(masks)) and len(run.rounds) >= 2  # the first round missed
    assert table.measured == len(table.entries)  # each (geometry, widths) measured once


@pytest.mark.parametrize("scale", [0.6, 2.5])
def test_correction_lands_when_the_rest_of_the_model_moves_with_the_layers(mobilenet, scale):
    """The time outside the weighted layers changes with their widths (attention scores,
    norms): the whole model moves ``scale`` times what the table predicts for the layers.
    Shifting the layers' budget by each miss swings past the budget for ever once the
    model moves more than twice its layers; interpolating between the tries converges."""
    _, g = mobilenet
    model, _ = model_for(g)
    whole = lambda masks: 0.2 + scale * model.predict([int(m.sum()) for m in masks])  # noqa: E731
    dense = whole([torch.zeros(grp.size, dtype=torch.bool) for grp in g.groups])
    scores, levels = random_scores_and_widths(g)
    masks, run = meet_latency(model, scores, gp.Target(latency_ms=0.6 * dense), levels, whole)
    assert abs(whole(masks) / (0.6 * dense) - 1) <= 0.05
    assert len(run.rounds) <= 4


@pytest.mark.parametrize("power,share", [(2, 0.6), (2, 0.4), (4, 0.4), (6, 0.4)])
def test_correction_reaches_a_budget_on_a_curved_model(mobilenet, power, share):
    """The whole model falls faster than its layers' predicted time (the rest of a ViT shrinks
    with the widths its layers lose): every try lands under the budget with the dense model
    as the bracket's other end, and interpolating between the two alone crept up from below,
    a few percent a round (a ViT's 40% budget: six rounds, all 5-12% under).  Weighting down
    the end kept across tries reaches the budget within the rounds."""
    _, g = mobilenet
    model, _ = model_for(g)
    full = model.predict([0] * len(g.groups))
    whole = lambda masks: 0.05 * full + full * (model.predict([int(m.sum()) for m in masks]) / full) ** power  # noqa: E731
    dense = whole([torch.zeros(grp.size, dtype=torch.bool) for grp in g.groups])
    scores, levels = random_scores_and_widths(g)
    masks, run = meet_latency(model, scores, gp.Target(latency_ms=share * dense), levels, whole)
    assert abs(whole(masks) / (share * dense) - 1) <= 0.05
    assert any(r["measured_ms"] > share * dense for r in run.rounds)  # it came at the budget from both sides


def test_the_end_of_the_bracket_kept_across_tries_counts_less():
    """Two tries in a row under the budget: the dense end's miss counts half (Illinois), so
    the next layers' budget moves past plain interpolation's."""
    from graphprune.latency import _next_layer_budget

    plain = _next_layer_budget([(10.0, 10.0), (6.0, 4.0)], 6.0, 6.0)
    assert plain == pytest.approx(6.0 + 4.0 * 2.0 / 6.0)
    assert _next_layer_budget([(10.0, 10.0), (5.0, 3.0), (6.0, 4.0)], 6.0, 6.0) == pytest.approx(6.0 + 4.0 * 2.0 / 4.0)


def by_macs(layer, cin: int, cout: int) -> float:
    """A kernel's time exactly proportional to its multiply-accumulates."""
    return 1e-6 * layer_macs(layer, cin, cout)


@pytest.mark.parametrize("share", [0.6, 0.4])
@pytest.mark.parametrize("net", ["mobilenet", "small_vit"])
def test_a_time_that_follows_the_flops_picks_what_a_flops_target_picks(request, net, share):
    """Where every layer's time is its FLOPs, a latency budget is a FLOPs budget, and the
    selection must remove (nearly) the units a FLOPs target removes at the FLOPs it reached.
    Dividing each group's normalised scores by the time a unit saves alone instead took
    whole wide groups first (a tenth of the units in common); pricing a ViT's hidden
    channels by their dense FLOPs after the heads they fed were gone kept 60 of 64 (a third
    to a half of the units in common)."""
    _, g = request.getfixturevalue(net)
    model, _ = model_for(g, by_macs)
    full = model.predict([0] * len(g.groups))
    scores = [torch.rand(grp.size, generator=torch.Generator().manual_seed(i)) for i, grp in enumerate(g.groups)]
    if net == "small_vit":  # heads first: each one cut leaves the hidden channels less to save
        scores = [s * 0.3 + 0.5 if grp.kind == "head" else s + 0.5 for s, grp in zip(scores, g.groups)]
    levels = [kept_widths(grp, gp.Target(latency_ms=1.0, multiple=1, min_fraction=0)) for grp in g.groups]
    masks = select_for_latency(model, scores, share * full, levels)
    # the FLOPs removed as a FLOPs target counts them: each unit's own, to first order
    reached = sum(int(m.sum()) * grp.flops_per_unit for m, grp in zip(masks, g.groups)) / g.total_flops
    by_flops = select_units(g.groups, scores, gp.Target(flops=reached, multiple=1, min_fraction=0),
                            total_flops=g.total_flops)
    common = sum(int((a & b).sum()) for a, b in zip(masks, by_flops))
    either = sum(int((a | b).sum()) for a, b in zip(masks, by_flops))
    assert common / either > 0.85


def test_a_narrower_width_is_never_predicted_slower(mobilenet):
    """A width measured slower than a wider one (noise, an unlucky schedule) is read at the
    wider one's time, so one step down is never predicted to cost time."""
    _, g = mobilenet

    def bumpy(layer, cin: int, cout: int) -> float:
        bump = 2.0 if 0.6 < cout / layer.channels[1] < 0.9 else 1.0  # the 75% width measures slow
        return by_macs(layer, cin, layer.channels[1]) * bump * cout / layer.channels[1]

    model, _ = model_for(g, bumpy)
    for layer in model.layers:
        if layer.by_out is not None:
            cout = layer.layer.channels[1]
            widths = range(1, cout + 1)
            times = [layer.by_out(w) for w in widths]
            assert all(a <= b + 1e-15 for a, b in zip(times, times[1:]))
            assert layer.by_out(cout) == pytest.approx(bumpy(layer.layer, layer.layer.channels[0], cout))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_elements_outside_the_layers_fall_by_what_each_unit_carries(small_vit, seed):
    """For any heads and MLP units removed, the compact model's ops outside the timed layers
    write the dense model's elements less each removed unit's share: traced again, the
    compact graph counts exactly what the dense one predicts. A ViT's hidden channels carry
    its norms and class-token concat, its heads the attention products, softmax and copies;
    its MLP units carry nothing (their GELU is the first layer's epilogue). (Cut hidden
    channels turn each layer norm into graphprune's width-corrected form, other ops.)"""
    _, g = small_vit
    total, per_unit = op_traffic(g.ir, g.analysis.labels, g.analysis.comp, g.groups)
    mlp = [e for grp, e in zip(g.groups, per_unit) if "mlp" in grp.name]
    others = [e for grp, e in zip(g.groups, per_unit) if "mlp" not in grp.name]
    assert mlp and all(e == 0 for e in mlp) and others and all(e > 0 for e in others)
    assert {grp.kind for grp, e in zip(g.groups, per_unit) if e > 0} == {"head", "channel"}
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for grp in g.groups:
        m = torch.zeros(grp.size, dtype=torch.bool)
        if grp.kind == "head" or "mlp" in grp.name:  # the hidden width's norms take another form when cut
            m[torch.randperm(grp.size, generator=gen)[: int(torch.randint(0, grp.size, (1,), generator=gen))]] = True
        masks.append(m)
    predicted = total - sum(int(m.sum()) * e for m, e in zip(masks, per_unit))
    compact = g.backend.emit(g, g.zeroed_copy(zip(g.groups, masks)))
    h = gp.trace(compact, (torch.randn(2, 3, 32, 32),), verify=False)
    assert op_traffic(h.ir, h.analysis.labels, h.analysis.comp, h.groups)[0] == pytest.approx(predicted)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_macs_a_step_saves_are_counted_at_the_widths_already_chosen(small_vit, seed):
    """Removing units group after group, the layer MACs each step saves add up to exactly what
    the compact model's layers no longer compute (traced again): a hidden channel saves less
    once heads are gone, and the selection prices it by what it saves then."""
    _, g = small_vit
    model = LatencyModel(graph_layers(g.ir), g.groups, LatencyTable(timed(staircase)))
    gen = torch.Generator().manual_seed(seed)
    removed, saved, masks = [0] * len(g.groups), 0.0, []
    for i, grp in enumerate(g.groups):
        n = int(torch.randint(0, grp.size, (1,), generator=gen))
        saved += model.macs_saved(removed, i, n)
        removed[i] = n
        m = torch.zeros(grp.size, dtype=torch.bool)
        m[:n] = True
        masks.append(m)
    compact = g.backend.emit(g, g.zeroed_copy(zip(g.groups, masks)))
    h = gp.trace(compact, (torch.randn(2, 3, 32, 32),), verify=False)

    def macs(graph) -> float:  # the layers' MACs, each as the analysis counted it
        layers = [layer for layer, _ in graph_layers(graph.ir)]
        assert [layer_macs(layer, *layer.channels) for layer in layers] == [
            graph.analysis.labels.param_macs[layer.weight] for layer in layers]
        return sum(layer_macs(layer, *layer.channels) for layer in layers)
    assert macs(g) - saved == pytest.approx(macs(h))
    hidden = next(i for i, grp in enumerate(g.groups) if grp.kind == "channel" and "mlp" not in grp.name)
    heads = [i for i, grp in enumerate(g.groups) if grp.kind == "head"]
    fewer = [grp.size - 1 if i in heads else 0 for i, grp in enumerate(g.groups)]
    assert model.macs_saved(fewer, hidden, 1) < model.macs_saved([0] * len(g.groups), hidden, 1)


def test_the_dense_time_beyond_the_layers_is_saved_with_the_units_that_carry_it(small_vit):
    """Given the traffic and the measured dense time, the model predicts the dense time, and a
    head saves its layers' time plus its share of the rest; without them, its layers' only."""
    _, g = small_vit
    traffic = op_traffic(g.ir, g.analysis.labels, g.analysis.comp, g.groups)
    bare = LatencyModel(graph_layers(g.ir), g.groups, LatencyTable(timed(staircase)))
    layers = bare.predict([0] * len(g.groups))
    full = LatencyModel(graph_layers(g.ir), g.groups, LatencyTable(timed(staircase)), traffic, dense_ms=1.5 * layers)
    assert full.predict([0] * len(g.groups)) == pytest.approx(1.5 * layers)
    head = next(i for i, grp in enumerate(g.groups) if grp.kind == "head")
    rest = 0.5 * layers * traffic[1][head] / traffic[0]
    assert full.saving([0] * len(g.groups), head, 1) == pytest.approx(bare.saving([0] * len(g.groups), head, 1) + rest)
    removed = [grp.size - 1 for grp in g.groups]
    assert full.predict(removed) - bare.predict(removed) == pytest.approx(
        0.5 * layers * (1 - sum(r * e for r, e in zip(removed, traffic[1])) / traffic[0]))
    # layers timed slower than the whole model (other schedules): no rest to spread
    slow = LatencyModel(graph_layers(g.ir), g.groups, LatencyTable(timed(staircase)), traffic, dense_ms=0.5 * layers)
    assert slow.predict([0] * len(g.groups)) == pytest.approx(layers) and slow.rest_per_unit[head] == 0


def test_an_unreachable_budget_is_a_clear_error(mobilenet):
    _, g = mobilenet
    model, _ = model_for(g)
    whole = lambda masks: 100.0 + model.predict([int(m.sum()) for m in masks])  # noqa: E731
    scores = [torch.ones(grp.size) for grp in g.groups]
    levels = [kept_widths(grp, gp.Target(latency_ms=1.0, multiple=8, min_fraction=0)) for grp in g.groups]
    with pytest.raises(UnprunableTargetError, match="latency budget"):
        meet_latency(model, scores, gp.Target(latency_ms=50.0), levels, whole)


def test_the_table_is_cached_on_disk_and_reused(mobilenet, tmp_path):
    _, g = mobilenet
    path = tmp_path / "table.json"
    first = LatencyTable(timed(staircase), path, "x86")
    LatencyModel(graph_layers(g.ir), g.groups, first)
    again = LatencyTable(lambda requests: pytest.fail("measured again"), path, "x86")
    LatencyModel(graph_layers(g.ir), g.groups, again)
    assert first.measured > 0 and again.measured == 0 and again.entries == first.entries


def test_entries_are_timed_again_where_the_database_learnt_faster_schedules(mobilenet, tmp_path):
    """A cached time is only as good as the schedule it was timed on: an entry whose function
    the database has since recorded a faster schedule for is timed again, in one batch; the
    rest are read from the cache."""
    _, g = mobilenet
    path = tmp_path / "table.json"
    function = lambda layer, cin, cout: f"{layer.kind}{layer.kernel}{cin}x{cout}"  # noqa: E731
    first = LatencyTable(timed(staircase, lambda *r: {function(*r): 2e-4}), path, "x86")
    LatencyModel(graph_layers(g.ir), g.groups, first)
    narrow = [k for k in first.entries if k.endswith("x8")]  # every layer at 8 outputs, made faster since
    improved = {h: 1e-4 for e in (first.entries[k] for k in narrow) for h in e.schedules}
    unchanged = {h: 2e-4 for e in first.entries.values() for h in e.schedules}
    batches = []

    def faster(requests):
        batches.append(requests)
        return [LayerTime(0.5 * staircase(*r), {function(*r): 1e-4}) for r in requests]

    again = LatencyTable(faster, path, "x86", best_known=lambda: {**unchanged, **improved})
    LatencyModel(graph_layers(g.ir), g.groups, again)
    assert len(batches) == 1 and again.measured == again.refreshed == len(narrow) > 0
    assert again.reused == len(first.entries) - len(narrow)
    for k, e in again.entries.items():
        assert e.ms == pytest.approx(first.entries[k].ms * (0.5 if k in narrow else 1.0))
    settled = LatencyTable(lambda requests: pytest.fail("timed again"), path, "x86",
                           best_known=lambda: {**unchanged, **improved})
    LatencyModel(graph_layers(g.ir), g.groups, settled)
    assert settled.reused == len(first.entries)


@pytest.mark.parametrize("field, value, bad", [("latency_ms", 4.5, (0, -1.0, True)),
                                               ("latency", 0.4, (1.0, -0.1, True))])
def test_a_latency_target_is_a_budget_not_a_fraction_of_the_network(field, value, bad):
    """In ms, or as a share of the dense model's time to remove."""
    target = gp.Target(**{field: value}, multiple=8)
    assert target.kind == "latency" and repr(target) == f"Target({field}={value}, multiple=8)"
    assert target.scaled(0.5).progress == 0.5
    with pytest.raises(UnprunableTargetError, match="not a fraction"):
        target.fraction
    for v in bad:
        with pytest.raises(UnprunableTargetError, match=f"{field}="):
            gp.Target(**{field: v})
    with pytest.raises(UnprunableTargetError, match="exactly one"):
        gp.Target(flops=0.5, **{field: value})


def test_a_latency_target_states_its_budget_in_ms():
    assert gp.Target(latency=0.4).budget_ms(10.0) == pytest.approx(6.0)
    assert gp.Target(latency_ms=4.5).budget_ms(10.0) == 4.5
    with pytest.raises(UnprunableTargetError, match="exactly one"):
        gp.Target(latency=0.4, latency_ms=3.0)
    with pytest.raises(UnprunableTargetError, match="not a latency target"):
        gp.Target(flops=0.4).budget_ms(10.0)


@pytest.mark.parametrize("method, share", [("hesso", False), ("dhspg", False), ("hesso", True)])
def test_oto_optimizers_train_to_a_latency_budget(method, share):
    """The OTO optimizers take a latency target as their target: part-way periods choose from
    the table, the whole budget is corrected against the (synthetic) compiled model, and the
    trained model's compact form is within 5% of the budget and equal to the zeroed model."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    g = gp.trace(net, (x,), verify=False)
    model, _ = model_for(g)
    whole = lambda masks: 0.5 + 1.3 * model.predict([int(m.sum()) for m in masks])  # noqa: E731
    target = gp.Target(latency_ms=1.0, multiple=8, min_fraction=0)
    plan = LatencyPlan(model, [kept_widths(grp, target) for grp in g.groups], whole)
    target = (gp.Target(latency=0.4, multiple=8, min_fraction=0) if share
              else gp.Target(latency_ms=0.6 * plan.dense_ms, multiple=8, min_fraction=0))
    budget = target.budget_ms(plan.dense_ms)
    seen: list[tuple[float, float]] = []
    select = plan.select
    plan.select = lambda scores, target, *a, **k: (lambda m: seen.append((target.progress, whole(m))) or m)(
        select(scores, target, *a, **k))
    if method == "hesso":
        opt = gp.HESSO(g, lr=0.01, target=target, latency=plan, pruning_steps=4, pruning_periods=2)
    else:
        opt = gp.DHSPG(g, lr=0.01, target=target, latency=plan, warmup_steps=1, pruning_steps=3)
    y = torch.randn(2, 10)
    for _ in range(opt.window_end + 1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    assert abs(whole(opt.masks) / budget - 1) <= 0.05
    assert plan.run is not None and plan.run.rounds  # the whole budget was measured
    if method == "hesso":  # the first period went part of the way: between the dense model and the budget
        first = next(ms for progress, ms in seen if progress < 1.0)
        assert budget < first < plan.dense_ms
    compact = g.construct_subnet()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), net(x), rtol=1e-4, atol=1e-5)


def test_h2spg_says_it_does_not_take_a_latency_budget(mobilenet):
    _, g = mobilenet
    with pytest.raises(UnprunableTargetError, match="latency budget"):
        gp.H2SPG(g, target=gp.Target(latency_ms=1.0))


@pytest.mark.parametrize("scale", [0.9, 0.95, 1.05, 1.1, 1.2, 1.3])
def test_a_try_at_the_edge_of_the_tolerance_is_not_settled_for(mobilenet, scale):
    """A compiled model timed again measures a few percent apart, so a try 4-5% off the
    budget re-measures outside the tolerance: with rounds left, the correction goes on
    until the measurement is within half of it."""
    _, g = mobilenet
    model, _ = model_for(g)
    whole = lambda masks: 0.3 + scale * model.predict([int(m.sum()) for m in masks])  # noqa: E731
    dense = whole([torch.zeros(grp.size, dtype=torch.bool) for grp in g.groups])
    scores, levels = random_scores_and_widths(g)
    masks, run = meet_latency(model, scores, gp.Target(latency_ms=0.6 * dense), levels, whole, tolerance=0.05, rounds=6)
    assert abs(whole(masks) / (0.6 * dense) - 1) <= 0.025


def test_the_kept_try_is_reported_as_it_was_measured_and_never_timed_again(mobilenet):
    """Timings of one compiled model differ from draw to draw (on CI one compact CNN read
    3.18 ms, then 3.48 ms). When the kept try is not the last, timing it again would report
    a fresh draw of the noise as the kept model's time; the loop reports the kept try's own
    measurement and measures each set of widths once."""
    _, g = mobilenet
    model, _ = model_for(g)
    timed: list[tuple[int, ...]] = []
    noise = [1.04, 0.96, 1.035, 0.965, 1.03, 0.97, 1.2]  # no try within half the tolerance

    def noisy(masks):
        timed.append(tuple(int(m.sum()) for m in masks))
        return (0.3 + model.predict([int(m.sum()) for m in masks])) * noise[len(timed) - 1]

    dense = 0.3 + model.predict([0] * len(g.groups))
    scores, levels = random_scores_and_widths(g)
    masks, run = meet_latency(model, scores, gp.Target(latency_ms=0.6 * dense), levels, noisy, tolerance=0.05, rounds=6)
    assert len(timed) == len(set(timed))  # no widths timed twice
    kept = tuple(int(m.sum()) for m in masks)
    assert run.achieved_ms == run.rounds[timed.index(kept) - 1]["measured_ms"]  # timed[0] is the dense model
    assert abs(run.achieved_ms / (0.6 * dense) - 1) <= 0.05


def test_a_share_of_the_dense_time_is_judged_against_the_dense_time_read_with_each_try(mobilenet):
    """The dense model first timed in a slow minute (1.3x, as right after a tuning run) must
    not set the budget for good: a 40% cut of that reading is a budget the pruning meets by
    removing far less.  The plan reads the dense time anew with each try (a paired timer's
    reference), so the kept model is 60% of the dense model as the machine runs now."""
    _, g = mobilenet
    model, _ = model_for(g)
    true = lambda masks: 0.3 + model.predict([int(m.sum()) for m in masks])  # noqa: E731
    dense = 0.3 + model.predict([0] * len(g.groups))
    speed = [1.3]

    def measure(masks):
        speed[0] = 1.0  # the slow minute is over by the time the compact models are timed
        return true(masks) * speed[0]

    scores, levels = random_scores_and_widths(g)
    plan = LatencyPlan(model, levels, measure, dense_ms=lambda: dense * speed[0])
    assert plan.dense_ms == pytest.approx(1.3 * dense)
    masks = plan.select(scores, gp.Target(latency=0.4))
    assert abs(true(masks) / (0.6 * dense) - 1) <= 0.05
    assert plan.run.budget_ms == pytest.approx(0.6 * dense) and plan.run.dense_ms == pytest.approx(dense)
    assert plan.run.achieved_ms == pytest.approx(true(masks))


def test_each_try_is_read_against_the_dense_time_of_its_own_round(mobilenet):
    """A try timed while the machine ran 10% slow, dense model and try alike, is that share
    of the dense model; the run states it on the last dense time, not as it was read."""
    _, g = mobilenet
    model, _ = model_for(g)
    true = lambda masks: 0.3 + model.predict([int(m.sum()) for m in masks])  # noqa: E731
    dense = 0.3 + model.predict([0] * len(g.groups))
    speeds = iter([1.1, 1.0, 1.0, 1.0, 1.0, 1.0])
    speed = [1.1]

    def measure(masks):
        speed[0] = next(speeds)
        return true(masks) * speed[0]

    scores, levels = random_scores_and_widths(g)
    plan = LatencyPlan(model, levels, measure, dense_ms=lambda: dense * speed[0])
    masks = plan.select(scores, gp.Target(latency=0.4))
    assert all(r["measured_ms"] / r["dense_ms"] <= 1 for r in plan.run.rounds)
    assert plan.run.achieved_share == pytest.approx(true(masks) / dense)
    assert abs(plan.run.achieved_share / 0.6 - 1) <= 0.05


def depthwise_dear(layer, cin: int, cout: int) -> float:
    """:func:`staircase` with depthwise kernels five times slower per multiply-accumulate, so
    the knapsack departs from the FLOPs order."""
    return staircase(layer, cin, cout) * (5.0 if layer.depthwise else 1.0)


def order_tries(g):
    """A plan factory over a table where the two orders choose differently, its synthetic
    compiled model (counting what it times), scores, and the masks each order keeps alone."""
    model, _ = model_for(g, depthwise_dear)
    timings: list[bytes] = []

    def whole(masks):
        timings.append(torch.cat(masks).numpy().tobytes())
        return 0.3 + model.predict([int(m.sum()) for m in masks])

    scores, levels = random_scores_and_widths(g)
    target = gp.Target(latency=0.4, multiple=8, min_fraction=0)  # the floors and multiple of ``levels``

    def plan(order="knapsack"):
        p = LatencyPlan(model, levels, whole)
        p.order = order
        return p
    alone = {order: plan(order).select(scores, target) for order in ORDERS}
    return plan, whole, timings, scores, target, alone


def test_the_flops_order_stops_where_the_table_meets_the_budget(mobilenet):
    """The FLOPs order removes, in every group, its lowest scores on the allowed widths, as
    a FLOPs target does, and stops at the first share the table predicts within budget."""
    _, g = mobilenet
    model, _ = model_for(g, depthwise_dear)
    scores, levels = random_scores_and_widths(g)
    target = gp.Target(latency=0.4, multiple=8, min_fraction=0)
    full = model.predict([0] * len(g.groups))
    masks = select_in_flops_order(model, scores, 0.6 * full, target)
    predicted = model.predict([int(m.sum()) for m in masks])
    assert 0.55 * full <= predicted <= 0.6 * full
    for grp, m, s, allowed in zip(g.groups, masks, scores, levels):
        kept = grp.size - int(m.sum())
        assert kept == grp.size or kept in allowed
        if m.any() and not m.all():
            assert s[m].max() <= s[~m].min()


@pytest.mark.parametrize("preferred", list(ORDERS))
def test_a_judge_keeps_the_order_whose_model_it_prefers(mobilenet, preferred):
    """Given a judge, the whole budget is met under the knapsack and in the FLOPs order,
    each corrected by its own measurements; the masks the judge scores lower are kept, their
    order is what later (partial) budgets select under, and the run says what was compared."""
    _, g = mobilenet
    plan, whole, timings, scores, target, alone = order_tries(g)
    assert not all(torch.equal(a, b) for a, b in zip(*alone.values()))  # the orders disagree here
    key = lambda masks: torch.cat(masks).numpy().tobytes()  # noqa: E731
    loss = {key(masks): 0.0 if order == preferred else 1.0 for order, masks in alone.items()}
    judged = plan()
    timings.clear()
    masks = judged.select(scores, target, judge=lambda m: loss[key(m)])
    assert key(masks) == key(alone[preferred])
    run = judged.run
    assert run.order == judged.order == preferred
    assert run.judged == {p: (0.0 if p == preferred else 1.0) for p in ORDERS}
    assert run.compiled == len(set(timings)) == len(timings)  # every model compiled and timed once
    assert run.achieved_share <= 0.6 * 1.05  # met (the coarse depthwise steps may land below)
    partial = replace(target, progress=0.5)
    assert key(judged.select(scores, partial)) == key(plan(preferred).select(scores, partial))


def test_a_model_both_orders_choose_is_compiled_once():
    """With one group the knapsack and the FLOPs order step through the same widths and stop
    at the same one: the second order's tries are the first's, and nothing is compiled or
    judged twice."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    g = gp.trace(mlp, (torch.randn(8, 16),), verify=False)
    assert len(g.groups) == 1
    model, _ = model_for(g, by_macs)
    timings: list[bytes] = []

    def whole(masks):
        timings.append(torch.cat(masks).numpy().tobytes())
        return 1e-4 + 1.2 * model.predict([int(m.sum()) for m in masks])

    scores, levels = random_scores_and_widths(g)
    plan = LatencyPlan(model, levels, whole)
    timings.clear()
    judged = []
    plan.select(scores, gp.Target(latency=0.4, multiple=8, min_fraction=0), judge=lambda masks: judged.append(1) or 0.0)
    assert len(timings) == len(set(timings)) == len(plan.run.rounds) == plan.run.compiled
    assert len(judged) == 1 and set(plan.run.judged) == set(ORDERS)  # and judged once


@pytest.mark.parametrize("frontend, one_shot", [("torch", False), ("onnx", False), ("torch", True)])
def test_prune_judges_the_model_it_hands_over(monkeypatch, tmp_path, frontend, one_shot):
    """``prune`` with calibration data and a latency target judges each order's masks by
    the drift of the model it would hand over (compensated, added biases and all), on a copy:
    the kept order's judged drift is the drift of the compact model it returns (judging
    on the weights themselves would have edited them twice).  Data given as a generator is
    read once: the judge's batches and the calibration's are the same stream."""
    from graphprune.optim.drift import OutputDrift

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(32, 8, 2, 4, 64, 128, num_classes=10).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero: every output would be 0
    x = torch.randn(2, 3, 32, 32)
    if frontend == "onnx":
        torch.onnx.export(vit, (x,), str(tmp_path / "vit.onnx"), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
        g = gp.trace(str(tmp_path / "vit.onnx"), (x.numpy(),), verify=False)
    else:
        g = gp.trace(vit, (x,), verify=False)
    # batches of the traced size: the TorchScript export bakes the batch into the ViT's reshapes
    data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    reference = OutputDrift(g, data)

    def synthetic(pg, groups, target, codegen="x86", tuning_db=None):
        model = LatencyModel(graph_layers(pg.ir), groups, LatencyTable(timed(staircase)))
        plan = LatencyPlan(model, [kept_widths(grp, target) for grp in groups],
                           lambda masks: 0.1 + model.predict([int(m.sum()) for m in masks]))
        plan.table = LatencyTable(timed(staircase))
        return plan

    monkeypatch.setattr(LatencyPlan, "for_graph", classmethod(lambda cls, *a, **k: synthetic(*a, **k)))
    report = gp.prune(g, "obspa", gp.Target(latency=0.5, multiple=8), data=(b for b in data) if one_shot else data)
    assert report.calibration.samples == sum(len(b) for b in data)
    run = report.latency
    assert set(run.judged) == set(ORDERS) and run.order in ORDERS
    kept = g.construct_subnet()
    err = norm = 0.0
    for batch, ref in zip(reference.inputs, reference.reference):
        out = reference.outputs(kept, batch)
        err += sum(float(((o - r) ** 2).sum()) for o, r in zip(out, ref))
        norm += sum(float((r ** 2).sum()) for r in ref)
    assert err / norm == pytest.approx(run.judged[run.order], rel=1e-5)
    assert min(run.judged.values()) == run.judged[run.order] > 0


@pytest.mark.parametrize("argv, expected", [(["--latency", "0.4"], gp.Target(latency=0.4)),
                                            (["--latency-ms", "3.5"], gp.Target(latency_ms=3.5))])
def test_the_cli_reads_either_latency_target(argv, expected):
    from graphprune.cli import _target, build_parser

    args = build_parser().parse_args(["prune", "model.onnx", *argv])
    assert _target(args) == expected


def test_the_report_states_the_kept_try_not_the_last():
    """The kept try is the closest, not the last (a later try can miss by more)."""
    from graphprune.report import Report

    rounds = [{"layer_budget_ms": 4.0, "predicted_layers_ms": 4.0, "measured_ms": 6.1, "dense_ms": 10.0},
              {"layer_budget_ms": 3.0, "predicted_layers_ms": 3.0, "measured_ms": 5.0, "dense_ms": 10.0}]
    report = Report(source="m", frontend="torch", method="l2", target="Target(latency=0.4)", params_before=10,
                    params_after=5, flops_before=10.0, flops_after=5.0,
                    latency_target=dict(budget_ms=6.0, dense_ms=10.0, rounds=rounds, chosen=0, layers_measured=8,
                                        layers_cached=0, codegen="x86"))
    assert "measured 6.100 ms (+1.7%)" in report.latency_budget_line
    assert "(kept)" in report.to_markdown().split("round 1:")[1].splitlines()[0]


def test_the_report_says_which_order_was_kept_and_why():
    from graphprune.report import Report

    rounds = [{"layer_budget_ms": 3.0, "predicted_layers_ms": 3.0, "measured_ms": 6.0, "dense_ms": 10.0}]
    run = dict(budget_ms=6.0, dense_ms=10.0, rounds=rounds, chosen=0, layers_measured=8, layers_cached=0,
               codegen="x86", order="flops order", judged={"knapsack": 0.761, "flops order": 0.355}, compiled=4)
    report = Report(source="m", frontend="torch", method="obspa", target="Target(latency=0.4)", params_before=10,
                    params_after=5, flops_before=10.0, flops_after=5.0, latency_target=run)
    assert ("kept the flops order selection (output drift on the calibration data 0.355, against knapsack 0.761; "
            "4 models compiled)") in report.latency_budget_line
    alone = Report(source="m", frontend="torch", method="l2", target="Target(latency=0.4)", params_before=10,
                   params_after=5, flops_before=10.0, flops_after=5.0,
                   latency_target=dict(run, order="knapsack", judged={}, compiled=0))
    assert "kept the" not in alone.latency_budget_line
