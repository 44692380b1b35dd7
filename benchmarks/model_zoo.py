"""Models of the coverage table beyond torchvision's classifiers: one per timm family,
and segmentation, detection and diffusion architectures built from their libraries.

A *family* is the timm module that defines an architecture (``resnet``, ``xcit``,
``maxxvit``, ...: 98 in timm 1.0.31), so two families differ in code, not just in
width or depth.  Each family is represented by its cheapest registered model, cost
being parameters times input pixels at the model's default input size: the coverage
question is whether the *architecture* traces and prunes, and the cheapest member
answers it at the least machine time.  timm's ``test_*`` models (its own unit tests'
shrunken widths) are left out: a family is represented by a model someone deploys.  Weights are random (nothing downloads here).

**Dense prediction** (``zoo/<name>``, :data:`ZOO`): torchvision's segmentation models
and segmentation_models_pytorch's decoders as they are; detectors as their dense part
(backbone, FPN and heads, returning the raw per-anchor outputs), since box decoding
and non-maximum suppression have data-dependent shapes and are deployed outside the
pruned network; a diffusers UNet at one denoising step (the timestep held as a buffer,
as a per-step export does).  Small configurations, random weights.

The timm choice is computed once (every registered model instantiated on the meta device,
about a minute) and kept in ``timm_families.json`` beside this file, so that reruns and
``--report`` see the same set; ``python benchmarks/model_zoo.py`` recomputes it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

FAMILIES_FILE = Path(__file__).with_name("timm_families.json")
PREFIX = "timm/"
ZOO_PREFIX = "zoo/"


def _cost(name: str) -> tuple[int, tuple[int, ...]] | None:
    """(parameter count, default input size) of a registered timm model, or None when it
    cannot be built on the meta device (then it does not represent its family)."""
    import timm
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:
        return None
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return sum(p.numel() for p in model.parameters()), size


def choose_families() -> dict[str, dict]:
    """family -> {"model", "params", "input_size"}: each family's cheapest model."""
    import timm
    import timm.models._registry as registry
    chosen: dict[str, dict] = {}
    for name in timm.list_models(exclude_filters=["test_*"]):  # timm's unit-test widths
        family = registry._model_to_module[name]
        cost = _cost(name)
        if cost is None:
            continue
        params, size = cost
        score = params * size[-1] * size[-2]
        best = chosen.get(family)
        if best is None or score < best["score"]:
            chosen[family] = {"model": name, "params": params, "input_size": list(size), "score": score}
    return {f: {k: v for k, v in row.items() if k != "score"} for f, row in sorted(chosen.items())}


def timm_families() -> dict[str, dict]:
    """The families of ``timm_families.json``, written by :func:`choose_families`."""
    return json.loads(FAMILIES_FILE.read_text())["families"]


def timm_names() -> list[str]:
    return [PREFIX + row["model"] for row in timm_families().values()]


def timm_params(name: str) -> int:
    model = name[len(PREFIX):]
    return next((row["params"] for row in timm_families().values() if row["model"] == model), 0)


def build_timm(name: str, batch: int = 2) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The model with random weights in eval mode and a random batch at its default size."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name[len(PREFIX):], pretrained=False).eval()
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return model, (torch.randn(batch, *size),)


def input_side(name: str) -> int:
    model = name[len(PREFIX):]
    row = next(r for r in timm_families().values() if r["model"] == model)
    return int(row["input_size"][-1])


class DenseDetector(torch.nn.Module):
    """A torchvision detector up to its heads' raw outputs (no box decoding, no NMS)."""

    def __init__(self, detector: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = detector.backbone, head

    def forward(self, x: torch.Tensor) -> object:
        return self.head(list(self.backbone(x).values()))


class DenoisingStep(torch.nn.Module):
    """A diffusers UNet at one timestep: ``x_t -> predicted noise``."""

    def __init__(self, unet: torch.nn.Module, timestep: int = 10) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("timestep", torch.tensor([timestep]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x, self.timestep).sample


def _tv_segmentation(name: str) -> torch.nn.Module:
    import torchvision
    return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=21)


def _tv_detector(name: str, rpn: bool = False) -> torch.nn.Module:
    import torchvision
    det = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    return DenseDetector(det, det.rpn.head if rpn else det.head)


def _smp(arch: str, encoder: str) -> torch.nn.Module:
    import segmentation_models_pytorch as smp
    return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=5)


def _unet() -> torch.nn.Module:
    import diffusers
    return DenoisingStep(diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8))


ZOO: dict[str, tuple[Callable[[], torch.nn.Module], int]] = {
    "fcn_resnet50": (lambda: _tv_segmentation("fcn_resnet50"), 64),
    "deeplabv3_mobilenet_v3_large": (lambda: _tv_segmentation("deeplabv3_mobilenet_v3_large"), 64),
    "lraspp_mobilenet_v3_large": (lambda: _tv_segmentation("lraspp_mobilenet_v3_large"), 64),
    "smp_unet_resnet18": (lambda: _smp("unet", "resnet18"), 64),
    "smp_fpn_efficientnet_b0": (lambda: _smp("fpn", "efficientnet-b0"), 64),
    "smp_deeplabv3plus_mobilenet_v2": (lambda: _smp("deeplabv3plus", "mobilenet_v2"), 64),
    "smp_segformer_mit_b0": (lambda: _smp("segformer", "mit_b0"), 64),
    "retinanet_resnet50_fpn": (lambda: _tv_detector("retinanet_resnet50_fpn"), 128),
    "fcos_resnet50_fpn": (lambda: _tv_detector("fcos_resnet50_fpn"), 128),
    "ssdlite320_mobilenet_v3_large": (lambda: _tv_detector("ssdlite320_mobilenet_v3_large"), 128),
    "fasterrcnn_mobilenet_v3_large_fpn_rpn": (lambda: _tv_detector("fasterrcnn_mobilenet_v3_large_fpn", rpn=True), 128),
    "diffusers_unet2d": (_unet, 32),
}
"""name -> (builder, input side): the dense-prediction architectures of the table."""


def zoo_names() -> list[str]:
    return [ZOO_PREFIX + n for n in ZOO]


def build_zoo(name: str, batch: int = 2) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    make, side = ZOO[name[len(ZOO_PREFIX):]]
    return make().eval(), (torch.randn(batch, 3, side, side),)


def zoo_side(name: str) -> int:
    return ZOO[name[len(ZOO_PREFIX):]][1]


def main() -> None:
    import timm
    families = choose_families()
    tmp = FAMILIES_FILE.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"timm": timm.__version__, "families": families}, indent=1) + "\n")
    os.replace(tmp, FAMILIES_FILE)
    print(f"{len(families)} families -> {FAMILIES_FILE}", file=sys.stderr)


if __name__ == "__main__":
    main()
