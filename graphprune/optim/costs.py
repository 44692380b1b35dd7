"""MACs each parameter takes part in, for exact FLOPs budgets.

:func:`graphprune.target.select_units` needs, for every weight that two groups cut
along different dims, the MACs it accounts for (see :class:`graphprune.target.Overlap`).
A graph that knows them exposes ``g.param_macs``; otherwise :class:`MacsProbe` watches
a forward pass of the model's convolutions and linear layers (a weight's MACs are its
element count times the output positions it is applied at): right away on the graph's
example inputs when it has them (``g.example``, the shape ``total_flops`` was counted
at), else on the user's next training forward, counted per sample.
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
        self._macs: dict[str, float] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        example = getattr(g, "example", None)
        self._per_sample = example is None
        if getattr(g, "model", None) is None:
            return
        names = {id(p): n for n, p in g.params.items()}
        for module in g.model.modules():
            if isinstance(module, _WEIGHTED) and id(module.weight) in names:
                self._handles.append(module.register_forward_hook(self._hook(names[id(module.weight)])))
        if not self._handles:
            return
        self._handles.append(g.model.register_forward_hook(lambda *_: self.close()))
        if example is not None:
            args, kwargs = example
            flags = {m: m.training for m in g.model.modules()}
            g.model.eval()
            try:
                with torch.no_grad():
                    g.model(*args, **kwargs)
            finally:
                for m, training in flags.items():
                    m.training = training
                self.close()

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            channel_dim = -1 if isinstance(module, nn.Linear) else 1
            batched = output.dim() > (1 if isinstance(module, nn.Linear) else module.weight.dim() - 1)
            batch = output.shape[0] if batched and self._per_sample else 1
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
        """MACs per weight name, or None if no forward pass was seen."""
        return dict(self._macs) if self._macs else None

