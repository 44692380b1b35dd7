"""Dependency analysis: channel labels flow through the op registry into zero-invariant groups.

>>> analysis = analyse(ir)        # an immutable Analysis(ir, labels, comp, groups)
"""
from .result import Analysis, analyse, same_groups, unit_map

__all__ = ["Analysis", "analyse", "same_groups", "unit_map"]
