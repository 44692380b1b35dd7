"""MACs each parameter takes part in, for exact FLOPs budgets.

:func:`graphprune.target.select_units` needs, for every weight that two groups cut
along different dims, the MACs it accounts for (see :class:`graphprune.target.Overlap`).
A graph that knows them exposes ``g.param_macs``; otherwise :class:`MacsProbe` watches
the next forward pass of the model's convolutions and linear layers (a weight's MACs
are its element count times the output positions it is applied at) and scales the
result so the groups' first-order FLOPs agree with the graph's own ``flops_per_unit``
(which also fixes the batch size the graph counted at).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class MacsProbe:
    """Records per-parameter MACs on the model's next forward, then detaches itself.

    >>> probe = MacsProbe(g)          # before the training loop
    >>> model(x)                      # the user's own forward
    >>> probe.result                  # {"conv2.weight": 73728.0, ...} or None if unseen
    """

    def __init__(self, g: Any) -> None:
        self._graph = g
        self._macs: dict[str, float] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        names = {id(p): n for n, p in g.params.items()}
        for module in g.model.modules():
            if isinstance(module, _WEIGHTED) and id(module.weight) in names:
                self._handles.append(module.register_forward_hook(self._hook(names[id(module.weight)])))
        if self._handles:
            self._handles.append(g.model.register_forward_hook(lambda *_: self.close()))

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            channel_dim = -1 if isinstance(module, nn.Linear) else 1
            batched = output.dim() > (1 if isinstance(module, nn.Linear) else module.weight.dim() - 1)
            batch = output.shape[0] if batched else 1
            positions = output.numel() / (batch * output.shape[channel_dim])
            self._macs[name] = self._macs.get(name, 0.0) + float(module.weight.numel() * positions)
        return record

    def close(self) -> None:
        """Remove the hooks (after the first whole forward pass)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def result(self) -> dict[str, float] | None:
        """The calibrated MACs, or None if no forward pass was seen."""
        if not self._macs:
            return None
        return calibrate(self._graph, self._macs)


def calibrate(g: Any, macs: dict[str, float]) -> dict[str, float]:
    """Scale ``macs`` so the groups' first-order FLOPs they imply match ``flops_per_unit``.

    Only slices of weights we measured count; the scale absorbs the batch size and any
    convention difference between this estimate and the graph's FLOPs counter.
    """
    ours = theirs = 0.0
    for grp in g.groups:
        measured = [s for s in grp.slices if s.param in macs]
        if not measured or grp.flops_per_unit <= 0:
            continue
        params = g.params
        ours += grp.size * sum(macs[s.param] * s.index.shape[1] / params[s.param].shape[s.dim] for s in measured)
        theirs += grp.size * grp.flops_per_unit
    scale = theirs / ours if ours > 0 and theirs > 0 else 1.0
    return {n: m * scale for n, m in macs.items()}
