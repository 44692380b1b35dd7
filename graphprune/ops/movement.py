"""Data-movement ops: their channel maps come from running them on label tensors.

Reshape/view (hidden = heads × head_dim, flatten into a linear), permute, concat and
split on any axis (a token-axis concat is not a channel concat: the labels say so),
slicing, pixel shuffle, channel shuffle, repeat/expand (grouped-query attention)...
need no hand-written index maps: :meth:`Labels.run_on_labels` executes the op itself.
What is op-specific is how constant arguments change when units go (``rewrite``); sizes
an ONNX model computes at run time (``Shape -> Gather -> Concat``) hold the full model's
values in the compact model too (:class:`ShapeOf`), and only the entries of axes that shrank
are replaced where they are used (:func:`_runtime_shape`).
"""
from __future__ import annotations

import math

import torch

from ..analysis.labels import Field, Labels
from ..errors import UnprunableTargetError
from ..ir.graph import Node, Ref
from .common import as_list, ref_name
from .registry import OnnxOp, Rule, register
from .rewrite import Call, Entries, OnnxArg, OnnxCall, OnnxContext, Phantom, Rewrite

aten = torch.ops.aten
F = torch.nn.functional


# ---- ONNX data movement in torch: inputs positionally, normalised attributes (constant
# inputs such as Reshape's shape already resolved into lists by the importer) as keywords

def _reshape(x: torch.Tensor, *_, shape: list[int], allowzero: int = 0, **__) -> torch.Tensor:
    dims = [x.shape[i] if (s == 0 and not allowzero) else s for i, s in enumerate(shape)]
    return x.reshape(dims)


def _flatten(x: torch.Tensor, *_, axis: int = 1, **__) -> torch.Tensor:
    axis %= max(1, x.dim())
    return x.reshape(int(torch.Size(x.shape[:axis]).numel()), -1)


def _squeeze(x: torch.Tensor, *_, axes: list[int] | None = None, **__) -> torch.Tensor:
    if not axes:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _unsqueeze(x: torch.Tensor, *_, axes: list[int], **__) -> torch.Tensor:
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _expand(x: torch.Tensor, *_, shape: list[int], **__) -> torch.Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))


def _transpose(x: torch.Tensor, *_, perm: list[int] | None = None, **__) -> torch.Tensor:
    return x.permute(perm if perm else list(reversed(range(x.dim()))))


def _concat(*xs: torch.Tensor, axis: int, **__) -> torch.Tensor:
    return torch.cat([x for x in xs if x is not None], dim=axis)


def _split(x: torch.Tensor, *_, axis: int = 0, split: list[int], **__) -> tuple[torch.Tensor, ...]:
    return torch.split(x, split, dim=axis)


def _slice(x: torch.Tensor, *_, starts: list[int], ends: list[int], axes: list[int] | None = None,
           steps: list[int] | None = None, **__) -> torch.Tensor:
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.dim()
    reversed_axes = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st < 0:  # torch slices step forward only: pick the positions Python's slicing picks (same clamping as ONNX)
            reversed_axes.append((a % x.dim(), list(range(x.shape[a % x.dim()]))[slice(s, e, st)]))
        else:
            index[a % x.dim()] = slice(s, e, st)
    out = x[tuple(index)]
    for a, picked in reversed_axes:
        out = out.index_select(a, torch.tensor(picked, dtype=torch.long, device=x.device))
    return out


def _gather(x: torch.Tensor, indices: torch.Tensor, *_, axis: int = 0, **__) -> torch.Tensor:
    axis %= x.dim()
    idx = indices.long() % x.shape[axis]
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))  # a scalar index of a 1-D x: shape ()


def _gather_elements(x: torch.Tensor, indices: torch.Tensor, *_, axis: int = 0, **__) -> torch.Tensor:
    return torch.gather(x, axis, indices.long() % x.shape[axis])


def _gather_nd(x: torch.Tensor, indices: torch.Tensor, *_, batch_dims: int = 0, **__) -> torch.Tensor:
    """ONNX GatherND: the last axis of ``indices`` addresses the ``k`` axes of ``x`` after
    its ``batch_dims`` leading ones; the remaining axes of ``x`` ride along."""
    b, k = batch_dims, indices.shape[-1]
    lead = x.shape[:b]
    xs = x.reshape(-1, *x.shape[b:])                      # batch axes merged
    idx = indices.long().reshape(xs.shape[0], -1, k)      # per batch entry, a list of k-tuples
    sizes = torch.tensor(x.shape[b:b + k])
    idx = idx % sizes
    rows = torch.arange(xs.shape[0]).unsqueeze(1).expand(-1, idx.shape[1])
    out = xs[(rows, *idx.unbind(-1))]                     # (batch, n, *x.shape[b + k:])
    return out.reshape(*lead, *indices.shape[b:-1], *x.shape[b + k:])


