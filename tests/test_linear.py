"""block_sparse_linear against a float64 dense reference, on the CPU path and the Triton kernels.

Every check draws fresh random inputs from a seeded generator, compares the output and all three
gradients by relative error, and (on the Triton path) starts every output buffer as NaN inside
NaN guard bands, so unwritten elements and out-of-bounds writes show. Masks with two or more
blocks per side have a transpose that is a real permutation (:mod:`block_masks`).
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from block_masks import random_mask
from guard_bands import guarded_outputs
from itop_kernels import BlockLayout, block_sparse_linear
from kernel_launches import spy_launches
from numerics import TOL, TOL_TF32, rel_err, tol_for

CPU_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def check_linear(mask, bs, lead, dtype, device, gen, bias=True, x_transform=None):
    """Forward and gradients of x, values, bias against float64; returns the four errors.
    Inputs are drawn from ``gen``."""
    layout = BlockLayout.from_mask(mask.to(device), bs)
    R, C = mask.shape
    W = torch.randn(R * bs, C * bs, dtype=torch.float64, generator=gen)
    x64 = torch.randn(*lead, C * bs, dtype=torch.float64, generator=gen)
    b64 = torch.randn(R * bs, dtype=torch.float64, generator=gen) if bias else None
    dy64 = torch.randn(*lead, R * bs, dtype=torch.float64, generator=gen)
    values = layout.gather(W.to(device)).to(dtype).requires_grad_()
    x = x64.to(device, dtype)
    if x_transform is not None:
        x = x_transform(x)
    x.requires_grad_()
    b = b64.to(device, dtype).requires_grad_() if bias else None
    y = block_sparse_linear(x, values, layout, b)
    assert y.dtype == dtype and y.shape == (*lead, R * bs)
    y.backward(dy64.to(device, dtype))

    # Reference in float64 from the same (rounded) inputs.
    xr = x.detach().cpu().double().requires_grad_()
    vr = values.detach().cpu().double().requires_grad_()
    br = b.detach().cpu().double().requires_grad_() if bias else None
    lay_cpu = BlockLayout.from_mask(mask, bs)
    yr = xr @ lay_cpu.scatter(vr).t()
    if bias:
        yr = yr + br
    yr.backward(dy64.to(dtype).double())
    errs = {"y": rel_err(y, yr), "dx": rel_err(x.grad, xr.grad), "dv": rel_err(values.grad, vr.grad)}
    if bias:
        errs["db"] = rel_err(b.grad, br.grad)
    if mask.any():
        tol = tol_for(dtype, device)
        bad = {k: e for k, e in errs.items() if not e <= tol}
        assert not bad, f"relative errors over {tol}: {bad}"
    else:  # nothing active: y is the bias (or zero), dW is empty, dX is zero
        assert (x.grad == 0).all() and values.grad.numel() == 0
        assert rel_err(y, yr) <= tol_for(dtype, device) if bias else (y == 0).all()
    return errs


# --------------------------------------------------------------------------- CPU path
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("kind", ["random", "empty_rows", "dense", "empty"])
def test_cpu_path(dtype, bs, kind, gen):
    mask = random_mask(4, 3, 0.4, kind, gen)
    check_linear(mask, bs, (5, 7), dtype, "cpu", gen)


@pytest.mark.parametrize("lead", [(1,), (33,), (2, 3, 5), ()])
def test_cpu_leading_dims_and_odd_m(lead, gen):
    check_linear(random_mask(3, 5, 0.5, "random", gen), 16, lead, torch.float32, "cpu", gen)


@pytest.mark.parametrize("bs", [1, 3, 8])
def test_cpu_path_other_block_sizes(bs, gen):
    check_linear(random_mask(6, 4, 0.5, "random", gen), bs, (9,), torch.float64, "cpu", gen)


def test_cpu_non_contiguous_input(gen):
    check_linear(random_mask(3, 4, 0.5, "random", gen), 16, (6, 9), torch.float32, "cpu", gen,
                 x_transform=lambda x: x.transpose(0, 1).contiguous().transpose(0, 1))
    check_linear(random_mask(3, 4, 0.5, "random", gen), 16, (6,), torch.float32, "cpu", gen,
                 bias=False, x_transform=lambda x: torch.cat([x, x], 1)[:, ::2])


def test_cpu_gradcheck_float64(gen):
    mask = random_mask(3, 4, 0.5, "random", gen)
    mask[1] = False
    lay = BlockLayout.from_mask(mask, 2)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(lay.nnz, 2, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: block_sparse_linear(x, v, lay, b), (x, v, b))


def _mask_bits(R, C):
    """A hypothesis strategy for an arbitrary ``[R, C]`` bool mask (replayable, unlike a mask
    drawn from torch's RNG)."""
    return st.lists(st.booleans(), min_size=R * C, max_size=R * C).map(
        lambda bits: torch.tensor(bits, dtype=torch.bool).reshape(R, C))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), bs=st.sampled_from([16, 32]), M=st.integers(1, 40), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**32 - 1))
