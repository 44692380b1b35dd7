"""The zero-invariance property on random architectures drawn by hypothesis.

Two tiny DSLs describe models as lists of blocks, so a failing example shrinks to a
short, readable spec:

* convolutional nets: conv/bn/act/pool blocks of random widths, plain, grouped and
  depthwise convolutions, residual adds, channel concats (dense-style), squeeze-excitation
  gates, and a head that either pools globally or flattens the feature map into a linear;
* token stacks: (gated) MLPs and multi-head / grouped-query attention (fused or
  matmul-softmax-matmul) with optional residuals and layer/RMS norms, width-changing
  projections, on features or on embedded tokens.

The default run is derandomized (the same examples every time, so CI cannot flake); the
``slow`` variants draw many more, fresh each run.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tests.helpers import check_zero_invariance

FAST = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

ACTS = ("relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "identity")


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(),
            "hardswish": nn.Hardswish(), "identity": nn.Identity()}[name]


# ---- convolutional nets ----------------------------------------------------------------
@dataclass(frozen=True)
class Conv:
    out: int
    kernel: int
    groups: int          # 1: plain; == in channels and out: depthwise; otherwise grouped
    bn: bool
    act: str


@dataclass(frozen=True)
class Residual:
    body: tuple[Conv, ...]   # every conv keeps the width, so the add lines up


@dataclass(frozen=True)
class Concat:
    branch: Conv             # torch.cat([x, branch(x)], dim=1)


@dataclass(frozen=True)
class SE:
    squeeze: int


@dataclass(frozen=True)
class Pool:
    kind: str                # "max" or "avg", 2x2


@dataclass(frozen=True)
class CNNSpec:
    in_ch: int
    size: int
    blocks: tuple
    head: str                # "gap" or "flatten"
    classes: int


def _conv(in_ch: int, c: Conv) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, c.out, c.kernel, padding=c.kernel // 2, groups=c.groups)]
    if c.bn:
        layers.append(nn.BatchNorm2d(c.out))
    layers.append(_act(c.act))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, ch: int, spec: Residual) -> None:
        super().__init__()
        self.body = nn.Sequential(*(_conv(ch, c) for c in spec.body))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Concat(nn.Module):
    def __init__(self, ch: int, spec: Concat) -> None:
        super().__init__()
        self.branch = _conv(ch, spec.branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.branch(x)], dim=1)


class _SE(nn.Module):
    def __init__(self, ch: int, spec: SE) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(ch, spec.squeeze, 1), nn.Conv2d(spec.squeeze, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class RandomCNN(nn.Module):
    def __init__(self, spec: CNNSpec) -> None:
        super().__init__()
        ch, size, layers = spec.in_ch, spec.size, []
        for b in spec.blocks:
            if isinstance(b, Conv):
                layers.append(_conv(ch, b))
                ch = b.out
            elif isinstance(b, Residual):
                layers.append(_Residual(ch, b))
            elif isinstance(b, Concat):
                layers.append(_Concat(ch, b))
                ch += b.branch.out
            elif isinstance(b, SE):
                layers.append(_SE(ch, b))
            else:
                layers.append(nn.MaxPool2d(2) if b.kind == "max" else nn.AvgPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.head_kind = spec.head
        self.head = nn.Linear(ch * (size * size if spec.head == "flatten" else 1), spec.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        y = y.flatten(1) if self.head_kind == "flatten" else y.mean((2, 3))
        return self.head(y)


@st.composite
def conv_layers(draw: st.DrawFn, in_ch: int, keep_width: bool = False) -> Conv:
    kind = draw(st.sampled_from(("plain", "grouped", "depthwise")))
    kernel, bn, act = draw(st.sampled_from((1, 3))), draw(st.booleans()), draw(st.sampled_from(ACTS))
    if kind == "depthwise":
        return Conv(in_ch, kernel, in_ch, bn, act)
    divisors = [g for g in range(2, in_ch + 1) if in_ch % g == 0]
    if kind == "grouped" and divisors:
        g = draw(st.sampled_from(divisors))
        out = in_ch if keep_width else g * draw(st.integers(1, max(1, 12 // g)))
        return Conv(out, kernel, g, bn, act)
    return Conv(in_ch if keep_width else draw(st.integers(2, 12)), kernel, 1, bn, act)


@st.composite
def cnn_specs(draw: st.DrawFn) -> CNNSpec:
    in_ch, size = draw(st.integers(1, 4)), 8
    ch, blocks = in_ch, []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(("conv", "conv", "residual", "concat", "se", "pool"))) if blocks else "first"
        if kind == "first":  # a plain conv: the input's channels are pinned, its filters are not
            b = Conv(draw(st.integers(2, 12)), draw(st.sampled_from((1, 3))), 1, draw(st.booleans()),
                     draw(st.sampled_from(ACTS)))
            ch = b.out
        elif kind == "conv":
            b = draw(conv_layers(ch))
            ch = b.out
        elif kind == "residual":
            b = Residual(tuple(draw(conv_layers(ch, keep_width=True)) for _ in range(draw(st.integers(1, 2)))))
        elif kind == "concat":
            b = Concat(draw(conv_layers(ch)))
            ch += b.branch.out
        elif kind == "se":
            b = SE(draw(st.integers(1, 4)))
        elif size > 2:
            b = Pool(draw(st.sampled_from(("max", "avg"))))
            size //= 2
        else:
            continue
        blocks.append(b)
    return CNNSpec(in_ch, 8, tuple(blocks), draw(st.sampled_from(("gap", "flatten"))), draw(st.integers(2, 5)))


def _check_cnn(spec: CNNSpec) -> None:
    torch.manual_seed(0)
    model = RandomCNN(spec)
    for m in model.modules():  # non-trivial statistics, so batch norm is not an identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    check_zero_invariance(model, torch.randn(2, spec.in_ch, spec.size, spec.size))


@FAST
@given(cnn_specs())
def test_random_cnn(spec: CNNSpec) -> None:
    _check_cnn(spec)


@pytest.mark.slow
@SLOW
@given(cnn_specs())
def test_random_cnn_many(spec: CNNSpec) -> None:
    _check_cnn(spec)


# ---- token stacks (MLPs and attention) -------------------------------------------------------
@dataclass(frozen=True)
class MLP:
    hidden: int
    act: str
    gated: bool
    residual: bool
    norm: str                # "none", "layer", "rms"


@dataclass(frozen=True)
class Attention:
    heads: int
    kv_heads: int            # divides heads: grouped-query attention when smaller
    head_dim: int
    fused: bool              # F.scaled_dot_product_attention or explicit matmul-softmax-matmul
    causal: bool
    residual: bool
    norm: str


@dataclass(frozen=True)
class Proj:
    out: int
    act: str


@dataclass(frozen=True)
class TokenSpec:
    vocab: int               # 0: float features in, else embedded token ids
    width: int
    length: int
    blocks: tuple
    classes: int


def _norm(kind: str, d: int) -> nn.Module:
    return {"none": nn.Identity(), "layer": nn.LayerNorm(d), "rms": nn.RMSNorm(d)}[kind]


class _MLP(nn.Module):
    def __init__(self, d: int, spec: MLP) -> None:
        super().__init__()
        self.spec, self.norm = spec, _norm(spec.norm, d)
        self.up, self.down, self.act = nn.Linear(d, spec.hidden), nn.Linear(spec.hidden, d), _act(spec.act)
        self.gate = nn.Linear(d, spec.hidden, bias=False) if spec.gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        u = self.act(self.up(h)) * self.gate(h) if self.gate is not None else self.act(self.up(h))
        y = self.down(u)
        return x + y if self.spec.residual else y


class _Attention(nn.Module):
    def __init__(self, d: int, spec: Attention) -> None:
        super().__init__()
        self.spec, self.norm = spec, _norm(spec.norm, d)
        e = spec.head_dim
        self.q, self.k = nn.Linear(d, spec.heads * e), nn.Linear(d, spec.kv_heads * e)
        self.v, self.o = nn.Linear(d, spec.kv_heads * e), nn.Linear(spec.heads * e, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, (b, n, _) = self.spec, x.shape
        h = self.norm(x)
        q = self.q(h).view(b, n, s.heads, s.head_dim).transpose(1, 2)
        k = self.k(h).view(b, n, s.kv_heads, s.head_dim).transpose(1, 2)
        v = self.v(h).view(b, n, s.kv_heads, s.head_dim).transpose(1, 2)
        k = k.repeat_interleave(s.heads // s.kv_heads, dim=1)
        v = v.repeat_interleave(s.heads // s.kv_heads, dim=1)
        if s.fused:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=s.causal)
        else:
            scores = q @ k.transpose(-2, -1) / s.head_dim ** 0.5
            if s.causal:
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            a = scores.softmax(-1) @ v
        y = self.o(a.transpose(1, 2).reshape(b, n, s.heads * s.head_dim))
        return x + y if s.residual else y


class RandomTokenNet(nn.Module):
    def __init__(self, spec: TokenSpec) -> None:
        super().__init__()
        d = spec.width
        self.embed = nn.Embedding(spec.vocab, d) if spec.vocab else None
        layers: list[nn.Module] = []
        for b in spec.blocks:
            if isinstance(b, MLP):
                layers.append(_MLP(d, b))
            elif isinstance(b, Attention):
                layers.append(_Attention(d, b))
            else:
                layers.append(nn.Sequential(nn.Linear(d, b.out), _act(b.act)))
                d = b.out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(d, spec.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x) if self.embed is not None else x))


@st.composite
def token_specs(draw: st.DrawFn) -> TokenSpec:
    blocks = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("mlp", "attention", "attention", "proj")))
        residual, norm = draw(st.booleans()), draw(st.sampled_from(("none", "layer", "rms")))
        if kind == "mlp":
            blocks.append(MLP(draw(st.integers(2, 24)), draw(st.sampled_from(ACTS)), draw(st.booleans()),
                              residual, norm))
        elif kind == "attention":
            kv = draw(st.integers(1, 3))
            blocks.append(Attention(kv * draw(st.integers(1, 3)), kv, draw(st.sampled_from((2, 4, 8))),
                                    draw(st.booleans()), draw(st.booleans()), residual, norm))
        else:
            blocks.append(Proj(draw(st.integers(2, 24)), draw(st.sampled_from(ACTS))))
    return TokenSpec(draw(st.sampled_from((0, 0, 30))), draw(st.integers(4, 24)), draw(st.integers(1, 6)),
                     tuple(blocks), draw(st.integers(2, 5)))


def _check_tokens(spec: TokenSpec) -> None:
    torch.manual_seed(0)
    model = RandomTokenNet(spec)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randint(0, spec.vocab, (2, spec.length), generator=gen) if spec.vocab
         else torch.randn(2, spec.length, spec.width, generator=gen))
    check_zero_invariance(model, x)


@FAST
@given(token_specs())
def test_random_token_stack(spec: TokenSpec) -> None:
    _check_tokens(spec)


@pytest.mark.slow
@SLOW
@given(token_specs())
def test_random_token_stack_many(spec: TokenSpec) -> None:
    _check_tokens(spec)
