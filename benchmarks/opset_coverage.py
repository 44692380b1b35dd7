"""Print how much of the core ATen and ai.onnx op sets the registry covers.

    python benchmarks/opset_coverage.py [--opset 23] [--barriers]

Counts ops with a rule, declared barriers (with ``--barriers``, each with its reason) and
unknown ops (which ``tests/ops/test_opset_completeness.py`` fails on).
"""
from __future__ import annotations

import argparse

from graphprune.ops.catalog import ATEN, ONNX
from graphprune.ops.opsets import ONNX_OPSET, coverage
from graphprune.ops.registry import BARRIERS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--opset", type=int, default=ONNX_OPSET)
    ap.add_argument("--barriers", action="store_true", help="list each declared barrier with its reason")
    args = ap.parse_args()
    for cov, table in zip(coverage(args.opset), (ATEN, ONNX)):
        print(cov)
        if args.barriers:
            for op in cov.barriers:
                print(f"  {op}: {BARRIERS[table[op]]}")


if __name__ == "__main__":
    main()
