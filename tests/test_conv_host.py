"""The host side of block_sparse_conv2d: the eager fast path and what runs on the host per call.

- The eager path (``conv.EAGER_FAST_PATH``, an autograd Function calling the implementations
  directly) gives bit-identical outputs and gradients to the custom-op path, on the CPU path and
  on the Triton kernels under the interpreter.
- With the Triton path's kernel launches replaced by stubs, a ``TorchDispatchMode`` records every
  aten op of an eager forward and backward on channels-last inputs: none may sync the host with
  the device (``.item()``, ``nonzero``, ...) or copy/convert a tensor (``clone``, ``copy_``,
  ``_to_copy``). A planted ``.item()`` and a planted format copy are caught (so the check can
  fail).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from itop_kernels import (BlockLayout, block_sparse_conv2d, conv, triton_conv, triton_launch,
                          triton_linear, triton_split_sum)

CL = torch.channels_last

# aten ops that make the host wait for the device, or copy data on the host's request
SYNC_OPS = ("_local_scalar_dense", "nonzero", "item", "masked_select", "unique", "_unique",
            "_unique2", "unique_consecutive", "unique_dim", "equal", "is_nonzero",
            "_assert_async")
COPY_OPS = ("clone", "copy_", "_to_copy", "contiguous", "as_strided_copy", "permute_copy",
            "_copy_from", "_copy_from_and_resize", "to", "index_copy", "resize_")


class OpRecorder(TorchDispatchMode):
    """Records the name (``aten.clone``) of every op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(f"{func.namespace}.{func._opname}")
        return func(*args, **(kwargs or {}))


def bad_ops(ops: list[str]) -> list[str]:
    """The syncing and copying ops among ``ops``."""
    return [op for op in ops if op.split(".", 1)[1] in SYNC_OPS + COPY_OPS]


