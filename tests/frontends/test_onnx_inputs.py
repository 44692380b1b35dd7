"""The example inputs of an ONNX model (``graphprune.frontends.onnx_inputs``): shape specs,
checks against the declared inputs, and the second sizes of dynamic axes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper

from graphprune.errors import BadOnnxError, ShapeMismatchError
from graphprune.frontends.onnx_inputs import input_feeds, load_npz, parse_input_shape, second_feeds


def two_inputs() -> onnx.ModelProto:
    """image[N, 3, H, W] (float) and mask[N, H, W] (bool): dynamic batch, height, width."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["out"])], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("text, want", [("x=1x3x640x640", ("x", (1, 3, 640, 640))), ("1X3X8", (None, (1, 3, 8))),
                                        ("input.1=2,5", ("input.1", (2, 5))), ("a=b=4", ("a=b", (4,)))])
def test_parse_input_shape(text, want):
    assert parse_input_shape(text) == want


@pytest.mark.parametrize("text", ["", "x=", "x=1x", "1x0x3", "x=-1x3", "x=1.5x3", "x=?x3"])
def test_parse_input_shape_rejects(text):
    with pytest.raises(ValueError):
        parse_input_shape(text)


def test_each_dynamic_dim_but_the_batch_must_be_given():
    model = two_inputs()
    with pytest.raises(ShapeMismatchError, match=r"input 'image' has a dynamic height 'H'") as err:
        input_feeds(model)
    assert "--input-shape image=1x3x<height>x<width>" in err.value.hint
    with pytest.raises(ShapeMismatchError, match=r"input 'mask' has a dynamic dim 1 'H'"):
        input_feeds(model, shapes={"image": (2, 3, 8, 12)})
    feeds = input_feeds(model, shapes={"image": (2, 3, 8, 12), "mask": (2, 8, 12)})
    assert feeds["image"].shape == (2, 3, 8, 12) and feeds["image"].dtype == np.float32
    assert feeds["mask"].shape == (2, 8, 12) and feeds["mask"].dtype == np.bool_


def test_bad_specs_are_named():
    model = two_inputs()
    with pytest.raises(ShapeMismatchError, match="one input; this one has 2 .image, mask."):
        input_feeds(model, shapes={None: (1, 3, 8, 8)})
    with pytest.raises(ShapeMismatchError, match="no input 'img'"):
        input_feeds(model, shapes={"img": (1, 3, 8, 8)})
    with pytest.raises(ShapeMismatchError, match="static channels .3., but the shape given has 4 there"):
        input_feeds(model, shapes={"image": (1, 4, 8, 8), "mask": (1, 8, 8)})
    with pytest.raises(ShapeMismatchError, match="given both as a shape and as an array"):
        input_feeds(model, shapes={"image": (1, 3, 8, 8)}, arrays={"image": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(ShapeMismatchError, match="'image' is float32, but the array given is float64"):
        input_feeds(model, arrays={"image": np.zeros((1, 3, 8, 8)), "mask": np.zeros((1, 8, 8), bool)})


def test_npz(tmp_path):
    model = two_inputs()
    path = tmp_path / "inputs.npz"
    np.savez(path, image=np.ones((1, 3, 4, 4), np.float32))
    arrays = load_npz(path)
    with pytest.raises(ShapeMismatchError, match="'mask' has a dynamic dim 1 'H' and is not among the inputs given"):
        input_feeds(model, arrays=arrays)
    np.savez(path, image=np.ones((1, 3, 4, 4), np.float32), mask=np.ones((1, 4, 4), bool))
    feeds = input_feeds(model, arrays=load_npz(path))
    assert feeds["image"].sum() == 48 and feeds["mask"].all()
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BadOnnxError, match="cannot read the inputs file"):
        load_npz(tmp_path / "junk.npz")


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 3), st.integers(1, 400), st.integers(1, 400))
def test_second_sizes_keep_every_power_of_two_stride(n, h, w):
    """Every dynamic axis gets another size; a power-of-two stride that divides the first
    size divides the second, and nothing grows past twice its size."""
    model = two_inputs()
    feeds = {"image": np.zeros((n, 3, h, w), np.float32), "mask": np.ones((n, h, w), bool)}  # sizes alone matter
    alt = second_feeds(model, feeds)
    (n2, c2, h2, w2), mask = alt["image"].shape, alt["mask"]
    assert (n2, c2) == (n + 1, 3) and mask.shape == (n2, h2, w2) and mask.all()
    for a, b in ((h, h2), (w, w2)):
        assert a < b <= 2 * a
        assert all(b % s == 0 for s in (1, 2, 4, 8, 16, 32, 64) if a % s == 0)
    only = second_feeds(model, feeds, batch_only=True)
    assert only["image"].shape == (n + 1, 3, h, w)


def test_static_inputs_have_no_second_size():
    model = two_inputs()
    for vi in model.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            d.dim_value = 4
    assert second_feeds(model, input_feeds(model)) is None