def test_cpu_hypothesis(data, bs, M, bias, dtype, seed):
    mask = data.draw(_mask_bits(data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))))
    gen = torch.Generator().manual_seed(seed)
    check_linear(mask, bs, (M,), dtype, "cpu", gen, bias=bias)


def test_cpu_path_does_not_scatter_to_dense(monkeypatch, gen):
    """The CPU path must never form the dense weight: forbid scatter while it runs."""
    def boom(*a, **k):
        raise AssertionError("CPU path called BlockLayout.scatter")
    lay = BlockLayout.from_mask(random_mask(4, 4, 0.3, "random", gen), 16)
    v = torch.randn(lay.nnz, 16, 16, generator=gen, requires_grad=True)
    x = torch.randn(8, 64, generator=gen, requires_grad=True)
    monkeypatch.setattr(BlockLayout, "scatter", boom)
    block_sparse_linear(x, v, lay).sum().backward()


# --------------------------------------------------------------------------- Triton kernels
def triton_dtypes(device):
    # bf16 loads are wrong in Triton's interpreter (ENVIRONMENT.md): bf16 is tested on GPUs.
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_triton_block_sizes(triton_device, bs, gen):
    # 3x2 blocks, block-row 1 empty, and a transpose that is a real permutation
    for dtype in triton_dtypes(triton_device):
        check_linear(random_mask(3, 2, 0.6, "empty_rows", gen), bs, (37,), dtype, triton_device,
                     gen)


@pytest.mark.parametrize("kind", ["dense", "empty", "random"])
def test_triton_edge_layouts(triton_device, kind, gen):
    check_linear(random_mask(4, 3, 0.3, kind, gen), 16, (2, 9), torch.float32, triton_device, gen)


def test_triton_one_block_and_m_of_one(triton_device, gen):
    one = torch.ones(1, 1, dtype=torch.bool)
    for dtype in triton_dtypes(triton_device):
        check_linear(one, 32, (1,), dtype, triton_device, gen)
        check_linear(one, 16, (3,), dtype, triton_device, gen, bias=False)


def test_triton_strided_input(triton_device, gen):
    check_linear(random_mask(2, 3, 0.6, "random", gen), 16, (5, 4), torch.float16, triton_device,
                 gen, x_transform=lambda x: x.transpose(0, 1).contiguous().transpose(0, 1))


def test_triton_m_spans_several_tiles(triton_device, gen):
    # M larger than every BM in the config table, with a ragged last tile.
    check_linear(random_mask(2, 2, 0.7, "random", gen), 16, (300,), torch.float16, triton_device,
                 gen)


