"""block_sparse_conv2d against a float64 F.conv2d reference, on the CPU path and the Triton kernels.

The reference is float64 ``F.conv2d`` on the masked dense weight (``layout.scatter(values)``),
fed the same (rounded) inputs; forward and the gradients of x, values and bias are compared by
relative error ‖out − ref‖ / ‖ref‖ against ``numerics.tol_for``. On the Triton path every kernel
output starts as NaN inside NaN guard bands (the ``triton_device`` fixture), so an element a
kernel forgot to write, or one it wrote out of bounds, fails. Random masks of two or more
block-rows and block-columns have a transpose that is a real permutation (:mod:`block_masks`).
"""
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from block_masks import add_transposing_blocks, assert_real_transpose
from itop_kernels import BlockLayout, block_sparse_conv2d
from itop_kernels.cpu_conv import output_memory_format
from kernel_launches import at_odd_offset, record_operand_bases, spy_launches
from numerics import TOL, TOL_TF32, rel_err, tol_for

CL = torch.channels_last


@dataclass
class Case:
    """One convolution: channels, map size, kernel, conv arguments, block mask kind."""

    cin: int
    cout: int
    hw: tuple
    k: tuple
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    bs: int = 16
    batch: int = 2
    mask: str = "random"          # random | empty_rows | dense | empty | one
    bias: bool = True
    layout_in: str = "nchw"       # nchw | cl (channels_last) | strided (non-contiguous view)
    id: str = field(default="")


