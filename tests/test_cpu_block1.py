"""Block size 1 (unstructured) on CPU tensors: a real CSR path, checked like every other size.

Forward and all gradients against a float64 dense reference, gradcheck, hypothesis layouts, the
edge cases (empty rows, dense, all-empty masks, batch 1), the transposed-view output layout that
chains of block-1 layers read in place, stale workspaces, and that no dense weight is formed.
"""
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from itop_kernels import BlockLayout, block_sparse_linear, cpu_linear
from block_masks import random_mask
from numerics import rel_err
from test_linear import check_linear


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "empty_rows", "dense", "empty"])
def test_block1_against_float64(dtype, kind, gen):
    check_linear(random_mask(48, 40, 0.1, kind, gen), 1, (5, 7), dtype, "cpu", gen)


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("bias", [True, False])
def test_block1_float32_bigger(density, bias, gen):
    errs = check_linear(random_mask(256, 384, density, "random", gen), 1, (97,), torch.float32,
                        "cpu", gen, bias=bias)
    assert all(e <= 1e-4 for e in errs.values())


@pytest.mark.parametrize("lead", [(1,), (2, 3, 5), ()])
def test_block1_batch_one_and_leading_dims(lead, gen):
    check_linear(random_mask(20, 30, 0.2, "random", gen), 1, lead, torch.float32, "cpu", gen)


def test_block1_empty_row_and_empty_column(gen):
    mask = random_mask(16, 12, 0.5, "random", gen)
    mask[3] = False       # an output with no inputs: y = bias there, and dW has no entry
    mask[:, 5] = False    # an input feeding nothing: dX is 0 there
    mask[0, 0] = True
    check_linear(mask, 1, (9,), torch.float64, "cpu", gen)
    check_linear(mask, 1, (9,), torch.float32, "cpu", gen, bias=False)


def test_block1_gradcheck(gen):
    mask = random_mask(7, 9, 0.4, "random", gen)
    mask[2] = False
    mask[:, 4] = False
    mask[0, 0] = True
    lay = BlockLayout.from_mask(mask, 1)
    x = torch.randn(2, 3, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(lay.nnz, 1, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: block_sparse_linear(x, v, lay, b), (x, v, b))
    assert torch.autograd.gradcheck(lambda x, v: block_sparse_linear(x, v, lay), (x, v))


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 40), C=st.integers(1, 40), density=st.floats(0.0, 1.0),
       M=st.integers(1, 33), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**32 - 1))
def test_block1_hypothesis(R, C, density, M, bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)  # drawn by hypothesis: a failure replays
    check_linear(random_mask(R, C, density, "plain", gen), 1, (M,), dtype, "cpu", gen, bias=bias)


def _reference(x, values, lay, bias=None):
    return x.double() @ lay.scatter(values.detach().double()).t() + (
        0 if bias is None else bias.double())