@settings(max_examples=8, deadline=None)
@given(data=st.data(), M=st.integers(1, 70), bias=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_triton_hypothesis(data, M, bias, seed):
    from conftest import HAS_CUDA
    import os
    mask = data.draw(_mask_bits(data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))))
    device = "cuda" if HAS_CUDA else "cpu"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0" if HAS_CUDA else "1"
    os.environ["ITOP_POISON_OUTPUTS"] = "1"
    try:
        with guarded_outputs():
            check_linear(mask, 16, (M,), torch.float32, device,
                         torch.Generator().manual_seed(seed), bias=bias)
    finally:
        os.environ["TRITON_INTERPRET"] = old if old is not None else "0"
        os.environ.pop("ITOP_POISON_OUTPUTS")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tf32 dots exist only on a GPU")
@pytest.mark.parametrize("tf32", [True, False])
def test_triton_tf32_follows_torch_switch(tf32_switch, guard_bands, poison, gen, tf32):
    """On a GPU: with torch's switch on the dots really are TF32 (errors well above IEEE fp32's),
    and within TF32's bound; with it off, within IEEE fp32's bound."""
    tf32_switch("matmul", "new", tf32)
    errs = check_linear(random_mask(4, 4, 0.5, "random", gen), 64, (256,), torch.float32, "cuda",
                        gen)
    if tf32:
        assert 1e-5 < max(errs.values()) <= TOL_TF32, errs
    else:
        assert max(errs.values()) <= TOL[torch.float32], errs


# (api, switch on?) for the precision tests: both of torch's APIs, both ways
SWITCHES = [("legacy", False), ("legacy", True), ("new", False), ("new", True)]


@pytest.mark.parametrize("api,on", SWITCHES, ids=[f"{a}-{'tf32' if o else 'ieee'}"
                                                  for a, o in SWITCHES])
def test_fp32_dots_follow_torch_matmul_switch(triton_device, monkeypatch, tf32_switch, gen, api,
                                             on):
    """fp32 dots are TF32 exactly when torch's matmul switch allows it, through either of its
    APIs: every kernel launch gets that ``PRECISION`` and the tiles of that config kind (checked
    on the CPU, through the interpreter). 16-bit dots are always ``ieee``."""
    from itop_kernels import dot_precision, triton_linear as tl_mod

    tf32_switch("matmul", api, on)
    assert dot_precision.dot_precision(torch.float32, "matmul") == ("tf32" if on else "ieee")
    assert dot_precision.dot_precision(torch.float16, "matmul") == "ieee"
    kernels = {"fwd": "_bsl_fwd_kernel", "dx": "_bsl_dx_kernel", "dw": "_bsl_dw_kernel"}
    spies = spy_launches(monkeypatch, tl_mod, kernels.values())
    for dtype in (torch.float32, torch.float16):
        for spy in spies.values():
            spy.calls.clear()
        check_linear(random_mask(2, 2, 0.5, "random", gen), 32, (5,), dtype, triton_device, gen)
        prec = "tf32" if on and dtype == torch.float32 else "ieee"
        kind = "16bit" if dtype == torch.float16 else prec
        for k, name in kernels.items():
            cfg = tl_mod._config(k, torch.device(triton_device), 32, dtype)
            assert cfg == tl_mod.CONFIGS[tl_mod._arch(torch.device(triton_device))][k][(32, kind)]
            (call,) = spies[name].calls
            assert call["PRECISION"] == prec, (name, dtype, call["PRECISION"])
            tile_m = call["BKM"] if k == "dw" else call["BM"]
            assert tile_m == cfg.tile_m and call["num_warps"] == cfg.num_warps, (name, dtype)


def test_tolerances_hold_ieee_fp32_to_1e4_on_a_gpu(tf32_switch):
    """The test bound for fp32 on a GPU is TF32's only while torch's switch allows TF32."""
    for op in ("matmul", "conv"):
        for api in ("legacy", "new"):
            tf32_switch(op, api, False)
            assert tol_for(torch.float32, "cuda", op) == 1e-4
            tf32_switch(op, api, True)
            assert tol_for(torch.float32, "cuda", op) == 1e-3
            assert tol_for(torch.float32, "cpu", op) == 1e-4
            assert tol_for(torch.float16, "cuda", op) == 1e-2


