"""BSR kernels: every form matches numpy; the chooser's verdict follows its own measurements."""
import numpy as np
import pytest
import torch

from graphprune.codegen.sparse import BsrWeight, bsr_linear, kernel_form
from graphprune.codegen.sparsify import choose_kernels

RNG = np.random.default_rng(0)


def block_sparse(n: int, k: int, block: tuple[int, int], density: float) -> np.ndarray:
    weight = RNG.standard_normal((n, k)).astype("float32")
    mask = RNG.random((n // block[0], k // block[1])) < density
    return weight * np.kron(mask, np.ones(block, "float32"))


@pytest.mark.parametrize("block", [(16, 1), (1, 16), (4, 4)])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_bsr_matches_numpy(block, batch):
    weight, bias = block_sparse(64, 48, block, 0.3), RNG.standard_normal(64).astype("float32")
    x = RNG.standard_normal((batch, 48)).astype("float32")
    layer = bsr_linear(weight, block, batch, bias)
    assert layer.form == kernel_form(block, batch)
    np.testing.assert_allclose(layer(x), x @ weight.T + bias, rtol=1e-4, atol=1e-4)


def test_kernel_form_follows_block_and_batch():
    assert kernel_form((16, 1), 1) == "rows" and kernel_form((4, 4), 1) == "rows"
    assert kernel_form((1, 16), 1) == "cols"
    assert {kernel_form(b, 128) for b in [(16, 1), (1, 16), (4, 4)]} == {"tokens"}


def test_bsr_round_trip_and_empty_weight():
    weight = block_sparse(32, 32, (4, 4), 0.25)
    bsr = BsrWeight.from_dense(weight, (4, 4))
    np.testing.assert_array_equal(bsr.to_dense(), weight)
    assert bsr.block_density == pytest.approx((np.abs(weight).reshape(8, 4, 8, 4).max(axis=(1, 3)) > 0).mean())
    empty = bsr_linear(np.zeros((32, 16), "float32"), (16, 1), 2)
    assert not empty(np.ones((2, 16), "float32")).any()


def test_chooser_picks_bsr_only_when_faster():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(block_sparse(64, 64, (16, 1), 0.1)))
    choices = choose_kernels(model, batch=8, block=(16, 1))
    assert [c.layer for c in choices] == ["0", "2"]
    for choice in choices:
        assert choice.kernel == ("bsr" if choice.bsr_ms < choice.dense_ms else "dense")
