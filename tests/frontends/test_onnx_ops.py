"""Every ONNX op type the registry maps runs in torch as onnxruntime runs it.

Each case is a one-node model imported with ``load_onnx`` (so the entry's input names and
attribute normalisation are exercised too) and run as a torch program
(:class:`GraphProgram`, the nodes' bound torch implementations); its outputs must match
onnxruntime's on random inputs.  A new ONNX op in an entry needs a case here: the test
over the registry fails without one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphprune.frontends.onnx_import import load_onnx
from graphprune.frontends.onnx_skeleton import session
from graphprune.frontends.onnx_program import GraphProgram
from graphprune.ops.catalog import known_ops, onnx_op
from graphprune.ops.registry import BARRIERS

rng = np.random.default_rng(0)


def f32(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def pos(*shape: int) -> np.ndarray:
    return rng.uniform(0.5, 2.0, shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@dataclass
class Case:
    """``inputs`` become graph inputs (fed), ``consts`` initializers, in ``order`` (names;
    "" for an omitted optional input)."""

    inputs: dict[str, np.ndarray]
    attrs: dict = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    order: list[str] | None = None
    outputs: int = 1
    opset: int = 17
    exact: bool = True  # False: random outputs, compared by shape and dtype only
    checked: bool = True  # False: an onnxruntime-only op that onnx.checker (so the importer) refuses


X = f32(2, 4, 5, 6)
CASES: dict[str, Case] = {
    # compute
    "Conv": Case({"x": X}, dict(pads=[1, 0, 2, 1], strides=[2, 1], group=2), {"w": f32(6, 2, 3, 3), "b": f32(6)}),
    "ConvTranspose": Case({"x": X}, dict(pads=[1, 0, 0, 1], strides=[2, 2], output_padding=[1, 0], group=2),
                          {"w": f32(4, 3, 3, 3), "b": f32(6)}),
    "Gemm": Case({"a": f32(3, 5)}, dict(alpha=0.5, beta=2.0, transB=1), {"b": f32(4, 5), "c": f32(4)}),
    "MatMul": Case({"a": f32(2, 3, 5), "b": f32(2, 5, 4)}),
    "Einsum": Case({"a": f32(2, 3, 5), "b": f32(2, 5, 4)}, dict(equation="bij,bjk->bik")),
    # elementwise
    "Where": Case({"a": f32(3, 4), "b": f32(4)}, consts={"c": rng.random((3, 4)) > 0.5}, order=["c", "a", "b"]),
    "Mod": Case({}, dict(fmod=0), {"a": i64(7, -7, 5, -3), "b": i64(3, 3, -2, 2)}),
    "PRelu": Case({"x": X}, consts={"s": f32(4, 1, 1)}),
    "Trilu": Case({"x": f32(2, 5, 5)}, dict(upper=0), {"k": i64(1)}),
    "Clip": Case({"x": X}, consts={"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}),
    "Cast": Case({"x": X}, dict(to=TensorProto.INT32)),
    "CastLike": Case({"x": X}, consts={"like": np.zeros(1, np.float16)}),
    "Dropout": Case({"x": X}, outputs=2),
    "IsInf": Case({"x": np.array([1.0, np.inf, -np.inf, np.nan], np.float32)}, dict(detect_negative=0)),
    "IsNaN": Case({"x": np.array([1.0, np.inf, np.nan], np.float32)}),
    "Not": Case({}, consts={"x": rng.random(5) > 0.5}),
    "Div": Case({}, consts={"a": i64(7, -7, 8), "b": i64(2, 2, 3)}),
    "Pow": Case({"a": pos(3, 4), "b": f32(4)}),
    "Gelu": Case({"x": X}, dict(approximate="tanh"), opset=20),
    "Selu": Case({"x": X}, dict(alpha=1.5, gamma=1.1)),
    # creation
    "ConstantOfShape": Case({}, dict(value=numpy_helper.from_array(np.array([1.5], np.float32))),
                            {"shape": i64(2, 3)}),
    "Constant": Case({}, dict(value=numpy_helper.from_array(f32(2, 3)))),
    "Range": Case({}, consts={"s": np.array(1, np.int64), "l": np.array(10, np.int64), "d": np.array(3, np.int64)}),
    "RandomNormalLike": Case({"x": X}, exact=False),
    "RandomUniformLike": Case({"x": X}, exact=False),
    "EyeLike": Case({"x": f32(4, 5)}, dict(k=1)),
    # movement
    "Reshape": Case({"x": X}, consts={"s": i64(2, 0, -1)}),
    "Flatten": Case({"x": X}, dict(axis=2)),
    "Squeeze": Case({"x": f32(2, 1, 3, 1)}, consts={"a": i64(-1)}),
    "Unsqueeze": Case({"x": f32(2, 3)}, consts={"a": i64(0, 3)}),
    "Expand": Case({"x": f32(3, 1)}, consts={"s": i64(2, 3, 4)}),
    "Shape": Case({"x": X}, dict(start=1, end=-1), opset=17),
    "Size": Case({"x": X}),
    "Transpose": Case({"x": X}, dict(perm=[0, 2, 3, 1])),
    "Concat": Case({"a": f32(2, 3), "b": f32(2, 5)}, dict(axis=1)),
    "DepthToSpace": Case({"x": f32(1, 8, 2, 3)}, dict(blocksize=2, mode="CRD")),
    "SpaceToDepth": Case({"x": f32(1, 2, 4, 6)}, dict(blocksize=2)),
    "Tile": Case({"x": f32(2, 3)}, consts={"r": i64(2, 1)}),
    "Split": Case({"x": X}, dict(axis=1), {"s": i64(1, 3)}, outputs=2),
    "Slice": Case({"x": X}, consts={"s": i64(1, 0), "e": i64(4, -1), "a": i64(1, 3), "st": i64(1, 2)}),
    "Gather": Case({"x": X}, dict(axis=1), {"i": i64(3, 0, -1)}),
    "GatherElements": Case({"x": f32(3, 4)}, dict(axis=1), {"i": np.array([[0, 3], [1, 1], [2, 0]], np.int64)}),
    "GatherND": Case({"x": f32(2, 3, 4)}, dict(batch_dims=1), {"i": np.array([[[1], [2]], [[0], [0]]], np.int64)}),
    "Pad": Case({"x": X}, dict(mode="reflect"), {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}),
    # normalisation
    "BatchNormalization": Case({"x": X}, dict(epsilon=1e-3),
                               {"s": f32(4), "b": f32(4), "m": f32(4), "v": pos(4)}),
    "InstanceNormalization": Case({"x": X}, consts={"s": f32(4), "b": f32(4)}),
    "LayerNormalization": Case({"x": X}, dict(axis=-2), {"s": f32(5, 6), "b": f32(5, 6)}, outputs=3),
    "RMSNormalization": Case({"x": X}, dict(axis=-1, epsilon=1e-4), {"s": f32(6)}, opset=23),
    "GroupNormalization": Case({"x": X}, dict(num_groups=2), {"s": f32(4), "b": f32(4)}, opset=21),
    # reductions, softmax, spatial
    "ReduceMean": Case({"x": X}, dict(keepdims=0), {"a": i64(1, -1)}, opset=18),
    "ReduceSum": Case({"x": X}, consts={"a": i64(2)}, opset=13),
    "ReduceMax": Case({"x": X}, dict(axes=[0, 2], keepdims=0), opset=13),
    "ReduceProd": Case({"x": pos(2, 3, 4)}, dict(keepdims=1), opset=13),
    "ArgMax": Case({"x": np.array([[1, 3, 3], [2, 2, 0]], np.float32)}, dict(axis=1, select_last_index=1)),
    "ArgMin": Case({"x": X}, dict(axis=2, keepdims=0)),
    "Softmax": Case({"x": X}),
    "LogSoftmax": Case({"x": X}, dict(axis=1)),
    "MaxPool": Case({"x": X}, dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1]), outputs=2),
    "AveragePool": Case({"x": X}, dict(kernel_shape=[2, 3], auto_pad="SAME_UPPER", strides=[2, 2])),
    "LpPool": Case({"x": X}, dict(kernel_shape=[2, 2], p=3, pads=[1, 1, 0, 0]), opset=18),
    "Resize": Case({"x": X}, dict(mode="linear", coordinate_transformation_mode="half_pixel"),
                   {"roi": np.zeros(0, np.float32), "sc": np.array([1, 1, 2.0, 1.5], np.float32)}),
    "Upsample": Case({"x": X}, dict(mode="nearest"), {"sc": np.array([1, 1, 2.0, 3.0], np.float32)}, opset=9),
}
_UNARY = ("Relu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Softplus", "Mish", "Neg",
          "Exp", "Abs", "Sin", "Cos", "Erf", "Sign", "Floor", "Ceil", "Round", "Identity", "Celu",
          "ThresholdedRelu", "Softsign", "Reciprocal")
CASES.update({op: Case({"x": X}) for op in _UNARY})
CASES["Mish"] = Case({"x": X}, opset=18)
CASES.update({op: Case({"x": pos(2, 3)}) for op in ("Log", "Sqrt")})
CASES.update({op: Case({"a": X, "b": f32(5, 6)}) for op in ("Add", "Sub", "Mul", "Max", "Min", "Sum", "Mean")})
CASES.update({op: Case({"a": X, "b": f32(6)}) for op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")})
CASES.update({op: Case({}, consts={"a": rng.random(6) > 0.5, "b": rng.random(6) > 0.5}) for op in ("And", "Or", "Xor")})
CASES.update({op: Case({"x": X}, dict(keepdims=1), {"a": i64(1, 3)}, opset=18)
              for op in ("ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")})
CASES.update({op: Case({"x": X}) for op in ("GlobalAveragePool", "GlobalMaxPool")})
CASES["SimplifiedLayerNormalization"] = Case({"x": X}, dict(axis=-1, epsilon=1e-5), {"s": f32(6)}, checked=False)
CASES["Resize_nearest"] = Case({"x": X}, dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                              nearest_mode="floor"),
                               {"roi": np.zeros(0, np.float32), "sc": np.zeros(0, np.float32),
                                "sz": i64(2, 4, 7, 13)})
CASES["Conv_same"] = Case({"x": X}, dict(auto_pad="SAME_LOWER", strides=[2, 2]), {"w": f32(3, 4, 3, 2)})
CASES["ConvTranspose_same"] = Case({"x": X}, dict(auto_pad="SAME_UPPER", strides=[2, 3]), {"w": f32(4, 2, 3, 3)})
CASES["ConvTranspose_shape"] = Case({"x": X}, dict(output_shape=[10, 13], strides=[2, 2]), {"w": f32(4, 2, 3, 3)})
CASES["MaxPool_same"] = Case({"x": X}, dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2]), outputs=2)
CASES["AveragePool_counted"] = Case({"x": X}, dict(kernel_shape=[3, 2], pads=[1, 1, 0, 1], count_include_pad=1))
CASES["Pad_constant"] = Case({"x": X}, consts={"p": i64(0, 1, -1, 2, 0, 0, 1, 1), "v": np.array(0.5, np.float32)})
CASES.update({op: Case({"x": rng.uniform(-0.9, 0.9, (2, 3, 4)).astype(np.float32)})
              for op in ("Acos", "Asin", "Atan", "Asinh", "Cosh", "Sinh", "Tan", "Atanh")})
CASES["Acosh"] = Case({"x": pos(2, 3) + 1})
CASES["BitwiseNot"] = Case({}, consts={"x": i64(0, 5, -3)}, opset=18)
CASES.update({op: Case({}, consts={"a": i64(12, 5, -3), "b": i64(10, 3, 6)}, opset=18)
              for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor")})
CASES["BitShift"] = Case({}, dict(direction="LEFT"), {"a": np.array([1, 3, 7], np.uint32),
                                                      "b": np.array([2, 1, 3], np.uint32)})
CASES["BitShift_right"] = Case({}, dict(direction="RIGHT"), {"a": np.array([16, 3, 255], np.uint8),
                                                             "b": np.array([2, 1, 3], np.uint8)})
CASES["Shrink"] = Case({"x": X}, dict(lambd=0.7, bias=0.2))
CASES["Swish"] = Case({"x": X}, dict(alpha=0.6), opset=24)
CASES["Bernoulli"] = Case({"x": rng.random((3, 4)).astype(np.float32)}, exact=False)
CASES["RandomNormal"] = Case({}, dict(shape=[2, 3], mean=1.0), exact=False)
CASES["RandomUniform"] = Case({}, dict(shape=[2, 3], high=3.0), exact=False)
CASES.update({op: Case({}, dict(periodic=0), {"n": np.array(8, np.int64)}, opset=17)
              for op in ("HannWindow", "HammingWindow", "BlackmanWindow")})
CASES["GlobalLpPool"] = Case({"x": X}, dict(p=3))
CASES["ReduceLogSum"] = Case({"x": pos(2, 3, 4)}, dict(keepdims=0), {"a": i64(1)}, opset=18)
# along an axis
CASES["TopK"] = Case({"x": X}, dict(axis=2, largest=0), {"k": i64(3)}, outputs=2)
CASES["CumSum"] = Case({"x": X}, dict(exclusive=1, reverse=1), {"a": np.array(2, np.int64)})
CASES["ReverseSequence"] = Case({"x": f32(5, 3, 2)}, dict(batch_axis=1, time_axis=0), {"l": i64(5, 2, 0)})
CASES["Hardmax"] = Case({"x": X}, dict(axis=1), opset=13)
CASES["LRN"] = Case({"x": X}, dict(size=3, alpha=2e-3, beta=0.7, bias=1.5))
CASES["GridSample"] = Case({"x": X}, dict(align_corners=1), {"g": rng.uniform(-1, 1, (2, 3, 4, 2)).astype(np.float32)},
                           opset=20)
CASES["RoiAlign"] = Case({"x": X}, dict(output_height=2, output_width=3, sampling_ratio=2, spatial_scale=0.5),
                         {"r": np.array([[0, 0, 4, 3], [1, 2, 8, 9]], np.float32), "b": i64(1, 0)}, opset=16)
CASES["MaxRoiPool"] = Case({"x": X}, dict(pooled_shape=[2, 2], spatial_scale=1.0),
                           {"r": np.array([[0, 0, 0, 3, 3], [1, 1, 1, 4, 4]], np.float32)})
CASES["CenterCropPad"] = Case({"x": X}, dict(axes=[2, 3]), {"s": i64(3, 9)}, opset=18)
CASES["DFT"] = Case({"x": f32(2, 6, 1)}, dict(onesided=1, axis=1), opset=17)
CASES["ScatterElements"] = Case({"x": f32(3, 4)}, dict(axis=1, reduction="add"),
                                {"i": np.array([[0, 1], [2, 2], [3, 0]], np.int64), "u": f32(3, 2)}, opset=16)
CASES["Scatter"] = Case({"x": f32(3, 4)}, dict(axis=0), {"i": np.array([[0, 1], [2, 2]], np.int64), "u": f32(2, 2)},
                        opset=9)
CASES["ScatterND"] = Case({"x": f32(4, 3)}, dict(reduction="mul"), {"i": np.array([[1], [3], [1]], np.int64),
                                                                    "u": f32(3, 3)}, opset=16)
CASES["QuantizeLinear"] = Case({"x": X}, dict(axis=1), {"s": pos(4), "z": np.array([1, 0, 3, 250], np.uint8)},
                               opset=13)
CASES["DequantizeLinear"] = Case({}, consts={"x": rng.integers(-128, 127, (2, 4, 3), dtype=np.int8),
                                             "s": np.array(0.1, np.float32), "z": np.array(-3, np.int8)}, opset=13)
_T, _B, _I, _H = 5, 2, 3, 4
CASES["LSTM"] = Case({"x": f32(_T, _B, _I)}, dict(hidden_size=_H, direction="bidirectional"),
                     {"w": f32(2, 4 * _H, _I), "r": f32(2, 4 * _H, _H), "b": f32(2, 8 * _H), "h": f32(2, _B, _H),
                      "c": f32(2, _B, _H), "p": f32(2, 3 * _H)},
                     order=["x", "w", "r", "b", "", "h", "c", "p"], outputs=3)
CASES["GRU"] = Case({"x": f32(_T, _B, _I)}, dict(hidden_size=_H, direction="reverse", linear_before_reset=1),
                    {"w": f32(1, 3 * _H, _I), "r": f32(1, 3 * _H, _H), "b": f32(1, 6 * _H)}, outputs=2)
CASES["GRU_default"] = Case({"x": f32(_T, _B, _I)}, dict(hidden_size=_H, direction="bidirectional"),
                            {"w": f32(2, 3 * _H, _I), "r": f32(2, 3 * _H, _H), "b": f32(2, 6 * _H)}, outputs=2)
CASES["RNN"] = Case({"x": f32(_T, _B, _I)}, dict(hidden_size=_H, activations=["Relu"]),
                    {"w": f32(1, _H, _I), "r": f32(1, _H, _H), "b": f32(1, 2 * _H), "h": f32(1, _B, _H)},
                    order=["x", "w", "r", "b", "", "h"], outputs=2)
CASES["Resize_cubic"] = Case({"x": X}, dict(mode="cubic", coordinate_transformation_mode="align_corners"),
                             {"roi": np.zeros(0, np.float32), "sc": np.array([1, 1, 1.6, 2.0], np.float32)})


def _model(op: str, case: Case) -> onnx.ModelProto:
    op_type = op.split("_")[0]
    names = case.order or [*case.inputs, *case.consts]
    outs = [f"y{k}" for k in range(case.outputs)]
    node = helper.make_node(op_type, names, outs, name="n", **case.attrs)
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for k, v in case.inputs.items()]
    inits = [numpy_helper.from_array(v, k) for k, v in case.consts.items()]
    graph = helper.make_graph([node], op, inputs, [helper.ValueInfoProto(name=o) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    inferred = onnx.shape_inference.infer_shapes(model).graph
    typed = {v.name: v for v in [*inferred.value_info, *inferred.output] if v.type.HasField("tensor_type")}
    first = next(iter([*case.inputs.values(), *case.consts.values()]), np.zeros(0))
    for o in model.graph.output:  # an op shape inference does not know: a norm, the input's type and shape
        o.CopyFrom(typed.get(o.name) or helper.make_tensor_value_info(o.name, TensorProto.FLOAT, first.shape))
    return model


def test_every_registered_onnx_op_runs_in_torch_and_has_a_case() -> None:
    """Every ONNX op with a rule (declared barriers aside: nothing is pruned through them,
    and sequences, strings or control flow have no torch form here)."""
    registered = sorted(n[len("onnx::"):] for op, names in known_ops().items() if op not in BARRIERS
                        for n in names if n.startswith("onnx::"))
    assert len(registered) > 100
    assert all(onnx_op(op) is not None and callable(onnx_op(op).torch) for op in registered)
    missing = [op for op in registered if op not in CASES]
    assert not missing, f"ONNX ops with an entry but no torch-vs-onnxruntime case: {missing}"


@pytest.mark.parametrize("op", sorted(CASES))
def test_torch_implementation_matches_onnxruntime(op: str) -> None:
    case = CASES[op]
    model = _model(op, case)
    sess, feeds = session(model)
    expected = sess.run(None, {**feeds, **case.inputs})
    if case.checked:
        ir, _, _ = load_onnx(model, tuple(torch.from_numpy(v) for v in case.inputs.values()))
        assert all(n.target is not None for n in ir.nodes)
        got = GraphProgram(ir, {})(*(torch.from_numpy(v) for v in case.inputs.values()))
    else:
        tensors = {**case.inputs, **case.consts}
        got = onnx_op(op).torch(*(torch.from_numpy(tensors[k]) for k in case.order or tensors), **case.attrs)
        got = got[:case.outputs] if isinstance(got, tuple) else got
    got = list(got) if isinstance(got, tuple) else [got]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        g = g.detach().numpy()
        assert g.shape == e.shape and g.dtype == e.dtype, (g.shape, e.shape, g.dtype, e.dtype)
        if case.exact:
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
