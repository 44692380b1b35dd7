"""Build tests/data/exporters/: small models of our own, with seeded weights, exported to
ONNX by every exporter users bring files from, so the default suite can test each
exporter's file without installing any exporter.

Every framework builds the same small CNN (conv+BN+ReLU stem, a residual block, a
depthwise-separable block, max pooling, global average pooling, a linear head; NCHW
3x32x32 input, NHWC for TensorFlow and JAX), exported with dynamic batch, height and
width (every exporter here allows it).  torch's dynamo exporter also writes a small
attention + MLP block (dynamic batch and sequence), tf2onnx a token MLP block with Keras
layer norms (which it writes op by op); optimum exports a tiny BERT built
from a random config.  onnxslim, onnx-simplifier and onnxconverter-common's fp16
conversion (keep_io_types, as users run it; once more with the head kept in fp32) process
the TorchScript CNN.

paddle2onnx 2.1 writes its weights as initializers; the files PyPI packages ship (written
by paddle2onnx before 2.0) hold them in ``Constant`` nodes, and onnxconverter-common 1.16
converts a weight to fp16 without a ``Cast`` (ops it keeps in fp32 keep fp32 weights).
Those forms are tested on files rewritten into them
(tests/frontends/test_onnx_weight_forms.py) and on the real files
(benchmarks/wild_onnx.py).

The exporters conflict with each other (protobuf, numpy, transformers, Python
version), so each runs in a venv of its own, outside the repository, with the pins of
``scripts/make_exporter_corpus.requirements.txt``::

    python3.11 -m venv /work/venvs/exporters-paddle && /work/venvs/exporters-paddle/bin/pip install \\
        paddlepaddle==3.3.1 paddle2onnx==2.1.0
    python3.11 -m venv /work/venvs/exporters-tf && /work/venvs/exporters-tf/bin/pip install \\
        tensorflow-cpu==2.21.0 tf2onnx==1.17.0
    python3.12 -m venv /work/venvs/exporters-jax && /work/venvs/exporters-jax/bin/pip install \\
        jax==0.12.0.1 jax2onnx==0.17.1
    python3.11 -m venv /work/venvs/exporters-optimum   # torch comes from the project's venv:
    echo $PROJECT_VENV/lib/python3.11/site-packages > \\
        /work/venvs/exporters-optimum/lib/python3.11/site-packages/zz_project_torch.pth
    /work/venvs/exporters-optimum/bin/pip install optimum-onnx==0.1.0 "transformers>=4.57,<4.58"
    python3.11 -m venv /work/venvs/exporters && /work/venvs/exporters/bin/pip install \\
        onnxslim==0.1.98 onnxsim==0.8.1 onnxconverter-common==1.16.0 onnxruntime==1.32.0

Then, from the repository root, with the project's venv (which runs the torch exporters
itself and every other one in its venv; ``--venvs`` if they live elsewhere)::

    python scripts/make_exporter_corpus.py            # all of them, then MANIFEST.json
    python scripts/make_exporter_corpus.py --only paddle2onnx tf2onnx

Each file is written through a temporary file and a rename; MANIFEST.json records per
file the exporter, the package versions, the opset, the inputs with their dynamic dims,
the form of the weights and the sha256.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "exporters"
SEED = 0
SIDE = 32  # traced height/width of the CNNs


def _versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import version
    return {p: version(p) for p in packages}


def _replace(tmp: str | Path, path: Path) -> None:
    os.replace(tmp, path)


@contextlib.contextmanager
def _written(path: Path) -> Iterator[str]:
    """A temporary path next to ``path`` to write to; renamed to ``path`` on success,
    removed on failure (never a half-written file under the real name)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---- torch (the project's venv) ---------------------------------------------------------------

def _torch_cnn() -> Any:
    import torch
    from torch import nn

    def cbr(cin: int, cout: int, k: int, groups: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class Residual(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.body = nn.Sequential(*cbr(c, c, 3), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.body(x))

    torch.manual_seed(SEED)
    model = nn.Sequential(*cbr(3, 16, 3), Residual(16), *cbr(16, 16, 3, groups=16), *cbr(16, 32, 1),
                          nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    _randomise_bn(model)
    return model.eval()


def _randomise_bn(model: Any) -> None:
    """Non-trivial running statistics and affine parameters (fresh ones are 0/1 and would
    hide a mistake in how a norm's entries are sliced)."""
    import torch
    g = torch.Generator().manual_seed(SEED)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _torch_attention() -> Any:
    import torch
    from torch import nn

    class Block(nn.Module):
        """Pre-norm attention (4 heads of 8) and a GELU MLP over 32-wide tokens."""

        def __init__(self, d: int = 32, heads: int = 4) -> None:
            super().__init__()
            self.heads = heads
            self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.norm2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 64), nn.Linear(64, d)
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
            x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
            x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))
            return self.head(x.mean(1))

    torch.manual_seed(SEED)
    return Block().eval()


def export_torch_script(out: Path) -> list[dict[str, Any]]:
    import torch
    path = out / "torch_script_cnn.onnx"
    with _written(path) as tmp:
        torch.onnx.export(_torch_cnn(), (torch.randn(1, 3, SIDE, SIDE),), tmp, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch"}})
    return [_entry(path, "torch.onnx.export (TorchScript)", _versions("torch"), "cnn")]


def export_torch_dynamo(out: Path) -> list[dict[str, Any]]:
    import torch
    from torch.export import Dim
    entries = []
    batch, side = Dim("batch", min=1, max=64), Dim("side", min=8, max=256)
    seq = Dim("seq", min=2, max=128)
    for name, model, x, shapes, kind in (
            ("torch_dynamo_cnn.onnx", _torch_cnn(), torch.randn(2, 3, SIDE, SIDE),
             ({0: batch, 2: side, 3: side},), "cnn"),
            ("torch_dynamo_attention.onnx", _torch_attention(), torch.randn(2, 6, 32),
             ({0: batch, 1: seq},), "attention")):
        path = out / name
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                    dynamic_shapes=shapes, optimize=True, verbose=False)
        with _written(path) as tmp:
            program.save(tmp)
        entries.append(_entry(path, "torch.onnx.export (dynamo)", _versions("torch", "onnxscript"), kind))
    return entries


# ---- paddle2onnx ------------------------------------------------------------------------------

def export_paddle2onnx(out: Path) -> list[dict[str, Any]]:
    import numpy as np
    import paddle
    from paddle import nn

    paddle.seed(SEED)

    def cbr(cin: int, cout: int, k: int, groups: int = 1) -> list[Any]:
        return [nn.Conv2D(cin, cout, k, padding=k // 2, groups=groups, bias_attr=False), nn.BatchNorm2D(cout),
                nn.ReLU()]

    class Net(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(*cbr(3, 16, 3))
            self.body = nn.Sequential(*cbr(16, 16, 3), nn.Conv2D(16, 16, 3, padding=1, bias_attr=False),
                                      nn.BatchNorm2D(16))
            self.sep = nn.Sequential(*cbr(16, 16, 3, groups=16), *cbr(16, 32, 1), nn.MaxPool2D(2))
            self.pool, self.head = nn.AdaptiveAvgPool2D(1), nn.Linear(32, 10)

        def forward(self, x: Any) -> Any:
            x = self.stem(x)
            x = nn.functional.relu(x + self.body(x))
            return self.head(paddle.flatten(self.pool(self.sep(x)), 1))

    model = Net()
    rng = np.random.default_rng(SEED)
    for layer in model.sublayers():
        if isinstance(layer, nn.BatchNorm2D):
            c = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(0, 0.1, c).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.bias.set_value(rng.normal(0, 0.1, c).astype("float32"))
    model.eval()
    path = out / "paddle2onnx_cnn.onnx"
    with tempfile.TemporaryDirectory() as work:
        spec = [paddle.static.InputSpec([None, 3, None, None], "float32", "x")]
        paddle.onnx.export(model, os.path.join(work, "model"), input_spec=spec, opset_version=11)
        _replace(os.path.join(work, "model.onnx"), path)
    return [_entry(path, "paddle2onnx", _versions("paddlepaddle", "paddle2onnx"), "cnn")]


# ---- tf2onnx ----------------------------------------------------------------------------------

def export_tf2onnx(out: Path) -> list[dict[str, Any]]:
    import numpy as np
    import tensorflow as tf
    import tf2onnx
    from tensorflow.keras import layers

    tf.keras.utils.set_random_seed(SEED)

    def cbr(x: Any, c: int, k: int, depthwise: bool = False) -> Any:
        conv = layers.DepthwiseConv2D(k, padding="same", use_bias=False) if depthwise else \
            layers.Conv2D(c, k, padding="same", use_bias=False)
        return layers.ReLU()(layers.BatchNormalization()(conv(x)))

    x = inp = tf.keras.Input((None, None, 3), name="x")
    x = cbr(x, 16, 3)
    y = layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same", use_bias=False)(cbr(x, 16, 3)))
    x = layers.ReLU()(layers.Add()([x, y]))
    x = cbr(cbr(x, 16, 3, depthwise=True), 32, 1)
    x = layers.GlobalAveragePooling2D()(layers.MaxPooling2D(2)(x))
    model = tf.keras.Model(inp, layers.Dense(10)(x))
    rng = np.random.default_rng(SEED)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
                               rng.uniform(0.5, 1.5, c)])
    fn = tf.function(lambda t: model(t, training=False))
    spec = (tf.TensorSpec((None, None, None, 3), tf.float32, name="x"),)
    path = out / "tf2onnx_cnn.onnx"
    with _written(path) as tmp:
        tf2onnx.convert.from_function(fn, input_signature=spec, opset=13, output_path=tmp)
    return [_entry(path, "tf2onnx (Keras)", _versions("tensorflow-cpu", "tf2onnx"), "cnn"),
            _tf2onnx_tokens(out)]


def _tf2onnx_tokens(out: Path) -> dict[str, Any]:
    """A token MLP block with Keras' ``LayerNormalization`` (trained-looking gamma and beta,
    then one without beta), which tf2onnx writes in its batch-norm-like decomposed form."""
    import numpy as np
    import tensorflow as tf
    import tf2onnx
    from tensorflow.keras import layers

    tf.keras.utils.set_random_seed(SEED)
    t = inp = tf.keras.Input((None, 16), name="x")
    h = layers.LayerNormalization()(layers.Dense(32)(t))
    h = layers.Add()([h, layers.Dense(32)(layers.Dense(64, activation="relu")(h))])
    model = tf.keras.Model(inp, layers.Dense(4)(layers.LayerNormalization(center=False)(h)))
    rng = np.random.default_rng(SEED)
    for layer in model.layers:
        if isinstance(layer, layers.LayerNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape) if k == 0 else rng.normal(0, 0.2, w.shape)
                               for k, w in enumerate(layer.get_weights())])
    fn = tf.function(lambda x: model(x, training=False))
    spec = (tf.TensorSpec((None, None, 16), tf.float32, name="x"),)
    path = out / "tf2onnx_tokens.onnx"
    with _written(path) as tmp:
        tf2onnx.convert.from_function(fn, input_signature=spec, opset=13, output_path=tmp)
    return _entry(path, "tf2onnx (Keras)", _versions("tensorflow-cpu", "tf2onnx"), "tokens")


