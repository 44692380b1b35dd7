"""The data and models shared by the optimizer and one-shot benchmarks.

sklearn's bundled digits with one fixed 1297/500 train/test split, and the three models
the issues name: a small ResNet (3 stages, 32-64-128 channels), a small ViT that reads
the 8 image rows as 8 tokens, and torchvision's mobilenet_v2 adapted to one input
channel (on digits upsampled to 32x32).  Keeping them in one place means the one-shot
table and the training-time table describe the same networks.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def digits_split(side: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test); images scaled to [0, 1] and resized to ``side``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if side != 8:
        x = F.interpolate(x, size=side, mode="bilinear", align_corners=False)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # the fixed split
    train, test = order[:1297], order[1297:]
    return x[train], y[train], x[test], y[test]


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNet(nn.Module):
    """3 stages of 32-64-128 channels, one basic block each."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.stages = nn.Sequential(Block(32, 32, 1), Block(32, 64, 2), Block(64, 128, 2))
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).reshape(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


class ViT(nn.Module):
    """Rows as tokens: 8 tokens of 8 pixels, 2 pre-norm blocks, mean-pooled head."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict(dict(
                norm1=nn.LayerNorm(dim), attn=Attention(dim, heads), norm2=nn.LayerNorm(dim),
                mlp=nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)))))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1, 2)) + self.pos  # [b, 1, 8, 8] -> 8 row tokens
        for blk in self.blocks:
            h = h + blk["attn"](blk["norm1"](h))
            h = h + blk["mlp"](blk["norm2"](h))
        return self.head(self.norm(h).mean(dim=1))


def mobilenet(classes: int = 10) -> nn.Module:
    """torchvision's mobilenet_v2 (width 0.5) for 1-channel 32x32 digits: no stride in the stem."""
    from torchvision.models import mobilenet_v2

    m = mobilenet_v2(num_classes=classes, width_mult=0.5)
    old = m.features[0][0]
    m.features[0][0] = nn.Conv2d(1, old.out_channels, 3, 1, 1, bias=False)
    return m


# factory and input side of each model
MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet": (ResNet, 8), "vit": (ViT, 8), "mobilenet": (mobilenet, 32)}


def example(name: str) -> torch.Tensor:
    """A traced example with batch 2, so compact models accept any batch size."""
    return torch.zeros(2, 1, MODELS[name][1], MODELS[name][1])


def head_layer(model: nn.Module) -> nn.Module:
    """The classifier, which peers must be told not to prune."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Head counts of the q/k/v projections, which Torch-Pruning must be given."""
    return {proj: m.heads for m in model.modules() if isinstance(m, Attention) for proj in (m.q, m.k, m.v)}


def batches(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """``steps`` shuffled mini-batches, reshuffling at each epoch end."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch > len(y):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        yield x[idx], y[idx]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1)
    return float((pred == y).float().mean())