def make_mask(kind: str, R: int, C: int, gen: torch.Generator) -> torch.Tensor:
    """Block masks for the edge cases: random (never empty), empty block rows, dense, empty,
    a single active block. Random ones with two or more block-rows and block-columns get the
    blocks of :func:`block_masks.add_transposing_blocks` (a real transpose permutation)."""
    if kind == "dense":
        return torch.ones(R, C, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(R, C, dtype=torch.bool)
    if kind == "one":
        mask = torch.zeros(R, C, dtype=torch.bool)
        mask[R - 1, C - 1] = True
        return mask
    mask = torch.rand(R, C, generator=gen) < 0.5
    mask[torch.randint(R, (1,), generator=gen), torch.randint(C, (1,), generator=gen)] = True
    live_rows = list(range(R))
    if kind == "empty_rows":
        mask[0] = False           # block-row 0 empty: its outputs are bias only
        if R > 2:
            mask[2] = False
        mask[R - 1, 0] = True
        live_rows = [r for r in range(R) if r not in (0, 2)]
    if len(live_rows) >= 2 and C >= 2:
        add_transposing_blocks(mask, live_rows[0], live_rows[-1])
        assert_real_transpose(mask)
    return mask


def _input(x: torch.Tensor, layout_in: str) -> torch.Tensor:
    if layout_in == "cl":
        return x.contiguous(memory_format=CL)
    if layout_in == "strided":  # a non-contiguous view: every other column of a wider map
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def run_case(c: Case, dtype: torch.dtype, device: str, seed: int = 0):
    """Run ``c`` on ``device``/``dtype``; return ours and the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    R, C = c.cout // c.bs, c.cin // c.bs
    mask = make_mask(c.mask, R, C, gen)
    layout = BlockLayout.from_mask(mask, c.bs).to(device)
    kh, kw = c.k
    w64 = torch.randn(c.cout, c.cin, kh, kw, generator=gen, dtype=torch.float64)
    x64 = torch.randn(c.batch, c.cin, *c.hw, generator=gen, dtype=torch.float64)
    b64 = torch.randn(c.cout, generator=gen, dtype=torch.float64)

    values = layout.gather(w64.to(device)).to(dtype).requires_grad_()
    x = _input(x64.to(device, dtype), c.layout_in).requires_grad_()
    bias = b64.to(device, dtype).requires_grad_() if c.bias else None
    y = block_sparse_conv2d(x, values, layout, bias, c.stride, c.padding, c.dilation)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    y.backward(dy)

    xr = x.detach().cpu().double().requires_grad_()
    vr = values.detach().cpu().double().requires_grad_()
    br = bias.detach().cpu().double().requires_grad_() if c.bias else None
    yr = F.conv2d(xr, BlockLayout.from_mask(mask, c.bs).scatter(vr), br, c.stride, c.padding,
                  c.dilation)
    yr.backward(dy.cpu().double())
    ours = {"y": y, "dx": x.grad, "dv": values.grad}
    ref = {"y": yr, "dx": xr.grad, "dv": vr.grad}
    if c.bias:
        ours["db"], ref["db"] = bias.grad, br.grad
    return x, y, ours, ref


def check_case(c: Case, dtype: torch.dtype, device: str, seed: int = 0):
    x, y, ours, ref = run_case(c, dtype, device, seed)
    assert y.dtype == dtype and y.shape == ref["y"].shape
    tol = tol_for(dtype, device, "conv")
    errs = {k: rel_err(ours[k], ref[k]) for k in ours}
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{c}: relative errors {errs} above {tol}"
    # Gradients that must be exactly zero (no active block) are zero, not just small.
    for k in ours:
        if ref[k].numel() and ref[k].abs().max() == 0:
            assert ours[k].abs().max() == 0, f"{k} should be exactly zero"
    # The output and dX keep the input's memory format.
    fmt = CL if c.layout_in == "cl" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    assert ours["dx"].is_contiguous(memory_format=fmt)
    return errs


# --------------------------------------------------------------------------- CPU path
CPU_CASES = [
    Case(32, 32, (9, 7), (3, 3), padding=1, id="3x3_odd_pad1"),
    Case(32, 48, (9, 11), (3, 3), stride=2, padding=2, id="stride2_odd_pad2"),
    Case(48, 32, (11, 9), (3, 3), dilation=2, padding=2, id="dilation2"),
    Case(32, 32, (7, 9), (3, 3), stride=(2, 1), padding=(0, 3), dilation=(1, 2), id="mixed_pairs"),
    Case(32, 64, (6, 5), (1, 1), id="1x1"),
    Case(32, 32, (7, 7), (1, 1), stride=2, id="1x1_stride2"),
    Case(32, 32, (9, 9), (5, 5), padding=2, id="5x5"),
    Case(32, 32, (11, 10), (7, 7), stride=2, padding=3, id="7x7_stride2"),
    Case(32, 48, (8, 9), (3, 5), stride=(1, 2), padding=(1, 2), id="rect_3x5"),
    Case(16, 48, (7, 7), (3, 3), padding=1, id="cin_one_block"),
    Case(48, 16, (7, 7), (3, 3), padding=1, id="cout_one_block"),
    Case(32, 64, (7, 7), (3, 3), padding=1, mask="empty_rows", id="empty_rows"),
    Case(32, 32, (7, 7), (3, 3), padding=1, mask="dense", id="dense"),
    Case(32, 32, (7, 7), (3, 3), padding=1, mask="one", id="one_block"),
    Case(32, 32, (7, 7), (3, 3), padding=1, mask="empty", id="no_blocks"),
    Case(32, 48, (9, 7), (3, 3), stride=2, padding=1, layout_in="cl", id="channels_last"),
    Case(32, 32, (7, 9), (3, 3), padding=1, layout_in="strided", id="non_contiguous"),
    Case(32, 32, (7, 7), (3, 3), padding=1, bias=False, id="no_bias"),
    Case(24, 16, (6, 7), (3, 3), padding=1, bs=8, id="block8"),
    Case(64, 64, (5, 5), (3, 3), padding=1, bs=32, id="block32"),
    Case(32, 32, (3, 3), (3, 3), padding=0, id="single_output_pixel"),
    Case(32, 32, (5, 5), (3, 3), padding=1, batch=1, id="batch1"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CPU_CASES, ids=[c.id for c in CPU_CASES])
def test_cpu_path(case, dtype):
    check_case(case, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CPU_CASES[:3] + CPU_CASES[15:16],
                         ids=[c.id for c in CPU_CASES[:3] + CPU_CASES[15:16]])
def test_cpu_path_half(case, dtype):
    check_case(case, dtype, "cpu")


def test_cpu_gradcheck():
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[True, False], [True, True], [False, False]])
    layout = BlockLayout.from_mask(mask, 2)
    values = torch.randn(layout.nnz, 3, 2, 2, 2, generator=gen, dtype=torch.float64,
                         requires_grad=True)
    x = torch.randn(1, 4, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    for memory_format in (torch.contiguous_format, CL):
        xi = x.detach().contiguous(memory_format=memory_format).requires_grad_()
        fn = lambda x_, v_, b_: block_sparse_conv2d(x_, v_, layout, b_, stride=(2, 1),
                                                   padding=(1, 2), dilation=(1, 2))
        assert torch.autograd.gradcheck(fn, (xi, values, bias), fast_mode=memory_format == CL)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_cpu_hypothesis(data):
    bs = data.draw(st.sampled_from([4, 8, 16]), "bs")
    R = data.draw(st.integers(1, 3), "R")
    C = data.draw(st.integers(1, 3), "C")
    kh = data.draw(st.integers(1, 5), "kh")
    kw = data.draw(st.integers(1, 5), "kw")
    sh, sw = data.draw(st.integers(1, 3), "sh"), data.draw(st.integers(1, 3), "sw")
    dh, dw = data.draw(st.integers(1, 2), "dh"), data.draw(st.integers(1, 2), "dw")
    ph, pw = data.draw(st.integers(0, 3), "ph"), data.draw(st.integers(0, 3), "pw")
    H = data.draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 10), "H")
    W = data.draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 10), "W")
    bits = data.draw(st.lists(st.booleans(), min_size=R * C, max_size=R * C), "mask")
    cl = data.draw(st.booleans(), "channels_last")
    mask = torch.tensor(bits).view(R, C)
    layout = BlockLayout.from_mask(mask, bs)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
    values = torch.randn(layout.nnz, kh, kw, bs, bs, generator=gen, dtype=torch.float64,
                         requires_grad=True)
    x = torch.randn(2, C * bs, H, W, generator=gen, dtype=torch.float64)
    if cl:
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    bias = torch.randn(R * bs, generator=gen, dtype=torch.float64, requires_grad=True)
    conv = dict(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw))
    y = block_sparse_conv2d(x, values, layout, bias, **conv)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(dy)
    xr = x.detach().clone().requires_grad_()
    vr = values.detach().clone().requires_grad_()
    br = bias.detach().clone().requires_grad_()
    yr = F.conv2d(xr, layout.scatter(vr), br, **conv)
    yr.backward(dy)
    for ours, ref in ((y, yr), (x.grad, xr.grad), (values.grad, vr.grad), (bias.grad, br.grad)):
        assert rel_err(ours, ref) <= 1e-10
    # the output keeps x's memory format (a 1x1 map is both formats: NCHW then)
    assert y.is_contiguous(memory_format=output_memory_format(x))
    assert output_memory_format(x) == (CL if cl and H * W > 1 else torch.contiguous_format)


def test_cpu_path_skips_inactive_blocks(monkeypatch):
    """The CPU path convolves only compact per-row weights, never the dense [Cout, Cin] one."""
    shapes = []
    real_conv2d = F.conv2d

    def spy(inp, weight, *args, **kwargs):
        shapes.append((tuple(inp.shape), tuple(weight.shape)))
        return real_conv2d(inp, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", spy)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[3, 5] = mask[3, 1] = mask[6, 2] = True
    layout = BlockLayout.from_mask(mask, 16)
    values = torch.randn(layout.nnz, 3, 3, 16, 16)
    x = torch.randn(1, 128, 6, 6)
    block_sparse_conv2d(x, values, layout, padding=1)
    # one convolution per non-empty block-row, over only that row's active input blocks
    assert sorted(s[1] for s in shapes) == [(16, 16, 3, 3), (16, 32, 3, 3)]
    assert sorted(s[0][1] for s in shapes) == [16, 32]


def test_cpu_worker_pool_matches_single_thread():
    """Rows (and batch chunks) run on a worker pool when torch has > 1 intra-op thread: the
    results match one thread (dW sums batch chunks, so up to rounding), no autograd graph is
    recorded in the workers, and the caller's thread count is untouched."""
    gen = torch.Generator().manual_seed(5)
    layout = BlockLayout.from_mask(torch.rand(4, 3, generator=gen) < 0.6, 16)
    values = torch.randn(layout.nnz, 3, 3, 16, 16, generator=gen, requires_grad=True)
    x = torch.randn(2, 48, 9, 8, generator=gen).contiguous(memory_format=CL).requires_grad_()
    bias = torch.randn(64, generator=gen, requires_grad=True)
    before = torch.get_num_threads()
    results = []
    for threads in (max(2, before), 1):
        torch.set_num_threads(threads)
        try:
            y = block_sparse_conv2d(x, values, layout, bias, padding=1, stride=(2, 1))
            grads = torch.autograd.grad(y.square().sum(), (x, values, bias))
        finally:
            torch.set_num_threads(before)
        results.append((y.detach(), *grads))
        assert torch.get_num_threads() == before
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-6


def test_custom_ops_opcheck():
    """Schemas, fake (meta) impls, autograd registration of the three ops."""
    gen = torch.Generator().manual_seed(3)
    layout = BlockLayout.from_mask(torch.tensor([[True, False], [True, True]]), 8)
    values = torch.randn(layout.nnz, 3, 3, 8, 8, generator=gen, requires_grad=True)
    bias = torch.randn(16, generator=gen, requires_grad=True)
    meta = [layout.row_ptr, layout.col_idx, layout.row_idx, layout.col_ptr, layout.t_row_idx,
            layout.t_block_idx]
    for memory_format in (torch.contiguous_format, CL):
        x = torch.randn(2, 16, 7, 6, generator=gen).contiguous(
            memory_format=memory_format).requires_grad_()
        torch.library.opcheck(torch.ops.itop_kernels.bsc_forward,
                              (x, values, *meta, bias, 8, 16, [2, 1], [1, 1], [1, 1]))
        dy = torch.randn(2, 16, 4, 6, generator=gen).contiguous(memory_format=memory_format)
        torch.library.opcheck(torch.ops.itop_kernels.bsc_grad_input,
                              (dy, values.detach(), layout.col_ptr, layout.t_row_idx,
                               layout.t_block_idx, 8, [2, 16, 7, 6], [2, 1], [1, 1], [1, 1]))
        torch.library.opcheck(torch.ops.itop_kernels.bsc_grad_weight,
                              (dy, x.detach(), layout.row_idx, layout.col_idx, layout.col_ptr,
                               layout.t_row_idx, layout.t_block_idx, 8, [3, 3], [2, 1], [1, 1],
                               [1, 1]))


def test_torch_compile_fullgraph():
    """torch.compile traces through the ops without a graph break (aot_eager: no codegen)."""
    layout = BlockLayout.from_mask(torch.tensor([[True, False], [True, True]]), 8)
    values = torch.randn(layout.nnz, 3, 3, 8, 8, requires_grad=True)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)

    def f(x_, v_):
        return block_sparse_conv2d(x_, v_, layout, padding=1).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, values)
    gx, gv = torch.autograd.grad(out, (x, values))
    ref = f(x, values)
    rx, rv = torch.autograd.grad(ref, (x, values))
    assert rel_err(out, ref) <= 1e-6 and rel_err(gx, rx) <= 1e-6 and rel_err(gv, rv) <= 1e-6


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding(padding):
    layout = BlockLayout.from_mask(torch.tensor([[True, False], [True, True]]), 8)
    values = torch.randn(layout.nnz, 3, 5, 8, 8, dtype=torch.float64)
    x = torch.randn(2, 16, 7, 6, dtype=torch.float64)
    y = block_sparse_conv2d(x, values, layout, padding=padding, dilation=(2, 1))
    ref = F.conv2d(x, layout.scatter(values), padding=padding, dilation=(2, 1))
    assert y.shape == ref.shape and rel_err(y, ref) <= 1e-10


