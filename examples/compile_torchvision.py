"""gp.compile on torchvision's resnet18 with OBSPA: one call from a model to a compact model,
a report folder (report.md, report.json, width plot) and, with --codegen, a TVM build.

    python examples/compile_torchvision.py                      # random weights, 224x224
    python examples/compile_torchvision.py --pretrained --codegen x86 -o runs/resnet18

OBSPA is data-free: it scores channels from the weights alone and rewrites each pruned
layer's consumers (Optimal Brain Surgeon update) so the compact model stays close to
the original without retraining.  --pretrained downloads the ImageNet weights (needs
internet); without it the weights are random, which is enough to see the pipeline work.
"""
from __future__ import annotations

import argparse

import torch
import torchvision

import graphprune as gp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", action="store_true", help="ImageNet weights (downloads ~45 MB)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--flops", type=float, default=0.5, help="fraction of the MACs to remove (default 0.5)")
    parser.add_argument("--codegen", choices=["x86", "arm", "cuda"], help="also build the compact model with TVM")
    parser.add_argument("-o", "--output", default="runs/resnet18-obspa", help="report folder")
    args = parser.parse_args()

    torch.manual_seed(0)
    weights = torchvision.models.ResNet18_Weights.DEFAULT if args.pretrained else None
    model = torchvision.models.resnet18(weights=weights).eval()
    x = torch.randn(1, 3, args.size, args.size)

    result = gp.compile(model, (x,), method="obspa", target=gp.Target(flops=args.flops), codegen=args.codegen,
                        output=args.output, progress=True)
    print(result.graph.summary().splitlines()[0])
    print(result.summary())
    with torch.no_grad():
        dense, small = model(x), result.model(x)
    agree = float((dense.softmax(1) - small.softmax(1)).abs().sum(1).mean() / 2)
    print(f"  total-variation distance of the output distributions: {agree:.3f}")
    print(f"wrote {args.output}/ (report.md, report.json, widths.png, model.onnx, model.pt2)")


if __name__ == "__main__":
    main()
