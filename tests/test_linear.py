"""block_sparse_linear against a float64 dense reference, on the CPU path and the Triton kernels.

Every check draws fresh random inputs, compares the output and all three gradients by relative
error, and (on the Triton path) starts every output buffer as NaN so unwritten elements show.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from itop_kernels import BlockLayout, block_sparse_linear
from numerics import rel_err, tol_for

CPU_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def random_mask(R: int, C: int, density: float, kind: str = "random", gen=None) -> torch.Tensor:
    """Block masks for the edge cases: random, empty block rows/cols, dense, all empty."""
    if kind == "dense":
        return torch.ones(R, C, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(R, C, dtype=torch.bool)
    mask = torch.rand(R, C, generator=gen) < density
    if kind == "empty_rows":
        mask[::2] = False
        mask[1::2, 0] = True
    return mask


def check_linear(mask, bs, lead, dtype, device, bias=True, x_transform=None):
    """Forward and gradients of x, values, bias against float64; returns the four errors."""
    layout = BlockLayout.from_mask(mask.to(device), bs)
    R, C = mask.shape
    W = torch.randn(R * bs, C * bs, dtype=torch.float64)
    x64 = torch.randn(*lead, C * bs, dtype=torch.float64)
    b64 = torch.randn(R * bs, dtype=torch.float64) if bias else None
    dy64 = torch.randn(*lead, R * bs, dtype=torch.float64)

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
def test_cpu_path(dtype, bs, kind):
    mask = random_mask(4, 3, 0.4, kind)
    check_linear(mask, bs, (5, 7), dtype, "cpu")


@pytest.mark.parametrize("lead", [(1,), (33,), (2, 3, 5), ()])
def test_cpu_leading_dims_and_odd_m(lead):
    check_linear(random_mask(3, 5, 0.5), 16, lead, torch.float32, "cpu")


@pytest.mark.parametrize("bs", [1, 3, 8])
def test_cpu_path_other_block_sizes(bs):
    check_linear(random_mask(6, 4, 0.5), bs, (9,), torch.float64, "cpu")


def test_cpu_non_contiguous_input():
    check_linear(random_mask(3, 4, 0.5), 16, (6, 9), torch.float32, "cpu",
                 x_transform=lambda x: x.transpose(0, 1).contiguous().transpose(0, 1))
    check_linear(random_mask(3, 4, 0.5), 16, (6,), torch.float32, "cpu", bias=False,
                 x_transform=lambda x: torch.cat([x, x], 1)[:, ::2])


def test_cpu_gradcheck_float64():
    mask = random_mask(3, 4, 0.5)
    mask[1] = False
    mask[0, 0] = True
    lay = BlockLayout.from_mask(mask, 2)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(lay.nnz, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: block_sparse_linear(x, v, lay, b), (x, v, b))


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 5), C=st.integers(1, 5), density=st.floats(0.0, 1.0),
       bs=st.sampled_from([16, 32]), M=st.integers(1, 40), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_cpu_hypothesis(R, C, density, bs, M, bias, dtype):
    check_linear(random_mask(R, C, density), bs, (M,), dtype, "cpu", bias=bias)


def test_cpu_path_does_not_scatter_to_dense(monkeypatch):
    """The CPU path must never form the dense weight: forbid scatter while it runs."""
    def boom(*a, **k):
        raise AssertionError("CPU path called BlockLayout.scatter")
    mask = random_mask(4, 4, 0.3)
    lay = BlockLayout.from_mask(mask, 16)
    v = torch.randn(lay.nnz, 16, 16, requires_grad=True)
    x = torch.randn(8, 64, requires_grad=True)
    monkeypatch.setattr(BlockLayout, "scatter", boom)
    block_sparse_linear(x, v, lay).sum().backward()


# --------------------------------------------------------------------------- Triton kernels
def triton_dtypes(device):
    # bf16 loads are wrong in Triton's interpreter (ENVIRONMENT.md): bf16 is tested on GPUs.
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_triton_block_sizes(triton_device, bs):
    for dtype in triton_dtypes(triton_device):
        check_linear(random_mask(3, 2, 0.6, "empty_rows"), bs, (37,), dtype, triton_device)


@pytest.mark.parametrize("kind", ["dense", "empty", "random"])
def test_triton_edge_layouts(triton_device, kind):
    check_linear(random_mask(4, 3, 0.3, kind), 16, (2, 9), torch.float32, triton_device)


def test_triton_one_block_and_m_of_one(triton_device):
    one = torch.ones(1, 1, dtype=torch.bool)
    for dtype in triton_dtypes(triton_device):
        check_linear(one, 32, (1,), dtype, triton_device)
        check_linear(one, 16, (3,), dtype, triton_device, bias=False)


def test_triton_strided_input(triton_device):
    check_linear(random_mask(2, 3, 0.6), 16, (5, 4), torch.float16, triton_device,
                 x_transform=lambda x: x.transpose(0, 1).contiguous().transpose(0, 1))


def test_triton_m_spans_several_tiles(triton_device):
    # M larger than every BM in the config table, with a ragged last tile.
    check_linear(random_mask(2, 2, 0.7), 16, (300,), torch.float16, triton_device)


@settings(max_examples=8, deadline=None)
@given(R=st.integers(1, 3), C=st.integers(1, 3), density=st.floats(0.0, 1.0),
       M=st.integers(1, 70), bias=st.booleans())
def test_triton_hypothesis(R, C, density, M, bias):
    from conftest import HAS_CUDA
    import os
    device = "cuda" if HAS_CUDA else "cpu"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0" if HAS_CUDA else "1"
    os.environ["ITOP_POISON_OUTPUTS"] = "1"
    try:
        check_linear(random_mask(R, C, density), 16, (M,), torch.float32, device, bias=bias)
    finally:
        os.environ["TRITON_INTERPRET"] = old if old is not None else "0"
        os.environ.pop("ITOP_POISON_OUTPUTS")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tf32 dots exist only on a GPU")
def test_triton_tf32_follows_torch_switch(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    errs = check_linear(random_mask(4, 4, 0.5), 64, (256,), torch.float32, "cuda")
    assert max(errs.values()) <= 1e-3


def test_triton_rejects_unsupported_block_size(triton_device):
    lay = BlockLayout.from_mask(torch.ones(2, 2, dtype=torch.bool, device=triton_device), 8)
    x = torch.randn(4, 16, device=triton_device)
    v = torch.randn(4, 8, 8, device=triton_device)
    with pytest.raises(ValueError, match="block_size 8 has no Triton kernel"):
        block_sparse_linear(x, v, lay)


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


def test_triton_device_really_runs_the_triton_kernels(triton_device, monkeypatch):
    """Guard for the test set-up itself: the triton_device tests must not reach the CPU path."""
    from itop_kernels import cpu_linear

    def boom(*a, **k):
        raise AssertionError("the CPU path ran instead of the Triton kernels")
    for name in ("linear_forward", "linear_grad_input", "linear_grad_weight"):
        monkeypatch.setattr(cpu_linear, name, boom)
    check_linear(random_mask(2, 2, 0.7), 16, (5,), torch.float32, triton_device)
