"""Recurrent layers: LSTM, GRU and Elman RNN, as ATen records them and as ONNX ops.

A hidden unit ``j`` is one atom across the gates: rows ``j, H+j, ...`` (4 gate slices
for an LSTM, 3 for a GRU, 1 for an RNN) of the input and recurrent weights and of both
biases, column ``j`` of the recurrent weight, and the next layer's input columns that
read it (every direction's copy).  Zeroed, the unit's pre-activations are 0, so its cell
input ``tanh(0) = 0`` (an RNN's ``tanh``/``relu`` of 0 too) and, starting from a zero
state, its state stays 0 at every step: ``c = f*0 + i*0``, ``h = o*tanh(0)``; a GRU's
``h = (1-z)*tanh(0) + z*0``.  Removing it is then exact.  That needs the unit's initial
state to be zero: a state made of zeros (``torch.zeros``, ``ConstantOfShape``) is
sliced in the compact model; one the caller passes is a barrier with that reason.

One module has one ``hidden_size``: ATen's ``lstm`` runs every layer and direction with
it, so there unit ``j`` is one atom in all of them; an ONNX node is one layer (an export
writes one node per layer), so there the directions of a node share atoms and the layers
are separate groups, chained through the next node's input columns.
"""
from __future__ import annotations

from typing import Any

import torch

from ..analysis.labels import Field, Labels
from ..ir.graph import Node
from .common import ref_name, tensor_attr
from .registry import OnnxOp, Rule, op_kind, register
from .rewrite import Call, OnnxCall, OnnxContext, Phantom, Rewrite

aten = torch.ops.aten
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1, "LSTM": 4, "GRU": 3, "RNN": 1}
ATEN_RNN = {"lstm": aten.lstm.input, "gru": aten.gru.input, "rnn_tanh": aten.rnn_tanh.input,
            "rnn_relu": aten.rnn_relu.input}
ZERO_ACTIVATIONS = {"Tanh", "Relu", "LeakyRelu", "Softsign", "ScaledTanh", "Elu", "ThresholdedRelu"}  # f(0) = 0
# ops a zero initial state may pass through on its way from where it is made
_STATE_PATH = ("aten.slice", "aten.expand", "aten.view", "aten.reshape", "aten.unsqueeze", "aten.select",
               "aten.contiguous", "aten.clone", "aten._to_copy", "onnx::Slice", "onnx::Expand", "onnx::Unsqueeze",
               "onnx::Reshape", "onnx::Squeeze", "onnx::Identity", "onnx::Cast", "onnx::Gather")
_ZERO_MAKERS = ("aten.zeros.", "aten.new_zeros.", "aten.zeros_like.")


def _zero_state(lab: Labels, name: str) -> bool:
    """Whether ``name`` is all zeros by construction: made by ``zeros`` (or ONNX
    ConstantOfShape of 0), possibly sliced, expanded or reshaped since; or known data."""
    for _ in range(16):
        data = lab.data(name)
        if data is not None:
            return not bool(data.any())
        node = lab.producer(name)
        if node is None:
            return False
        if node.source_op.startswith(_ZERO_MAKERS):
            return True
        if node.source_op == "onnx::ConstantOfShape":
            value = node.attrs.get("value")
            if value is None:
                return True
            return not bool(tensor_attr(value).any())
        if not node.source_op.startswith(_STATE_PATH) or not node.inputs:
            return False
        name = node.inputs[0]
    return False


def _state_problem(lab: Labels, h: str | None) -> str | None:
    """Why initial state ``h`` keeps the units (None: it is fine): an unlabelled state must
    be zeros (the compact model slices it), a labelled one zero where removed."""
    if h is None:
        return None
    if lab.field(h) is None:
        return None if _zero_state(lab, h) else \
            f"initial state {h} is not known to be zero: a removed unit's state must start at 0"
    if not lab.is_zero(h):
        return f"initial state {h} carries channels but is not zero where they are removed"
    return None


def _couple_state(lab: Labels, h: str | None, units: torch.Tensor) -> None:
    """A labelled initial state [layers*dirs, batch, hidden] loses the removed units' columns."""
    if h is not None and lab.field(h) is not None:
        lab.union(lab.axis_labels(h, 2), units)


def _macs(lab: Labels, units: torch.Tensor, ins: torch.Tensor | None, gates: int, steps: int, in_size: int,
          hidden: int, cells: int) -> None:
    macs = float(steps * cells * gates * hidden * (in_size + hidden))
    lab.total_macs += macs
    lab.cost(units, macs)
    if ins is not None:
        lab.cost(ins, steps * gates * hidden * in_size)


