"""``benchmarks/host_route.py``: the GPU route's host work on a CPU, with kernels that launch
nothing. The host-overhead figures of ``bench_conv.py`` and ``bench_linear.py`` on the CPU rest
on it, so it must really take the GPU route (the cached launches replay) and leave nothing
patched behind."""
import pytest
import torch

from bench_scripts import bench_module
from itop_kernels import BlockLayout, block_sparse_conv2d, block_sparse_linear, triton_launch
from itop_kernels import triton_conv, triton_linear


def _operands(gen):
    mask = torch.rand(4, 4, generator=gen) < 0.5
    mask[0, 0] = True
    layout = BlockLayout.from_mask(mask, 16)
    x = torch.randn(6, 64, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    v = layout.gather(torch.randn(64, 64, generator=gen).bfloat16()).requires_grad_()
    xc = torch.randn(2, 64, 5, 5, generator=gen).bfloat16()
    xc = xc.contiguous(memory_format=torch.channels_last).requires_grad_()
    vc = layout.gather(torch.randn(64, 64, 3, 3, generator=gen).bfloat16()).requires_grad_()
    return layout, x, v, xc, vc


@pytest.mark.parametrize("mode", ["cached", "plain"])
def test_ops_take_the_gpu_route_and_launch_nothing(gen, mode):
    host_route = bench_module("host_route")
    layout, x, v, xc, vc = _operands(gen)
    real = (triton_conv._conv_fwd_kernel, triton_linear._bsl_fwd_kernel)
    handles, mode_before = triton_launch._handles, triton_launch.launch_mode()
    with host_route.gpu_route_without_kernels(mode):
        assert x.is_cuda and triton_launch.launch_mode() == mode
        for _ in range(2):   # the second call replays what the first cached
            block_sparse_linear(x, v, layout).sum().backward()
            block_sparse_conv2d(xc, vc, layout, padding=1).sum().backward()
        cached = {key[0] for key in triton_launch._handles}   # id() of each kernel cached
        stand_ins = (triton_conv._conv_fwd_kernel, triton_linear._bsl_fwd_kernel)
    # nothing stays patched
    assert not x.is_cuda and triton_launch._handles is handles
    assert (triton_conv._conv_fwd_kernel, triton_linear._bsl_fwd_kernel) == real
    assert triton_launch.launch_mode() == mode_before
    replays = [k.compiled.runs for k in stand_ins]
    if mode == "cached":   # cached on the first call, replayed on the second
        assert {id(k) for k in stand_ins} <= cached and replays == [1, 1]
    else:
        assert not cached and replays == [0, 0]
    assert x.grad.shape == x.shape and vc.grad.shape == vc.shape
