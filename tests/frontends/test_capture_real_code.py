"""PyTorch capture on model code as libraries write it (issue 18): modules shared under
several paths, state computed on the first call, verification that fails for a reason
that is not numeric.  Real timm architectures from small configs where they exist."""
from __future__ import annotations

import pytest
import torch

import graphprune as gp
from tests.helpers import check_zero_invariance, n_params

timm = pytest.importorskip("timm")


def test_a_module_shared_under_two_paths_is_left_as_it_was() -> None:
    """CoaT's convolutional position encoding ``cpe1`` is also ``serial_blocks1.0.cpe``.
    Recording and verifying used to leave the user's model holding meta tensors under one
    of the paths (export then failed: ``weight is on meta``), and the compact model held
    a copy of the shared weights per path (so it was not smaller)."""
    from timm.models.coat import CoaT
    torch.manual_seed(0)
    model = CoaT(img_size=32, patch_size=4, embed_dims=(16, 16, 32, 32), serial_depths=(1, 1, 1, 1), parallel_depth=0,
                 num_heads=8, mlp_ratios=(2, 2, 2, 2), num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    before = dict(model.named_parameters(remove_duplicate=False))
    g = gp.trace(model, (x,))
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[k] is before[k] for k in before), "the user's model holds other tensors after tracing"
    assert g.groups and not g.withdrawn, g.summary()  # verify: compact == zeroed for half of every group
    assert n_params(g.construct_subnet()) == n_params(model)  # one tensor per shared weight, as in the model


def _make_anchors(feats: list[torch.Tensor], strides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres and their strides for every cell of every level, as YOLO heads make them."""
    points, stride_rows = [], []
    for f, s in zip(feats, strides):
        h, w = f.shape[2:]
        sy, sx = torch.meshgrid(torch.arange(h, dtype=f.dtype) + 0.5, torch.arange(w, dtype=f.dtype) + 0.5,
                                indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_rows.append(torch.full((h * w, 1), float(s), dtype=f.dtype))  # a buffer's value: data to export
    return torch.cat(points).transpose(0, 1), torch.cat(stride_rows).transpose(0, 1)


class DetectHead(torch.nn.Module):
    """A two-level anchor-free detection head that computes its anchors on the first call
    and again only when the input shape changes (ultralytics' ``Detect`` does this)."""

    def __init__(self, chans: tuple[int, ...] = (16, 32), classes: int = 3) -> None:
        super().__init__()
        self.register_buffer("stride", torch.tensor([8.0, 16.0]))
        self.shape: torch.Size | None = None
        self.anchors = self.strides = torch.empty(0)
        conv = lambda c, o: torch.nn.Sequential(torch.nn.Conv2d(c, 16, 3, padding=1), torch.nn.SiLU(),  # noqa: E731
                                                torch.nn.Conv2d(16, o, 1))
        self.box = torch.nn.ModuleList(conv(c, 4) for c in chans)
        self.cls = torch.nn.ModuleList(conv(c, classes) for c in chans)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = torch.cat([torch.cat((b(f), c(f)), 1).flatten(2) for f, b, c in zip(feats, self.box, self.cls)], 2)
        if self.shape != feats[0].shape:
            self.anchors, self.strides = _make_anchors(feats, self.stride)
            self.shape = feats[0].shape
        box, cls = y.split((4, y.shape[1] - 4), 1)
        lt, rb = box.chunk(2, 1)
        centre = (self.anchors.unsqueeze(0) + (rb - lt) / 2) * self.strides
        return torch.cat((centre, (lt + rb) * self.strides, cls.sigmoid()), 1)


class TinyDetector(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        block = lambda c, o: [torch.nn.Conv2d(c, o, 3, 2, 1), torch.nn.BatchNorm2d(o), torch.nn.SiLU()]  # noqa: E731
        self.p3 = torch.nn.Sequential(*block(3, 16), *block(16, 16), *block(16, 16))
        self.p4 = torch.nn.Sequential(*block(16, 32))
        self.head = DetectHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.p3(x)
        return self.head([p3, self.p4(p3)])


@pytest.mark.parametrize("batch", [1, 2])
def test_a_model_with_first_call_state_traces_without_a_manual_warm_up(batch: int) -> None:
    """Traced before any forward, the head's anchor branch reads a buffer's value, which
    ``torch.export`` cannot trace (``GuardOnDataDependentSymNode``).  Capture runs one call
    on a copy first, so export sees the branch every later call takes; the user's model
    is left as it was (no cached anchors, no first call)."""
    torch.manual_seed(0)
    model, x = TinyDetector().eval(), torch.randn(batch, 3, 64, 64)
    g = gp.trace(model, (x,))
    assert len(g.groups) == 8 and not g.withdrawn, g.summary()
    assert model.head.shape is None, "tracing ran the user's model"
    # reading the stride buffer's value cannot run on meta tensors: the summary says export captured it
    assert "captured with torch.export (fake tensors)" in g.summary()
    check_zero_invariance(model, (x,))


class DataBranch(torch.nn.Module):
    """Branches on its input's values on every call: no warm-up makes it traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h if h.mean() > 0 else -h)


def test_a_model_export_cannot_trace_is_a_trace_error_naming_the_cause() -> None:
    """Not a model whose every group is withdrawn: the error says which model and why."""
    with pytest.raises(gp.errors.UnsupportedModelError, match=r"DataBranch.*GuardOnDataDependentSymNode|"
                                                              r"DataBranch.*data.dependent"):
        gp.trace(DataBranch().eval(), (torch.randn(2, 8),))