class _StubKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` launches nothing."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


@pytest.fixture
def stub_launches(monkeypatch):
    """The Triton path under the interpreter, with every conv and linear kernel a stub."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    stubs = {}
    for mod, names in ((triton_conv, ("_conv_fwd_kernel", "_conv_dgrad_kernel",
                                      "_conv_wgrad_kernel")),
                       (triton_linear, ("_bsl_fwd_kernel", "_bsl_dx_kernel", "_bsl_dw_kernel")),
                       (triton_split_sum, ("_sum_splits_kernel",))):
        for name in names:
            stubs[name] = _StubKernel()
            monkeypatch.setattr(mod, name, stubs[name])
    return stubs


def _problem(cin=32, cout=32, hw=6, k=3, bs=16, batch=2, bias=True, dtype=torch.float32,
             fmt=CL, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[True, False], [True, True]])[: cout // bs, : cin // bs]
    layout = BlockLayout.from_mask(mask, bs)
    w = torch.randn(cout, cin, k, k, generator=gen)
    values = layout.gather(w).to(dtype).requires_grad_()
    x = torch.randn(batch, cin, hw, hw, generator=gen).to(dtype).contiguous(
        memory_format=fmt).requires_grad_()
    b = torch.randn(cout, generator=gen).to(dtype).requires_grad_() if bias else None
    return x, values, layout, b


def _record_fwd_bwd(x, values, layout, b, **conv_args):
    """Ops of the forward and of the backward (dY channels-last like Y), recorded separately."""
    with OpRecorder() as fwd:
        y = block_sparse_conv2d(x, values, layout, b, **conv_args)
    dy = torch.randn_like(y)   # keeps Y's memory format, as a BN/ReLU backward would
    with OpRecorder() as bwd:
        y.backward(dy)
    return y, fwd.ops, bwd.ops


# --------------------------------------------------------------------------- no syncs, no copies
@pytest.mark.parametrize("route", ["conv", "gemm"])
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0)],
                         ids=["3x3", "3x3_s2", "1x1", "1x1_s2"])
def test_eager_path_makes_no_sync_and_no_copy(stub_launches, tf32_switch, k, stride, padding,
                                              route):
    """Channels-last fp32 inputs, eager fwd+bwd on the Triton path (launches stubbed): no op that
    syncs or copies, and every kernel launched. (fp32 takes the GEMM route where torch's matmul
    and conv TF32 switches agree: the conv switch is set to IEEE like the matmul default.)"""
    if route == "gemm":
        tf32_switch("conv", "new", False)
    x, values, layout, b = _problem(k=k)
    with triton_conv.options(route_1x1=route):
        y, fwd, bwd = _record_fwd_bwd(x, values, layout, b, stride=stride, padding=padding)
    assert y.is_contiguous(memory_format=CL)
    assert not bad_ops(fwd), fwd
    assert not bad_ops(bwd), bwd
    assert x.grad.is_contiguous(memory_format=CL)
    gemm = route == "gemm" and k == 1 and stride == 1
    names = (("_bsl_fwd_kernel", "_bsl_dx_kernel", "_bsl_dw_kernel") if gemm else
             ("_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel"))
    assert [stub_launches[n].launches for n in names] == [1, 1, 1]


def test_eager_path_runs_no_custom_op(stub_launches):
    """The eager path dispatches none of the ``itop_kernels::bsc_*`` custom ops; with the fast
    path switched off, the same call does (what the benchmarks compare)."""
    x, values, layout, b = _problem()
    _, fwd, bwd = _record_fwd_bwd(x, values, layout, b, padding=1)
    assert not [op for op in fwd + bwd if op.startswith("itop_kernels.")], fwd + bwd
    conv.EAGER_FAST_PATH = False
    try:
        x.grad = values.grad = b.grad = None
        _, fwd, bwd = _record_fwd_bwd(x, values, layout, b, padding=1)
    finally:
        conv.EAGER_FAST_PATH = True
    assert "itop_kernels.bsc_forward" in fwd
    assert {"itop_kernels.bsc_grad_input", "itop_kernels.bsc_grad_weight"} <= set(bwd), bwd


@pytest.mark.parametrize("plant", ["item", "format_copy"])
def test_the_check_catches_a_sync_or_a_copy(stub_launches, monkeypatch, plant):
    """The recorder sees what a regression would add: a ``.item()`` in the wgrad wrapper, or a
    channels-last input converted to NCHW and back before the forward kernel."""
    real_kernel_input = triton_conv._kernel_input

    def planted(t, name):
        if plant == "item":
            float(t.sum().item())
            return real_kernel_input(t, name)
        return real_kernel_input(t.contiguous(), name)

    monkeypatch.setattr(triton_conv, "_kernel_input", planted)
    x, values, layout, b = _problem()
    _, fwd, bwd = _record_fwd_bwd(x, values, layout, b, padding=1)
    want = "aten._local_scalar_dense" if plant == "item" else "aten.clone"
    assert want in bad_ops(fwd) and want in bad_ops(bwd), (fwd, bwd)


def test_nchw_input_is_copied_once_each_way(stub_launches):
    """NCHW inputs are supported through one copy to channels-last per kernel input (the kernels
    read channels-last) and one back per output: the check is specific to channels-last."""
    x, values, layout, b = _problem(fmt=torch.contiguous_format)
    _, fwd, _ = _record_fwd_bwd(x, values, layout, b, padding=1)
    assert fwd.count("aten.clone") == 2, fwd   # x to channels-last, y back to NCHW


# --------------------------------------------------------------------------- eager == custom ops
def _grads(x, values, layout, b, **conv_args):
    for t in (x, values, b):
        if t is not None:
            t.grad = None
    y = block_sparse_conv2d(x, values, layout, b, **conv_args)
    gen = torch.Generator().manual_seed(7)
    y.backward(torch.randn(y.shape, generator=gen).to(y.dtype))
    return [y.detach().clone()] + [t.grad.clone() for t in (x, values, b) if t is not None]


def _eager_vs_custom_ops(monkeypatch, x, values, layout, b, **conv_args):
    eager = _grads(x, values, layout, b, **conv_args)
    monkeypatch.setattr(conv, "EAGER_FAST_PATH", False)
    ops = _grads(x, values, layout, b, **conv_args)
    assert len(eager) == len(ops)
    for name, e, o in zip(("y", "dx", "dv", "db"), eager, ops):
        assert e.stride() == o.stride(), name
        assert torch.equal(e, o), f"{name} differs between the eager path and the custom ops"


@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format], ids=["cl", "nchw"])
def test_eager_matches_custom_ops_cpu(monkeypatch, fmt):
    x, values, layout, b = _problem(dtype=torch.float64, fmt=fmt)
    _eager_vs_custom_ops(monkeypatch, x, values, layout, b, stride=2, padding=1)


def test_eager_matches_custom_ops_triton(monkeypatch, triton_device):
    x, values, layout, b = _problem(hw=5, batch=1, fmt=CL)
    layout = layout.to(triton_device)
    x, values, b = (t.detach().to(triton_device).requires_grad_() for t in (x, values, b))
    x = x.detach().contiguous(memory_format=CL).requires_grad_()
    _eager_vs_custom_ops(monkeypatch, x, values, layout, b, padding=1)


@pytest.mark.parametrize("need", ["x", "values", "bias"])
def test_eager_path_only_needed_grads(monkeypatch, need):
    """``needs_input_grad``: only the inputs that require grad get one, as on the custom ops."""
    x, values, layout, b = _problem(dtype=torch.float64)
    for name, t in (("x", x), ("values", values), ("bias", b)):
        t.requires_grad_(name == need)
    y = block_sparse_conv2d(x, values, layout, b, padding=1)
    y.sum().backward()
    got = {name: t.grad is not None for name, t in (("x", x), ("values", values), ("bias", b))}
    assert got == {"x": need == "x", "values": need == "values", "bias": need == "bias"}


def test_conv_arguments_cache_keeps_types():
    """The cached argument parsing still rejects what the uncached one rejects (``True`` is not
    the stride 1 it hashes like) and hands out fresh lists."""
    x, values, layout, _ = _problem(dtype=torch.float64)
    block_sparse_conv2d(x, values, layout, stride=1)
    with pytest.raises(TypeError, match="stride"):
        block_sparse_conv2d(x, values, layout, stride=True)
    with pytest.raises(TypeError, match="stride"):
        block_sparse_conv2d(x, values, layout, stride=(True, 1))
    a = conv._conv_args(1, 1, 1, 3, 3)
    a[0][0] = 5
    assert conv._conv_args(1, 1, 1, 3, 3)[0] == [1, 1]


# --------------------------------------------------------------------------- cached launches
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cached launches run on CUDA only")
def test_cached_launch_matches_plain_on_gpu(recwarn):
    """On a GPU: the cached launch gives bit-identical results and needs no fallback."""
    x, values, layout, b = _problem(hw=9, batch=2, dtype=torch.bfloat16)
    x, values, b = (t.detach().cuda().requires_grad_() for t in (x, values, b))
    x = x.detach().contiguous(memory_format=CL).requires_grad_()
    layout = layout.to("cuda")
    with triton_launch.launching("plain"):
        plain = _grads(x, values, layout, b, padding=1)
    with triton_launch.launching("cached"):
        for _ in range(2):
            cached = _grads(x, values, layout, b, padding=1)
    assert all(torch.equal(p, c) for p, c in zip(plain, cached))
    assert triton_launch._handles and triton_launch.launch_mode() == "cached"
    assert not [w for w in recwarn if "cached Triton launches" in str(w.message)]