def _depth_to_space(x: torch.Tensor, *_, blocksize: int, mode: str = "DCR", **__) -> torch.Tensor:
    b, c, h, w = x.shape
    r = blocksize
    if mode == "CRD":
        return x.reshape(b, c // (r * r), r, r, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (r * r), h * r, w * r)
    return x.reshape(b, r, r, c // (r * r), h, w).permute(0, 3, 4, 1, 5, 2).reshape(b, c // (r * r), h * r, w * r)


def _space_to_depth(x: torch.Tensor, *_, blocksize: int, **__) -> torch.Tensor:
    b, c, h, w = x.shape
    r = blocksize
    return x.reshape(b, c, h // r, r, w // r, r).permute(0, 3, 5, 1, 2, 4).reshape(b, c * r * r, h // r, w // r)


def _tile(x: torch.Tensor, *_, repeats: list[int], **__) -> torch.Tensor:
    return x.repeat(repeats)


def _shape(x: torch.Tensor, *_, start: int = 0, end: int | None = None, **__) -> torch.Tensor:
    return torch.tensor(x.shape[start:end], dtype=torch.int64)


def _split_sizes(attrs: dict, out_shapes: list[tuple[int, ...]]) -> None:
    """Split sizes from the outputs (``split`` may be an input, an attribute or absent)."""
    axis = attrs.get("axis", 0)
    attrs["split"] = [int(s[axis]) for s in out_shapes]


def _onnx_pad(x: torch.Tensor, _pads=None, constant_value=None, _axes=None, *, pads: list[int],
              axes: list[int] | None = None, mode: str = "constant", value: float = 0.0, **_) -> torch.Tensor:
    """ONNX Pad: ``pads`` are all begins then all ends, over ``axes`` (default: every axis)."""
    axes = [a % x.dim() for a in axes] if axes else list(range(x.dim()))
    half = len(pads) // 2
    per_axis = {a: (pads[k], pads[k + half]) for k, a in enumerate(axes)}
    flat = [p for a in reversed(range(x.dim())) for p in per_axis.get(a, (0, 0))]
    if mode == "constant":
        fill = float(constant_value.reshape(-1)[0]) if isinstance(constant_value, torch.Tensor) \
            and constant_value.numel() else value
        return F.pad(x, flat, value=fill)
    while flat[-2:] == [0, 0] and len(flat) > 2:  # torch pads the last axes only in these modes
        flat = flat[:-2]
    return F.pad(x, flat, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


class Movement(Rule):
    """Generic data movement; ``index_args`` name inputs used as indices, not data."""

    index_args: tuple[str, ...] = ()

    def data_inputs(self, node: Node) -> list[str]:
        skip = set()
        for key in self.index_args:
            for leaf in (node.attrs.get(key) if isinstance(node.attrs.get(key), (list, tuple)) else [node.attrs.get(key)]):
                if ref_name(leaf):
                    skip.add(ref_name(leaf))
        return [i for i in dict.fromkeys(node.inputs) if i not in skip]

    def propagate(self, node: Node, lab: Labels) -> None:
        # integer/bool inputs are shapes, axes and indices: passed by value, never labelled
        data = [i for i in self.data_inputs(node)
                if lab.graph.values[i].dtype.is_floating_point or lab.field(i) is not None]
        fast = self.fast_field(node, lab, data)
        if fast is not None:
            lab.set_field(node.outputs[0], fast)
            return
        outs = lab.run_on_labels(node, data)
        if outs is None:
            if any(lab.field(d) is not None for d in data):
                return lab.barrier(node, "indices are computed from data (data-dependent gather)")
            for o in node.outputs:
                lab.fields[o] = None
            return
        for o, t in zip(node.outputs, outs):
            lab.set_from_tensor(o, t)
        self.check(node, lab, data)

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        """Moving entries keeps them zero: removed entries come from labelled data inputs."""
        data = [i for i in self.data_inputs(node) if lab.fields.get(i) is not None]
        return bool(data) and all(lab.is_zero(i) for i in data)

    def check(self, node: Node, lab: Labels, data: list[str]) -> None:
        """Pin atoms the op cannot handle once units go (overridden per op)."""

    def fast_field(self, node: Node, lab: Labels, data: list[str]) -> Field | None:
        """The output field computed from shapes alone, where that is exact (overridden by
        reshapes and permutations); None runs the op on label tensors instead."""
        return None


def _single(node: Node, lab: Labels, data: list[str]) -> Field | None:
    """The only labelled data input's field, for one-in one-out ops (else None)."""
    if len(data) != 1 or len(node.outputs) != 1:
        return None
    return lab.field(data[0])


def _reshape_axes(shape_in: tuple[int, ...], shape_out: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...] | None:
    """Where each labelled axis lands when a reshape leaves it whole (only size-1 axes
    appear or vanish around it); None when a labelled axis is split or merged."""
    i = j = 0
    out: dict[int, int] = {}
    while i < len(shape_in) or j < len(shape_out):
        if i < len(shape_in) and shape_in[i] == 1 and i not in axes:
            i += 1
            continue
        if j < len(shape_out) and shape_out[j] == 1:
            j += 1
            continue
        if i >= len(shape_in) or j >= len(shape_out):
            return None
        if i in axes:
            if shape_in[i] != shape_out[j]:
                return None
            out[i] = j
            i, j = i + 1, j + 1
            continue
        a, b = shape_in[i], shape_out[j]  # walk a segment of unlabelled axes until products agree
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                if i >= len(shape_in) or i in axes:
                    return None
                a, i = a * shape_in[i], i + 1
            else:
                if j >= len(shape_out):
                    return None
                b, j = b * shape_out[j], j + 1
    return tuple(out[a] for a in axes) if len(out) == len(axes) else None


def _resize(old: list, old_shape: tuple[int, ...], new_shape: tuple[int, ...]) -> list:
    """Shape arguments for the compact graph: entries of axes that did not shrink (a
    symbolic batch size, -1) stay as they were; shrunk axes get their new size."""
    return [o if os_ == ns else n for o, os_, ns, n in zip(old, old_shape, new_shape, new_shape)]


def _onnx_reshape_shape(x, out, shrink, keep: list[int] | None = None) -> list[int]:
    """A Reshape target that stays valid for other batch sizes.  Dims that follow the
    batch (seen to change between the importer's two captures) are copied with 0 when
    the input has the same dim at the same position, else become the one -1; every
    other dim gets its (possibly pruned) size.  Entries flagged in ``keep`` are left to a
    run-time target (:func:`_runtime_shape`) and get no -1 of their own."""
    vx, vo = shrink.graph.values[x], shrink.graph.values[out]
    old_i, old_o, new_i, new_o = vx.shape, vo.shape, shrink.new_shape(x), shrink.new_shape(out)
    alt_i, alt_o = vx.alt_shape or old_i, vo.alt_shape or old_o
    keep = keep or [0] * len(new_o)
    shape: list[int] = []
    for k, n in enumerate(new_o):
        if alt_o[k] == old_o[k] or keep[k]:
            shape.append(n)
        elif k < len(old_i) and old_i[k] == old_o[k] and alt_i[k] == alt_o[k] and new_i[k] == n:
            shape.append(0)
        else:
            shape.append(-1)
    if shape.count(-1) > 1:
        raise UnprunableTargetError("a Reshape merges several batch-dependent dims", node=vo.name,
                                    op="Reshape", hint="export the model with a static batch size")
    return shape


def _onnx_expand_shape(node, x, out, shrink) -> list[int]:
    """An Expand target for the compact graph: 1 wherever the input already has the
    output's size (Expand keeps it: pruned axes and the batch, whose size the traced
    constant would otherwise fix), else the output's (possibly pruned) size."""
    old = list(node.attrs.get("shape", []))
    new_i, new_o = shrink.new_shape(x), shrink.new_shape(out)
    off, off_i = len(new_o) - len(old), len(new_o) - len(new_i)
    shape = []
    for k, v in enumerate(old):
        j = k + off
        in_dim = new_i[j - off_i] if j >= off_i else 1
        shape.append(1 if in_dim == new_o[j] else (new_o[j] if v != 1 else v))
    return shape


@register("reshape", aten=("view", "reshape", "_unsafe_view", "view_copy", "expand", "expand_copy",
                           "squeeze", "unsqueeze", "squeeze_copy", "unsqueeze_copy"),
          onnx={"Reshape": OnnxOp(_reshape, ("data", "shape"), ("shape",)), "Flatten": OnnxOp(_flatten),
                "Squeeze": OnnxOp(_squeeze, ("data", "axes"), ("axes",)),
                "Unsqueeze": OnnxOp(_unsqueeze, ("data", "axes"), ("axes",)),
                "Expand": OnnxOp(_expand, ("input", "shape"), ("shape",))})
class Reshape(Movement):
    onnx_args = {("Reshape", "shape"): OnnxArg(input=1, since=5), ("Expand", "shape"): OnnxArg(input=1, since=8)}

    def fast_field(self, node, lab, data) -> Field | None:
        f = _single(node, lab, data)
        if f is None:
            return None
        axes = _reshape_axes(lab.shape(data[0]), lab.shape(node.outputs[0]), f.axes)
        return Field(axes, f.labels) if axes is not None else None

    def rewrite(self, node, shrink) -> Rewrite | None:
        """Sizes of shrunk axes take their compact values; the rest (a symbolic batch,
        -1) stay.  An ONNX target computed at run time is filtered where it is read."""
        if node.source_op.startswith("onnx::"):
            return _onnx_reshape(node, shrink)
        out = node.outputs[0]
        old_s, new_s = shrink.old_shape(out), shrink.new_shape(out)
        if old_s == new_s:
            return None
        shrunk = {k: n for k, (o, n) in enumerate(zip(old_s, new_s)) if o != n}
        return Rewrite(args={key: Entries(shrunk) for key in ("size", "shape") if key in node.attrs})


def _onnx_reshape(node: Node, shrink) -> Rewrite | None:
    out, x = node.outputs[0], node.inputs[0]
    old_o, new_o = shrink.old_shape(out), shrink.new_shape(out)
    if node.source_op in ("onnx::Reshape", "onnx::Expand") and _computed_shape(node, shrink) \
            and shrink.graph.values[out].dynamic_axes:  # sizes that follow the batch stay computed
        return _runtime_shape(node, shrink)
    if old_o == new_o:
        return None
    if node.source_op == "onnx::Reshape":
        shape = _onnx_reshape_shape(x, out, shrink)
        args: dict = {"shape": shape}
        if 0 in shape and "allowzero" in node.attrs:
            args["allowzero"] = 0  # 0 copies the input's dim, which allowzero=1 (dynamo exporter) would forbid
        return Rewrite(args=args)
    if node.source_op == "onnx::Expand":
        return Rewrite(args={"shape": _onnx_expand_shape(node, x, out, shrink)})
    return None


def _computed_shape(node: Node, shrink) -> bool:
    """Whether a Reshape's or Expand's target is computed at run time (``Shape -> Gather
    -> Concat``), not a constant (an initializer or a Constant node)."""
    return len(node.inputs) > 1 and shrink.graph.values[node.inputs[1]].kind != "const"


def _runtime_shape(node: Node, shrink) -> Rewrite | None:
    """A target computed at run time keeps its entries where ``keep`` says and takes ``fixed``
    elsewhere (:func:`shape_shrunk`):
    its entries are kept where the output kept its size (the batch, and any size the
    exporter computes; a Reshape's 0 entry also needs the input to have kept its dim).
    Run-time shapes hold the full model's sizes in the compact model too (:class:`ShapeOf`),
    so kept entries stay right, -1 included.  The others are replaced as a constant target
    would be: the compact size, or for Reshape 0 or the one -1 where the axis also follows
    the batch (``bsz * heads`` with heads pruned: a kept -1 then gets its size instead),
    and for Expand 1 where the input already has the size (:func:`_onnx_expand_shape`)."""
    out, x = node.outputs[0], node.inputs[0]
    old_o, new_o, new_i = shrink.old_shape(out), shrink.new_shape(out), shrink.new_shape(x)
    shape = list(node.attrs["shape"])
    off = len(old_o) - len(shape)  # Expand's target may be shorter than its output
    reshape = node.source_op == "onnx::Reshape"
    copies = reshape and not int(node.attrs.get("allowzero", 0))
    keep = [int(old_o[k + off] == new_o[k + off]
                and not (copies and s == 0 and (k >= len(new_i) or new_i[k] != new_o[k]))) for k, s in enumerate(shape)]
    if all(keep):
        return None
    if reshape:
        fixed = _onnx_reshape_shape(x, out, shrink, keep)
        if -1 in fixed:  # a run-time -1 would be a second one
            keep = [int(k and s != -1) for k, s in zip(keep, shape)]
            fixed = _onnx_reshape_shape(x, out, shrink, keep)
    else:
        fixed = _onnx_expand_shape(node, x, out, shrink)
    args = {}
    if reshape and "allowzero" in node.attrs and any(f == 0 and not k for k, f in zip(keep, fixed)):
        args["allowzero"] = 0  # a fixed 0 copies the input's dim only without it
    return Rewrite(args=args, feeds={node.inputs[1]: shape_shrunk(node.inputs[1], keep, fixed)})


@register("shape", onnx={"Shape": OnnxOp(_shape),
                         "Size": OnnxOp(lambda x, **_: torch.tensor(x.numel(), dtype=torch.int64))})
class ShapeOf(Rule):
    """Sizes carry no channel identity.  In the compact model ``Shape`` of a pruned value
    reads its full model's sizes on the pruned axes (written as constants when no size
    depends on the batch, else as run-time entries with the pruned ones replaced), so every
    integer computed from shapes is what the full model computed: swin's attention scale
    ``(C // heads) ** -0.5`` and its ``reshape(x.size(0), x.size(1), C)`` read ``C`` off
    the pruned input; the ops whose outputs shrink set their own sizes
    (:func:`_runtime_shape`, Slice, Split)."""

    def propagate(self, node: Node, lab: Labels) -> None:
        for o in node.outputs:
            lab.fields[o] = None

    def rewrite(self, node, shrink) -> Rewrite | None:
        x = node.inputs[0]
        old, new = shrink.old_shape(x), shrink.new_shape(x)
        if old == new:
            return None
        size = node.source_op == "onnx::Size"
        forward = {}
        if "start" in node.attrs or "end" in node.attrs:  # Shape reads dims start:end only (opset 15)
            lo, hi = int(node.attrs.get("start", 0)), int(node.attrs.get("end", len(old)))
            forward = {"start": lo, "end": hi}
            old, new = old[lo:hi], new[lo:hi]
        dynamic = {a - int(forward.get("start", 0)) for a in shrink.graph.values[x].dynamic_axes}
        if not dynamic:  # every size known: write the full model's
            return Rewrite(constant=math.prod(old) if size else list(old))
        # kept sizes read at run time; a pruned axis that also follows the batch (``bsz *
        # heads`` with heads pruned, BLOOM) scaled back to the full model's at run time
        keep = tuple(1 if o == n else (SCALED if k in dynamic else 0) for k, (o, n) in enumerate(zip(old, new)))
        den = [n if k == SCALED else 1 for k, n in zip(keep, new)] if SCALED in keep else None
        return Rewrite(call=Call(SHAPE_OF_FULL, (x,), dict(size=size, keep=keep, forward=forward, den=den,
                                                           fixed=[0 if k == 1 else o for k, o in zip(keep, old)])))


def _int64(values: list[int] | int):
    import numpy as np
    from onnx import numpy_helper
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64))


SCALED = 2  # a ``keep`` code: the run-time size times ``fixed`` over ``den``


def _keep_fixed(shape: str, new: str, keep: tuple[int, ...], opset: int) -> list:
    """``new[k] = shape[k]`` where ``keep[k]`` is 1, ``fixed[k]`` where it is 0, and
    ``shape[k] * fixed[k] / den[k]`` where it is :data:`SCALED` (``fixed`` and ``den`` the
    function's tensor attributes): a run-time shape whose entries on pruned axes are
    replaced.  Written as Gather -> Unsqueeze -> Concat, the pattern exporters emit for
    shapes, which every consumer (TVM's ONNX frontend included) reads as shape
    arithmetic; the pattern of ``keep`` is part of the function's name, so each pattern
    is its own function.  ``opset``: the model's, whose Unsqueeze the body uses (its axes an
    attribute before opset 13: paddle2onnx writes opset 11)."""
    from onnx import AttributeProto, helper

    def attribute(name: str):
        node = helper.make_node("Constant", [], [f"{name}_"])
        node.attribute.append(AttributeProto(name="value", ref_attr_name=name, type=AttributeProto.TENSOR))
        return node
    body = [attribute("fixed"), helper.make_node("Constant", [], ["axis0_"], value=_int64([0]))]
    if SCALED in keep:
        body.append(attribute("den"))
    for k, code in enumerate(keep):
        body += [helper.make_node("Constant", [], [f"i{k}_"], value=_int64(k)),
                 helper.make_node("Gather", [shape if code else "fixed_", f"i{k}_"], [f"e{k}_"], axis=0)]
        if code == SCALED:  # multiply first: the quotient is exact
            body += [helper.make_node("Gather", ["fixed_", f"i{k}_"], [f"f{k}_"], axis=0),
                     helper.make_node("Gather", ["den_", f"i{k}_"], [f"d{k}_"], axis=0),
                     helper.make_node("Mul", [f"e{k}_", f"f{k}_"], [f"m{k}_"]),
                     helper.make_node("Div", [f"m{k}_", f"d{k}_"], [f"s{k}_"])]
        entry = f"s{k}_" if code == SCALED else f"e{k}_"
        body.append(helper.make_node("Unsqueeze", [entry, "axis0_"], [f"u{k}_"]) if opset >= 13
                    else helper.make_node("Unsqueeze", [entry], [f"u{k}_"], axes=[0]))
    return body + [helper.make_node("Concat", [f"u{k}_" for k in range(len(keep))], [new], axis=0)]


def _forwarding(op: str, inputs: list[str], outputs: list[str], forwarded: tuple[str, ...]):
    """``op`` with the function's INT attributes ``forwarded`` passed through."""
    from onnx import AttributeProto, helper
    node = helper.make_node(op, inputs, outputs)
    node.attribute.extend(AttributeProto(name=a, ref_attr_name=a, type=AttributeProto.INT) for a in forwarded)
    return node


def shape_shrunk(value: str, keep: list[int], fixed: list[int]) -> Call:
    """A call that passes ``value``, a shape computed at run time (a Reshape or Expand
    target, a Resize's ``sizes``: built from ``Shape``, which reads the full model's
    sizes), with entry ``k`` kept where ``keep[k]`` and ``fixed[k]`` elsewhere."""
    return Call(SHAPE_SHRUNK, (value,), dict(keep=tuple(keep), fixed=[0 if k else f for k, f in zip(keep, fixed)]))


def _shape_shrunk_onnx(call: Call, ctx: OnnxContext) -> OnnxCall:
    """:func:`_keep_fixed` as a model-local function, one per pattern of ``keep``."""
    from onnx import helper

    from .normalization import DOMAIN
    keep = call.attrs["keep"]
    fn = helper.make_function(DOMAIN, f"ShapeShrunk_{''.join(map(str, keep))}", ["shape"], ["new"],
                              _keep_fixed("shape", "new", keep, ctx.opset(13)), [helper.make_opsetid("", ctx.opset(13))],
                              attributes=["fixed"])
    return OnnxCall(fn, {"fixed": _int64(call.attrs["fixed"])})


def _shape_of_full_onnx(call: Call, ctx: OnnxContext) -> OnnxCall:
    """:func:`shape_of_onnx_function` for the call's pattern, its lists as int64 tensors."""
    a = call.attrs
    attrs = dict(fixed=_int64(a["fixed"]), **a["forward"])
    if a["den"] is not None:
        attrs["den"] = _int64(a["den"])
    return OnnxCall(shape_of_onnx_function(ctx.opset(13), a["size"], a["keep"], tuple(a["forward"])), attrs)


def shape_of_onnx_function(opset: int, size: bool, keep: tuple[int, ...], forwarded: tuple[str, ...] = ()):
    """``Shape(input)`` with its entries kept, fixed or scaled as ``keep`` says
    (:func:`_keep_fixed`; its ``start``/``end`` forwarded), or for ``size`` the product of
    that (``Size``), as a FunctionProto: the full model's sizes of a pruned value."""
    from onnx import helper

    from .normalization import DOMAIN
    body = [_forwarding("Shape", ["input"], ["shape"], forwarded),
            *_keep_fixed("shape", "full" if size else "output", keep, opset)]
    if size:
        body.append(helper.make_node("ReduceProd", ["full"], ["output"], keepdims=0))
    name = f"{'SizeOfFull' if size else 'ShapeOfFull'}_{''.join(map(str, keep))}"
    scaled = ["den"] if SCALED in keep else []
    return helper.make_function(DOMAIN, name, ["input"], ["output"], body,
                                [helper.make_opsetid("", opset)], attributes=["fixed", *scaled, *forwarded])


# Only ONNX models compute shapes at run time: these phantoms have no torch form.
SHAPE_SHRUNK = Phantom("shape_shrunk", None, _shape_shrunk_onnx)
SHAPE_OF_FULL = Phantom("shape_of_full", None, _shape_of_full_onnx)
# ONNX's Split takes sizes as they are; an ATen split by count becomes a split by sizes
SPLIT_WITH_SIZES = Phantom("split_with_sizes", aten.split_with_sizes.default, None)


@register("permute", aten=("permute", "transpose", "t", "movedim", "swapaxes", "numpy_T", "mT", "flip",
                           "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
                           "repeat", "tile", "stack", "cat", "concat", "unbind", "unfold", "diagonal"),
          onnx={"Transpose": OnnxOp(_transpose), "Concat": OnnxOp(_concat), "DepthToSpace": OnnxOp(_depth_to_space),
                "SpaceToDepth": OnnxOp(_space_to_depth), "Tile": OnnxOp(_tile, ("input", "repeats"), ("repeats",))})
class Permute(Movement):
    """Pure rearrangements whose constant arguments survive pruning unchanged."""

    def fast_field(self, node, lab, data) -> Field | None:
        if node.source_op.startswith(("aten.cat.", "aten.concat.")):
            return _cat_field(node, lab, data)
        f = _single(node, lab, data)
        perm = _permutation(node, len(lab.shape(data[0]))) if f is not None else None
        if perm is None:
            return None
        where = [perm.index(a) for a in f.axes]
        order = sorted(range(len(where)), key=lambda k: where[k])
        return Field(tuple(where[k] for k in order), f.labels.permute(order).contiguous())


def _cat_field(node: Node, lab: Labels, data: list[str]) -> Field | None:
    """``cat`` along ``dim`` of inputs labelled along that axis alone (a DenseNet's channel
    concatenations): the inputs' labels concatenated, which is what running ``cat`` on
    their label tensors gives, without building those over whole activations (2 s of a
    batch-2 DenseNet-121's analysis); None (run it) for any other case."""
    rank = len(lab.shape(node.outputs[0]))
    dim = int(node.attrs.get("dim", 0)) % max(rank, 1)
    parts = []
    for a in node.attrs.get("tensors") or ():
        name = ref_name(a)
        if name is None or name not in data or len(lab.shape(name)) != rank:
            return None
        f = lab.field(name)
        if f is None:
            parts.append(torch.full((lab.shape(name)[dim],), -1, dtype=torch.long))
        elif f.axes == (dim,):
            parts.append(f.labels)
        else:
            return None
    labels = torch.cat(parts) if parts else None
    if labels is None or labels.numel() < 2 or bool((labels == labels[0]).all()):
        return None  # no axis varies: running it pins or leaves unlabelled, as it must
    return Field((dim,), labels)


def _permutation(node: Node, rank: int) -> list[int] | None:
    """The axis permutation of permute/transpose/t (and ONNX Transpose), else None."""
    op = node.source_op
    if op.startswith(("aten.permute", "onnx::Transpose")):
        dims = node.attrs.get("dims", node.attrs.get("perm")) or list(reversed(range(rank)))
        return [int(d) % rank for d in dims]
    if op.startswith(("aten.transpose", "aten.swapaxes")):
        perm = list(range(rank))
        a, b = (int(node.attrs.get(k)) % rank for k in (("dim0", "dim1") if "dim0" in node.attrs else ("axis0", "axis1")))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if op.startswith("aten.t."):
        return list(reversed(range(rank)))
    return None


@register("roll", aten=("roll",))
class Roll(Movement):
    """Rolling a pruned axis would change which entries wrap around: pin it."""

    def check(self, node, lab, data) -> None:
        f = lab.field(data[0])
        dims = as_list(node.attrs.get("dims"))
        if f is not None and (not dims or any(d % len(lab.shape(data[0])) in f.axes for d in dims)):
            lab.pin(f.labels)


@register("split", aten=("split", "split_with_sizes", "chunk", "split_copy", "tensor_split"),
          onnx={"Split": OnnxOp(_split, ("input", "split"), ("split",), _split_sizes)})
class Split(Movement):
    onnx_args = {("Split", "split"): OnnxArg(input=1, since=13, replaces="num_outputs")}

    def rewrite(self, node, shrink) -> Rewrite | None:
        """The split sizes follow the compact outputs."""
        x = node.inputs[0]
        dim = int(node.attrs.get("dim", node.attrs.get("axis", 0))) % len(shrink.old_shape(x))
        if shrink.new_shape(x)[dim] == shrink.old_shape(x)[dim]:
            return None
        sizes = [shrink.new_shape(o)[dim] for o in node.outputs]
        if node.source_op.startswith("onnx::"):
            return Rewrite(args={"split": sizes})
        return Rewrite(call=Call(SPLIT_WITH_SIZES, (x,), dict(split_sizes=sizes, dim=dim)))


@register("slice", aten=("slice", "narrow", "select", "slice_copy", "select_copy"),
          onnx={"Slice": OnnxOp(_slice, ("data", "starts", "ends", "axes", "steps"), ("starts", "ends", "axes", "steps"))})
class Slice(Movement):
    """Slicing a pruned axis: start/end/index shift to the kept positions before them."""

    onnx_args = {("Slice", "starts"): OnnxArg(input=1, since=10), ("Slice", "ends"): OnnxArg(input=2, since=10)}

    def check(self, node, lab, data) -> None:
        steps = as_list(node.attrs.get("steps")) or [int(node.attrs.get("step", 1) or 1)]
        f = lab.field(data[0])
        if any(s != 1 for s in steps) and f is not None:
            lab.pin(f.labels)

    def rewrite(self, node, shrink) -> Rewrite | None:
        x = node.inputs[0]
        rank = len(shrink.old_shape(x))
        if node.source_op.startswith("onnx::"):
            return _onnx_slice(node, shrink, x, rank)
        dim = int(node.attrs.get("dim", 0)) % rank
        kept = shrink.kept(x, dim)
        if kept is None:
            return None
        size = shrink.old_shape(x)[dim]
        before = lambda i: int(kept[: max(0, min(size, i + size if i < 0 else i))].sum())  # noqa: E731
        if "index" in node.attrs:
            return Rewrite(args={"index": before(int(node.attrs["index"]))})
        if "length" in node.attrs:
            return Rewrite(args={"start": before(int(node.attrs["start"])),
                                 "length": shrink.new_shape(node.outputs[0])[dim]})
        start = before(int(node.attrs.get("start") or 0))
        return Rewrite(args={"start": start, "end": start + shrink.new_shape(node.outputs[0])[dim]})


def _onnx_slice(node: Node, shrink, x: str, rank: int) -> Rewrite | None:
    starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
    axes = list(node.attrs.get("axes") or range(len(starts)))
    changed = False
    for k, a in enumerate(axes):
        kept = shrink.kept(x, a)
        if kept is None:
            continue
        size = shrink.old_shape(x)[a % rank]
        start = max(0, min(size, starts[k] + size if starts[k] < 0 else starts[k]))
        starts[k] = int(kept[:start].sum())
        ends[k] = starts[k] + shrink.new_shape(node.outputs[0])[a % rank]
        changed = True
    return Rewrite(args={"starts": starts, "ends": ends}) if changed else None


@register("gather", aten=("index_select", "index", "gather", "_unsafe_index", "take_along_dim"),
          onnx={"Gather": OnnxOp(_gather, ("data", "indices")),
                "GatherElements": OnnxOp(_gather_elements, ("data", "indices")),
                "GatherND": OnnxOp(_gather_nd, ("data", "indices"))})
class Gather(Movement):
    """Indexing with constant indices runs exactly on labels.  The indexed axis itself
    must keep its length (the indices are not rewritten): its entries are coupled
    across that axis, e.g. the q/k/v thirds of a fused in-projection prune together,
    and a field on that axis alone is pinned."""

    index_args = ("index", "indices")

    def fast_field(self, node, lab, data) -> Field | None:
        """Indices computed from data (a detector's top-k queries) that address unlabelled
        axes only, in ``x[i, j]`` (leading, adjacent index tensors), ``index_select`` or ONNX
        ``Gather``: every labelled axis keeps its entries and moves by shape alone, so the
        field follows without running the op.  (``gather``'s index spans every axis: it
        would have to shrink with the channels, and stays a barrier.)"""
        f = lab.field(data[0]) if len(data) == 1 else None
        op = node.source_op
        if f is None or not op.startswith(("aten.index.", "aten._unsafe_index.", "aten.index_select.", "onnx::Gather")):
            return None
        raw = node.attrs.get("indices", node.attrs.get("index"))
        index = [ref_name(i) for i in (raw if isinstance(raw, (list, tuple)) else [raw])]
        if all(i is None or lab.data(i) is not None for i in index):
            return None  # constant indices: run exactly on labels
        if any(i is not None and (lab.field(i) is not None or lab.graph.values[i].dtype == torch.bool) for i in index):
            return None
        rank, out = len(lab.shape(data[0])), lab.shape(node.outputs[0])
        if op.startswith(("aten.index.", "aten._unsafe_index.")):
            dims = [k for k, i in enumerate(index) if i is not None]
            if dims != list(range(dims[0], dims[-1] + 1)):
                return None  # separated index tensors put their axes first
            width = len(out) - (rank - len(dims))  # the broadcast indices' rank
        else:
            dims = [int(node.attrs.get("dim", node.attrs.get("axis", 0))) % rank]
            width = 1 if op.startswith("aten.index_select.") else len(lab.shape(index[0]))
        if any(dims[0] <= a <= dims[-1] for a in f.axes):
            return None
        axes = tuple(a if a < dims[0] else a - len(dims) + width for a in f.axes)
        if any(out[b] != lab.shape(data[0])[a] for a, b in zip(f.axes, axes)):
            return None
        return Field(axes, f.labels)

    def check(self, node, lab, data) -> None:
        f = lab.field(data[0])
        if f is None:
            return
        rank = len(lab.shape(data[0]))
        if "indices" in node.attrs and isinstance(node.attrs["indices"], (list, tuple)):
            dims = [i for i, ix in enumerate(node.attrs["indices"]) if ix is not None]
        elif node.source_op == "onnx::GatherND":  # the indices' last axis addresses that many axes
            b = int(node.attrs.get("batch_dims", 0))
            dims = list(range(b, b + lab.shape(ref_name(node.attrs["indices"]))[-1]))
        else:
            dims = [int(node.attrs.get("dim", node.attrs.get("axis", 0))) % rank]
        hit = [d for d in dims if d in f.axes]
        if not hit:
            return
        if len(hit) == len(f.axes):
            lab.pin(f.labels)
            return
        for d in hit:
            j = f.axes.index(d)
            rows = f.labels.movedim(j, -1).reshape(-1, f.labels.shape[j])
            lab.union(rows[:, :1], rows)


@register("embed_scatter", aten=("slice_scatter", "select_scatter"))
class EmbedScatter(Movement):
    """Writes ``src`` into a slice (or one index) of ``input`` along ``dim``: runs exactly on
    labels.  The slice's bounds are not rewritten, so atoms on ``dim`` are pinned."""

    def check(self, node, lab, data) -> None:
        dim = int(node.attrs.get("dim", 0)) % len(lab.shape(node.outputs[0]))
        f = lab.field(node.outputs[0])  # input's and src's atoms, as run on labels
        if f is not None and dim in f.axes:
            lab.pin(f.labels)


@register("repeat_interleave", aten=("repeat_interleave",))
class RepeatInterleave(Movement):
    def rewrite(self, node, shrink) -> Rewrite | None:
        if node.attrs.get("output_size") is None:
            return None
        dim = node.attrs.get("dim")
        return Rewrite(args={"output_size": shrink.new_shape(node.outputs[0])[int(dim or 0)]})


@register("pad", aten=("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
                       "replication_pad2d", "replication_pad3d", "reflection_pad3d"),
          onnx={"Pad": OnnxOp(_onnx_pad, ("data", "pads", "constant_value", "axes"), ("pads", "axes"))})
class Pad(Rule):
    """Padding along a labelled axis adds unlabelled entries; elsewhere labels are unchanged."""

    def propagate(self, node: Node, lab: Labels) -> None:
        x, out = node.inputs[0], node.outputs[0]
        f = lab.field(x)
        if f is None:
            lab.fields[out] = None
            return
        rank = len(lab.shape(x))
        mode = node.attrs.get("mode", "constant")
        if "reflection" in node.source_op or "replication" in node.source_op:
            mode = "reflect"
        labels = f.labels
        for i, a in enumerate(f.axes):
            before, after = _pad_of(node, rank, a)
            if before or after:
                if mode != "constant" or before < 0 or after < 0:
                    lab.pin(f.labels)
                    lab.fields[out] = None
                    return
                pads = [0, 0] * (labels.dim() - 1 - i) + [before, after]
                labels = torch.nn.functional.pad(labels, pads, value=-1)
        lab.set_field(out, Field(f.axes, labels))

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        """Padding a zero channel along other axes keeps it zero only with the value 0."""
        if not lab.is_zero(node.inputs[0]):
            return False
        if "reflection" in node.source_op or "replication" in node.source_op \
                or node.attrs.get("mode", "constant") != "constant":
            return True
        value = node.attrs.get("value", node.attrs.get("constant_value"))
        if isinstance(value, Ref):
            data = lab.data(value.name)
            return data is not None and bool((data == 0).all())
        return value is None or value == 0


def _pad_of(node: Node, rank: int, axis: int) -> tuple[int, int]:
    pads = as_list(node.attrs.get("pad", node.attrs.get("padding", node.attrs.get("pads"))))
    if node.source_op.startswith("onnx::"):
        half = len(pads) // 2
        return (pads[axis], pads[axis + half]) if axis < half else (0, 0)
    k = rank - 1 - axis
    return (pads[2 * k], pads[2 * k + 1]) if 2 * k + 1 < len(pads) else (0, 0)
