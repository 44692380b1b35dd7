"""``--calibration`` and ``--recover-steps`` from the shell, on an ONNX file with dynamic batch,
height and width: the written model keeps its names and dynamic axes and passes the checker;
wrong calibration files are refused with the input named."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from .conftest import run_cli, run_main
from .dynamic_models import export_fpn


@pytest.fixture(scope="module")
def fpn(tmp_path_factory) -> tuple:
    folder = tmp_path_factory.mktemp("calib")
    path = export_fpn(folder / "det.onnx")
    calib = folder / "calib.npz"
    np.savez(calib, images=np.random.default_rng(0).standard_normal((4, 3, 16, 24)).astype(np.float32))
    return path, calib


def _interface(proto: onnx.ModelProto) -> list:
    return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*proto.graph.input, *proto.graph.output]]


def test_prune_with_calibration_and_recovery_from_the_shell(fpn, tmp_path):
    path, calib = fpn
    out = tmp_path / "det.small.onnx"
    done = run_cli("prune", path, "--calibration", calib, "--recover-steps", "50", "--criterion", "l2",
                   "--flops", "0.3", "-o", out, "--json")  # a small detector: 50% is past its floor on multiples of 8
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["report"]
    assert report["criterion"] == "l2" and report["recovery"]["steps"] == 50 and report["recovery"]["improved"]
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert _interface(written) == _interface(onnx.load(str(path)))
    assert report["flops_removed"] > 0.25
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"images": np.zeros((2, 3, 24, 40), np.float32)})[0]  # another batch, height and width
    assert y.shape[:2] == (2, 6)


@pytest.mark.parametrize("arrays, words", [
    ({"image": np.zeros((2, 3, 16, 16), np.float32)}, "no such input"),
    ({"images": np.zeros((2, 16, 16), np.float32)}, "input 'images' has rank 4"),
    ({"images": np.zeros((2, 1, 16, 16), np.float32)}, "input 'images' has a static channels (3)"),
])
def test_wrong_calibration_files_name_the_input(fpn, tmp_path, capsys, arrays, words):
    path, _ = fpn
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    code, _, err = run_main(capsys, "prune", path, "--calibration", bad, "-o", tmp_path / "o.onnx")
    assert code == 3 and words in err and not (tmp_path / "o.onnx").exists()


def test_recovery_without_calibration_is_refused(fpn, tmp_path, capsys):
    path, _ = fpn
    code, _, err = run_main(capsys, "prune", path, "--recover-steps", "10", "--input-shape", "images=1x3x16x16",
                            "-o", tmp_path / "o.onnx")
    assert code == 3 and "--calibration" in err


def test_a_folder_of_images_with_preprocess(fpn, tmp_path):
    """Images are read as the model was trained (size, mean, std), checked like arrays."""
    from PIL import Image

    from graphprune.frontends.calibration_files import Preprocess, load_calibration

    path, _ = fpn
    for i in range(3):
        Image.fromarray(np.full((30, 20, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    pre = Preprocess.parse("size=16x24,mean=0.5,0.5,0.5,std=0.25,0.25,0.25")
    batches = load_calibration(tmp_path, onnx.load(str(path)), preprocess=pre)
    x = np.concatenate([b["images"] for b in batches])
    assert x.shape == (3, 3, 16, 24) and np.allclose(x[2], (120 / 255 - 0.5) / 0.25)
    with pytest.raises(ValueError, match="size=HxW"):
        Preprocess.parse("mean=0.5")


def test_calibration_at_a_size_the_traced_graph_cannot_run_names_the_input(fpn):
    """The detector's Reshape sizes were read from shapes at trace time: other sizes are refused clearly."""
    import graphprune as gp
    from graphprune.errors import ShapeMismatchError

    path, calib = fpn
    g = gp.trace(str(path), (np.load(calib)["images"],))
    with pytest.raises(ShapeMismatchError, match="calibration input 'images' has shape 2x3x24x32"):
        gp.prune(g, target=0.3, data=[np.zeros((2, 3, 24, 32), np.float32)])
