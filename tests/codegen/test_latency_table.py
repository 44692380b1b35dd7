"""The latency benchmark's derived numbers (``benchmarks/latency.py``): pruned speedup over the
FLOPs ratio, tuned TVM over onnxruntime, and the issue's two checks, on made-up timings.

These are the cells the issue is decided by; a ratio inverted by mistake would read as
a pass.  Nothing is built or timed here.
"""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from tests.helpers import load_benchmark

latency = load_benchmark("latency")
Variant = latency.Variant
RUNTIMES = ["onnxruntime", "tvm-tuned"]


def pair(model: str, dense_ms: dict[str, float], pruned_ms: dict[str, float], threads: int = 1) -> tuple:
    """A model whose pruned form has half the MACs, timed at ``threads``."""
    return (Variant(model, "dense", 2e9, "", ms={str(threads): dense_ms}),
            Variant(model, "pruned", 1e9, "", ms={str(threads): pruned_ms}))


def test_speedup_per_flops_is_one_when_latency_halves_with_flops():
    dense, pruned = pair("m", {"onnxruntime": 10.0}, {"onnxruntime": 5.0})
    assert latency.speedup_per_flops(dense, pruned, "onnxruntime", 1) == pytest.approx(1.0)
    dense, pruned = pair("m", {"onnxruntime": 10.0}, {"onnxruntime": 8.0})
    assert latency.speedup_per_flops(dense, pruned, "onnxruntime", 1) == pytest.approx(0.625)
    assert latency.speedup_per_flops(dense, pruned, "tvm-tuned", 1) is None  # not timed
    assert latency.speedup_per_flops(dense, pruned, "onnxruntime", 2) is None  # not at that thread count


def test_done_when_counts_models_that_meet_each_check():
    pairs = [pair("fast", {"onnxruntime": 10.0, "tvm-tuned": 9.0}, {"onnxruntime": 5.0, "tvm-tuned": 4.5}),
             pair("slow", {"onnxruntime": 10.0, "tvm-tuned": 20.0}, {"onnxruntime": 9.0, "tvm-tuned": 12.0})]
    lines = latency.done_when(pairs, RUNTIMES, 1)
    assert lines[0].startswith("- (a)") and "1 of 2 models (fast)" in lines[0]
    assert "onnxruntime" in lines[1] and "1 of 2 models (fast)" in lines[1]   # slow: 1.11x of 2x = 0.56
    assert "tvm-tuned" in lines[2] and "2 of 2 models (fast, slow)" in lines[2]  # slow: 1.67x of 2x = 0.83


def test_model_rows_show_both_forms_and_the_ratios():
    dense, pruned = pair("m", {"onnxruntime": 10.0, "tvm-tuned": 8.0}, {"onnxruntime": 5.0})
    rows = latency.model_rows(dense, pruned, RUNTIMES, 1)
    assert rows[0] == "| m | dense | 2,000.0 | 10.00 | 8.00 | 0.80 |"
    assert rows[1] == "| m | pruned | 1,000.0 | 5.00 | n/a | n/a |"
    assert rows[2] == "| m | speedup / FLOPs ratio (2.00x) | | 1.00 | n/a | |"


def test_merge_keeps_the_rows_of_models_not_remeasured(tmp_path):
    """``--merge``: a re-run of one model keeps the other rows, and the header can say which run
    measured them (files written before runs were recorded hold only sys.argv)."""
    vit = pair("vit", {"onnxruntime": 2.0}, {"onnxruntime": 1.0})
    bert = pair("bert", {"onnxruntime": 8.0}, {"onnxruntime": 5.0})
    saved = {"command": ["benchmarks/latency.py", "--models", "vit,bert"], "threads": 1,
             "models": [{**asdict(v), "ms": v.ms["1"]} for v in (*vit, *bert)]}
    (tmp_path / "latency.json").write_text(json.dumps(saved))
    kept, runs = latency.earlier_rows(tmp_path, {"vit"})
    assert [(dense.model, dense.form, pruned.form) for dense, pruned in kept] == [("bert", "dense", "pruned")]
    assert kept[0][1].ms == {"1": {"onnxruntime": 5.0}}  # a file of one thread count: its cells keyed by it
    assert runs == [{"command": "python benchmarks/latency.py --models vit,bert", "models": ["bert"]}]
    assert latency.earlier_rows(tmp_path / "none", {"vit"}) == ([], [])
    assert [p[0].model for p in latency.in_model_order([*kept, vit])] == ["vit", "bert"]  # the MODELS order


def test_reuse_table_says_the_tuning_time_the_shared_database_saved():
    tuning = {"tasks": 20, "trials_run": 40, "seconds": 100, "tasks_reused": 12}
    shared = Variant("deit_tiny", "shared database", 0.0, "", ms={"1": {"tvm-tuned": 2.0, "onnxruntime": 3.0}},
                     tuning={**tuning, "tasks_reused": 12})
    empty = Variant("deit_tiny", "empty database", 0.0, "", ms={"1": {"tvm-tuned": 2.2}},
                    tuning={**tuning, "seconds": 400, "tasks_reused": 0})
    args = type("Args", (), {"thread_counts": [1], "models": "vit,bert", "reuse_trials": 16, "rounds": 3})()
    lines = latency.reuse_lines(args, [shared, empty])
    assert "| shared database | 20 | 12 | 40 | 100 | 2.00 | 3.00 |" in lines
    assert "| empty database | 20 | 0 | 40 | 400 | 2.20 | 3.00 |" in lines  # onnxruntime: the same model's
    assert lines[-1].endswith("tuning 100 s instead of 400 s: 300 s saved (75%)")