def test_block1_outputs_are_transposed_views_and_chain_without_copies():
    torch.manual_seed(0)
    l1 = BlockLayout.from_mask(torch.rand(24, 16) < 0.3, 1)
    l2 = BlockLayout.from_mask(torch.rand(8, 24) < 0.3, 1)
    v1 = torch.randn(l1.nnz, 1, 1, dtype=torch.float64, requires_grad=True)
    v2 = torch.randn(l2.nnz, 1, 1, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    h = block_sparse_linear(x, v1, l1)
    assert h.stride() == (1, 6) and h.t().is_contiguous()   # Yᵀ row-major, Y a view
    h2 = torch.relu(h)
    y = block_sparse_linear(h2, v2, l2)
    dy = torch.randn(6, 8, dtype=torch.float64)
    y.backward(dy)
    # same numbers from the dense float64 chain
    xr = x.detach().clone().requires_grad_()
    v1r, v2r = v1.detach().clone().requires_grad_(), v2.detach().clone().requires_grad_()
    yr = torch.relu(xr @ l1.scatter(v1r).t()) @ l2.scatter(v2r).t()
    yr.backward(dy)
    assert rel_err(y, yr) < 1e-12
    for got, ref in ((x.grad, xr.grad), (v1.grad, v1r.grad), (v2.grad, v2r.grad)):
        assert rel_err(got, ref) < 1e-12


def test_block1_reads_transposed_and_strided_inputs():
    torch.manual_seed(1)
    lay = BlockLayout.from_mask(torch.rand(10, 12) < 0.4, 1)
    v = torch.randn(lay.nnz, 1, 1)
    b = torch.randn(10)
    base = torch.randn(12, 7)
    for x in (base.t(), base.t().contiguous(), torch.randn(7, 24)[:, ::2]):
        y = block_sparse_linear(x, v, lay, b)
        assert rel_err(y, _reference(x, v, lay, b)) < 1e-6
    # a transposed dY is read in place too
    x = torch.randn(7, 12, requires_grad=True)
    vv = v.clone().requires_grad_()
    y = block_sparse_linear(x, vv, lay)
    dy = torch.randn(10, 7).t()
    y.backward(dy)
    xr = x.detach().double().requires_grad_()
    vr = vv.detach().double().requires_grad_()
    (xr @ lay.scatter(vr).t()).backward(dy.double())
    assert rel_err(x.grad, xr.grad) < 1e-6 and rel_err(vv.grad, vr.grad) < 1e-6


def test_block1_stale_workspaces_do_not_leak(monkeypatch):
    """Scratch buffers are reused across calls: poison them and the results must not change."""
    torch.manual_seed(2)
    lay = BlockLayout.from_mask(torch.rand(30, 20) < 0.2, 1)
    v = torch.randn(lay.nnz, 1, 1, requires_grad=True)
    x = torch.randn(9, 20, requires_grad=True)
    real = cpu_linear._workspace

    def poisoned(slot, shape, dtype):
        return real(slot, shape, dtype).fill_(float("nan"))
    monkeypatch.setattr(cpu_linear, "_workspace", poisoned)
    y = block_sparse_linear(x, v, lay)
    y.backward(torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(v.grad).all()
    assert rel_err(y, _reference(x, v, lay)) < 1e-6


def _forbid_dense_count_sampled(monkeypatch) -> dict:
    """Make ``BlockLayout.scatter`` fail (no dense weight may be formed) and count calls of
    ``torch.sparse.sampled_addmm`` (the sampled dW) in the returned dict's ``"sampled"``."""
    calls = {"sampled": 0}
    real_sampled = torch.sparse.sampled_addmm

    def counting_sampled(*a, **k):
        calls["sampled"] += 1
        return real_sampled(*a, **k)

    def boom(*a, **k):
        raise AssertionError("the CPU block-1 path scattered to a dense weight")
    monkeypatch.setattr(torch.sparse, "sampled_addmm", counting_sampled)
    monkeypatch.setattr(BlockLayout, "scatter", boom)
    return calls


def test_block1_never_forms_the_dense_weight(monkeypatch):
    """The CSR path: no scatter to dense, and the sparse kernels are the ones that run."""
    lay = BlockLayout.from_mask(torch.rand(64, 64) < 0.05, 1)
    v = torch.randn(lay.nnz, 1, 1, requires_grad=True)
    x = torch.randn(8, 64, requires_grad=True)
    calls = _forbid_dense_count_sampled(monkeypatch)
    block_sparse_linear(x, v, lay).sum().backward()
    assert calls["sampled"] == 1
    assert v.grad.shape == (lay.nnz, 1, 1)


@pytest.mark.parametrize("threads", [1, 2])
def test_block1_thread_counts_agree(threads):
    torch.manual_seed(3)
    lay = BlockLayout.from_mask(torch.rand(128, 96) < 0.1, 1)
    v = torch.randn(lay.nnz, 1, 1, requires_grad=True)
    x = torch.randn(33, 96, requires_grad=True)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = block_sparse_linear(x, v, lay)
        y.backward(torch.ones_like(y))
    finally:
        torch.set_num_threads(old)
    assert rel_err(y, _reference(x, v, lay)) < 1e-5
    xr = x.detach().double().requires_grad_()
    vr = v.detach().double().requires_grad_()
    (xr @ lay.scatter(vr).t()).sum().backward()
    assert rel_err(x.grad, xr.grad) < 1e-5 and rel_err(v.grad, vr.grad) < 1e-5


def test_block1_has_no_triton_kernel(triton_device):
    lay = BlockLayout.from_mask(torch.rand(16, 16) < 0.3, 1).to(triton_device)
    v = torch.randn(lay.nnz, 1, 1, device=triton_device)
    x = torch.randn(4, 16, device=triton_device)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_linear(x, v, lay)


def test_block1_compiles_without_graph_break():
    torch.manual_seed(4)
    l1 = BlockLayout.from_mask(torch.rand(32, 16) < 0.3, 1)
    l2 = BlockLayout.from_mask(torch.rand(8, 32) < 0.3, 1)
    v1 = torch.randn(l1.nnz, 1, 1, requires_grad=True)
    v2 = torch.randn(l2.nnz, 1, 1, requires_grad=True)
    b1 = torch.randn(32, requires_grad=True)

    def f(x):
        return block_sparse_linear(torch.relu(block_sparse_linear(x, v1, l1, b1)), v2, l2)
    x = torch.randn(5, 16)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    y_eager, y_comp = f(x), compiled(x)
    assert torch.allclose(y_comp, y_eager, rtol=1e-5, atol=1e-6)
    ge = torch.autograd.grad(f(x).square().sum(), [v1, v2, b1])
    gc = torch.autograd.grad(compiled(x).square().sum(), [v1, v2, b1])
    for a, b in zip(ge, gc):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,density", [((64, 48), 0.05), ((7, 300), 0.5), ((1, 1), 1.0),
                                           ((5, 6), 0.0), ((40, 40), 1.0)])
