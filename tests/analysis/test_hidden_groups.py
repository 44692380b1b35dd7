"""Hidden ("embedding column") groups through layer and RMS norms.

The property of :mod:`tests.analysis.test_zero_invariance` on transformers whose
residual stream passes layer/RMS norms: zero a random half of every group (the hidden
columns included), and the compact model (whose norms keep the original count, see
:mod:`graphprune.ops.normalization`) reproduces the zeroed full model with fewer
parameters, in PyTorch and in ONNX (checked with onnxruntime).  The negative cases
keep the hidden columns pinned: a layer norm without a trained scale, and an input
that is not zero where removed (a sigmoid before the norm).
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
import torch.nn.functional as F

import graphprune as gp
from tests.helpers import check_zero_invariance

torch.set_num_threads(1)


def _randomised(model: nn.Module) -> nn.Module:
    """No all-zero or all-one weights (torchvision's zero head, norms at 1/0) hiding differences."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


class PreNorm(nn.Module):
    """ViT-like pre-norm blocks: patch linear, learned positions, attention and MLP
    branches added to the residual stream, a final norm and a head."""

    def __init__(self, d: int = 16, norm: type = nn.LayerNorm, layers: int = 2) -> None:
        super().__init__()
        self.embed, self.pos = nn.Linear(12, d), nn.Parameter(torch.randn(1, 5, d))
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "n1": norm(d), "attn": nn.MultiheadAttention(d, 2, batch_first=True), "n2": norm(d),
            "fc1": nn.Linear(d, 2 * d), "fc2": nn.Linear(2 * d, d)}) for _ in range(layers))
        self.norm, self.head = norm(d), nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x) + self.pos
        for b in self.blocks:
            y = b["n1"](h)
            h = h + b["attn"](y, y, y, need_weights=False)[0]
            h = h + b["fc2"](F.gelu(b["fc1"](b["n2"](h))))
        return self.head(self.norm(h))


class LlamaRMSNorm(nn.Module):
    """Hugging Face Llama's hand-written RMS norm: ``x.pow(2).mean(-1)`` and ``rsqrt``."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


class ConvNeXtish(nn.Module):
    """ConvNeXt blocks: depthwise conv, LayerNorm over channels after a permute, an MLP
    in channels-last, layer scale, permute back, residual add."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.stem_norm = nn.LayerNorm(c)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "dw": nn.Conv2d(c, c, 3, padding=1, groups=c), "norm": nn.LayerNorm(c), "fc1": nn.Linear(c, 4 * c),
            "fc2": nn.Linear(4 * c, c)}) for _ in range(2))
        self.scale = nn.ParameterList(nn.Parameter(torch.full((c, 1, 1), 0.5)) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(c), nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        for b, s in zip(self.blocks, self.scale):
            y = b["norm"](b["dw"](x).permute(0, 2, 3, 1))
            y = b["fc2"](F.gelu(b["fc1"](y))).permute(0, 3, 1, 2)
            x = x + s * y
        return self.head(self.norm(x.mean((2, 3))))


def _hidden(g: gp.PrunableGraph, weight: str) -> list:
    """The groups that hold columns of ``weight`` (a norm's scale) among their slices."""
    return [grp for grp in g.groups if any(s.param == weight for s in grp.slices)]


TORCH = {
    "prenorm_layernorm": (lambda: PreNorm(), lambda: torch.randn(2, 5, 12), "norm.weight", 16),
    "prenorm_rmsnorm": (lambda: PreNorm(norm=nn.RMSNorm), lambda: torch.randn(2, 5, 12), "norm.weight", 16),
    "prenorm_llama_rmsnorm": (lambda: PreNorm(norm=LlamaRMSNorm), lambda: torch.randn(2, 5, 12), "norm.weight", 16),
    "convnext": (ConvNeXtish, lambda: torch.randn(2, 3, 8, 8), "norm.weight", 16),
    "vit_b_16_tiny": (lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64),
        lambda: torch.randn(2, 3, 32, 32), "encoder.ln.weight", 32),
}


@pytest.mark.parametrize("name", sorted(TORCH))
def test_hidden_group_torch(name: str) -> None:
    build, make, weight, size = TORCH[name]
    g = check_zero_invariance(_randomised(build()), make())
    hidden = _hidden(g, weight)
    assert len(hidden) == 1 and hidden[0].size == size, g.summary()


# Hugging Face transformers: the whole residual stream is one group (BertModel returns
# the hidden states themselves, so its columns stay; the classifier's do not).
HF = {"bert_classifier": ("bert.encoder.layer.0.output.LayerNorm.weight", 32),
      "gpt2": ("transformer.ln_f.weight", 32), "llama_gqa": ("model.norm.weight", 64)}


@pytest.mark.parametrize("name", sorted(HF))
def test_hidden_group_hf(name: str) -> None:
    pytest.importorskip("transformers")
    from tests.analysis.hf_models import build
    model, inputs = build(name)
    g = check_zero_invariance(_randomised(model), inputs)
    weight, size = HF[name]
    hidden = _hidden(g, weight)
    assert len(hidden) == 1 and hidden[0].size == size, g.summary()
    assert not gp.trace(model, inputs).withdrawn


