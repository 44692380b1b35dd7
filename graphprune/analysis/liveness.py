"""Which activations die once units go: the one definition of a *dead* value.

A value is **empty** when every entry belongs to a removed unit (a whole group zeroed
along its channel axis): it carries nothing any kept entry depends on.  A value is
**dead** when it is empty or computed only from dead values and constants (parameters,
buffers, constants and what is made from them alone), so it no longer depends on the
model's inputs: a residual branch whose first conv lost every filter is dead down to
the residual add.  :meth:`PrunableGraph.stays_connected` asks whether an output is
dead; the erasure pass (``graphprune.passes.erase``) removes the dead values' operators.

>>> live = Liveness(pg.ir, pg.labels, pg.comp)
>>> dead = live.dead(live.empty(removed))   # removed: one bool per component
"""
from __future__ import annotations

import torch

from ..ir.graph import Graph
from .labels import Labels


class Liveness:
    """Per activation, the components of its entries (precomputed once), so that finding
    the empty values for a set of removed components is one vectorised step: H2SPG asks
    for every candidate it considers."""

    def __init__(self, graph: Graph, labels: Labels, comp: torch.Tensor) -> None:
        self.graph = graph
        names, spans = [], []
        for name, f in labels.fields.items():
            if f is not None and graph.values[name].kind == "act" and bool((f.labels >= 0).all()):
                names.append(name)
                spans.append(comp[f.labels.reshape(-1)].unique())
        self._names = names
        self._comps = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        self._owner = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor([len(s) for s in spans],
                                                                                    dtype=torch.long))

    def empty(self, removed: torch.Tensor) -> set[str]:
        """Activations all of whose entries belong to ``removed`` components (bool per id)."""
        kept = torch.zeros(len(self._names), dtype=torch.long)
        kept.index_add_(0, self._owner, (~removed[self._comps]).long())
        return {self._names[i] for i in torch.nonzero(kept == 0).flatten().tolist()}

    def dead(self, empty: set[str]) -> set[str]:
        """``empty`` plus every activation computed only from dead values and constants."""
        if not empty:
            return set()
        dead = set(empty)
        fixed = {n for n, v in self.graph.values.items() if v.fixed}
        for node in self.graph.nodes:
            ins = node.inputs
            if all(i in dead or i in fixed for i in ins):
                (dead if any(i in dead for i in ins) else fixed).update(node.outputs)
        return dead