def _fixed(lab: Labels, names: list[str | None]) -> bool:
    return all(n is None or lab.graph.values[n].fixed for n in names)


# ---- ATen: lstm / gru / rnn_tanh / rnn_relu (``.input`` overloads: padded, not packed)

def rnn_kept(x: torch.Tensor, *tensors: torch.Tensor, kind: str, n_hx: int, kept: list, has_biases: bool,
             num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool) -> Any:
    """The compact model's recurrent layer: initial states made of zeros at the full size
    (``kept[k]`` not None) keep their surviving units, then ATen's op runs as before."""
    hx = [h if k is None else h.index_select(2, torch.tensor(k, device=h.device))
          for h, k in zip(tensors[:n_hx], kept)]
    params = list(tensors[n_hx:])
    state = hx if kind == "lstm" else hx[0]
    return ATEN_RNN[kind](x, state, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


rnn_kept.mode_arg = "train"  # a compact module sets it on .train()/.eval(): dropout between layers
RNN_KEPT = Phantom("rnn_kept", rnn_kept, None)


def _rnn_shape(args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...] | None:
    """A padded recurrent layer's outputs on meta tensors: the sequence ``[T, B, dirs * H]``
    (``[B, T, ...]`` batch first) and final states shaped like the initial ones.  ATen's
    meta path runs the op's decomposition step by step, every gate a dozen meta kernels in
    Python: the three recordings of timm's sequencer2d_s (36 LSTM calls each) were 8 of
    the 9 s of its verified trace.  None (the kernel runs) for an unbatched input or
    keyword arguments."""
    if kwargs or len(args) != 9 or args[0].dim() != 3:
        return None
    x, hx, bidirectional, batch_first = args[0], args[1], args[7], args[8]
    states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    steps, batch = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
    features = (2 if bidirectional else 1) * states[0].shape[-1]
    out = torch.empty((batch, steps, features) if batch_first else (steps, batch, features),
                      dtype=x.dtype, device="meta")
    return (out, *(torch.empty_like(h) for h in states))


@register("rnn", aten=("lstm", "gru", "rnn_tanh", "rnn_relu"),
          shape_only={f"{kind}.input": _rnn_shape for kind in ("lstm", "gru", "rnn_tanh", "rnn_relu")})
class AtenRNN(Rule):
    """One atom per hidden index, across every gate, layer and direction (one hidden_size)."""

    mode_args = {"lstm": "train", "gru": "train", "rnn_tanh": "train", "rnn_relu": "train"}  # dropout between layers

    def propagate(self, node: Node, lab: Labels) -> None:
        if "batch_sizes" in node.attrs:
            return lab.barrier(node, "a packed sequence (batch_sizes): not analysed; pad the batch instead")
        a, kind = node.attrs, op_kind(node)
        gates, dirs, layers = GATES[kind], 2 if a.get("bidirectional") else 1, int(a.get("num_layers", 1))
        params = [ref_name(p) for p in a["params"]]
        per = 4 if a.get("has_biases", True) else 2
        if len(params) != layers * dirs * per:
            return lab.barrier(node, "an LSTM with projections (proj_size): not analysed")
        if not _fixed(lab, params):
            return lab.barrier(node, "recurrent weights computed, not parameters")
        x = ref_name(a["input"])
        hx = [ref_name(h) for h in (a["hx"] if isinstance(a["hx"], (list, tuple)) else [a["hx"]])]
        for h in hx:
            why = _state_problem(lab, h)
            if why is not None:
                return lab.barrier(node, why)
        hidden = lab.shape(params[1])[1]
        units = lab.fresh(hidden, node)
        tile = units.repeat(gates)
        ins = lab.axis_labels(x, -1)
        for layer in range(layers):
            for d in range(dirs):
                w_ih, w_hh, *b = params[(layer * dirs + d) * per:(layer * dirs + d + 1) * per]
                lab.param_axis(w_ih, 0, tile, "producer", b[0] if b else None)
                lab.param_axis(w_hh, 0, tile, "producer", b[1] if b else None)
                lab.param_axis(w_hh, 1, units, "consumer")
                lab.param_axis(w_ih, 1, ins if layer == 0 else units.repeat(dirs), "consumer")
                for bias in b:
                    lab.param_axis(bias, 0, tile)
        for h in hx:
            _couple_state(lab, h, units)
        seq = lab.shape(x)[0 if not a.get("batch_first") else 1] * lab.shape(x)[1 if not a.get("batch_first") else 0]
        _macs(lab, units, ins, gates, seq, lab.shape(x)[-1], hidden, layers * dirs)
        out, *states = node.outputs
        lab.set_field(out, Field((len(lab.shape(out)) - 1,), units.repeat(dirs)))
        for s in states:
            lab.set_field(s, Field((2,), units))

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        """A removed unit's outputs are 0 at every step (its states start at 0: checked)."""
        return True

    def rewrite(self, node, shrink) -> Rewrite | None:
        """Initial states made at the full size keep their surviving units (:func:`rnn_kept`)."""
        out_state = node.outputs[1]
        kept = shrink.kept(out_state, 2)
        if kept is None:
            return None
        a = node.attrs
        hx = [ref_name(h) for h in (a["hx"] if isinstance(a["hx"], (list, tuple)) else [a["hx"]])]
        index = kept.nonzero().reshape(-1).tolist()
        attrs = dict(kind=op_kind(node), n_hx=len(hx),
                     kept=[index if shrink.lab.fields.get(h) is None else None for h in hx],
                     has_biases=bool(a.get("has_biases", True)), num_layers=int(a.get("num_layers", 1)),
                     dropout=float(a.get("dropout", 0.0)), train=bool(a.get("train", False)),
                     bidirectional=bool(a.get("bidirectional", False)), batch_first=bool(a.get("batch_first", False)))
        return Rewrite(call=Call(RNN_KEPT, (ref_name(a["input"]), *hx, *[ref_name(p) for p in a["params"]]), attrs))


# ---- ONNX: LSTM / GRU / RNN (one layer, one or two directions, per node)

def _names(v: Any) -> list[str]:
    """An ONNX list of strings attribute (the importer keeps them as bytes)."""
    return [n.decode() if isinstance(n, bytes) else str(n) for n in (v or [])]


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "Sigmoid":
        return torch.sigmoid(x)
    if name == "Tanh":
        return torch.tanh(x)
    if name == "Relu":
        return torch.relu(x)
    raise NotImplementedError(f"recurrent activation {name} has no torch form in graphprune yet")


def _onnx_rnn(op: str):
    """An ONNX recurrent op run step by step in torch (gates in ONNX order: LSTM iofc, GRU
    zrh), for gradient criteria."""
    gates = GATES[op]
    acts_default = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}[op]

    def run(X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, *_,
            hidden_size, direction="forward", activations=None, activation_alpha=None, activation_beta=None,
            clip=None, layout=0, linear_before_reset=0, input_forget=0, **__):  # noqa: N803 - ONNX names
        if layout:
            X = X.transpose(0, 1)
        T, batch = X.shape[0], X.shape[1]
        dirs = 2 if direction == "bidirectional" else 1
        per = len(acts_default)
        acts = _names(activations) or acts_default * dirs
        H = hidden_size
        h0 = initial_h.transpose(0, 1) if (initial_h is not None and layout) else initial_h
        c0 = initial_c.transpose(0, 1) if (initial_c is not None and layout) else initial_c
        ys, hs, cs = [], [], []
        for d in range(dirs):
            f, *rest = [lambda v, n=n: _act(n, v) for n in acts[d * per:(d + 1) * per]]
            g, hh = (rest + [None])[0], rest[1:]
            w, r = W[d], R[d]
            bw, br = (B[d][:gates * H], B[d][gates * H:]) if B is not None else (0.0, 0.0)
            h = h0[d] if h0 is not None else X.new_zeros(batch, H)
            c = c0[d] if c0 is not None else X.new_zeros(batch, H)
            reverse = direction == "reverse" or d == 1
            steps = range(T - 1, -1, -1) if reverse else range(T)
            out = [None] * T
            for t in steps:
                xw = X[t] @ w.T + bw
                if op == "LSTM":
                    z = xw + h @ r.T + br
                    if clip is not None:
                        z = z.clamp(-clip, clip)
                    i, o, fg, cc = z.split(H, -1)
                    if P is not None:
                        pi, po, pf = P[d].split(H)
                        i, fg = i + pi * c, fg + pf * c
                    i, fg = f(i), f(fg)
                    if input_forget:
                        fg = 1 - i
                    c = fg * c + i * g(cc)
                    o = f(o + (P[d].split(H)[1] * c if P is not None else 0))
                    h = o * hh[0](c)
                elif op == "GRU":
                    xz, xr, xh = xw.split(H, -1)
                    rz, rr, rh = r.split(H, 0)
                    bz, brr, bh = (br.split(H) if B is not None else (0.0, 0.0, 0.0))
                    zt = f(xz + h @ rz.T + bz)
                    rt = f(xr + h @ rr.T + brr)
                    nt = g(xh + (rt * (h @ rh.T + bh) if linear_before_reset else (rt * h) @ rh.T + bh))
                    h = (1 - zt) * nt + zt * h
                else:
                    h = f(xw + h @ r.T + br)
                out[t] = h
            ys.append(torch.stack(out))
            hs.append(h)
            cs.append(c)
        Y = torch.stack(ys, 1)  # [T, D, B, H]
        Yh, Yc = torch.stack(hs), torch.stack(cs)
        if layout:
            Y, Yh, Yc = Y.permute(2, 0, 1, 3), Yh.transpose(0, 1), Yc.transpose(0, 1)
        return (Y, Yh, Yc) if op == "LSTM" else (Y, Yh)
    return run