def test_empty_batch():
    layout = BlockLayout.from_mask(torch.tensor([[True, False], [True, True]]), 8)
    values = torch.randn(layout.nnz, 3, 3, 8, 8, requires_grad=True)
    x = torch.randn(0, 16, 5, 5, requires_grad=True)
    y = block_sparse_conv2d(x, values, layout, padding=1)
    assert y.shape == (0, 16, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(values.grad, torch.zeros_like(values))


def test_backward_with_expanded_grad():
    """``y.sum().backward()`` hands the backward an expanded (stride-0) gradient."""
    layout = BlockLayout.from_mask(torch.tensor([[True, True]]), 16)
    values = torch.randn(layout.nnz, 3, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 32, 5, 5, dtype=torch.float64).contiguous(memory_format=CL)
    x.requires_grad_()
    block_sparse_conv2d(x, values, layout, padding=1).sum().backward()
    xr = x.detach().clone().requires_grad_()
    F.conv2d(xr, layout.scatter(values.detach()), padding=1).sum().backward()
    assert rel_err(x.grad, xr.grad) <= 1e-10
    assert x.grad.is_contiguous(memory_format=CL)


# --------------------------------------------------------------------------- argument checks
def _args(**over):
    layout = BlockLayout.from_mask(torch.tensor([[True, False], [True, True]]), 16)
    a = dict(x=torch.randn(1, 32, 6, 6), values=torch.randn(layout.nnz, 3, 3, 16, 16),
             layout=layout, bias=torch.randn(32))
    a.update(over)
    return a


BAD_INPUTS = [
    ("layout", dict(layout="not a layout"), TypeError, "layout"),
    ("x_type", dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ("values_type", dict(values=3), TypeError, "values must be a torch.Tensor"),
    ("groups", dict(groups=2), ValueError, "groups"),
    ("groups_type", dict(groups=1.0), TypeError, "groups"),
    ("x_dtype", dict(x=torch.ones(1, 32, 6, 6, dtype=torch.int32)), TypeError, "x must be"),
    ("values_dtype", dict(values=torch.randn(3, 3, 3, 16, 16, dtype=torch.float64)), TypeError,
     "values has dtype"),
    ("x_dim", dict(x=torch.randn(32, 6, 6)), ValueError, "x must be 4-D"),
    ("x_channels", dict(x=torch.randn(1, 48, 6, 6)), ValueError, "channels"),
    ("values_nnz", dict(values=torch.randn(2, 3, 3, 16, 16)), ValueError, "values must have shape"),
    ("values_block", dict(values=torch.randn(3, 3, 3, 8, 8)), ValueError, "values must have shape"),
    ("values_dim", dict(values=torch.randn(3, 16, 16)), ValueError, "values must have shape"),
    ("bias_shape", dict(bias=torch.randn(16)), ValueError, "bias must have shape"),
    ("bias_dtype", dict(bias=torch.randn(32, dtype=torch.float64)), TypeError, "bias has dtype"),
    ("bias_type", dict(bias=[0.0] * 32), TypeError, "bias must be"),
    ("stride_zero", dict(stride=0), ValueError, "stride"),
    ("stride_triple", dict(stride=(1, 1, 1)), TypeError, "stride"),
    ("stride_float", dict(stride=1.5), TypeError, "stride"),
    ("padding_negative", dict(padding=-1), ValueError, "padding"),
    ("padding_string", dict(padding="full"), ValueError, "padding"),
    ("padding_same_stride", dict(padding="same", stride=2), ValueError, "padding='same'"),
    ("padding_same_even_kernel", dict(values=torch.randn(3, 2, 2, 16, 16), padding="same"),
     ValueError, "asymmetric"),
    ("padding_tensor", dict(padding=torch.tensor(1)), TypeError, "padding"),
    ("dilation_zero", dict(dilation=(1, 0)), ValueError, "dilation"),
    ("kernel_too_big", dict(x=torch.randn(1, 32, 2, 2)), ValueError, "smaller than the dilated kernel"),
    ("device", dict(x=torch.randn(1, 32, 6, 6, device="meta")), ValueError, "same device"),
]


@pytest.mark.parametrize("name,over,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_rejects_bad_input(name, over, exc, match):
    with pytest.raises(exc, match=match):
        block_sparse_conv2d(**_args(**over))


def test_triton_rejects_float64_and_odd_block(triton_device):
    layout = BlockLayout.from_mask(torch.tensor([[True]]), 8).to(triton_device)
    x = torch.randn(1, 8, 4, 4, device=triton_device)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_conv2d(x, torch.randn(1, 3, 3, 8, 8, device=triton_device), layout)
    layout = BlockLayout.from_mask(torch.tensor([[True]]), 16).to(triton_device)
    x = torch.randn(1, 16, 4, 4, device=triton_device, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        block_sparse_conv2d(x, torch.randn(1, 3, 3, 16, 16, device=triton_device,
                                           dtype=torch.float64), layout)


# --------------------------------------------------------------------------- Triton kernels
# Small shapes: under the CPU interpreter every case costs seconds.
TRITON_CASES = [
    Case(32, 32, (7, 9), (3, 3), padding=1, id="3x3_odd_pad1"),
    Case(32, 48, (9, 7), (3, 3), stride=2, padding=2, batch=1, id="stride2_odd_pad2"),
    Case(32, 32, (7, 8), (3, 3), dilation=(2, 1), padding=(2, 3), stride=(1, 2), batch=1,
         id="dilation_mixed"),
    Case(32, 32, (9, 8), (3, 3), stride=2, padding=1, dilation=2, batch=1,
         id="stride2_dilation2"),   # stride phases that no tap reaches
    Case(32, 32, (9, 7), (5, 3), stride=(3, 2), padding=(2, 1), batch=1, id="stride3x2"),
    Case(32, 48, (5, 7), (1, 1), id="1x1"),
    Case(32, 32, (7, 7), (1, 1), stride=2, batch=1, id="1x1_stride2"),
    Case(16, 32, (7, 7), (5, 5), padding=2, batch=1, id="5x5_cin_one_block"),
    Case(32, 16, (9, 9), (7, 7), stride=2, padding=3, batch=1, id="7x7_stride2_cout_one_block"),
    Case(32, 48, (6, 9), (3, 5), stride=(2, 1), padding=(1, 2), batch=1, id="rect_3x5"),
    Case(32, 64, (5, 5), (3, 3), padding=1, batch=1, mask="empty_rows", id="empty_rows"),
    Case(32, 32, (5, 5), (3, 3), padding=1, batch=1, mask="dense", id="dense"),
    Case(32, 32, (5, 5), (3, 3), padding=1, batch=1, mask="empty", bias=False, id="no_blocks"),
    Case(32, 32, (7, 5), (3, 3), stride=2, padding=1, layout_in="cl", id="channels_last"),
    Case(32, 32, (5, 7), (3, 3), padding=1, batch=1, layout_in="strided", bias=False,
         id="non_contiguous"),
    Case(64, 64, (5, 5), (3, 3), padding=1, bs=32, batch=1, id="block32"),
]
HALF_CASES = [c for c in TRITON_CASES if c.id in ("stride2_odd_pad2", "rect_3x5", "channels_last")]


@pytest.fixture
def no_cpu_path(monkeypatch):
    """Fail if any op falls back to the CPU implementation (the Triton kernels must run)."""
    from itop_kernels import cpu_conv

    def refuse(*args, **kwargs):
        raise AssertionError("the CPU path ran where the Triton kernels should")

    for name in ("conv_forward", "conv_grad_input", "conv_grad_weight"):
        monkeypatch.setattr(cpu_conv, name, refuse)


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c.id for c in TRITON_CASES])
def test_triton_fp32(case, triton_device, no_cpu_path):
    check_case(case, torch.float32, triton_device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", HALF_CASES, ids=[c.id for c in HALF_CASES])
def test_triton_half(case, dtype, triton_device, no_cpu_path):
    if dtype == torch.bfloat16 and triton_device == "cpu":
        pytest.skip("bf16 loads are wrong in Triton's CPU interpreter; bf16 runs on a GPU only")
    check_case(case, dtype, triton_device)


def test_triton_larger_blocks(triton_device, no_cpu_path):
    """Block sizes 64 and 128, one case each (a GPU runs them quickly; small in the interpreter)."""
    check_case(Case(128, 128, (5, 5), (3, 3), padding=1, bs=64, batch=1, id="bs64"),
               torch.float32, triton_device)
    # bs 128: several BK slices per block (forward/dgrad) and out-channel slices (wgrad)
    check_case(Case(256, 128, (5, 4), (3, 2), stride=(2, 1), padding=1, bs=128, batch=1,
                    mask="dense", id="bs128"), torch.float32, triton_device)


def test_triton_wgrad_splits_the_pixels(triton_device, guard_bands, no_cpu_path, monkeypatch):
    """The weight gradient's split-M path: with more SMs than (block, tap) programs, the reduction
    over the N·Ho·Wo pixels is cut into ranges whose fp32 partial sums are added afterwards. The
    interpreter counts one SM; sixteen make this small case take three splits of 192 pixels, the
    last one ragged (160)."""
    from itop_kernels import triton_conv

    monkeypatch.setattr(triton_conv, "_sm_count", lambda device: 16)
    check_case(Case(32, 32, (16, 17), (1, 1), batch=2, id="split_m"), torch.float32, triton_device)
    (ws,) = [shape for shape in guard_bands.shapes if len(shape) == 6]  # [splits, nnz, KH, KW, bs, bs]
    assert ws[0] == 3, ws


# (api, switch on?) for the precision tests: both of torch's APIs, both ways
SWITCHES = [("legacy", False), ("legacy", True), ("new", False), ("new", True)]


@pytest.mark.parametrize("api,on", SWITCHES, ids=[f"{a}-{'tf32' if o else 'ieee'}"
                                                  for a, o in SWITCHES])
def test_fp32_dots_follow_torch_conv_switch(triton_device, monkeypatch, tf32_switch, no_cpu_path,
                                            api, on):
    """fp32 dots are TF32 exactly when torch's cuDNN convolution switch allows it (the matmul
    switch, set the other way, does not matter): every kernel launch gets that ``PRECISION`` and
    the tiles of its table (``IEEE_CONFIGS`` for IEEE fp32). Checked on the CPU through the
    interpreter; 16-bit dots are always ``ieee``."""
    from itop_kernels import dot_precision, triton_conv

    tf32_switch("conv", api, on)
    tf32_switch("matmul", api, not on)
    assert dot_precision.dot_precision(torch.float32, "conv") == ("tf32" if on else "ieee")
    names = ("_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel")
    spies = spy_launches(monkeypatch, triton_conv, names)
    arch = triton_conv._arch(torch.device(triton_device))
    for dtype in (torch.float32, torch.float16):
        for spy in spies.values():
            spy.calls.clear()
        check_case(Case(32, 32, (3, 4), (1, 1), batch=1, id="precision"), dtype, triton_device)
        prec = "tf32" if on and dtype == torch.float32 else "ieee"
        ieee_fp32 = dtype == torch.float32 and not on
        cfg = (triton_conv.IEEE_CONFIGS if ieee_fp32 else triton_conv.CONFIGS)[arch][16]
        for name, tile in zip(names, (cfg.BM, cfg.BM, cfg.WBM)):
            (call,) = spies[name].calls
            assert call["PRECISION"] == prec and call["BM"] == tile, (name, dtype, call)


@pytest.mark.parametrize("bs", [32, 64, 128])
def test_triton_ieee_fp32_tiles(triton_device, tf32_switch, no_cpu_path, bs):
    """The IEEE fp32 tiles (cuDNN's TF32 switch off; block 16 runs in the test above): 42 output
    and 42 phase-0 input pixels, so two tiles of 32, the last ragged; three taps in a column; two
    stride phases."""
    tf32_switch("conv", "new", False)
    check_case(Case(2 * bs, 2 * bs, (13, 6), (3, 1), stride=(2, 1), padding=(1, 0), bs=bs, batch=1,
                    id=f"ieee_bs{bs}"), torch.float32, triton_device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tf32 dots exist only on a GPU")
@pytest.mark.parametrize("tf32", [True, False])
def test_triton_tf32_follows_torch_conv_switch(tf32_switch, guard_bands, poison, no_cpu_path, tf32):
    """On a GPU: with cuDNN's TF32 switch on the dots really are TF32 (errors well above IEEE
    fp32's) and within TF32's bound; with it off, within IEEE fp32's bound."""
    tf32_switch("conv", "new", tf32)
    errs = check_case(Case(128, 128, (9, 9), (3, 3), padding=1, bs=32, batch=2, id="tf32"),
                      torch.float32, "cuda")
    if tf32:
        assert 1e-5 < max(errs.values()) <= TOL_TF32, errs
    else:
        assert max(errs.values()) <= TOL[torch.float32], errs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (larger shapes)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_triton_gpu_larger(bs, dtype, guard_bands, poison):
    """On a GPU: larger maps and batch, every block size and dtype, wgrad split-K included."""
    for c in (Case(2 * bs, 4 * bs, (17, 15), (3, 3), stride=2, padding=1, bs=bs, batch=4,
                   layout_in="cl", id="gpu_s2"),
              Case(4 * bs, 2 * bs, (28, 28), (1, 1), bs=bs, batch=8, layout_in="cl", id="gpu_1x1")):
        check_case(c, dtype, "cuda")


# --------------------------------------------------------------------------- 1×1 as a GEMM
GEMM_CASES = [
    Case(32, 48, (5, 7), (1, 1), layout_in="cl", id="1x1_cl"),
    Case(32, 64, (3, 5), (1, 1), batch=1, mask="empty_rows", id="1x1_nchw_empty_rows"),
    Case(48, 32, (4, 4), (1, 1), dilation=2, batch=1, layout_in="strided", bias=False,
         id="1x1_dilated_strided_input"),
]


@pytest.mark.parametrize("route", ["gemm", "gemm_fwd_dx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", GEMM_CASES, ids=[c.id for c in GEMM_CASES])
def test_triton_1x1_gemm_route(case, dtype, route, triton_device, tf32_switch, no_cpu_path,
                               monkeypatch):
    """A 1×1, stride-1, unpadded conv through the block-sparse linear kernels (``route_1x1``):
    forward and dX always, dW too with ``"gemm"`` (the conv wgrad kernel with ``"gemm_fwd_dx"``),
    against the float64 reference, outputs poisoned and inside guard bands. fp32 takes the route
    only where torch's matmul and conv TF32 switches agree: the conv switch is set to IEEE here."""
    from itop_kernels import triton_conv, triton_linear

    tf32_switch("conv", "new", False)
    lin = spy_launches(monkeypatch, triton_linear, ("_bsl_fwd_kernel", "_bsl_dx_kernel",
                                                    "_bsl_dw_kernel"))
    cnv = spy_launches(monkeypatch, triton_conv, ("_conv_fwd_kernel", "_conv_dgrad_kernel",
                                                  "_conv_wgrad_kernel"))
    with triton_conv.options(route_1x1=route):
        check_case(case, dtype, triton_device)
    wgrad_on_linear = route == "gemm"
    assert [len(lin[n].calls) for n in lin] == [1, 1, int(wgrad_on_linear)]
    assert [len(cnv[n].calls) for n in cnv] == [0, 0, int(not wgrad_on_linear)]


def test_triton_1x1_gemm_route_keeps_the_conv_kernels_where_it_does_not_apply(
        triton_device, tf32_switch, no_cpu_path, monkeypatch):
    """Strided or padded 1×1 convs, and fp32 where the TF32 switches disagree (the default: cuDNN
    TF32 on, matmul IEEE), stay on the conv kernels under ``route_1x1="gemm"``."""
    from itop_kernels import triton_conv, triton_linear

    lin = spy_launches(monkeypatch, triton_linear, ("_bsl_fwd_kernel",))
    tf32_switch("conv", "new", False)
    with triton_conv.options(route_1x1="gemm"):
        check_case(Case(32, 32, (7, 7), (1, 1), stride=2, batch=1, id="1x1_s2"), torch.float32,
                   triton_device)
        check_case(Case(32, 32, (4, 4), (1, 1), padding=1, batch=1, id="1x1_pad"), torch.float32,
                   triton_device)
        tf32_switch("conv", "new", True)
        check_case(Case(32, 32, (4, 4), (1, 1), batch=1, id="1x1_tf32"), torch.float32,
                   triton_device)
    assert lin["_bsl_fwd_kernel"].calls == []


def test_conv_options_reject_bad_values():
    from itop_kernels import triton_conv

    with pytest.raises(ValueError, match="route_1x1"):
        triton_conv.set_options(route_1x1="im2col")
    with pytest.raises(ValueError, match="unknown conv option"):
        triton_conv.set_options(tiles=3)
    with pytest.raises(TypeError, match="ConvConfig"):
        triton_conv.set_options(config={"BM": 64})


@pytest.mark.parametrize("bs", [16, 32])
def test_triton_tuning_candidates(bs, triton_device, no_cpu_path, monkeypatch):
    """Every tuning candidate (``CANDIDATES``) is correct under the interpreter: forward, dgrad
    (stride 2: two phases) and the wgrad split (16 SMs make several splits), fp16 and fp32."""
    from itop_kernels import triton_conv

    monkeypatch.setattr(triton_conv, "_sm_count", lambda device: 16)
    for i, (name, cfg) in enumerate(triton_conv.CANDIDATES[bs].items()):
        dtype = (torch.float16, torch.float32)[i % 2]
        with triton_conv.options(config=cfg):
            check_case(Case(2 * bs, 2 * bs, (7, 6), (3, 3), stride=(2, 1), padding=1, bs=bs,
                            batch=1, layout_in="cl", id=name), dtype, triton_device)


@pytest.mark.parametrize("reduce", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_triton_wgrad_reduce(reduce, dtype, triton_device, no_cpu_path, monkeypatch):
    """The wgrad's split partial sums become dW through one Triton kernel (sum and cast) or
    through torch (``wgrad_reduce``): both correct, and only the first launches the kernel."""
    from itop_kernels import triton_conv

    monkeypatch.setattr(triton_conv, "_sm_count", lambda device: 16)
    from itop_kernels import triton_split_sum

    spies = spy_launches(monkeypatch, triton_split_sum, ("_sum_splits_kernel",))
    with triton_conv.options(wgrad_reduce=reduce):
        check_case(Case(32, 32, (16, 17), (1, 1), batch=2, id="reduce"), dtype, triton_device)
    assert len(spies["_sum_splits_kernel"].calls) == (reduce == "triton")


@pytest.mark.parametrize("kernel", ["per_tap", "taps"])
@pytest.mark.parametrize("reduce", ["triton", "torch"])
def test_triton_wgrad_one_split_writes_dw_directly(kernel, reduce, triton_device, no_cpu_path,
                                                   monkeypatch):
    """With one split there is nothing to reduce: the wgrad kernel writes dW in the input dtype
    itself (fp16 here), and no reduction runs, whichever ``wgrad_reduce``; correct."""
    from itop_kernels import triton_conv, triton_split_sum

    monkeypatch.setattr(triton_conv, "_sm_count", lambda device: 1)
    outputs = []
    real = triton_conv._launch

    def spy(kern, grid, args, consts, warps, stages):
        if "wgrad" in getattr(kern, "__name__", str(kern)):
            outputs.append((grid[1], args[2].dtype))
        return real(kern, grid, args, consts, warps, stages)
    monkeypatch.setattr(triton_conv, "_launch", spy)
    sums = spy_launches(monkeypatch, triton_split_sum, ("_sum_splits_kernel",))
    with triton_conv.options(wgrad_kernel=kernel, wgrad_reduce=reduce):
        check_case(Case(32, 48, (5, 6), (3, 3), padding=1, batch=1, mask="empty_rows",
                        id="one_split"), torch.float16, triton_device)
    assert outputs == [(1, torch.float16)]
    assert sums["_sum_splits_kernel"].calls == []


@pytest.mark.parametrize("taps", [2, 4, 8])
def test_triton_wgrad_stacked_taps(taps, triton_device, no_cpu_path, monkeypatch):
    """``wgrad_kernel="taps"``: groups of taps stacked into one MMA, the last group ragged
    (3×3 = 9 taps), with stride, padding and dilation, split over the pixels, fp32 and fp16."""
    from itop_kernels import triton_conv

    monkeypatch.setattr(triton_conv, "_sm_count", lambda device: 16)
    spies = spy_launches(monkeypatch, triton_conv, ("_conv_wgrad_taps_kernel",
                                                    "_conv_wgrad_kernel"))
    with triton_conv.options(wgrad_kernel="taps", wgrad_taps=taps):
        check_case(Case(32, 48, (9, 7), (3, 3), stride=(2, 1), padding=(2, 1), dilation=(1, 2),
                        batch=1, mask="empty_rows", id="taps"), torch.float32, triton_device)
        check_case(Case(32, 32, (6, 6), (3, 3), padding=1, batch=1, layout_in="cl",
                        id="taps_fp16"), torch.float16, triton_device)
        check_case(Case(64, 64, (5, 5), (3, 3), padding=1, bs=32, batch=1, id="taps_bs32"),
                   torch.float32, triton_device)
    assert len(spies["_conv_wgrad_taps_kernel"].calls) == 3
    assert spies["_conv_wgrad_kernel"].calls == []


STACKED_CASES = [
    # 9 taps in groups of 2/4/8 (the last group padded); stride 2 in h: two dgrad phases with
    # different tap counts; padding and dilation; a block-row with no blocks
    Case(32, 48, (9, 7), (3, 3), stride=(2, 1), padding=(2, 1), dilation=(1, 2), batch=1,
         mask="empty_rows", id="strided_dilated"),
    # a 1×3 kernel at stride 2 in h: odd input rows get no tap at all (a dgrad phase with zero
    # groups writes zeros), odd batch, channels-last input
    Case(32, 32, (7, 6), (1, 3), stride=(2, 1), padding=(0, 1), batch=3, layout_in="cl",
         id="phase_without_taps"),
    Case(32, 32, (5, 5), (3, 3), padding=1, batch=1, mask="dense", bias=False, id="dense"),
    Case(32, 32, (5, 4), (3, 3), padding=1, batch=1, mask="one", layout_in="strided",
         id="one_block_strided"),
    Case(64, 64, (5, 5), (3, 3), padding=1, bs=32, batch=1, id="bs32"),
]


@pytest.mark.parametrize("taps", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("c", STACKED_CASES, ids=lambda c: c.id)
def test_triton_fwd_dgrad_stacked_taps(c, dtype, taps, triton_device, no_cpu_path, monkeypatch):
    """``fwd_kernel="taps"`` / ``dgrad_kernel="taps"``: groups of taps stacked into one MMA
    (capped at 128 / block size taps), against the float64 reference with poisoned outputs; the
    stacked kernels, not the per-tap ones, ran."""
    from itop_kernels import triton_conv

    spies = spy_launches(monkeypatch, triton_conv, (
        "_conv_fwd_taps_kernel", "_conv_fwd_kernel", "_conv_dgrad_taps_kernel",
        "_conv_dgrad_kernel"))
    with triton_conv.options(fwd_kernel="taps", fwd_taps=taps, dgrad_kernel="taps",
                             dgrad_taps=taps):
        check_case(c, dtype, triton_device)
    assert spies["_conv_fwd_kernel"].calls == [] and spies["_conv_dgrad_kernel"].calls == []
    assert len(spies["_conv_fwd_taps_kernel"].calls) >= 1
    assert len(spies["_conv_dgrad_taps_kernel"].calls) >= 1
    stacked = {call["TG"] for call in spies["_conv_fwd_taps_kernel"].calls}
    assert stacked == {min(taps, 128 // c.bs)}


_KERNEL_PAIRS = {"fwd": ("_conv_fwd_taps_kernel", "_conv_fwd_kernel"),
                 "dgrad": ("_conv_dgrad_taps_kernel", "_conv_dgrad_kernel"),
                 "wgrad": ("_conv_wgrad_taps_kernel", "_conv_wgrad_kernel")}


def test_triton_stacked_taps_leave_1x1_and_ieee_fp32_per_tap(triton_device, no_cpu_path,
                                                              monkeypatch, tf32_switch):
    """A 1×1 kernel has one tap, and IEEE fp32 (cuDNN's TF32 switch off) holds its operands in
    registers on the FMA path: both keep the per-tap kernels, and stay correct."""
    from itop_kernels import triton_conv

    spies = spy_launches(monkeypatch, triton_conv, sum(_KERNEL_PAIRS.values(), ()))
    with triton_conv.options(fwd_kernel="taps", dgrad_kernel="taps", wgrad_kernel="taps"):
        check_case(Case(32, 32, (5, 5), (1, 1), batch=1, id="1x1"), torch.float16, triton_device)
        tf32_switch("conv", "legacy", False)
        check_case(Case(32, 32, (5, 5), (3, 3), padding=1, batch=1, id="ieee"), torch.float32,
                   triton_device)
    for stacked, per_tap in _KERNEL_PAIRS.values():
        assert spies[stacked].calls == [] and len(spies[per_tap].calls) == 2


def test_auto_follows_the_stacked_taps_table(triton_device, no_cpu_path, monkeypatch):
    """``"auto"`` (the default) runs what ``STACKED_TAPS`` says for the arch and block size:
    the per-tap kernels while the table holds 1, the stacked kernels with the table's group
    sizes (capped at 128 / block size) once it holds more; correct either way."""
    from itop_kernels import triton_conv

    assert triton_conv.OPTIONS.fwd_kernel == "auto" == triton_conv.OPTIONS.wgrad_kernel
    arch = triton_conv._arch(torch.device(triton_device))
    case = Case(32, 32, (6, 5), (3, 3), padding=1, batch=1, id="auto")
    spies = spy_launches(monkeypatch, triton_conv, sum(_KERNEL_PAIRS.values(), ()))
    check_case(case, torch.float16, triton_device)
    for stacked, per_tap in _KERNEL_PAIRS.values():
        assert spies[stacked].calls == [] and len(spies[per_tap].calls) == 1
    table = {a: {bs: dict(row) for bs, row in rows.items()}
             for a, rows in triton_conv.STACKED_TAPS.items()}
    table[arch][16] = {"fwd": 4, "dgrad": 2, "wgrad": 16}
    monkeypatch.setattr(triton_conv, "STACKED_TAPS", table)
    spies = spy_launches(monkeypatch, triton_conv, sum(_KERNEL_PAIRS.values(), ()))
    check_case(case, torch.float16, triton_device)
    got = {k: [c["TG"] for c in spies[stacked].calls] for k, (stacked, _) in _KERNEL_PAIRS.items()}
    assert got == {"fwd": [4], "dgrad": [2], "wgrad": [8]}   # 16 taps capped at 128 / 16
    assert not any(spies[per_tap].calls for _, per_tap in _KERNEL_PAIRS.values())


@pytest.mark.parametrize("taps", ["per_tap", "taps"])
def test_triton_misaligned_operands_reach_the_kernels_aligned(taps, triton_device, no_cpu_path,
                                                              monkeypatch):
    """Views that start at an odd offset (x, the values, the bias) are copied to aligned buffers
    before the kernels see them: Triton specializes on 16-byte alignment, and the kernels are
    compiled and checked (``compile_check``) for aligned pointers. Correct against float64."""
    from itop_kernels import triton_conv

    bases = record_operand_bases(monkeypatch, triton_conv, "_launch")
    gen = torch.Generator().manual_seed(3)
    bs, cin, cout = 16, 32, 48
    mask = make_mask("random", cout // bs, cin // bs, gen)
    layout = BlockLayout.from_mask(mask, bs).to(triton_device)
    w = torch.randn(cout, cin, 3, 3, generator=gen, dtype=torch.float64)
    dense = w * mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:, :, None, None]
    x = torch.randn(2, cin, 5, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64)
    ref = F.conv2d(x, dense, b, padding=1)
    dt = torch.float16
    xs, vs, bs_ = (at_odd_offset(t.to(triton_device, dt))
                   for t in (x, layout.gather(w.to(triton_device)), b))
    with triton_conv.options(fwd_kernel=taps):
        y = block_sparse_conv2d(xs, vs, layout, bs_, padding=1)
    assert bases and not any(bases), "a kernel got a misaligned pointer"
    assert rel_err(y, ref) <= tol_for(dt, triton_device)


def test_conv_options_reject_bad_tap_kernels():
    from itop_kernels import triton_conv

    with pytest.raises(ValueError, match="fwd_kernel must be one of"):
        triton_conv.set_options(fwd_kernel="stacked")
    with pytest.raises(ValueError, match="dgrad_taps must be 1, 2, 4 or 8"):
        triton_conv.set_options(dgrad_taps=3)
    with pytest.raises(ValueError, match="taps_stages must be None or 1 to 4"):
        triton_conv.set_options(taps_stages=0)


def test_taps_stages_sets_the_stacked_kernels_stages(triton_device, no_cpu_path, monkeypatch):
    """``taps_stages=1`` launches all three stacked-taps kernels with one pipeline stage (plain,
    L1-cached loads), the per-tap kernels keep theirs; results stay right."""
    from itop_kernels import triton_conv

    monkeypatch.setattr(triton_conv, "_sm_count", lambda device: 16)
    names = ("_conv_fwd_taps_kernel", "_conv_dgrad_taps_kernel", "_conv_wgrad_taps_kernel")
    spies = spy_launches(monkeypatch, triton_conv, names)
    with triton_conv.options(fwd_kernel="taps", dgrad_kernel="taps", wgrad_kernel="taps",
                             taps_stages=1):
        check_case(Case(32, 32, (6, 5), (3, 3), padding=1, batch=1, id="s1"), torch.float16,
                   triton_device)
    assert [spies[n].calls[0]["num_stages"] for n in names] == [1, 1, 1]
    with triton_conv.options(fwd_kernel="taps", dgrad_kernel="taps", wgrad_kernel="taps"):
        assert triton_conv.stacked_tiles(16, 4)[2] == 3 and triton_conv.stacked_tiles(16, 8)[2] == 2


def _gpu_option_sets() -> list:
    from itop_kernels import triton_conv

    sets = [("launch_cached", 16, {"launch": "cached"}),
            ("wgrad_torch_reduce", 16, {"wgrad_reduce": "torch"})]
    for bs in (16, 32):
        for tg in (t for t in (2, 4, 8) if t * bs <= 128):
            sets.append((f"taps{tg}_bs{bs}", bs, {"wgrad_kernel": "taps", "wgrad_taps": tg,
                                                  "fwd_kernel": "taps", "fwd_taps": tg,
                                                  "dgrad_kernel": "taps", "dgrad_taps": tg}))
        for name, cfg in triton_conv.CANDIDATES[bs].items():
            sets.append((f"cand_{name}_bs{bs}", bs, {"config": cfg}))
    return sets


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and real tiles need a GPU")
@pytest.mark.parametrize("name,bs,opts", _gpu_option_sets() if torch.cuda.is_available() else [],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_triton_gpu_options_bf16(name, bs, opts, guard_bands, poison, monkeypatch):
    """On a GPU, bf16: every option the benchmark measures (cached launch, torch reduce,
    stacked-taps wgrad, forward and dgrad, each tuning candidate) at a ResNet-like 3×3 shape,
    stride 1 and 2."""
    from itop_kernels import triton_conv

    with triton_conv.options(**opts):
        for c in (Case(4 * bs, 4 * bs, (14, 14), (3, 3), padding=1, bs=bs, batch=4,
                       layout_in="cl", id="s1"),
                  Case(2 * bs, 4 * bs, (15, 15), (3, 3), stride=2, padding=1, bs=bs, batch=4,
                       layout_in="cl", id="s2")):
            check_case(c, torch.bfloat16, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU")
@pytest.mark.parametrize("route", ["gemm", "gemm_fwd_dx"])
@pytest.mark.parametrize("bs", [16, 32])
def test_triton_gpu_1x1_gemm_bf16(route, bs, guard_bands, poison):
    from itop_kernels import triton_conv

    from itop_kernels import triton_launch

    with triton_conv.options(route_1x1=route), triton_launch.launching("cached"):
        check_case(Case(4 * bs, 8 * bs, (14, 14), (1, 1), bs=bs, batch=4, layout_in="cl",
                        id="gemm_bf16"), torch.bfloat16, "cuda")
