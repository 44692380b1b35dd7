"""Pure passes from the IR, the analysis and the op registry to a :class:`~.plan.CompactPlan`
(installed as ``graphprune.passes``): kept indices and shapes (``shrink``), operators a zeroed
group leaves without input (``erase``), batch norms folded into their layer (``fold_bn``), and
the plan that gathers them (``plan``). :mod:`graphprune.lower` applies a plan to a frontend's graph."""
