"""``graphprune prune`` on ONNX files written by every exporter users bring files from
(tests/data/exporters/, built by scripts/make_exporter_corpus.py; no exporter is needed
here): groups cover most parameters, and the compact file, run by onnxruntime at two
sizes of every dynamic dim, computes what the full model with the pruned groups zeroed
computes, with its weights kept in the form the input had."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

import graphprune as gp
from graphprune.compile import compile
from graphprune.frontends.onnx_backend import run_onnx

from .conftest import run_cli

DATA = Path(__file__).resolve().parents[1] / "data" / "exporters"
MANIFEST = json.loads((DATA / "MANIFEST.json").read_text())
SIZES = {"batch": (1, 3), "side": (32, 40), "seq": (6, 9)}  # the traced size of a dynamic dim, then another
MIN_GROUPED = {"cnn": 0.95, "attention": 0.8, "bert": 0.5, "tokens": 0.9}  # share of the parameters in groups


def _dim_kind(model: str, axis: int, rank: int) -> str:
    """What a dynamic dim of an input is: the batch (axis 0), a CNN's height/width, or a
    sequence length."""
    if axis == 0:
        return "batch"
    return "side" if model == "cnn" and rank == 4 else "seq"


def feeds(path: Path, which: int) -> dict[str, np.ndarray]:
    """Inputs of the file at its traced size (``which=0``: the static dims as written, the
    batch 1, a CNN's dynamic sides 32) or at another size of every dynamic dim (1)."""
    entry = MANIFEST[path.name]
    rng = np.random.default_rng(which)
    model = onnx.load(path, load_external_data=False)
    out = {}
    for i in model.graph.input:
        if i.name not in entry["inputs"]:
            continue
        dims = entry["inputs"][i.name]
        shape = [d if isinstance(d, int) else SIZES[_dim_kind(entry["model"], k, len(dims))][which]
                 for k, d in enumerate(dims)]
        if i.type.tensor_type.elem_type == TensorProto.INT64:  # token ids, masks, token types
            high = 2 if "mask" in i.name or "type" in i.name else 100
            out[i.name] = rng.integers(0, high, shape).astype(np.int64)
            if "mask" in i.name:
                out[i.name][:, 0] = 1
        else:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def prune(path: Path, out: Path) -> gp.PrunableGraph:
    """Prune the file as ``graphprune prune --inputs x.npz --flops 0.5 --criterion obspa``
    does into ``out``, and return the pruned graph of the same run re-derived through the
    API (same settings and example inputs; deterministic), whose zeroed weights give the
    reference."""
    given = feeds(path, 0)
    npz = out.with_suffix(".npz")
    np.savez(npz, **given)
    result = compile(str(path), tuple(torch.from_numpy(a) for a in given.values()), method="obspa",
                     target=gp.Target(flops=0.5))
    r = run_cli("prune", path, "-o", out, "--inputs", npz, "--flops", "0.5", "--criterion", "obspa", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["report"]["verify_error"] < 1e-3
    assert _weights(onnx.load(out)) == _weights(result.model)  # the CLI pruned what the API re-derived
    return result.graph


def _weights(m: onnx.ModelProto) -> list[tuple[str, tuple[int, ...], int]]:
    """Name, dims and type of every weight, initializer or Constant node."""
    out = [(i.name, tuple(i.dims), i.data_type) for i in m.graph.initializer]
    out += [(n.output[0], tuple(a.t.dims), a.t.data_type) for n in m.graph.node if n.op_type == "Constant"
            for a in n.attribute if a.name == "value"]
    return sorted(out)


def weight_form(m: onnx.ModelProto) -> tuple[int, int, bool]:
    """(float initializers, float Constant nodes holding a tensor of rank >= 1, any fp16 weight)."""
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    consts = [a.t for n in m.graph.node if n.op_type == "Constant" for a in n.attribute
              if a.name == "value" and a.t.data_type in floats and len(a.t.dims) and np.prod(a.t.dims) > 1]
    inits = [i for i in m.graph.initializer if i.data_type in floats and len(i.dims) and np.prod(i.dims) > 1]
    return len(inits), len(consts), any(t.data_type == TensorProto.FLOAT16 for t in inits + consts)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_exporter_file(name: str, tmp_path: Path) -> None:
    path = DATA / name
    out = tmp_path / "small.onnx"
    g = prune(path, out)
    assert g.grouped_params >= MIN_GROUPED[MANIFEST[name]["model"]] * g.total_params, g.summary()
    full = g.backend.full(g, g.params)  # the full model, pruned groups zeroed
    compact = onnx.load(out)
    assert sum(np.prod(w[1]) for w in _weights(compact)) < 0.8 * sum(np.prod(w[1]) for w in _weights(full))
    before, after = weight_form(onnx.load(path)), weight_form(compact)
    assert (after[0] > 0, after[1] > 0, after[2]) == (before[0] > 0, before[1] > 0, before[2])
    for which in (0, 1):
        x = feeds(path, which)
        ref, got = run_onnx(full, x), run_onnx(compact, x)
        for r, o in zip(ref, got):
            assert r.shape == o.shape
            assert np.abs(r - o).max() <= 1e-3 * (np.abs(r).max() + 1e-6), (name, which)
