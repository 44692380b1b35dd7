"""Shapes and indices of the compact model once a set of units is removed.

:class:`Shrink` answers, for every value and parameter, which indices survive: the
queries the op rules compute their rewrites from (reshape sizes, split sizes, slice
bounds, conv groups) and the plan takes the parameters' kept indices from.  It only
reads the analysis.  Kept sets are checked to be rectangles: anything else is a bug
and raises instead of emitting a wrong model.
"""
from __future__ import annotations

import torch

from graphprune.analysis.grouping import param_dim_labels
from graphprune.analysis.labels import Labels
from graphprune.errors import UnprunableTargetError, ZeroInvarianceError


class Shrink:
    def __init__(self, lab: Labels, comp: torch.Tensor, removed_units: torch.Tensor) -> None:
        """``removed_units``: component ids to remove."""
        self.lab, self.graph, self.comp = lab, lab.graph, comp
        self.removed = torch.zeros(int(comp.max()) + 1, dtype=torch.bool)  # per component
        self.removed[removed_units] = True
        self.removed_atom = self.removed[comp]
        self._param_labels = param_dim_labels(lab, comp)
        self._shapes: dict[str, tuple[int, ...]] = {}

    def restoring(self, units: torch.Tensor) -> "Shrink":
        """The same removal with ``units`` (component ids) kept after all: how the erasure
        pass keeps one zero unit of a group whose operators cannot be erased."""
        removed = self.removed.clone()
        removed[units] = False
        return Shrink(self.lab, self.comp, torch.nonzero(removed).flatten())

    # ---- values --------------------------------------------------------------------
    def kept_mask(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels < 0) | ~self.removed_atom[labels.clamp(min=0)]

    def old_shape(self, name: str) -> tuple[int, ...]:
        return self.graph.values[name].shape

    def kept(self, name: str, axis: int) -> torch.Tensor | None:
        """Boolean mask of surviving indices along ``axis`` (None: all survive)."""
        f = self.lab.fields.get(name)
        axis = axis % max(1, len(self.old_shape(name)))
        view = self.lab.views.get(name)
        if view is not None:
            return self._param_kept(view.param, view.dims[axis])
        if f is None or axis not in f.axes:
            return None
        k = self.kept_mask(f.labels)
        j = f.axes.index(axis)
        mask = k.movedim(j, 0).reshape(k.shape[j], -1).any(dim=1)
        return None if bool(mask.all()) else mask

    def new_shape(self, name: str) -> tuple[int, ...]:
        if name in self._shapes:
            return self._shapes[name]
        shape = list(self.old_shape(name))
        f = self.lab.fields.get(name)
        view = self.lab.views.get(name)
        if view is not None:  # a parameter's view keeps what the parameter keeps, dim by dim
            for a, d in enumerate(view.dims):
                kept = self._param_kept(view.param, d)
                if kept is not None:
                    shape[a] = int(kept.sum())
        if f is not None:
            k = self.kept_mask(f.labels)
            masks = []
            for j, a in enumerate(f.axes):
                m = k.movedim(j, 0).reshape(k.shape[j], -1).any(dim=1)
                masks.append(m)
                shape[a] = int(m.sum())
                if shape[a] == 0:
                    raise UnprunableTargetError(
                        f"removing these units empties axis {a} of {name}", node=name,
                        hint="keep at least one unit of the groups feeding this value")
            prod = masks[0]
            for m in masks[1:]:
                prod = prod.unsqueeze(-1) & m
            if not torch.equal(prod.reshape(k.shape), k):
                raise ZeroInvarianceError(f"surviving entries of {name} are not a rectangle",
                                          node=name, hint="this is a graphprune bug; please report it")
        self._shapes[name] = tuple(shape)
        return self._shapes[name]

    # ---- parameters ------------------------------------------------------------------
    def _param_kept(self, param: str, dim: int | None) -> torch.Tensor | None:
        """Boolean mask of the surviving indices of ``param`` along ``dim`` (None: all)."""
        labels = self._param_labels.get((param, dim)) if dim is not None else None
        if labels is None:
            return None
        keep = self.kept_mask(labels)
        return None if bool(keep.all()) else keep

    def param_indices(self) -> dict[str, dict[int, torch.Tensor]]:
        """Fixed value -> dim -> LongTensor of surviving indices, for the dims that shrink."""
        out: dict[str, dict[int, torch.Tensor]] = {}
        for (p, d), labels in self._param_labels.items():
            keep = self.kept_mask(labels)
            if not bool(keep.all()):
                out.setdefault(p, {})[d] = torch.nonzero(keep).flatten()
        return out
