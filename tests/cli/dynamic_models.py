"""ONNX files with dynamic batch, height and width, as detectors and segmenters are exported:
an FPN-like detector head with ``Resize`` by scale and by a size computed from ``Shape``, and
the input padded to a multiple of the network's stride with pads computed from ``Shape``
(what TVM's ONNX importer cannot import until the shapes are bound and folded)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import randomise_batch_norms


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU())


class TinyFPN(nn.Module):
    """Three stride-2 stages, lateral 1x1 convs, a top-down path, a spatial softmax and a head:
    ``Resize`` with scales (level 3 -> 2) and with sizes read from a feature map's shape
    (2 -> 1), ``Reshape`` to sizes computed from ``Shape`` (batch, pruned channels, H*W)."""

    STRIDE = 8

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = _stage(3, 8), _stage(8, 16), _stage(16, 32)
        self.l1, self.l2, self.l3 = nn.Conv2d(8, 12, 1), nn.Conv2d(16, 12, 1), nn.Conv2d(32, 12, 1)
        self.head = nn.Sequential(nn.Conv2d(12, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (self.STRIDE - w % self.STRIDE) % self.STRIDE, 0, (self.STRIDE - h % self.STRIDE) % self.STRIDE))
        a = self.c1(x)
        b = self.c2(a)
        c = self.c3(b)
        p2 = self.l2(b) + F.interpolate(self.l3(c), scale_factor=2.0, mode="nearest")
        p1 = self.l1(a) + F.interpolate(p2, size=a.shape[-2:], mode="bilinear", align_corners=False)
        n, c, h, w = p1.shape  # spatial attention: a Reshape to sizes read from Shape, channels pruned
        p1 = p1 * p1.reshape(n, c, h * w).softmax(-1).reshape(n, c, h, w)
        return self.head(p1)


def export_fpn(path: Path, *, input_name: str = "images") -> Path:
    """The detector as ONNX (TorchScript exporter, opset 17) with dynamic batch/height/width."""
    torch.manual_seed(0)
    model = randomise_batch_norms(TinyFPN())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 40, 56),), str(path), dynamo=False, opset_version=17,
                          input_names=[input_name], output_names=["maps"],
                          dynamic_axes={input_name: {0: "batch", 2: "height", 3: "width"},
                                        "maps": {0: "batch", 2: "out_h", 3: "out_w"}})
    return path
