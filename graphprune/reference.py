"""The latency a user already has: onnxruntime on the same compact ONNX, at the same thread count.

A compiled model's latency means little alone: the compile report sets it beside this
reference, so a build slower than the runtime the user could deploy instead says so.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import numpy as np
import onnx


def onnxruntime_latency(model: onnx.ModelProto, inputs: Sequence[Any], threads: int, *, repeat: int = 7,
                        min_repeat_ms: float = 50.0) -> dict[str, Any]:
    """Median latency (ms) of onnxruntime's CPU provider running ``model`` on ``inputs``.

    Timed like TVM's ``time_evaluator``: after a warm-up run, ``repeat`` repeats, each the mean
    of as many runs as fill ``min_repeat_ms``; the median over repeats is reported.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {i.name: np.asarray(_numpy(x)) for i, x in zip(session.get_inputs(), inputs)}
    session.run(None, feed)
    start = time.perf_counter()
    session.run(None, feed)
    number = max(1, int(min_repeat_ms / 1e3 / max(time.perf_counter() - start, 1e-6)))
    means = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            session.run(None, feed)
        means.append((time.perf_counter() - start) / number * 1e3)
    return {"runtime": "onnxruntime", "median_ms": statistics.median(means), "repeat": repeat, "threads": threads}


def _numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x