def test_triton_rejects_unsupported_block_size(triton_device):
    lay = BlockLayout.from_mask(torch.ones(2, 2, dtype=torch.bool, device=triton_device), 8)
    x = torch.randn(4, 16, device=triton_device)
    v = torch.randn(4, 8, 8, device=triton_device)
    with pytest.raises(ValueError, match="block_size 8 has no Triton kernel"):
        block_sparse_linear(x, v, lay)


# --------------------------------------------------------------------------- the custom ops
def _grad_op_operands(mask, bs, M, dtype, device, gen):
    lay = BlockLayout.from_mask(mask, bs)
    R, C = mask.shape
    W = torch.randn(R * bs, C * bs, dtype=torch.float64, generator=gen)
    x = torch.randn(M, C * bs, dtype=torch.float64, generator=gen).to(device, dtype)
    dy = torch.randn(M, R * bs, dtype=torch.float64, generator=gen).to(device, dtype)
    values = lay.gather(W).to(device, dtype)
    return lay, lay.to(device), x, dy, values


@pytest.mark.parametrize("path,bs", [("cpu", 16), ("cpu", 1), ("triton", 16), ("triton", 32)])
def test_grad_input_and_grad_weight_ops(request, gen, path, bs):
    """``bsl_grad_input`` (``dX = dY·W``), ``bsl_grad_weight`` (``dW`` at the active blocks) and
    ``bsl_backward`` (both, or either) called as ops, against float64."""
    device = request.getfixturevalue("triton_device") if path == "triton" else "cpu"
    mask = random_mask(3, 4, 0.4, "random", gen)
    lay_cpu, lay, x, dy, values = _grad_op_operands(mask, bs, 21, torch.float32, device, gen)
    ops = torch.ops.itop_kernels
    K = lay.shape[1]
    ref_dx = dy.cpu().double() @ lay_cpu.scatter(values.cpu().double())
    ref_dv = lay_cpu.gather(dy.cpu().double().t() @ x.cpu().double())
    dx = ops.bsl_grad_input(dy, values, lay.col_ptr, lay.t_row_idx, lay.t_block_idx, bs, K)
    dv = ops.bsl_grad_weight(dy, x, lay.row_idx, lay.col_idx, lay.col_ptr, lay.t_row_idx,
                             lay.t_block_idx, bs)
    tol = tol_for(torch.float32, device)
    assert dx.shape == ref_dx.shape and dv.shape == ref_dv.shape
    assert rel_err(dx, ref_dx) <= tol and rel_err(dv, ref_dv) <= tol
    meta = (lay.row_ptr, lay.col_idx, lay.row_idx, lay.col_ptr, lay.t_row_idx, lay.t_block_idx)
    for need_dx, need_dv in ((True, True), (True, False), (False, True)):
        gx, gv = ops.bsl_backward(dy, x, values, *meta, bs, need_dx, need_dv)
        assert (rel_err(gx, ref_dx) <= tol) if need_dx else gx.numel() == 0
        assert (rel_err(gv, ref_dv) <= tol) if need_dv else gv.numel() == 0


@pytest.mark.parametrize("bs", [4, 1])
def test_custom_ops_opcheck(gen, bs):
    """Schemas, fake (meta) impls and autograd registration of the linear ops (CPU path)."""
    mask = random_mask(2, 3, 0.5, "random", gen)
    lay = BlockLayout.from_mask(mask, bs)
    N, K = lay.shape
    meta = (lay.row_ptr, lay.col_idx, lay.row_idx, lay.col_ptr, lay.t_row_idx, lay.t_block_idx)
    x = torch.randn(5, K, generator=gen, requires_grad=True)
    values = torch.randn(lay.nnz, bs, bs, generator=gen, requires_grad=True)
    bias = torch.randn(N, generator=gen, requires_grad=True)
    dy = torch.randn(5, N, generator=gen)
    ops = torch.ops.itop_kernels
    if bs == 1:
        xt = x.detach().t().contiguous().requires_grad_()
        torch.library.opcheck(ops.bsl_forward_csr, (xt, values, *meta, bias, N))
    else:
        torch.library.opcheck(ops.bsl_forward, (x, values, *meta, bias, bs, N))
    xd, vd = x.detach(), values.detach()
    torch.library.opcheck(ops.bsl_grad_input,
                          (dy, vd, lay.col_ptr, lay.t_row_idx, lay.t_block_idx, bs, K))
    torch.library.opcheck(ops.bsl_grad_weight, (dy, xd, lay.row_idx, lay.col_idx, lay.col_ptr,
                                                lay.t_row_idx, lay.t_block_idx, bs))
    for need in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(ops.bsl_backward, (dy, xd, vd, *meta, bs, *need))


