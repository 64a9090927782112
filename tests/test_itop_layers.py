"""SparseLinear / SparseConv2d: forward, init, conversion, state_dict, errors; block-norm op."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import itop
from itop_kernels import block_norms
from itop_kernels.block_norms import block_grad_norms, conv2d_block_grad_norms
from numerics import rel_err


# Tiny matrices: one intra-op thread avoids thread-pool contention (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- SparseLinear
@pytest.mark.parametrize("bs", [1, 4, 16])
def test_linear_forward_backward_match_dense(bs):
    torch.manual_seed(0)
    layer = itop.SparseLinear(32, 48, density=0.3, block_size=bs, dtype=torch.float64)
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    w = layer.dense_weight().detach().requires_grad_()
    y = layer(x)
    ref = F.linear(x, w, layer.bias)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    (dx,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(x.grad, dx)
    dw = torch.autograd.grad(F.linear(x, w, layer.bias), w, g)[0]
    torch.testing.assert_close(layer.values.grad, layer.layout.gather(dw))  # block 1 too (CSR)


@pytest.mark.parametrize("bs,density,units", [(16, 0.1, 24), (8, 0.3, 96), (16, 1e-6, 24),
                                              (1, 0.05, 96 * 64)])
def test_exact_nnz(bs, density, units):
    layer = itop.SparseLinear(64, 96, density=density, block_size=bs)
    expected = max(1, round(density * units))
    assert layer.nnz == expected == int(layer.block_mask.sum())
    # block 1 stores the active weights only too: values [nnz, 1, 1] with a block-1 layout
    assert layer.values.shape == (expected, bs, bs) and layer.layout.nnz == expected


def test_init_matches_nn_linear_distribution():
    torch.manual_seed(0)
    layer = itop.SparseLinear(256, 512, density=0.5, block_size=16)
    bound = 1 / math.sqrt(256)
    v = layer.values.detach()
    assert v.abs().max() <= bound and v.abs().max() > 0.99 * bound
    # uniform(-b, b): mean 0, std b/sqrt(3)
    assert abs(v.mean().item()) < 0.02 * bound
    assert v.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert layer.bias.abs().max() <= bound
    conv = itop.SparseConv2d(32, 64, 3, density=0.5, block_size=16)
    cb = 1 / math.sqrt(32 * 9)
    assert conv.values.abs().max() <= cb and conv.values.std().item() == pytest.approx(
        cb / math.sqrt(3), rel=0.05)


def test_extra_repr_shows_density_and_block_size():
    r = repr(itop.SparseLinear(64, 64, density=0.25, block_size=16))
    assert "density=0.2500" in r and "block_size=16" in r
    r = repr(itop.SparseConv2d(16, 16, 3, density=0.5, block_size=8))
    assert "density=0.5000" in r and "block_size=8" in r


@pytest.mark.parametrize("bs", [1, 8])
def test_from_dense_to_dense(bs):
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    sl = itop.SparseLinear.from_dense(lin, density=0.25, block_size=bs, init="magnitude")
    w = lin.weight.detach()
    if bs > 1:
        norms = w.reshape(2, 8, 4, 8).square().sum((1, 3))
    else:
        norms = w.abs()
    kept = norms[sl.block_mask]
    dropped = norms[~sl.block_mask]
    assert kept.min() >= dropped.max()  # magnitude init keeps the largest blocks
    back = sl.to_dense()
    assert type(back) is nn.Linear
    mask = sl.block_mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    assert torch.equal(back.weight, w * mask) and torch.equal(back.bias, lin.bias)
    x = torch.randn(4, 32)
    torch.testing.assert_close(back(x), sl(x))
    with pytest.raises(ValueError, match="init"):
        itop.SparseLinear.from_dense(lin, block_size=bs, init="best")
    with pytest.raises(TypeError, match="nn.Linear"):
        itop.SparseLinear.from_dense(nn.Conv2d(8, 8, 1), block_size=bs)


def test_state_dict_carries_layout_and_fresh_model_loads_other_nnz():
    torch.manual_seed(0)
    trained = itop.SparseLinear(64, 64, density=0.5, block_size=16)
    sd = trained.state_dict()
    assert "block_mask" in sd and sd["block_mask"].dtype == torch.bool
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = itop.SparseLinear(64, 64, density=0.1, block_size=16)
    param = fresh.values
    assert fresh.nnz != trained.nnz
    fresh.load_state_dict(torch.load(buf))
    assert fresh.values is param  # same Parameter object, resized
    assert fresh.nnz == trained.nnz == fresh.layout.nnz
    assert torch.equal(fresh.block_mask, trained.block_mask)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), trained(x))
    bad = dict(sd)
    bad["block_mask"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="block_mask"):
        fresh.load_state_dict(bad)


def test_module_to_dtype_keeps_layout_consistent():
    layer = itop.SparseLinear(32, 32, density=0.5, block_size=8).double()
    assert layer.values.dtype == torch.float64
    y = layer(torch.randn(2, 32, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_linear_bad_arguments():
    with pytest.raises(ValueError, match="block_size=16 does not divide in_features=30"):
        itop.SparseLinear(30, 32, block_size=16)
    with pytest.raises(ValueError, match="density"):
        itop.SparseLinear(32, 32, density=0.0, block_size=16)
    with pytest.raises(ValueError, match="density"):
        itop.SparseLinear(32, 32, density=1.01, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        itop.SparseLinear(32, 32, block_size=0)
    with pytest.raises(ValueError, match="in_features"):
        itop.SparseLinear(0, 32, block_size=1)


# --------------------------------------------------------------------------- SparseConv2d
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_conv_forward_backward_match_dense(stride, padding, dilation):
    torch.manual_seed(0)
    conv = itop.SparseConv2d(16, 24, 3, stride, padding, dilation, density=0.4, block_size=8,
                             dtype=torch.float64)
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64, requires_grad=True)
    w = conv.dense_weight().detach().requires_grad_()
    y = conv(x)
    ref = F.conv2d(x, w, conv.bias, stride, padding, dilation)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    dx, dw = torch.autograd.grad(ref, (x, w), g)
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(conv.values.grad, conv.layout.gather(dw))
    assert conv.values.shape == (conv.nnz, 3, 3, 8, 8)


def test_conv_block1_grouped_matches_masked_dense():
    torch.manual_seed(0)
    conv = itop.SparseConv2d(8, 16, 3, padding=1, groups=2, density=0.3, block_size=1,
                             dtype=torch.float64)
    assert conv.values.shape == (16, 4, 3, 3) and conv.block_mask.shape == (16, 4, 3, 3)
    assert conv.nnz == round(0.3 * 16 * 4 * 9)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.values * conv.block_mask, conv.bias,
                                                 padding=1, groups=2))


def test_conv_from_dense_to_dense_and_state_dict():
    torch.manual_seed(0)
    c = nn.Conv2d(16, 32, 3, padding="same")
    sc = itop.SparseConv2d.from_dense(c, density=0.5, block_size=8)
    assert sc.padding == (1, 1)
    x = torch.randn(2, 16, 7, 7)
    back = sc.to_dense()
    torch.testing.assert_close(back(x), sc(x), rtol=1e-5, atol=1e-5)
    mask = sc.block_mask.repeat_interleave(8, 0).repeat_interleave(8, 1)[:, :, None, None]
    assert torch.equal(back.weight, c.weight * mask)
    fresh = itop.SparseConv2d(16, 32, 3, padding=1, density=0.1, block_size=8)
    fresh.load_state_dict(sc.state_dict())
    assert torch.equal(fresh(x), sc(x))


def test_conv_bad_arguments():
    with pytest.raises(ValueError, match="groups"):
        itop.SparseConv2d(16, 16, 3, groups=2, block_size=8)
    with pytest.raises(ValueError, match="in_channels"):
        itop.SparseConv2d(12, 16, 3, block_size=8)
    with pytest.raises(ValueError, match="padding"):
        itop.SparseConv2d(16, 16, 3, padding="full", block_size=8)
    with pytest.raises(ValueError, match="kernel_size"):
        itop.SparseConv2d(16, 16, (3, 3, 3), block_size=8)
    with pytest.raises(ValueError, match="padding_mode"):
        itop.SparseConv2d.from_dense(nn.Conv2d(16, 16, 3, padding_mode="reflect"), block_size=8)


# --------------------------------------------------------------------------- block-norm op
def _ref_block_norms(dw, bs):
    R, C = dw.shape[0] // bs, dw.shape[1] // bs
    return dw.reshape(R, bs, C, bs, *dw.shape[2:]).square().sum(
        dim=tuple(d for d in range(dw.dim() + 2) if d not in (0, 2))).sqrt()


@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 20), R=st.integers(1, 6), C=st.integers(1, 6),
       bs=st.sampled_from([1, 2, 4, 8]), small_chunks=st.booleans())
def test_block_grad_norms_match_dense_reference(M, R, C, bs, small_chunks):
    g = torch.Generator().manual_seed(M * 100 + R * 10 + C)
    x = torch.randn(M, C * bs, dtype=torch.float64, generator=g)
    dy = torch.randn(M, R * bs, dtype=torch.float64, generator=g)
    old = block_norms._CHUNK_ELEMENTS
    block_norms._CHUNK_ELEMENTS = 1 if small_chunks else old  # one block-row per chunk
    try:
        got = block_grad_norms(x, dy, bs)
    finally:
        block_norms._CHUNK_ELEMENTS = old
    ref = _ref_block_norms(dy.t() @ x, bs).float()
    assert got.dtype == torch.float32 and got.shape == (R, C)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduce_taps", [True, False])
def test_conv2d_block_grad_norms_match_dense_reference(reduce_taps, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    dy = torch.randn(2, 24, 5, 5, dtype=torch.float64)
    monkeypatch.setattr(block_norms, "_CHUNK_ELEMENTS", 1)
    got = conv2d_block_grad_norms(x, dy, (24, 16, 3, 3), 8, stride=2, padding=1,
                                  reduce_taps=reduce_taps)
    dw = torch.nn.grad.conv2d_weight(x, (24, 16, 3, 3), dy, stride=2, padding=1)
    if reduce_taps:
        ref = _ref_block_norms(dw, 8)
    else:
        ref = dw.reshape(3, 8, 2, 8, 3, 3).square().sum((1, 3)).sqrt()
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-6)


def test_block_grad_norms_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        block_grad_norms(torch.randn(4, 8), torch.randn(4, 8), 3)
    with pytest.raises(ValueError, match="same M"):
        block_grad_norms(torch.randn(4, 8), torch.randn(5, 8), 4)
    with pytest.raises(ValueError, match="groups"):
        conv2d_block_grad_norms(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2), (8, 4, 3, 3), 4,
                                groups=2)


def test_block_grad_norms_is_a_custom_op():
    assert hasattr(torch.ops.itop_kernels, "block_grad_norms")
    assert hasattr(torch.ops.itop_kernels, "conv2d_block_grad_norms")
    x, dy = torch.randn(6, 16), torch.randn(6, 8)
    for precision in ("exact", "bf16"):
        torch.testing.assert_close(torch.ops.itop_kernels.block_grad_norms(x, dy, 4, precision),
                                   block_grad_norms(x, dy, 4, precision=precision))
        torch.library.opcheck(torch.ops.itop_kernels.block_grad_norms, (x, dy, 4, precision))
    xc, dyc = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    torch.library.opcheck(torch.ops.itop_kernels.conv2d_block_grad_norms,
                          ([xc], [dyc], [8, 8, 3, 3], 4, [1, 1], [1, 1], [1, 1], 1, True, "bf16"))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_bf16_precision_norms_are_close_to_exact(bs):
    """precision="bf16" multiplies bf16 copies (fp32 accumulation): within the fp16 class
    tolerance of the float64 norms, and the same top blocks where they are not near-ties."""
    gen = torch.Generator().manual_seed(bs)
    x = torch.randn(96, 64, generator=gen)
    dy = torch.randn(96, 48, generator=gen)
    ref = block_grad_norms(x.double(), dy.double(), bs)
    got = block_grad_norms(x, dy, bs, precision="bf16")
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert _rel(got, ref) <= 1e-2
    assert _rel(block_grad_norms(x, dy, bs, precision="exact"), ref) <= 1e-4
    xc = torch.randn(2, 16, 7, 7, generator=gen).to(memory_format=torch.channels_last)
    dyc = torch.randn(2, 16, 7, 7, generator=gen)
    cbs = 1 if bs == 1 else 8
    cref = conv2d_block_grad_norms(xc.double(), dyc.double(), (16, 16, 3, 3), cbs, padding=1)
    cgot = conv2d_block_grad_norms(xc, dyc, (16, 16, 3, 3), cbs, padding=1, precision="bf16")
    assert _rel(cgot, cref) <= 1e-2


def test_auto_precision_resolution(monkeypatch):
    from itop_kernels.block_norms import resolve_precision
    cpu = torch.device("cpu")
    monkeypatch.setattr(block_norms, "native_bf16_matmul", lambda device: True)
    assert resolve_precision("auto", torch.float32, cpu) == "bf16"
    assert resolve_precision("auto", torch.bfloat16, cpu) == "bf16"
    assert resolve_precision("auto", torch.float64, cpu) == "exact"  # float64 stays exact
    assert resolve_precision("exact", torch.float32, cpu) == "exact"
    monkeypatch.setattr(block_norms, "native_bf16_matmul", lambda device: False)
    assert resolve_precision("auto", torch.float32, cpu) == "exact"
    assert resolve_precision("bf16", torch.float64, cpu) == "bf16"   # asked for explicitly
    with pytest.raises(ValueError, match="precision"):
        block_grad_norms(torch.randn(4, 8), torch.randn(4, 8), 4, precision="fp8")


# --------------------------------------------------------------------------- captured scores
def test_linear_captured_grad_scores_match_dense_gradient_over_micro_batches():
    torch.manual_seed(0)
    layer = itop.SparseLinear(16, 24, density=0.3, block_size=4, dtype=torch.float64)
    layer._start_capture()
    w = layer.dense_weight().detach().requires_grad_()
    dense_grad = torch.zeros_like(w)
    for _ in range(2):  # gradient accumulation: dW is the sum over both micro-batches
        x = torch.randn(3, 5, 16, dtype=torch.float64)  # leading dims are flattened
        layer(x).sin().sum().backward()
        dense_grad += torch.autograd.grad(F.linear(x, w, layer.bias).sin().sum(), w)[0]
    with torch.no_grad():
        layer(torch.randn(2, 16, dtype=torch.float64))  # no grad: nothing captured
    got = layer._grad_scores()
    torch.testing.assert_close(got, _ref_block_norms(dense_grad, 4).float())
    layer._stop_capture()
    assert layer._grad_scores() is None and not layer._forward_hooks


@pytest.mark.parametrize("bs", [1, 8])
def test_conv_captured_grad_scores_match_dense_gradient(bs):
    torch.manual_seed(0)
    conv = itop.SparseConv2d(16, 16, 3, stride=2, padding=1, density=0.4, block_size=bs,
                             dtype=torch.float64)
    conv._start_capture()
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    conv(x).square().sum().backward()
    w = conv.dense_weight().detach().requires_grad_()
    dw = torch.autograd.grad(F.conv2d(x, w, conv.bias, 2, 1).square().sum(), w)[0]
    ref = dw.abs() if bs == 1 else _ref_block_norms(dw, bs)
    torch.testing.assert_close(conv._grad_scores(), ref.float())
    conv._stop_capture()


@pytest.mark.parametrize("bs", [1, 8])
def test_conv_grad_scores_over_micro_batches_of_different_sizes(bs):
    """Gradient accumulation over micro-batches of different spatial sizes: the score is the
    norm of the summed gradient (not a sum of per-micro-batch norms)."""
    torch.manual_seed(1)
    conv = itop.SparseConv2d(16, 16, 3, padding=1, density=0.4, block_size=bs,
                             dtype=torch.float64)
    conv._start_capture()
    w = conv.dense_weight().detach().requires_grad_()
    dense_grad = torch.zeros_like(w)
    for hw in (5, 8):
        x = torch.randn(2, 16, hw, hw, dtype=torch.float64)
        conv(x).sin().sum().backward()
        dense_grad += torch.autograd.grad(F.conv2d(x, w, conv.bias, 1, 1).sin().sum(), w)[0]
    ref = dense_grad.abs() if bs == 1 else _ref_block_norms(dense_grad, bs)
    torch.testing.assert_close(conv._grad_scores(), ref.float())
    conv._stop_capture()
    with pytest.raises(ValueError, match="equally long"):
        conv2d_block_grad_norms([torch.randn(1, 16, 4, 4)], [], (16, 16, 3, 3), 8)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_autocast_runs_in_the_autocast_dtype_with_fp32_gradients(kind, gen):
    """Under bf16 autocast the layer computes in bf16 (as nn.Linear/nn.Conv2d would); its output
    and the gradients of x, values and bias stay within bf16's bound (1e-2) of a dense float64
    reference (``F.linear``/``F.conv2d`` on the layer's dense weight), and the gradients come
    back in the fp32 of the parameters and the input."""
    if kind == "linear":
        layer = itop.SparseLinear(64, 48, density=0.5, block_size=16)
        x = torch.randn(24, 64, generator=gen)
        dense_op = F.linear
    else:
        layer = itop.SparseConv2d(32, 48, 3, padding=1, density=0.5, block_size=16)
        x = torch.randn(2, 32, 6, 5, generator=gen)

        def dense_op(x_, w_, b_):
            return F.conv2d(x_, w_, b_, padding=1)
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xi)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(y.shape, generator=gen)
    gx, gv, gb = torch.autograd.grad(y, [xi, layer.values, layer.bias], dy.to(y.dtype))

    x64 = x.double().requires_grad_()
    w64 = layer.dense_weight().detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    ref = dense_op(x64, w64, b64)
    rx, rw, rb = torch.autograd.grad(ref, [x64, w64, b64], dy.double())
    assert rel_err(y, ref) <= 1e-2
    for name, g, r in (("x", gx, rx), ("values", gv, layer.layout.gather(rw)), ("bias", gb, rb)):
        assert g.dtype == torch.float32, name
        assert rel_err(g, r) <= 1e-2, (name, rel_err(g, r))


def test_layout_follows_in_place_mask_overwrite():
    # what DDP does when it broadcasts rank 0's buffers into a model built with other masks
    torch.manual_seed(0)
    a = itop.SparseLinear(32, 32, density=0.5, block_size=8)
    b = itop.SparseLinear(32, 32, density=0.5, block_size=8)
    assert not torch.equal(a.block_mask, b.block_mask)
    with torch.no_grad():
        b.block_mask.copy_(a.block_mask)
        b.values.copy_(a.values)
        b.bias.copy_(a.bias)
    x = torch.randn(3, 32)
    assert torch.equal(b(x), a(x))
    assert torch.equal(b.layout.row_idx, a.layout.row_idx)


@pytest.mark.parametrize("bs", [1, 4])
def test_captured_grad_scores_survive_inplace_activation(bs):
    # nn.ReLU(inplace=True) right after the layer must not hide dY from the capture
    torch.manual_seed(0)
    layer = itop.SparseLinear(16, 16, density=0.5, block_size=bs, dtype=torch.float64)
    model = nn.Sequential(layer, nn.ReLU(inplace=True))
    layer._start_capture()
    x = torch.randn(6, 16, dtype=torch.float64)
    model(x).square().sum().backward()
    w = layer.dense_weight().detach().requires_grad_()
    dw = torch.autograd.grad(torch.relu(F.linear(x, w, layer.bias)).square().sum(), w)[0]
    torch.testing.assert_close(layer._grad_scores(), _ref_block_norms(dw, bs).float())
    layer._stop_capture()