def _take_onnx(call: Call, ctx: OnnxContext) -> OnnxCall:
    """``Gather(data, kept, axis)`` as a FunctionProto of the ``graphprune`` domain."""
    from onnx import AttributeProto, helper

    from .normalization import DOMAIN
    gather = helper.make_node("Gather", ["data", "index"], ["taken"])
    gather.attribute.append(AttributeProto(name="axis", ref_attr_name="axis", type=AttributeProto.INT))
    fn = helper.make_function(DOMAIN, "TakeKept", ["data", "index"], ["taken"], [gather],
                              [helper.make_opsetid("", ctx.opset(13))], attributes=["axis"])
    return OnnxCall(fn, {"axis": int(call.attrs["axis"])}, {1: list(call.attrs["index"])})


TAKE_KEPT = Phantom("take_kept", None, _take_onnx)  # only ONNX states are made at run time at the full size
_ONNX_INPUTS = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P")


@register("onnx_rnn", onnx={op: OnnxOp(_onnx_rnn(op), _ONNX_INPUTS) for op in ("LSTM", "GRU", "RNN")})
class OnnxRNN(Rule):
    """One atom per hidden index of the node, across gates and directions."""

    def propagate(self, node: Node, lab: Labels) -> None:
        a, op = node.attrs, op_kind(node)
        gates = GATES[op]
        names = {k: ref_name(a.get(k)) for k in _ONNX_INPUTS}
        x, w, r, b, p = names["X"], names["W"], names["R"], names["B"], names["P"]
        if not _fixed(lab, [w, r, b, p]):
            return lab.barrier(node, "recurrent weights computed, not initializers")
        dirs = lab.shape(w)[0]
        acts = _names(a.get("activations"))
        per = {"LSTM": 3, "GRU": 2, "RNN": 1}[op]
        state_acts = [n for d in range(dirs) for n in acts[d * per + (1 if per > 1 else 0):(d + 1) * per]]
        if any(n not in ZERO_ACTIVATIONS for n in state_acts):
            return lab.barrier(node, f"activations {acts}: a zeroed unit's state is 0 only when the cell and "
                                     f"output activations map 0 to 0")
        for h in (names["initial_h"], names["initial_c"]):
            why = _state_problem(lab, h)
            if why is not None:
                return lab.barrier(node, why)
        hidden = int(a["hidden_size"])
        units = lab.fresh(hidden, node)
        tile = units.repeat(gates)
        ins = lab.axis_labels(x, -1)
        lab.param_axis(w, 1, tile, "producer", b)
        lab.param_axis(w, 2, ins, "consumer")
        lab.param_axis(r, 1, tile, "producer")
        lab.param_axis(r, 2, units, "consumer")
        if b is not None:
            lab.param_axis(b, 1, tile.repeat(2))
        if p is not None:
            lab.param_axis(p, 1, units.repeat(3))
        for h in (names["initial_h"], names["initial_c"]):
            _couple_state(lab, h, units)  # [D, B, H], or [B, D, H] with layout 1
        steps = lab.shape(x)[0] * lab.shape(x)[1]
        _macs(lab, units, ins, gates, steps, lab.shape(x)[-1], hidden, dirs)
        outs = node.outputs
        y = [o for o in outs if len(lab.shape(o)) == 4]
        for o in outs:
            lab.set_field(o, Field((3 if o in y else 2,), units))

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        """A removed unit's outputs are 0 at every step (states start at 0: checked)."""
        return True

    def rewrite(self, node, shrink) -> Rewrite | None:
        """``hidden_size`` follows the kept units; initial states made at the full size keep
        their surviving units."""
        out = node.outputs[0]
        kept = shrink.kept(out, len(shrink.old_shape(out)) - 1)
        if kept is None:
            return None
        index = kept.nonzero().reshape(-1).tolist()
        feeds = {}
        for k in ("initial_h", "initial_c"):
            h = ref_name(node.attrs.get(k))
            if h is not None and shrink.lab.fields.get(h) is None:
                feeds[h] = Call(TAKE_KEPT, (h,), {"axis": 2, "index": index})
        return Rewrite(args={"hidden_size": len(index)}, feeds=feeds)
