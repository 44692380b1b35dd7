"""Zeroing groups' units in the weights themselves for a check, and putting them back.

A copy of the weights a check zeroes, handed to the check in their place, is a second
model when the groups span every weight (a transformer's hidden-column group slices
every matrix): Phi-3-mini's check needed 2.7 times its 7 GiB of bf16 weights that way.
Here each touched weight is saved once, before anything is zeroed, and written back
after; past ``spill_above`` bytes the saved weights go to a temporary folder (written
with ``write``, they sit in the page cache, not in the process), so a check needs the
weights plus the compact model it builds.  Saving whole weights, not the zeroed slices,
keeps a small model's check a memory copy (gathering a slice's columns took longer than
the forward on ResNet-50), and tensors that share storage (a tied embedding and LM head)
simply get their one original back.
"""
from __future__ import annotations

import os
import tempfile
from types import TracebackType
from typing import Iterable

import torch

from .analysis.groups import Group


class ZeroedInPlace:
    """``with ZeroedInPlace(params, masks) as tensors:`` -- ``params`` with each group's
    masked units zeroed; on leaving (also on an error) every value is put back, bit for
    bit.  ``tensors`` is ``params`` itself: nothing else may read those weights meanwhile."""

    def __init__(self, params: dict[str, torch.Tensor], masks: Iterable[tuple[Group, torch.Tensor]],
                 spill_above: int = 1 << 30) -> None:
        self.params = params
        self.masks = [(g, m) for g, m in masks if m.any()]
        self.spill_above = spill_above
        self._saved: dict[str, torch.Tensor | str] = {}  # a weight's values, or the file holding them
        self._folder: tempfile.TemporaryDirectory | None = None

    @property
    def spilled(self) -> bool:
        """Whether some saved weights went to disk (over ``spill_above``)."""
        return self._folder is not None

    def __enter__(self) -> dict[str, torch.Tensor]:
        try:
            kept = 0
            for name in dict.fromkeys(s.param for g, _ in self.masks for s in g.slices):
                t = self.params[name].detach()
                kept += t.numel() * t.element_size()
                if kept <= self.spill_above:
                    self._saved[name] = t.clone()
                    continue
                if self._folder is None:
                    self._folder = tempfile.TemporaryDirectory(prefix="graphprune-verify-")
                path = os.path.join(self._folder.name, f"{len(self._saved)}.pt")
                torch.save(t.cpu(), path)
                self._saved[name] = path
            for g, m in self.masks:
                g.scatter_(self.params, m)
        except BaseException:
            self._restore()
            raise
        return self.params

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        try:
            with torch.no_grad():
                for name, saved in self._saved.items():
                    p = self.params[name]
                    p.copy_(saved if isinstance(saved, torch.Tensor) else torch.load(saved))
        finally:
            self._saved = {}
            if self._folder is not None:
                self._folder.cleanup()
                self._folder = None
