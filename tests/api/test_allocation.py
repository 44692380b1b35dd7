"""Issue 19's allocation guards on real models: a default ``gp.compile`` or ``graphprune prune``
never leaves a group below its floor (a quarter of its width, two channels) or off the
hardware multiple (8 channels without a codegen target), and the report flags a group
that is.

The widths are checked in *channels*, from the shapes of the parameters a group's unit
owns, so a head group is held to the multiple in channels (4 heads of 8 are always on it).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import onnx
import pytest
import torch

import graphprune as gp
from graphprune.report import LayerWidth, Report
from graphprune.target import PORTABLE_MULTIPLE
from tests.cli.conftest import run_main

EXPORTERS = Path(__file__).resolve().parents[1] / "data" / "exporters"


def _lanes(group) -> int:
    """Channels one unit owns: rows of its producer (output) slices."""
    return min(s.index.shape[1] for s in group.slices if not s.is_block)


def _check_widths(groups, widths, multiple: int = PORTABLE_MULTIPLE) -> int:
    """Every cut group is on the multiple and at or above the floor; returns how many were cut."""
    assert len(groups) == len(widths)
    cut = 0
    for grp, w in zip(groups, widths):
        assert w.before == grp.size
        if w.after == w.before:
            continue
        cut += 1
        channels = w.after * _lanes(grp)
        assert channels % multiple == 0, f"{w.group}: {w.before} -> {w.after} units of {_lanes(grp)} channels"
        assert w.after >= math.ceil(0.25 * w.before) and channels >= 2, f"{w.group}: {w.before} -> {w.after}"
        assert not w.flags
    return cut


def _resnet18():
    from torchvision.models import resnet18
    return resnet18(num_classes=10), (torch.randn(1, 3, 32, 32),)


def _mobilenet_v2():
    from torchvision.models import mobilenet_v2
    return mobilenet_v2(num_classes=10), (torch.randn(1, 3, 32, 32),)


def _bert():
    pytest.importorskip("transformers")
    from tests.analysis.hf_models import bert_classifier
    return bert_classifier()


@pytest.mark.parametrize("build", [pytest.param(_resnet18, marks=pytest.mark.slow),  # 30-90 s each
                                   pytest.param(_mobilenet_v2, marks=pytest.mark.slow), _bert],
                         ids=["resnet18", "mobilenet_v2", "bert"])
def test_default_compile_keeps_floor_and_multiple(build):
    torch.manual_seed(0)
    model, example = build()
    with torch.no_grad():  # trained-like spread of scales, so the global ranking has layers to collapse
        for p in model.parameters():
            p.mul_(torch.empty(()).log_normal_(0, 1.0))
    result = gp.compile(model.eval(), example)
    assert result.report.flops_removed >= 0.49
    assert _check_widths(result.graph.groups, result.report.widths) > 0
    assert not result.report.flagged


@pytest.mark.parametrize("name, shapes", [("paddle2onnx_cnn.onnx", ["x=1x3x32x32"]),
                                          ("optimum_bert.onnx", [f"{n}=1x16" for n in
                                                                 ("input_ids", "attention_mask", "token_type_ids")])])
def test_default_cli_prune_keeps_floor_and_multiple(tmp_path, capsys, name, shapes):
    """``graphprune prune`` without --multiple: 8-channel widths in the written file itself."""
    out = tmp_path / "small.onnx"
    code, stdout, err = run_main(capsys, "prune", EXPORTERS / name, "-o", out, "--flops", "0.3", "--json",
                                 *[a for s in shapes for a in ("--input-shape", s)])
    assert code == 0, err
    report = Report.from_dict(json.loads(stdout)["report"])
    assert report.flops_removed >= 0.29 and not report.flagged
    assert report.target == "Target(flops=0.3, multiple=8)"
    before = {i.name: list(i.dims) for i in onnx.load(EXPORTERS / name).graph.initializer}
    after = {i.name: list(i.dims) for i in onnx.load(out).graph.initializer}
    changed = [(b, after[n]) for n, b in before.items() if n in after and after[n] != b]
    assert changed
    for b, a in changed:  # every cut dimension of every weight: on the multiple, at or above a quarter
        for x, y in zip(b, a):
            assert y == x or (y % PORTABLE_MULTIPLE == 0 and y >= x / 4), (b, a)


def test_explicit_multiple_one_and_no_floor_are_honoured(cnn, example):
    """``multiple=1, min_fraction=0`` is still the plain global ranking, and such widths are flagged
    against the defaults' floor and multiple when a report holds them."""
    result = gp.compile(cnn, example, target=gp.Target(flops=0.5, multiple=1, min_fraction=0))
    assert result.report.target == "Target(flops=0.5, multiple=1, min_fraction=0)"
    assert all(w.multiple == 1 and w.floor == 1 for w in result.report.widths)
    collapsed = dataclasses.replace(result.report, widths=[LayerWidth("stem", "channel", 16, 1, 4, 8),
                                                           LayerWidth("b1", "channel", 64, 20, 16, 8),
                                                           LayerWidth("b2", "channel", 6, 6, 6, 8)])
    assert [w.flags for w in collapsed.widths] == [["below floor 4", "off multiple 8"], ["off multiple 8"], []]
    assert "**below floor 4**" in collapsed.to_markdown() and "2 groups cut below" in collapsed.summary()
    assert Report.from_dict(json.loads(collapsed.to_json())).widths == collapsed.widths
