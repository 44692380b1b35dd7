"""Reports round-trip through JSON and render; atomic writes never leave partial files."""
from __future__ import annotations

import json
import os

import pytest

from graphprune.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from graphprune.report import LayerWidth, Report, macs


def report(**extra) -> Report:
    return Report(source="Net", frontend="torch", method="hesso", target="Target(flops=0.5)",
                  params_before=1000, params_after=400, flops_before=2e6, flops_after=9e5,
                  widths=[LayerWidth("conv1", "channel", 16, 8), LayerWidth("attn", "head", 4, 3)],
                  barriers=[{"node": "topk", "op": "topk", "module": "gate", "reason": "no rule"}],
                  history=[{"step": 5, "group_sparsity": 0.1, "params_reduction": 0.2, "flops_reduction": 0.3,
                            "loss": 1.5}], accuracy_curve=[(5, 0.5), (10, 0.75)], **extra)


def test_json_round_trip_and_derived_fractions():
    r = report(accuracy_before=0.9, accuracy_after=0.88, accuracy_on="eval_data", verify_error=float("nan"))
    data = json.loads(r.to_json())
    assert data["params_removed"] == pytest.approx(0.6) and data["flops_removed"] == pytest.approx(0.55)
    assert data["verify_error"] is None  # JSON has no NaN
    back = Report.from_dict(data)
    assert back.widths == r.widths and back.accuracy_curve == r.accuracy_curve


def test_markdown_names_widths_barriers_and_accuracy():
    text = report(accuracy_before=0.9, accuracy_after=0.88, accuracy_on="eval_data").to_markdown()
    assert "| conv1 | channel | 16 | 8 |" in text
    assert "`topk` [topk] gate: no rule" in text
    assert "| accuracy (eval_data) | 0.9000 | 0.8800 | -0.0200 |" in text
    assert "| MACs | 2M | 900K | 55.0% |" in text


def test_plots_are_pngs_and_tuning_curve_appears_with_tuning():
    tuning = {"curve": [{"trial": 1, "run_ms": 2.0, "model_estimate_ms": None},
                        {"trial": 2, "run_ms": 1.0, "model_estimate_ms": 1.0}]}
    plots = report(codegen="x86", tuning=tuning).plots()
    assert set(plots) == {"widths.png", "training.png", "accuracy.png", "tuning.png"}
    assert all(data.startswith(b"\x89PNG") for data in plots.values())


def test_write_puts_every_file_in_place(tmp_path):
    paths = report().write(tmp_path)
    assert sorted(p.name for p in paths) == sorted(os.listdir(tmp_path))
    assert {"report.md", "report.json", "widths.png"} <= set(os.listdir(tmp_path))


def test_macs_units():
    assert [macs(n) for n in (512, 3.7e4, 3.7e7, 1.82e9)] == ["512", "37K", "37M", "1.82G"]


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half a mod")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_temporary_name_keeps_the_suffix(tmp_path):
    with atomic_path(tmp_path / "model.pt2") as tmp:
        assert tmp.suffix == ".pt2" and tmp.name.startswith(".model.pt2.") and tmp.parent == tmp_path
        tmp.write_text("x")


def test_inspect_page_draws_every_node_and_colours_groups(cnn, example):
    import re
    import xml.etree.ElementTree as ET

    from graphprune.inspection import inspect_data, inspect_html
    from graphprune.trace import trace

    g = trace(cnn, example)
    page = inspect_html(g)
    svg = ET.fromstring(re.search(r"<svg.*?</svg>", page, re.S).group(0))
    boxes = svg.findall(".//{http://www.w3.org/2000/svg}rect")
    assert len(boxes) == len(g.ir.nodes)
    coloured = {b.get("fill") for b in boxes} - {"#f0f0f0"}
    assert len(coloured) == len(g.groups) == 2
    data = inspect_data(g)
    assert [grp["size"] for grp in data["groups"]] == [8, 16]
    assert json.loads(json.dumps(data)) == data


def test_tuning_line_counts_failed_trials_with_the_first_error():
    tuning = {"tasks_total": 3, "tasks_tuned": ["a", "b"], "tasks_reused": ["c"], "work_dir": "db", "trials_run": 12,
              "trials_failed": 2, "failures": ["RPCSessionTimeoutError: session closed", "ValueError: bad split"]}
    text = report(codegen="x86", tuning=tuning).to_markdown()
    assert ("- tuning: 3 tasks, 2 tuned now, 1 reused from db, 12 trials, 2 failed "
            "(first error: RPCSessionTimeoutError: session closed)") in text
    assert ", 0 failed" not in report(codegen="x86", tuning={**tuning, "trials_failed": 0}).to_markdown()
