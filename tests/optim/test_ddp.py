"""Under DistributedDataParallel every rank takes the same group decisions.

Two CPU processes (gloo) train on the two halves of the same global batches; their
masks must agree with each other and with one process training on the whole batches.
BatchNorm runs in eval mode (an affine map) so the halves compute what the whole does.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from graphprune.optim import HESSO
from tests.optim.optim_standin import Net, batches, digits, graph, zero_units

STEPS = 40
SETTINGS = dict(lr=0.05, target=0.5, warmup_steps=5, pruning_steps=30, pruning_periods=3)


def _run(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Net(16, 16).eval()
    opt = HESSO(graph(model), **SETTINGS)
    net = model
    if world > 1:
        net = DistributedDataParallel(model)
    x, y = digits()
    for xb, yb in batches(x, y, STEPS, 32):
        share = xb.shape[0] // world
        xb, yb = xb[rank * share:(rank + 1) * share], yb[rank * share:(rank + 1) * share]
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"masks": opt.masks, "zeros": zero_units(opt.graph), "params": model.state_dict()},
               os.path.join(out, f"rank{rank}_of{world}.pt"))


def _worker(rank: int, world: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}",
                            rank=rank, world_size=world)
    try:
        _run(rank, world, out)
    finally:
        dist.destroy_process_group()


def test_ranks_agree_with_each_other_and_with_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    _run(0, 1, str(tmp_path))
    r0, r1, single = (torch.load(tmp_path / name) for name in ("rank0_of2.pt", "rank1_of2.pt", "rank0_of1.pt"))
    for a, b, c in zip(r0["masks"], r1["masks"], single["masks"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert any(m.any() for m in r0["masks"])
    for a, b in zip(r0["zeros"], r0["masks"]):
        assert torch.equal(a, b)
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
        torch.testing.assert_close(p, single["params"][name], rtol=1e-4, atol=1e-5)
