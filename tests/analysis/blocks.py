"""Hand-written blocks with the couplings that break naive pruners."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class SEBlock(nn.Module):
    """Squeeze-excitation: a broadcast multiply gates the trunk's channels."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head((y * s).mean((2, 3)))


class ChannelShuffle(nn.Module):
    def __init__(self, c: int = 16, groups: int = 4) -> None:
        super().__init__()
        self.g = groups
        self.a = nn.Conv2d(3, c, 1)
        self.b = nn.Conv2d(c, c, 3, padding=1, groups=groups)
        self.c = nn.Conv2d(c, 8, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        n, c, h, w = y.shape
        y = y.view(n, self.g, c // self.g, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.c(F.relu(self.b(y)))


class UNetSkip(nn.Module):
    """Encoder features concatenated with upsampled decoder features."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        e = F.relu(self.enc(x))
        d = F.relu(self.up(F.relu(self.down(e))))
        return self.dec(torch.cat([e, d], dim=1))


class DenseConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.c1 = nn.Conv2d(6, 4, 3, padding=1)
        self.c2 = nn.Conv2d(10, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(14)
        self.out = nn.Conv2d(14, 3, 1)

    def forward(self, x):
        a = self.c0(x)
        b = torch.cat([a, F.relu(self.c1(a))], 1)
        c = torch.cat([b, F.relu(self.c2(b))], 1)
        return self.out(F.relu(self.bn(c)))


class GatedChunk(nn.Module):
    """GLU-style gate: a linear's output split in two halves that multiply."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 32)
        self.down = nn.Linear(16, 12)

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(a * F.silu(b))


class SharedWeights(nn.Module):
    """One conv applied twice; a tied embedding/output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.mid = nn.Linear(16, 24)
        self.back = nn.Linear(24, 16)
        self.conv = nn.Conv1d(16, 16, 1)

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.back(F.gelu(self.mid(h)))
        h = self.conv(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return F.linear(h, self.emb.weight)


class PixelShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.b(F.pixel_shuffle(F.relu(self.a(x)), 2))


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.out = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        return self.out(F.silu(self.gn(self.conv(x))))


class MixtureOfExperts(nn.Module):
    """Dense soft routing over expert MLPs (every expert runs; weights from a router)."""

    def __init__(self, d: int = 12, experts: int = 3, hidden: int = 20) -> None:
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.ups = nn.ModuleList(nn.Linear(d, hidden) for _ in range(experts))
        self.downs = nn.ModuleList(nn.Linear(hidden, d) for _ in range(experts))

    def forward(self, x):
        w = torch.softmax(self.router(x), dim=-1)
        outs = torch.stack([dn(F.gelu(up(x))) for up, dn in zip(self.ups, self.downs)], dim=-1)
        return x + (outs * w.unsqueeze(-2)).sum(-1)


class Attention(nn.Module):
    """A pre-norm transformer encoder layer with nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.layer(x))


class GroupedQueryAttention(nn.Module):
    """Llama-style GQA: 4 query heads share 2 key/value heads via repeat_interleave."""

    def __init__(self, d: int = 32, hq: int = 4, hkv: int = 2) -> None:
        super().__init__()
        self.hq, self.hkv, self.hd = hq, hkv, d // hq
        self.q = nn.Linear(d, hq * self.hd, bias=False)
        self.k = nn.Linear(d, hkv * self.hd, bias=False)
        self.v = nn.Linear(d, hkv * self.hd, bias=False)
        self.o = nn.Linear(hq * self.hd, d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.hq, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.hkv, self.hd).transpose(1, 2).repeat_interleave(self.hq // self.hkv, 1)
        v = self.v(x).view(b, t, self.hkv, self.hd).transpose(1, 2).repeat_interleave(self.hq // self.hkv, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(y.transpose(1, 2).reshape(b, t, -1))


class RotaryTableGQA(GroupedQueryAttention):
    """GQA as the dynamo ONNX exporter leaves Llama: rotary cos/sin tables folded into
    constants ``[1, 1, seq, head_dim]`` (they vary along the sequence, which is never
    pruned) and key/value heads repeated with ``expand`` + ``reshape``.  The tables must
    not pin the heads."""

    def __init__(self, d: int = 32, hq: int = 4, hkv: int = 2, t: int = 6) -> None:
        super().__init__(d, hq, hkv)
        angle = torch.arange(t)[:, None] * torch.rand(self.hd // 2).repeat(2)[None]
        self.register_buffer("cos", angle.cos()[None, None])
        self.register_buffer("sin", angle.sin()[None, None])

    def _rotate(self, x):
        half = x.shape[-1] // 2
        return x * self.cos + torch.cat([-x[..., half:], x[..., :half]], -1) * self.sin

    def _repeat(self, x):
        b, h, t, hd = x.shape
        return x[:, :, None].expand(b, h, self.hq // self.hkv, t, hd).reshape(b, self.hq, t, hd)

    def forward(self, x):
        b, t, _ = x.shape
        q = self._rotate(self.q(x).view(b, t, self.hq, self.hd).transpose(1, 2))
        k = self._repeat(self._rotate(self.k(x).view(b, t, self.hkv, self.hd).transpose(1, 2)))
        v = self._repeat(self.v(x).view(b, t, self.hkv, self.hd).transpose(1, 2))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.hd ** 0.5, -1)
        return x + self.o((att @ v).transpose(1, 2).reshape(b, t, -1))


class EinsumAttention(GroupedQueryAttention):
    """Attention written with einsum (as MaxViT and many research codes do): scores
    ``bhqd,bhkd->bhqk``, values ``...ij,...jk`` (ellipsis, implicit output), and an MLP
    whose hidden units are scaled by a learned per-unit gate ``btf,f->btf``."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__(d, heads, heads)
        self.up, self.down = nn.Linear(d, 48), nn.Linear(48, d)
        self.gate = nn.Parameter(torch.rand(48) + 0.5)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.hq, self.hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1)
        y = torch.einsum("...ij,...jk", att, v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.o(y)
        return x + self.down(torch.einsum("btf,f->btf", F.gelu(self.up(x)), self.gate))


class ResizeToSize(nn.Module):
    """Bilinear upsampling to a size computed from the input's shape (MobileViT's unfold):
    as ONNX, a Resize whose ``sizes`` are built at run time from ``Shape``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.b(F.interpolate(y, size=(y.shape[-2] * 2, y.shape[-1] * 2), mode="bilinear"))


class DictInputs(nn.Module):
    """Two inputs given as keyword arguments, two outputs in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(4, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x, y):
        h = F.relu(self.a(x) + self.b(y))
        y = self.out(h)
        return {"logits": y, "probs": torch.softmax(y, -1)}


class UnknownOp(nn.Module):
    """torch.sort along channels has no registry entry: a barrier, not a silent mis-prune."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.sort(F.relu(self.a(x)), dim=-1).values
        return self.c(F.relu(self.b(h)))