def test_cpu_layout_build_matches_the_device_build(monkeypatch, shape, density):
    """CPU masks use a nonzero-based build (fast for element-level grids); it must give the
    same metadata as the sort-based build the GPU uses."""
    from itop_kernels import layout as layout_mod
    torch.manual_seed(5)
    mask = torch.rand(*shape) < density
    fast = BlockLayout.from_mask(mask, 1)
    monkeypatch.setattr(layout_mod, "_CPU_FAST_BUILD", False)
    ref = BlockLayout.from_mask(mask, 1)
    for name in ("row_ptr", "col_idx", "row_idx", "col_ptr", "t_row_idx", "t_block_idx"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.dtype == b.dtype == torch.int32, name
        assert torch.equal(a, b), name
    assert fast.nnz == ref.nnz == int(mask.sum())
    monkeypatch.setattr(layout_mod, "_CPU_FAST_BUILD", True)
    with pytest.raises(ValueError, match="nnz"):   # a wrong nnz is caught, not trusted
        BlockLayout.from_mask(mask, 1, nnz=int(mask.sum()) + 1)


# --------------------------------------------------------------------------- itop layers at block 1
def test_sparse_linear_block1_stores_only_active_weights_and_runs_csr(monkeypatch):
    import itop
    torch.manual_seed(6)
    layer = itop.SparseLinear(64, 48, density=0.1, block_size=1, dtype=torch.float64)
    assert layer.values.shape == (layer.nnz, 1, 1) and layer.layout.block_size == 1
    assert layer.layout.nnz == layer.nnz == int(layer.block_mask.sum()) == round(0.1 * 64 * 48)
    w = layer.dense_weight().detach().requires_grad_()   # built before scatter is forbidden
    calls = _forbid_dense_count_sampled(monkeypatch)
    x = torch.randn(3, 4, 64, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    monkeypatch.undo()
    assert calls["sampled"] == 1
    ref = torch.nn.functional.linear(x, w, layer.bias)
    dx, dw = torch.autograd.grad(ref, (x, w), g)
    assert rel_err(y, ref) < 1e-12 and rel_err(x.grad, dx) < 1e-12
    assert rel_err(layer.values.grad, layer.layout.gather(dw)) < 1e-12


def test_sparse_linear_block1_without_cpu_path_is_masked_dense_and_warns_once(monkeypatch):
    """Off the CPU path (CUDA, or TRITON_INTERPRET=1 here) block 1 runs as masked dense."""
    import itop
    from itop.storage import CsrStorage
    torch.manual_seed(7)
    layer = itop.SparseLinear(32, 16, density=0.2, block_size=1)
    x = torch.randn(5, 32)
    ref = torch.nn.functional.linear(x, layer.dense_weight().detach(), layer.bias.detach())
    monkeypatch.setattr(CsrStorage, "warned_masked_dense", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.warns(UserWarning, match="masked dense"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once only
        y2 = layer(x)
    y2.sum().backward()
    assert rel_err(y, ref) < 1e-6 and torch.equal(y, y2)
    assert layer.values.grad.shape == (layer.nnz, 1, 1)


def test_block1_topology_update_keeps_survivors_and_zeroes_new_weights():
    import itop
    torch.manual_seed(8)
    layer = itop.SparseLinear(24, 20, density=0.25, block_size=1)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(6, 24)).square().sum().backward()
        opt.step()
    old_mask = layer.block_mask.clone()
    old_w = layer.dense_weight().detach().clone()
    old_m = layer.layout.scatter(opt.state[layer.values]["exp_avg"]).clone()
    param = layer.values
    flat = old_mask.reshape(-1)
    slots = torch.randperm(int(flat.sum()))[:7]          # which active weights (values rows)
    grow = (~flat).nonzero().squeeze(1)[torch.randperm(int((~flat).sum()))[:7]]
    new_mask = flat.clone()
    new_mask[flat.nonzero().squeeze(1)[slots]] = False
    new_mask[grow] = True
    new_mask = new_mask.view(old_mask.shape)
    layer._apply_topology(slots, grow, opt)
    assert layer.values is param and layer.values.shape == (layer.nnz, 1, 1)
    assert layer.nnz == int(new_mask.sum()) == int(old_mask.sum())
    assert torch.equal(layer.layout.block_mask, new_mask)
    w = layer.dense_weight().detach()
    m = layer.layout.scatter(opt.state[layer.values]["exp_avg"])
    keep = old_mask & new_mask
    fresh = new_mask & ~old_mask
    assert torch.equal(w[keep], old_w[keep]) and torch.equal(m[keep], old_m[keep])
    assert (w[fresh] == 0).all() and (m[fresh] == 0).all() and (w[~new_mask] == 0).all()


def test_block1_gradient_scores_match_the_dense_gradient():
    import itop
    torch.manual_seed(9)
    layer = itop.SparseLinear(16, 12, density=0.3, block_size=1, dtype=torch.float64)
    layer._start_capture()
    x = torch.randn(7, 16, dtype=torch.float64)
    layer(x).sin().sum().backward()
    w = layer.dense_weight().detach().requires_grad_()
    dw = torch.autograd.grad(torch.nn.functional.linear(x, w, layer.bias).sin().sum(), w)[0]
    assert torch.allclose(layer._grad_scores(), dw.abs().float(), rtol=1e-6, atol=1e-7)
    layer._stop_capture()


def test_sparsify_block1_linear_is_csr_conv_is_masked_dense():
    import itop
    torch.manual_seed(10)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    x = torch.randn(2, 3, 6, 6)
    itop.sparsify(model, 0.3, block_size=1)
    lin = model[3]
    assert lin.values.shape == (lin.nnz, 1, 1) and lin.layout is not None
    assert model[0].values.shape == (8, 3, 3, 3) and model[0].layout is None
    torch.testing.assert_close(itop.densify(model)(x), model(x))


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_block1_output_can_be_modified_in_place(lead):
    """Outputs are tensors of their own, not views: in-place ops after the layer work."""
    torch.manual_seed(11)
    lay = BlockLayout.from_mask(torch.rand(12, 10) < 0.3, 1)
    v = torch.randn(lay.nnz, 1, 1, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*lead, 10, dtype=torch.float64, requires_grad=True)
    y = block_sparse_linear(x, v, lay)
    torch.relu_(y)
    y.sum().backward()
    xr = x.detach().clone().requires_grad_()
    vr = v.detach().clone().requires_grad_()
    torch.relu(xr @ lay.scatter(vr).t()).sum().backward()
    assert rel_err(x.grad, xr.grad) < 1e-12 and rel_err(v.grad, vr.grad) < 1e-12
