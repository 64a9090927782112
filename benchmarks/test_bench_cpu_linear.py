"""pytest-benchmark suite for the CPU path of block_sparse_linear (fwd+bwd, fp32).

Run with ``pytest benchmarks/ --benchmark-only``; it is not part of the test suite. Shape:
batch 512, 2048 x 2048 (``ITOP_BENCH_SIZE`` overrides the feature count).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from itop_kernels import BlockLayout, block_sparse_linear

N = int(os.environ.get("ITOP_BENCH_SIZE", "2048"))
M = 512


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, N, generator=g, requires_grad=True)
    W = torch.randn(N, N, generator=g) / N ** 0.5
    dy = torch.randn(M, N, generator=g)
    return x, W, dy


def _layout(density: float, bs: int) -> BlockLayout:
    R = N // bs
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(R * R, dtype=torch.bool)
    mask[torch.randperm(R * R, generator=g)[:max(1, round(density * R * R))]] = True
    return BlockLayout.from_mask(mask.view(R, R), bs)


def test_dense_fwd_bwd(benchmark, data):
    x, W, dy = data
    Wp = W.clone().requires_grad_()
    benchmark(lambda: torch.autograd.grad(F.linear(x, Wp), (x, Wp), dy))


@pytest.mark.parametrize("density", [0.1, 0.02])
@pytest.mark.parametrize("bs", [16, 32, 64])
def test_block_sparse_fwd_bwd(benchmark, data, density, bs):
    x, W, dy = data
    lay = _layout(density, bs)
    v = lay.gather(W).requires_grad_()
    benchmark.extra_info.update(density=density, block=bs, nnz=lay.nnz)
    benchmark(lambda: torch.autograd.grad(block_sparse_linear(x, v, lay), (x, v), dy))
