"""Importing graphprune changes no global state: matplotlib's backend, logging, warning filters, torch.

Each check runs in a fresh interpreter: the third-party libraries graphprune builds on are
imported first (their own import-time effects are theirs), the state is read, graphprune's
modules are imported, and the state is read again.
"""
import json
import subprocess
import sys

import pytest

_PROBE = r'''
import json, logging, sys, warnings
import numpy, scipy, networkx, onnx, onnxruntime, torch, sklearn, tqdm, matplotlib
{extra_deps}

def state():
    root = logging.getLogger()
    loggers = {{name: (lg.level, lg.propagate, len(lg.handlers))
               for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}}
    return {{
        "backend": matplotlib.get_backend() if "matplotlib.pyplot" in sys.modules else "pyplot not imported",
        "pyplot_imported": "matplotlib.pyplot" in sys.modules,
        "root": [root.level, [type(h).__name__ for h in root.handlers]],
        "levels": {{k: v for k, v in loggers.items() if v != (0, True, 0)}},
        "warning_filters": [repr(f) for f in warnings.filters],
        "torch": [str(torch.get_default_dtype()), torch.get_num_threads(), torch.is_grad_enabled(),
                  torch.are_deterministic_algorithms_enabled(), torch.is_anomaly_enabled(),
                  torch.get_float32_matmul_precision(), torch.random.get_rng_state().sum().item()],
        "numpy_rng": int(numpy.random.get_state()[1].sum()),
    }}

before = state()
import {modules}
after = state()
print(json.dumps({{"before": before, "after": after}}))
'''


def _probe(modules: str, extra_deps: str = "") -> dict:
    code = _PROBE.format(modules=modules, extra_deps=extra_deps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_graphprune_changes_no_global_state():
    seen = _probe("graphprune, graphprune.passes, graphprune.cli, graphprune.report, graphprune.optim.plots")
    assert seen["after"] == seen["before"]
    assert not seen["after"]["pyplot_imported"]


def test_import_graphprune_codegen_changes_no_global_state():
    pytest.importorskip("tvm")
    seen = _probe("graphprune.codegen, graphprune.codegen.tuning, graphprune.codegen.schedules",
                  extra_deps="import tvm, tvm.relax, tvm.s_tir.meta_schedule")
    assert seen["after"] == seen["before"]