# --------------------------------------------------------------------------- argument errors
def test_rejects_bad_arguments():
    lay = BlockLayout.from_mask(torch.tensor([[True, False], [True, True]]), 16)
    x = torch.randn(4, 32)
    v = torch.randn(3, 16, 16)
    b = torch.randn(32)
    cases = [
        (dict(x=torch.randn(4, 31)), ValueError, "in_features=32"),
        (dict(x=torch.randn(4, 32, dtype=torch.float64)), TypeError, "dtype"),
        (dict(x=torch.randint(0, 3, (4, 32))), TypeError, "float16, bfloat16, float32"),
        (dict(v=torch.randn(2, 16, 16)), ValueError, "values must have shape"),
        (dict(v=torch.randn(3, 16, 8)), ValueError, "values must have shape"),
        (dict(b=torch.randn(31)), ValueError, "bias must have shape"),
        (dict(b=torch.randn(32, dtype=torch.float64)), TypeError, "bias has dtype"),
        (dict(b=[0.0] * 32), TypeError, "bias must be a torch.Tensor"),
        (dict(lay="layout"), TypeError, "layout must be a BlockLayout"),
        (dict(x=[[1.0] * 32]), TypeError, "x must be a torch.Tensor"),
    ]
    for change, exc, words in cases:
        args = dict(x=x, v=v, lay=lay, b=b)
        args.update(change)
        with pytest.raises(exc, match=words):
            block_sparse_linear(args["x"], args["v"], args["lay"], args["b"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_rejects_device_mismatch():
    lay = BlockLayout.from_mask(torch.ones(1, 1, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="same device"):
        block_sparse_linear(torch.randn(2, 16, device="cuda"), torch.randn(1, 16, 16, device="cuda"), lay)


def test_triton_device_really_runs_the_triton_kernels(triton_device, guard_bands, monkeypatch,
                                                     gen):
    """Guard for the test set-up itself: the triton_device tests must not reach the CPU path,
    and the kernels' outputs (Y, dX, dW) are allocated inside guard bands."""
    from itop_kernels import cpu_linear

    def boom(*a, **k):
        raise AssertionError("the CPU path ran instead of the Triton kernels")
    for name in ("linear_forward", "linear_grad_input", "linear_grad_weight"):
        monkeypatch.setattr(cpu_linear, name, boom)
    mask = random_mask(2, 2, 0.7, "random", gen)
    check_linear(mask, 16, (5,), torch.float32, triton_device, gen)
    assert guard_bands.shapes == [(5, 32), (5, 32), (int(mask.sum()), 16, 16)]


def test_guard_bands_catch_writes_outside_an_output():
    """Guard for the guard bands themselves: a write just past the end, or just before the
    start, of an output is reported; writes inside are not."""
    from guard_bands import GuardBands

    for offset in (12, -1):
        guards = GuardBands()
        out = guards.empty_output((3, 4), torch.float32, torch.device("cpu"))
        out.fill_(1.0)
        guards.check()
        base = out.storage_offset()
        out.as_strided((1,), (1,), base + offset).fill_(2.0)  # one element outside
        with pytest.raises(AssertionError, match="before" if offset < 0 else "after"):
            guards.check()
