"""A trace at a batch over one replays the recording (no ``torch.export``) and the
program, and every compact model lowered from it, takes any batch: the sizes that follow
the batch are computed from the input (:mod:`graphprune.frontends.batch_general`).
Where the recordings at other batches cannot show how a size follows the batch, the
model is exported with a dynamic batch and the notes say why."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import graphprune as gp
from graphprune.frontends.batch_general import BatchSize, NotBatchGeneral, batch_general
from graphprune.frontends.torch_record import record_call
from graphprune.rel_error import max_rel_error
from tests.analysis import hf_models
from tests.frontends.test_torch_record import CachedTable
from tests.helpers import zero_random_half

OTHER_BATCHES = (1, 3, 5)


class FlattenBatch(nn.Module):
    """Sizes that are the batch times and plus constants: ``view(b, -1)``, ``flatten(0, 1)``
    (``b * t``), ``expand(b, ...)`` of a learned token, ``new_zeros(b, ...)`` and a
    ``reshape`` back to ``(b, t, c)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8 * 17, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)           # (b, 16, 8)
        h = torch.cat([self.token.expand(b, -1, -1), h], 1)                 # (b, 17, 8)
        t = self.mlp(h.flatten(0, 1)).reshape(b, 17, 8) + h.new_zeros(b, 17, 1)
        return self.head(t.view(b, -1))


def _vit() -> tuple[nn.Module, tuple]:
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: every output would be 0
    return model, (torch.randn(2, 3, 32, 32),)


def _resnet() -> tuple[nn.Module, tuple]:
    from torchvision.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=7), (torch.randn(2, 3, 32, 32),)  # resnet18's blocks, once each


MODELS = {
    "resnet": _resnet,
    "torchvision_vit": _vit,
    "bert": hf_models.bert,
    "llama_gqa": hf_models.llama_gqa,
    "flatten_batch": lambda: (FlattenBatch(), (torch.randn(2, 3, 4, 4),)),
    # caches a table on its first call: each batch is recorded on a fresh copy of the model
    "cached_table": lambda: (CachedTable(), (torch.randn(2, 5, 6),)),
}


def _shuffled(inputs: tuple, batch: int) -> tuple:
    """Other rows than the example's, so a batch size baked in as a constant cannot hide."""
    gen = torch.Generator().manual_seed(batch)
    return tuple(torch.randint(0, hf_models.VOCAB, (batch, *x.shape[1:]), generator=gen) if not x.is_floating_point()
                 else torch.randn((batch, *x.shape[1:]), generator=gen) for x in inputs)


@pytest.fixture(scope="module", params=sorted(MODELS))
def traced(request) -> tuple[nn.Module, tuple, gp.PrunableGraph]:
    torch.manual_seed(0)
    model, inputs = MODELS[request.param]()
    model.eval()
    return model, inputs, gp.trace(model, inputs)


def test_the_replayed_program_of_a_batch_of_two_runs_at_any_batch(traced) -> None:
    model, inputs, g = traced
    assert g.backend.replay is not None and g.backend._exported is None, g.notes
    assert not g.withdrawn and g.groups
    program = g.backend.replay.module()
    for batch in OTHER_BATCHES:
        x = _shuffled(inputs, batch)
        with torch.no_grad():
            ref = model(*x)
            assert max_rel_error(ref, program(*x)) < 1e-5, batch
        assert any(t.abs().sum() > 0 for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor))


def test_a_compact_model_from_a_batch_of_two_equals_the_zeroed_model_at_any_batch(traced) -> None:
    model, inputs, g = traced
    removed = zero_random_half(g)  # g.params are the model's own tensors: the model is the zeroed model
    compact = g.construct_subnet()
    assert removed and sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())
    for batch in (2, *OTHER_BATCHES):
        x = _shuffled(inputs, batch)
        with torch.no_grad():
            assert max_rel_error(model(*x), compact(*x)) < 1e-4, batch
    assert g.backend._exported is None


def test_the_onnx_of_a_compact_model_from_a_batch_of_two_keeps_a_dynamic_batch(tmp_path) -> None:
    """A replayed compact model exports with its batch-dependent sizes as shapes read at run time."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model, inputs = MODELS["flatten_batch"]()
    g = gp.trace(model.eval(), inputs)
    zero_random_half(g)
    compact = g.construct_subnet()
    path = gp.export_onnx(compact, inputs, tmp_path / "c.onnx") and tmp_path / "c.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in OTHER_BATCHES:
        (x,) = _shuffled(inputs, batch)
        with torch.no_grad():
            ref = model(x)
        assert max_rel_error(ref, torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])) < 1e-4


class HalfBatch(nn.Module):
    """Pairs the rows of its batch (an odd last row dropped): ``2 * (b // 2)`` is not ``k * b + c``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        pairs = x.shape[0] // 2
        return self.b(h[: 2 * pairs].reshape(pairs, 24))


class BatchBranch(nn.Module):
    """Another op sequence above a batch of two."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h if x.shape[0] <= 2 else h * 2)


@pytest.mark.parametrize("cls, why", [(HalfBatch, "not k * batch + c"), (BatchBranch, "runs other ops")])
def test_a_graph_not_shown_batch_general_is_exported_and_says_why(cls, why: str) -> None:
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(4 if cls is HalfBatch else 2, 6)
    g = gp.trace(model, (x,))
    assert g.backend.replay is None, "a fixed-batch replay must never be made silently"
    assert any("not batch-general" in n and why in n for n in g.notes), g.notes
    assert "not batch-general" in g.summary()
    with torch.no_grad():
        assert torch.allclose(g.construct_subnet()(x), model(x), atol=1e-6)


def test_sizes_are_affine_in_the_batch_over_the_three_recordings() -> None:
    model, x = FlattenBatch().eval(), torch.randn(2, 3, 4, 4)
    rec = record_call(model, (x,), {})
    general = batch_general(rec, 2, lambda b: record_call(model, (x,), {}, b))
    sizes = {s for args in general.args.values() for s in _leaves(args) if isinstance(s, BatchSize)}
    assert sizes == {BatchSize(1, 0), BatchSize(17, 0)}  # b, and b * 17 for flatten(0, 1)
    assert general.axes(general.source) == {0} and general.axes("p_token") == set()
    half, x = HalfBatch().eval(), torch.randn(4, 6)
    with pytest.raises(NotBatchGeneral, match="not k \\* batch \\+ c"):
        batch_general(record_call(half, (x,), {}), 4, lambda b: record_call(half, (x,), {}, b))


def _leaves(obj) -> list:
    if isinstance(obj, (tuple, list)):
        return [y for o in obj for y in _leaves(o)]
    if isinstance(obj, dict):
        return [y for o in obj.values() for y in _leaves(o)]
    return [obj]