# ---- jax2onnx ---------------------------------------------------------------------------------

def export_jax2onnx(out: Path) -> list[dict[str, Any]]:
    from flax import nnx
    from jax2onnx import to_onnx

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.stem = nnx.Conv(3, 16, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
            self.bn0 = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
            self.c1 = nnx.Conv(16, 16, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
            self.bn1 = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
            self.c2 = nnx.Conv(16, 16, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
            self.bn2 = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
            self.dw = nnx.Conv(16, 16, (3, 3), padding="SAME", feature_group_count=16, use_bias=False, rngs=rngs)
            self.bn3 = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
            self.pw = nnx.Conv(16, 32, (1, 1), use_bias=False, rngs=rngs)
            self.bn4 = nnx.BatchNorm(32, use_running_average=True, rngs=rngs)
            self.head = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            x = nnx.relu(self.bn0(self.stem(x)))
            x = nnx.relu(x + self.bn2(self.c2(nnx.relu(self.bn1(self.c1(x))))))
            x = nnx.relu(self.bn4(self.pw(nnx.relu(self.bn3(self.dw(x))))))
            x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            return self.head(x.mean(axis=(1, 2)))

    import jax
    import numpy as np
    model = Net(nnx.Rngs(SEED))
    rng = np.random.default_rng(SEED)
    for bn in (model.bn0, model.bn1, model.bn2, model.bn3, model.bn4):
        c = bn.scale.value.shape[0]
        bn.scale.value = jax.numpy.asarray(rng.uniform(0.5, 1.5, c), "float32")
        bn.bias.value = jax.numpy.asarray(rng.normal(0, 0.1, c), "float32")
        bn.mean.value = jax.numpy.asarray(rng.normal(0, 0.1, c), "float32")
        bn.var.value = jax.numpy.asarray(rng.uniform(0.5, 1.5, c), "float32")
    path = out / "jax2onnx_cnn.onnx"
    with _written(path) as tmp:
        to_onnx(model, [("B", "H", "W", 3)], return_mode="file", output_path=tmp, input_names=["x"])
    return [_entry(path, "jax2onnx (flax nnx)", _versions("jax", "flax", "jax2onnx"), "cnn")]


# ---- optimum ----------------------------------------------------------------------------------

def export_optimum(out: Path) -> list[dict[str, Any]]:
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    path = out / "optimum_bert.onnx"
    with tempfile.TemporaryDirectory() as work:
        BertModel(config).eval().save_pretrained(os.path.join(work, "model"))
        main_export(os.path.join(work, "model"), os.path.join(work, "onnx"), task="feature-extraction",
                    opset=17, do_validation=False)
        _replace(os.path.join(work, "onnx", "model.onnx"), path)
    return [_entry(path, "optimum-onnx (transformers BertModel, random config)",
                   _versions("optimum-onnx", "optimum", "transformers", "torch"), "bert")]


# ---- simplifiers and fp16, on the TorchScript CNN ---------------------------------------------

def export_tools(out: Path) -> list[dict[str, Any]]:
    import onnx
    import onnxslim
    from onnxconverter_common import float16
    from onnxsim import simplify

    src = onnx.load(out / "torch_script_cnn.onnx")
    entries = []
    made: list[tuple[str, Callable[[], Any], str, dict[str, str]]] = [
        ("onnxslim_cnn.onnx", lambda: onnxslim.slim(src), "onnxslim", _versions("onnxslim")),
        ("onnxsim_cnn.onnx", lambda: simplify(src)[0], "onnx-simplifier", _versions("onnxsim")),
        ("fp16_cnn.onnx", lambda: float16.convert_float_to_float16(src, keep_io_types=True),
         "onnxconverter-common float16 (keep_io_types)", _versions("onnxconverter-common")),
        ("fp16_mixed_cnn.onnx",  # the head kept in fp32: Casts between fp16 and fp32 activations
         lambda: float16.convert_float_to_float16(src, keep_io_types=True, op_block_list=["Gemm"]),
         "onnxconverter-common float16 (keep_io_types, Gemm kept in fp32)", _versions("onnxconverter-common"))]
    for name, make, exporter, versions in made:
        path = out / name
        with _written(path) as tmp:
            onnx.save(make(), tmp)
        entries.append(_entry(path, exporter + " of torch_script_cnn.onnx", versions, "cnn"))
    return entries


EXPORTERS: dict[str, tuple[str, Callable[[Path], list[dict[str, Any]]]]] = {
    # name: (venv the exporter runs in, "" for the project's own; function)
    "torch_script": ("", export_torch_script), "torch_dynamo": ("", export_torch_dynamo),
    "paddle2onnx": ("exporters-paddle", export_paddle2onnx), "tf2onnx": ("exporters-tf", export_tf2onnx),
    "jax2onnx": ("exporters-jax", export_jax2onnx), "optimum": ("exporters-optimum", export_optimum),
    "tools": ("exporters", export_tools),  # after torch_script: it processes that file
}


def _entry(path: Path, exporter: str, versions: dict[str, str], model: str) -> dict[str, Any]:
    return {"file": path.name, "exporter": exporter, "versions": versions, "model": model}


def describe(path: Path) -> dict[str, Any]:
    """What MANIFEST.json records of a file besides its exporter: opset, inputs with
    their dims (a name for a dynamic one), where the weights are, size and sha256."""
    import onnx
    from onnx import TensorProto

    m = onnx.load(path)
    inits = {i.name for i in m.graph.initializer}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    constants = sum(1 for n in m.graph.node if n.op_type == "Constant"
                    and any(a.name == "value" and a.t.data_type in floats and len(a.t.dims) for a in n.attribute))
    data = path.read_bytes()
    return {"opset": next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
            "inputs": {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                       for i in m.graph.input if i.name not in inits},
            "float_initializers": sum(1 for i in m.graph.initializer if i.data_type in floats and len(i.dims)),
            "float_constant_nodes": constants,
            "fp16": any(i.data_type == TensorProto.FLOAT16 for i in m.graph.initializer),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(EXPORTERS), help="run only these exporters")
    parser.add_argument("--venvs", default="/work/venvs", help="folder of the exporters' venvs")
    parser.add_argument("--run", choices=sorted(EXPORTERS), help=argparse.SUPPRESS)  # inside an exporter's venv
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.run:
        print("MANIFEST-ENTRIES " + json.dumps(EXPORTERS[args.run][1](OUT)))
        return
    manifest_path = OUT / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for name in args.only or list(EXPORTERS):
        venv = EXPORTERS[name][0]
        python = os.path.join(args.venvs, venv, "bin", "python") if venv else sys.executable
        done = subprocess.run([python, __file__, "--run", name], capture_output=True, text=True)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("MANIFEST-ENTRIES ")), None)
        if done.returncode or line is None:
            sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        for entry in json.loads(line.split(" ", 1)[1]):
            manifest[entry["file"]] = {**entry, **describe(OUT / entry["file"])}
            print(f"{entry['file']}: {manifest[entry['file']]['bytes']} bytes, {entry['exporter']}")
    fd, tmp = tempfile.mkstemp(prefix=".MANIFEST.", dir=OUT)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(sorted(manifest.items())), f, indent=1)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, manifest_path)


if __name__ == "__main__":
    main()