def test_compact_model_exports_and_retraces(tmp_path) -> None:
    """A compact model with phantom norms deep-copies, exports to ONNX and traces again."""
    import copy

    import numpy as np
    from graphprune.frontends.onnx_backend import run_onnx
    from tests.helpers import zero_random_half
    model, x = _randomised(PreNorm(norm=LlamaRMSNorm)), torch.randn(2, 5, 12)
    g = gp.trace(model, (x,))
    zero_random_half(g)
    compact = g.construct_subnet()
    assert "phantom" in compact.gm.code or "mean_of_original" in compact.gm.code
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(copy.deepcopy(compact)(x), ref, rtol=1e-4, atol=1e-5)
    proto = gp.export_onnx(compact, (x,), tmp_path / "c.onnx")
    out = run_onnx(proto, {"input_0": x.numpy()})[0]
    assert np.abs(out - ref.numpy()).max() <= 1e-4 * np.abs(ref.numpy()).max()
    again = gp.trace(compact, (x,))
    assert again.groups and not again.withdrawn


class Pinned(nn.Module):
    """A hidden layer ``fc1`` whose columns meet a norm through ``pre``: they must stay."""

    def __init__(self, pre=lambda h: h, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.pre, self.norm = pre, norm if norm is not None else nn.LayerNorm(8)

    def forward(self, x):
        return self.fc2(self.norm(self.pre(self.fc1(x))))


@pytest.mark.parametrize("case", ["no_affine", "bias_only", "sigmoid_before", "shifted_before", "two_axes"])
def test_hidden_columns_stay_pinned(case: str) -> None:
    """A removed output would be -mean/σ (no scale), the input would be non-zero where
    removed (sigmoid(0) = 1/2, x + 1), or the norm spans two axes: no group for fc1."""
    model = {
        "no_affine": lambda: Pinned(norm=nn.LayerNorm(8, elementwise_affine=False)),
        "bias_only": lambda: Pinned(norm=_BiasOnlyNorm()),
        "sigmoid_before": lambda: Pinned(pre=torch.sigmoid),
        "shifted_before": lambda: Pinned(pre=lambda h: h + 1.0),
        "two_axes": lambda: _TwoAxes(),
    }[case]()
    g = gp.trace(_randomised(model), (torch.randn(2, 4, 6),))
    assert not _hidden(g, "fc1.weight"), g.summary()
    assert not g.withdrawn


class _BiasOnlyNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(8))

    def forward(self, h):
        return F.layer_norm(h, (8,), None, self.bias)


class _TwoAxes(Pinned):
    def __init__(self) -> None:
        super().__init__(norm=nn.LayerNorm((4, 8)))


def test_zero_preserving_ops_keep_the_group() -> None:
    """relu, tanh, a residual add and a sum over the hidden axis keep the columns prunable."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.norm, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(F.relu(self.fc1(x))) + self.fc2(x)
            return self.out(self.norm(h)) + h.sum(-1, keepdim=True)

    g = check_zero_invariance(_randomised(Net()), torch.randn(2, 4, 6))
    assert [grp.size for grp in _hidden(g, "fc1.weight")] == [8]


# ---- ONNX: LayerNormalization (opset 17) and ReduceMean-based RMS norms -------------------

ONNX = {
    "prenorm_layernorm": (lambda: PreNorm(), (2, 5, 12), 16),
    "prenorm_llama_rmsnorm": (lambda: PreNorm(norm=LlamaRMSNorm), (2, 5, 12), 16),
    "vit_b_16_tiny": (TORCH["vit_b_16_tiny"][0], (2, 3, 32, 32), 32),
}


@pytest.mark.parametrize("name", sorted(ONNX))
def test_hidden_group_onnx(name: str, tmp_path) -> None:
    import numpy as np
    import onnx

    from graphprune.frontends.onnx_backend import run_onnx
    from tests.frontends.test_onnx import export, n_weights
    from tests.helpers import zero_random_half
    build, shape, size = ONNX[name]
    x = torch.randn(*shape)
    path = export(_randomised(build()), x, tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ("ReduceMean" if "rms" in name else "LayerNormalization") in ops
    g = gp.trace(path, (x.numpy(),))
    assert not g.withdrawn
    assert size in [grp.size for grp in g.groups if grp.kind == "channel"], g.summary()
    zero_random_half(g)
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    assert not compact.functions and {o.domain for o in compact.opset_import} <= {"", "ai.onnx"}
    assert not {"LayerNormalization", "ReduceMean"} & {n.op_type for n in compact.graph.node}
    ref, out = run_onnx(full, {"x": x.numpy()})[0], run_onnx(compact, {"x": x.numpy()})[0]
    assert np.abs(ref - out).max() <= 1e-4 * np.abs(ref).max()
    assert n_weights(compact) < n_weights(full)


def test_compact_onnx_reads_in_tvm(tmp_path) -> None:
    """The inlined phantom norm and mean are standard ops that TVM's ONNX frontend builds."""
    tvm = pytest.importorskip("tvm")
    import numpy as np
    from tvm.relax.frontend.onnx import from_onnx

    from graphprune.frontends.onnx_backend import run_onnx
    from tests.frontends.test_onnx import export
    from tests.helpers import zero_random_half
    x = torch.randn(2, 5, 12)
    for norm in (nn.LayerNorm, LlamaRMSNorm):
        g = gp.trace(export(_randomised(PreNorm(norm=norm, layers=1)), x, tmp_path / "m.onnx"), (x.numpy(),))
        zero_random_half(g)
        compact = g.construct_subnet()
        vm = tvm.relax.VirtualMachine(tvm.compile(from_onnx(compact, shape_dict={"x": list(x.shape)}), target="llvm"),
                                      tvm.cpu())
        out, ref = vm["main"](tvm.runtime.tensor(x.numpy())).numpy(), run_onnx(compact, {"x": x.numpy()})[0]
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
