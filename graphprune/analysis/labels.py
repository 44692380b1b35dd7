"""Channel labels: the state the op rules read and write while the graph is analysed.

Every prunable index (a conv filter, a linear output feature, an element of a free
parameter) is an *atom*.  A value's :class:`Field` says which atom each element belongs
to along the axes where atoms vary; elements of one atom are removed together.  Rules
couple atoms (``union``), forbid their removal (``pin``) and give parameter axes their
labels (``param_axis``).  Atom 0 is the pin: anything connected to it stays.

Rules also record which values are *zero where removed* (:meth:`Labels.is_zero`): the
entries that removed units take are exactly zero in the zeroed model.  A reduction
over a prunable axis (a layer norm's statistics, a sum) is exact on the compact model
only then, with the original count as divisor.

Data-movement ops need no hand-written index maps: their rule *runs the op on label
tensors* (see :meth:`Labels.run_on_labels`), so concat offsets, channel shuffles, pixel
shuffles, flatten-into-linear and head reshapes come out exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..ir.graph import Graph, Node

PIN = 0


@dataclass
class Field:
    """``labels[i_0, .., i_k]`` is the atom of the elements at those indices of ``axes``."""

    axes: tuple[int, ...]
    labels: torch.Tensor  # int64, shape = value.shape[axes]


@dataclass
class Barrier:
    """An op whose channels were kept because its semantics are unknown or unprunable."""

    node: str
    op: str
    module: str
    reason: str


@dataclass(eq=False)
class Deferred:
    """A coupling decided once units are known (see :meth:`Labels.union_unless_whole`).
    Compared by identity: settling removes one from a list, and field-wise equality would
    compare label tensors of other shapes (XCiT's cross-covariance attention crashed)."""

    a: torch.Tensor
    b: torch.Tensor
    axes: tuple[int, ...]
    pinned: bool = False


@dataclass(frozen=True)
class ParamView:
    """An activation that is a parameter seen through broadcasts and axis moves
    (``table.unsqueeze(0).expand(B, -1, -1)``): its axis ``i`` indexes the parameter's dim
    ``dims[i]`` (None: a broadcast axis).  Its compact shape follows the parameter's kept
    indices (:class:`graphprune.passes.shrink.Shrink`), so a rule that uses it as a weight
    can slice two of the parameter's dims, which a field (one atom per element, pruned
    along one axis) cannot express."""

    param: str
    dims: tuple[int | None, ...]


@dataclass
class Labels:
    graph: Graph
    n_atoms: int = 1
    fields: dict[str, Field | None] = field(default_factory=dict)
    param_axes: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    roles: dict[tuple[str, int], tuple[str, str | None]] = field(default_factory=dict)  # see param_role
    rects: list[torch.Tensor] = field(default_factory=list)
    origins: list[tuple[int, int, str, str]] = field(default_factory=list)
    costs: list[tuple[torch.Tensor, float]] = field(default_factory=list)
    total_macs: float = 0.0
    param_macs: dict[str, float] = field(default_factory=dict)  # weight value -> MACs of the op using it
    barriers: list[Barrier] = field(default_factory=list)
    head_atoms: list[torch.Tensor] = field(default_factory=list)
    deferred: list[Deferred] = field(default_factory=list)
    zero: set[str] = field(default_factory=set)  # activations zero where removed (see is_zero)
    folded: dict[str, torch.Tensor] = field(default_factory=dict)  # activations known from constants (see data)
    views: dict[str, ParamView] = field(default_factory=dict)  # activations that are views of a parameter
    _edges: list[np.ndarray] = field(default_factory=list)
    _collapsed: dict = field(default_factory=dict)  # (id(labels), axis) -> (labels, per-index atoms)
    _pinned: dict = field(default_factory=dict)     # id(labels) -> labels already pinned whole
    _producers: dict | None = None                  # value -> the node computing it, built on first use
    _users: dict | None = None                      # value -> the nodes reading it, built on first use

    # ---- atoms and couplings -------------------------------------------------------
    def fresh(self, n: int, node: Node, role: str = "out") -> torch.Tensor:
        """``n`` new atoms produced by ``node`` (a conv's filters, a linear's outputs...)."""
        start = self.n_atoms
        self.n_atoms += n
        self.origins.append((start, n, node.module or node.name, role))
        return torch.arange(start, start + n, dtype=torch.long)

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Couple atoms elementwise; an atom coupled with an unlabelled (-1) element is pinned."""
        a, b = torch.broadcast_tensors(a, b)
        a, b, distinct = _drop_repeated_slices(a.numpy(), b.numpy())  # numpy: far faster on int64 here
        if np.array_equal(a, b):
            return
        self._pin_np(b[(a < 0) & (b >= 0)])
        self._pin_np(a[(b < 0) & (a >= 0)])
        both = (a >= 0) & (b >= 0) & (a != b)
        if both.any():
            a, b = a[both], b[both]
            if distinct:  # a subset of distinct pairs: nothing to deduplicate
                self._edges.append(np.stack([a, b], 1))
                return
            key = np.unique(a * (1 << 31) + b)
            self._edges.append(np.stack([key >> 31, key & ((1 << 31) - 1)], 1))

    def union_unless_whole(self, a: torch.Tensor, b: torch.Tensor, axes: tuple[int, ...]) -> None:
        """Couple ``a`` with ``b`` (same shape) unless ``a``'s units turn out to be whole
        hyperplanes along one of ``axes`` (dims of ``a`` along which ``b`` is constant); then
        ``b`` is pinned instead.  For a broadcast multiply (rotary cos/sin tables shared by
        every head): if only whole heads go, the shared factor never loses entries, and
        coupling it would merge all heads into one unit.  Settled by :func:`.dependency.solve`."""
        self.deferred.append(Deferred(a, b, axes))

    def producer(self, name: str) -> Node | None:
        """The node whose output ``name`` is (None for inputs, parameters, constants)."""
        if self._producers is None:
            self._producers = self.graph.producers()
        return self._producers.get(name)

    def param_view(self, name: str, claim: bool = True) -> ParamView | None:
        """``name`` as a view of one parameter, or None.  A parameter is its own view; an
        activation is one when a chain of one-input ops (unsqueeze, expand, permute, a
        reshape that moves no data across axes) leads back to a parameter read by nothing
        else, and its labels show each axis indexing one whole parameter dim or none (the
        labels are the parameter's own per-element atoms, so this is checked, not assumed:
        a slice, a flatten or an added constant is no view).  The chain's per-element
        fields are then dropped for views (:class:`ParamView`): a rule slices the parameter
        by dim with :meth:`param_axis`, and nothing else may read those fields, which is why
        every value on the chain must have one reader.  ``claim=False`` only asks, and
        changes nothing."""
        v = self.graph.values[name]
        if self._users is None:
            self._users = self.graph.users()
        if v.kind == "param":
            # another reader would label its elements through a field the slicing ignores
            alone = self.fields.get(name) is None and len(self._users.get(name, [])) == 1
            return ParamView(name, tuple(range(len(v.shape)))) if alone else None
        if name in self.views:
            return self.views[name]
        chain, cur = [name], name
        while self.graph.values[cur].kind != "param":
            node = self.producer(cur)
            if node is None or len(node.outputs) != 1 or len(chain) > 32:
                return None
            data = [i for i in dict.fromkeys(node.inputs)
                    if self.fields.get(i) is not None or self.graph.values[i].dtype.is_floating_point]
            if len(data) != 1 or len(self._users.get(data[0], [])) != 1:
                return None
            cur = data[0]
            chain.append(cur)
        param, pf = chain[-1], self.fields.get(chain[-1])
        if pf is None:
            return None
        start = int(pf.labels.reshape(-1)[0])
        if not torch.equal(pf.labels.reshape(-1), torch.arange(start, start + pf.labels.numel())):
            return None  # not the parameter's own per-element atoms
        views = {}
        for c in chain[:-1]:
            dims = _view_dims(self.fields.get(c), len(self.shape(c)), pf, start)
            if dims is None:
                return None
            views[c] = ParamView(param, dims)
        if not claim:
            return views[name]
        dropped = {id(self.fields[c].labels) for c in chain}
        self.rects = [r for r in self.rects if id(r) not in dropped]
        for c in chain:
            self.fields[c] = None
        self.views.update(views)
        return views[name]

    def pin(self, a: torch.Tensor) -> None:
        if id(a) in self._pinned:  # a field flows through many ops as one tensor: pin it once
            return
        self._pinned[id(a)] = a    # held, so the id is not reused
        self._pin_np(a.reshape(-1).numpy())

    def _pin_np(self, a: np.ndarray) -> None:
        a = a[a > 0]
        if a.size:
            a = np.unique(a)
            self._edges.append(np.stack([np.zeros_like(a), a], 1))

    def edges(self) -> np.ndarray:
        return np.concatenate(self._edges) if self._edges else np.zeros((0, 2), dtype=np.int64)

    def barrier(self, node: Node, reason: str) -> None:
        """Keep every channel touching ``node`` and report it (when it touches any: an op on
        unlabelled tensors, e.g. mask arithmetic, keeps nothing and is not reported)."""
        touched = False
        for i in node.inputs:
            f = self.field(i)
            if f is not None:
                self.pin(f.labels)
                touched = True
        for o in node.outputs:
            self.fields[o] = None
        if touched:
            self.barriers.append(Barrier(node.name, node.source_op or node.op, node.module, reason))

    def pin_reported(self, node: Node, labels: torch.Tensor, reason: str) -> None:
        """Keep the channels ``labels`` holds and report ``node`` as the barrier that kept
        them (once per labels tensor: a field that flows on unchanged is not named again
        by each op it meets); the node's outputs are left to its rule."""
        fresh = id(labels) not in self._pinned
        self.pin(labels)
        if fresh and bool((labels > 0).any()):
            self.barriers.append(Barrier(node.name, node.source_op or node.op, node.module, reason))

    def cost(self, atoms: torch.Tensor | None, macs: float) -> None:
        """Attribute ``macs`` evenly to ``atoms`` (for FLOPs-targeted budgets)."""
        if atoms is not None and atoms.numel():
            self.costs.append((atoms.reshape(-1), macs / atoms.numel()))

    def data(self, name: str) -> torch.Tensor | None:
        """The contents of a value known before the model runs: a parameter's, buffer's or
        constant's own, or an activation folded from constants during this analysis
        (:func:`.dependency.propagate`; kept here so analysing never writes into the graph)."""
        v = self.graph.values[name]
        return v.data if v.data is not None else self.folded.get(name)

    def is_zero(self, name: str) -> bool:
        """Whether the entries of ``name`` whose atoms are removed are exactly zero in the
        zeroed model: parameters (a removed unit's slices are zero by definition) and the
        outputs of ops whose rule says so (:meth:`Rule.keeps_zero`).  Buffers, constants
        and inputs are not."""
        return name in self.zero or self.graph.values[name].kind == "param"

    # ---- fields --------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return self.graph.values[name].shape

    def field(self, name: str) -> Field | None:
        """The value's field; floating-point parameters and constants get one atom per element
        on first use (integer and boolean ones are indices and masks: never pruned themselves)."""
        if name in self.fields:
            return self.fields[name]
        v = self.graph.values[name]
        f = None
        if v.fixed and v.dtype.is_floating_point:  # not indices or masks
            axes = tuple(i for i, s in enumerate(v.shape) if s > 1)
            if axes:
                sizes = [v.shape[i] for i in axes]
                start = self.n_atoms
                self.n_atoms += int(np.prod(sizes))
                self.origins.append((start, int(np.prod(sizes)), v.source_name or name, "free"))
                f = Field(axes, torch.arange(start, self.n_atoms, dtype=torch.long).reshape(sizes))
                if len(axes) > 1:
                    self.rects.append(f.labels)
        self.fields[name] = f
        return f

    def full(self, name: str) -> torch.Tensor:
        """Labels broadcast to the value's whole shape (-1 where unlabelled): a broadcast view,
        never copied (label tensors of activations are large; ops rarely need them dense)."""
        shape = self.shape(name)
        f = self.field(name)
        if f is None:
            return unlabelled(shape)
        view = [1] * len(shape)
        for a in f.axes:
            view[a] = shape[a]
        return f.labels.reshape(view).expand(shape)

    def set_field(self, name: str, f: Field | None) -> None:
        """Store a value's field.  A field over several axes must be pruned as a product
        (a rectangle), which :mod:`.components` enforces; a value whose every element is
        one atom cannot lose it, so that atom is pinned."""
        if f is not None and not f.axes:
            self.pin(f.labels)
            f = None
        self.fields[name] = f
        if f is not None and len(f.axes) > 1:
            self.rects.append(f.labels)

    def set_from_tensor(self, name: str, t: torch.Tensor) -> None:
        """Store labels computed by running an op, keeping only the axes where they vary."""
        self.set_field(name, field_from_tensor(t))

    def axis_labels(self, name: str, axis: int) -> torch.Tensor | None:
        """One atom per index along ``axis``: a joint field is collapsed by coupling each
        hyperplane; atoms on other axes are pinned (they cannot be removed through this use)."""
        f = self.field(name)
        if f is None:
            return None
        axis = axis % len(self.shape(name))
        if axis not in f.axes:
            self.pin(f.labels)
            return None
        key = (id(f.labels), axis)
        if key not in self._collapsed:
            j = f.axes.index(axis)
            first = f.labels[tuple(slice(None) if k == j else 0 for k in range(len(f.axes)))].clone()
            if f.labels.numel() > len(first):
                # each hyperplane coupled with its first entry, in the labels' own layout: a
                # weight's per-element atoms then arrive in order, which union takes as
                # distinct pairs without hashing them (qwen3_vit's [2304, 768] learned
                # positions, transposed into rows, were hashed for 1.5 s)
                shape = [1] * len(f.axes)
                shape[j] = len(first)
                self.union(first.reshape(shape).expand_as(f.labels), f.labels)
            self._collapsed[key] = (f.labels, first)
        collapsed = self._collapsed[key][1]
        if len(f.axes) > 1:
            # every hyperplane is one unit from here on: later uses of the value see the
            # collapsed field, not per-element atoms, which every norm and residual add
            # would otherwise couple again element by element (a ViT's stream with
            # learned positions)
            self.fields[name] = Field((axis,), collapsed)
        return collapsed

    def param_axis(self, name: str, dim: int, labels: torch.Tensor | None, role: str = "other",
                   bias: str | None = None) -> None:
        """Give dim ``dim`` of parameter ``name`` its atoms (shared weights are coupled), and
        say which role that dim plays in its layer (:meth:`param_role`)."""
        if labels is None:
            return
        self.param_role(name, dim, role, bias)
        axes = self.param_axes.setdefault(name, {})
        if dim in axes:
            self.union(axes[dim], labels)
        else:
            axes[dim] = labels

    def param_role(self, name: str, dim: int, role: str, bias: str | None = None) -> None:
        """Record what dim ``dim`` of parameter ``name`` is to its layer, for the optimizers:
        ``producer`` (it indexes the units the layer writes: a weight's output rows),
        ``consumer`` (units the layer reads: input columns), ``norm`` (a normalisation's
        scale), ``other`` (anything else: biases, embeddings, grouped convolutions), and
        ``bias``, the layer's bias (a norm's shift) that goes with it.  A weight shared by
        several layers keeps the role its first layer gave it."""
        self.roles.setdefault((name, dim % max(1, len(self.shape(name)))), (role, bias))

    def run_on_labels(self, node: Node, data: list[str]) -> list[torch.Tensor] | None:
        """Execute ``node`` on label tensors of its ``data`` inputs; other inputs get their
        real contents.  Returns one label tensor per output, or None if nothing is labelled."""
        labelled = [d for d in data if self.field(d) is not None]
        if not labelled:
            return None
        env: dict[str, torch.Tensor] = {}
        for i in node.inputs:
            if i not in data:
                known = self.data(i)
                if known is None:
                    return None
                env[i] = known
        merged: list[torch.Tensor] | None = None
        for d in labelled:
            for other in data:
                env[other] = self.full(other) if other == d else unlabelled(self.shape(other))
            try:
                out = node.call(env)
            except RuntimeError:  # a view or in-place op that needs dense memory
                out = node.call({k: v.contiguous() for k, v in env.items()})
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            if merged is None:
                merged = outs
                continue
            for k, (m, o) in enumerate(zip(merged, outs)):
                both = (m >= 0) & (o >= 0)
                if both.any():
                    self.union(m[both], o[both])
                merged[k] = torch.where(m >= 0, m, o)
        return merged


def _view_dims(f: Field | None, rank: int, pf: Field, start: int) -> tuple[int | None, ...] | None:
    """Which parameter dim each of a value's ``rank`` axes indexes, when its field ``f``
    holds the parameter's atoms (field ``pf``, atoms from ``start`` in row-major order) with
    each of the parameter's non-unit dims on one whole axis; None otherwise."""
    if f is None:
        return None
    strides = [int(np.prod(pf.labels.shape[k + 1:])) for k in range(len(pf.axes))]
    rel = f.labels - start
    dims: list[int | None] = [None] * rank
    expected = torch.zeros((), dtype=torch.long)
    used = set()
    for j, a in enumerate(f.axes):
        n = f.labels.shape[j]
        step = int(rel.select(j, 1).reshape(-1)[0] - rel.select(j, 0).reshape(-1)[0])
        k = next((k for k in range(len(pf.axes)) if strides[k] == step and pf.labels.shape[k] == n
                  and k not in used), None)
        if k is None:
            return None
        used.add(k)
        dims[a] = pf.axes[k]
        shape = [1] * len(f.axes)
        shape[j] = n
        expected = expected + (torch.arange(n) * step).reshape(shape)
    if len(used) != len(pf.axes) or not torch.equal(rel, expected.expand(rel.shape)):
        return None
    return tuple(dims)


def unlabelled(shape: tuple[int, ...]) -> torch.Tensor:
    """-1 labels of ``shape`` as a broadcast view (no memory)."""
    return torch.full((), -1, dtype=torch.long).expand(shape)


_SLICE_HASH = np.random.default_rng(0).integers(1, 2 ** 62, size=1 << 16, dtype=np.int64)


def _consecutive(x: np.ndarray) -> bool:
    """Whether ``x`` is a run of consecutive atoms (so all distinct): how a weight's own
    per-element atoms arrive, checked in one pass instead of hashing them."""
    return x.size > 1 and bool((np.diff(x) == 1).all())


def _drop_repeated_slices(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """``a`` and ``b`` (same shape) flattened, keeping along every axis only the first of
    identical slices (same pairs in both): a coupling of a [tokens, channels] activation
    repeats the same channel pairs for every token (or for all but the class token), and
    hashing all of them dominated the analysis.  Slices are grouped by a random-projection
    hash and then compared exactly, so a hash collision only costs the saving.  The flag
    says the pairs are known to be distinct (one side is a weight's fresh atoms)."""
    if _consecutive(a.reshape(-1)) or _consecutive(b.reshape(-1)):  # no pair, so no slice, repeats
        return a.reshape(-1), b.reshape(-1), True
    key = a.astype(np.int64) * (1 << 31) + b  # a pair per element: labels are below 2**31
    for axis in range(key.ndim):
        n = key.shape[axis]
        if n < 2:
            continue
        rows = np.moveaxis(key, axis, 0).reshape(n, -1)
        with np.errstate(over="ignore"):
            h = (rows * _SLICE_HASH[np.arange(rows.shape[1]) % len(_SLICE_HASH)]).sum(axis=1)
        _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        if len(first) == n or not (rows == rows[first[inverse.reshape(-1)]]).all():
            continue
        keep = np.sort(first)
        key, a, b = (np.take(t, keep, axis=axis) for t in (key, a, b))
    return a.reshape(-1), b.reshape(-1), False


def field_from_tensor(t: torch.Tensor) -> Field | None:
    """The smallest set of axes along which ``t``'s labels vary (None if all -1)."""
    a = t.numpy()
    if a.size == 0:
        return None
    axes = []
    # longest axes first, each found constant cut to its first entry: later checks (and
    # the result) read a smaller array; an attention map's [b, h, q, k] labels, which
    # vary along h alone, cost one full pass instead of four
    for i in sorted(range(a.ndim), key=lambda i: -a.shape[i]):
        if a.shape[i] < 2:
            continue
        first = a[(slice(None),) * i + (slice(0, 1),)]
        if a.strides[i] == 0 or (a == first).all():  # a broadcast (stride 0) axis is constant
            a = first
        else:
            axes.append(i)
    axes.sort()
    reduced = a[tuple(slice(None) if i in axes else 0 for i in range(a.ndim))]
    if bool((reduced < 0).all()):
        return None
    return Field(tuple(axes), torch.from_numpy(np.array(reduced, order="C")))
