"""The eager fast path of ``block_sparse_linear`` against its custom-op path.

Eagerly, ``block_sparse_linear`` runs an ``autograd.Function`` that calls the implementations
directly; under ``torch.compile`` it runs the ``itop_kernels::bsl_*`` custom ops. Both must
give bit-identical outputs and gradients (the same implementation functions run in both), for
every ``needs_input_grad`` combination, bias or not, block size 1 (the CSR path) included.
"""
import pytest
import torch

from block_masks import random_mask
from itop_kernels import BlockLayout, block_sparse_linear, cpu_linear
from itop_kernels import linear as lin


def _run(path, x, values, layout, bias, dy, grads):
    """Output and the gradients of the inputs named in ``grads`` through ``path``."""
    leaves = {"x": x.detach().clone(), "values": values.detach().clone(),
              "bias": bias.detach().clone() if bias is not None else None}
    for name in grads:
        leaves[name].requires_grad_()
    y = path(leaves["x"], leaves["values"], layout, leaves["bias"])
    out = {"y": y.detach()}
    if grads:
        gs = torch.autograd.grad(y, [leaves[n] for n in grads], dy)
        out.update({f"d{n}": g for n, g in zip(grads, gs)})
    return out


def _assert_paths_identical(mask, bs, lead, dtype, device, gen, bias, grads):
    layout = BlockLayout.from_mask(mask, bs).to(device)
    R, C = mask.shape
    x = torch.randn(*lead, C * bs, generator=gen).to(device, dtype)
    values = torch.randn(layout.nnz, bs, bs, generator=gen).to(device, dtype)
    b = torch.randn(R * bs, generator=gen).to(device, dtype) if bias else None
    dy = torch.randn(*lead, R * bs, generator=gen).to(device, dtype)
    eager = _run(lin._linear_eager, x, values, layout, b, dy, grads)
    ops = _run(lin._linear_custom_op, x, values, layout, b, dy, grads)
    assert eager.keys() == ops.keys()
    for k in eager:
        assert eager[k].shape == ops[k].shape and eager[k].stride() == ops[k].stride(), k
        assert torch.equal(eager[k], ops[k]), f"{k} differs between the eager and custom-op paths"


GRAD_SETS = [("x", "values", "bias"), ("x",), ("values",), ("bias",), ("x", "values"), ()]


@pytest.mark.parametrize("grads", GRAD_SETS, ids=lambda g: "+".join(g) or "none")
@pytest.mark.parametrize("bs", [16, 1])
def test_eager_matches_custom_ops_cpu(bs, grads, gen):
    mask = random_mask(3, 4, 0.5, "random", gen)
    _assert_paths_identical(mask, bs, (2, 5), torch.float32, "cpu", gen, True, grads)


@pytest.mark.parametrize("bs,dtype", [(16, torch.float64), (4, torch.bfloat16), (1, torch.float64)])
def test_eager_matches_custom_ops_cpu_no_bias(bs, dtype, gen):
    mask = random_mask(4, 3, 0.4, "empty_rows", gen)
    _assert_paths_identical(mask, bs, (7,), dtype, "cpu", gen, False, ("x", "values"))


def test_eager_matches_custom_ops_triton(triton_device, gen):
    mask = random_mask(2, 3, 0.6, "random", gen)
    _assert_paths_identical(mask, 16, (5,), torch.float32, triton_device, gen, True,
                            ("x", "values", "bias"))
    _assert_paths_identical(mask, 16, (3,), torch.float16, triton_device, gen, False,
                            ("values",))


def test_public_function_is_eager_unless_compiling(monkeypatch, gen):
    """Eagerly the custom ops are not called at all (their dispatch is the host cost saved)."""
    def boom(*a, **k):
        raise AssertionError("the eager path called a custom op")
    for name in ("_bsl_forward", "_bsl_forward_csr", "_bsl_backward"):
        monkeypatch.setattr(lin, name, boom)
    for bs in (16, 1):
        lay = BlockLayout.from_mask(random_mask(2, 2, 0.5, "random", gen), bs)
        x = torch.randn(3, 2 * bs, generator=gen, requires_grad=True)
        v = torch.randn(lay.nnz, bs, bs, generator=gen, requires_grad=True)
        block_sparse_linear(x, v, lay).sum().backward()
        assert x.grad is not None and v.grad is not None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(AssertionError, match="called a custom op"):
        block_sparse_linear(x.detach(), v.detach(), lay)


def test_eager_saved_metadata_rejects_in_place_layout_change(gen):
    """The eager Function saves the layout tensors like the custom op does: rewriting them in
    place between forward and backward is an error, not a silently wrong gradient."""
    lay = BlockLayout.from_mask(random_mask(2, 2, 0.5, "random", gen), 16)
    x = torch.randn(3, 32, generator=gen, requires_grad=True)
    v = torch.randn(lay.nnz, 16, 16, generator=gen, requires_grad=True)
    y = block_sparse_linear(x, v, lay)
    lay.col_ptr.add_(0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_cpu_plan_cache_sees_in_place_layout_rewrites(gen):
    """The CPU path caches its per-layout plan; rewriting the layout's metadata in place (to
    another mask with the same nnz) must invalidate it."""
    m1 = torch.tensor([[True, True], [False, True]])
    m2 = torch.tensor([[True, False], [True, True]])
    lay, lay2 = BlockLayout.from_mask(m1, 16), BlockLayout.from_mask(m2, 16)
    x = torch.randn(4, 32, generator=gen)
    v = torch.randn(3, 16, 16, generator=gen)
    block_sparse_linear(x, v, lay)  # fills the cache for lay's tensors
    for name in ("row_ptr", "col_idx", "row_idx", "col_ptr", "t_row_idx", "t_block_idx"):
        getattr(lay, name).copy_(getattr(lay2, name))
    ref = x.double() @ lay2.scatter(v.double()).t()
    assert torch.allclose(block_sparse_linear(x, v, lay).double(), ref, atol=1e-4)
    dy = torch.randn(4, 32, generator=gen)
    dx, _ = cpu_linear.linear_backward(dy, x, v, lay.row_ptr, lay.col_idx, lay.col_ptr,
                                       lay.t_row_idx, lay.t_block_idx, 16, True, False)
    assert torch.allclose(dx.double(), dy.double() @ lay2.scatter(v.double()), atol=1e-4)
