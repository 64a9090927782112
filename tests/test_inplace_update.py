"""A topology update rewrites layouts, values, gradients and optimizer state in place
(issue 14): every tensor a captured CUDA graph reads keeps its identity and address, so a graph
(or ``torch.compile(mode="reduce-overhead")``) captured before an update stays valid after it."""
import copy

import pytest
import torch

import itop
from itop import storage
from itop_kernels import BlockLayout, block_sparse_linear
from step_models import batch, sparse_model, train_step

HAS_CUDA = torch.cuda.is_available()
LAYOUT_TENSORS = ("block_mask", "row_ptr", "col_idx", "row_idx", "col_ptr", "t_row_idx",
                  "t_block_idx", "_positions")


def _tensor_addresses(model, opt):
    """``{name: data_ptr}`` of every layout tensor, values, gradient and optimizer state
    tensor of the sparse layers."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, itop.SparseLayer):
            continue
        for t in LAYOUT_TENSORS:
            out[f"{name}.layout.{t}"] = getattr(m.layout, t).data_ptr()
        out[f"{name}.values"] = m.values.data_ptr()
        out[f"{name}.values.grad"] = m.values.grad.data_ptr()
        for k, v in opt.state[m.values].items():
            if isinstance(v, torch.Tensor):
                out[f"{name}.opt.{k}"] = v.data_ptr()
    return out


def _run(optimizer: str, inplace: bool, steps: int, monkeypatch):
    monkeypatch.setattr(storage, "_INPLACE_LAYOUT", inplace)
    model = sparse_model()
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-2))
    mgr = itop.TopologyManager(model, opt, update_every=3, total_steps=100, prune_rate=0.5,
                               growth="gradient")
    x, y = batch()
    losses = [train_step(model, opt, x, y, mgr) for _ in range(steps)]
    return model, opt, mgr, torch.stack(losses)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_update_keeps_every_tensor_in_place(optimizer, monkeypatch):
    model, opt, mgr, _ = _run(optimizer, True, 2, monkeypatch)
    x, y = batch()
    before = _tensor_addresses(model, opt)
    layouts = {n: (m.layout, m.layout.version) for n, m in mgr.layers}
    masks = {n: m.block_mask.clone() for n, m in mgr.layers}
    train_step(model, opt, x, y, mgr)                   # step 3: an update
    assert mgr.step_count == 3
    assert any(not torch.equal(masks[n], m.block_mask) for n, m in mgr.layers), "no change"
    assert _tensor_addresses(model, opt) == before
    for n, m in mgr.layers:
        assert m.layout is layouts[n][0]
        assert m.layout.version == layouts[n][1] + 1
        fresh = BlockLayout.from_mask(m.block_mask.clone(), m.block_size)
        for t in LAYOUT_TENSORS:
            assert torch.equal(getattr(m.layout, t), getattr(fresh, t)), (n, t)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_in_place_update_trains_bit_identically(optimizer, monkeypatch):
    """Same losses and parameters, bit for bit, as installing a new layout object (the code
    before the change, still selectable by ``itop.storage._INPLACE_LAYOUT``), over 3 updates."""
    m_new, _, _, l_new = _run(optimizer, True, 10, monkeypatch)
    m_old, _, _, l_old = _run(optimizer, False, 10, monkeypatch)
    assert torch.equal(l_new, l_old)
    for (n, a), b in zip(m_new.state_dict().items(), m_old.state_dict().values()):
        assert torch.equal(a, b), n


def test_a_layout_held_from_before_an_update_computes_the_new_topology(monkeypatch):
    """What a captured CUDA graph does: it keeps the layout tensors it was captured with. After
    an update, computing with them gives the layer's new output (with the old layout objects it
    gave the old topology's)."""
    monkeypatch.setattr(storage, "_INPLACE_LAYOUT", True)
    model, opt, mgr, _ = _run("sgd", True, 2, monkeypatch)
    layer = model.fc
    held = layer.layout
    held_tensors = [getattr(held, t) for t in LAYOUT_TENSORS]
    x, y = batch()
    train_step(model, opt, x, y, mgr)                   # the update
    xin = torch.randn(5, layer.in_features)
    with torch.no_grad():
        layer.values.normal_()      # (new blocks start at zero: make every block count)
        want = layer(xin)
        fresh = BlockLayout.from_mask(layer.block_mask.clone(), layer.block_size)
        got = block_sparse_linear(xin, layer.values, held, layer.bias)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(a is getattr(held, t) for a, t in zip(held_tensors, LAYOUT_TENSORS))
    torch.testing.assert_close(block_sparse_linear(xin, layer.values.detach(), fresh,
                                                   layer.bias.detach()), want, rtol=0, atol=0)


def test_layout_copy_checks_its_argument():
    a = BlockLayout.from_mask(torch.tensor([[True, False], [False, True]]), 4)
    b = BlockLayout.from_mask(torch.tensor([[True, True], [False, False]]), 4)
    c = BlockLayout.from_mask(torch.tensor([[True, True], [False, True]]), 4)
    with pytest.raises(ValueError, match="same grid, block size, nnz"):
        a.copy_(c)
    with pytest.raises(TypeError, match="other must be a BlockLayout"):
        a.copy_(b.block_mask)
    assert a.copy_(b) is a and torch.equal(a.block_mask, b.block_mask) and a.version == 1


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: CUDA graph capture")
@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_cuda_graph_captured_before_updates_matches_eager(growth):
    """Capture one training step (forward, backward, SGD step) in a CUDA graph, then train with
    graph replays across topology updates (the armed step before a gradient update runs
    eagerly: the capture ops keep tensors from Python) and compare with eager training."""
    torch.manual_seed(0)
    model = sparse_model("cuda")
    x, y = batch("cuda")

    def make(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        return opt, itop.TopologyManager(m, opt, update_every=3, total_steps=100,
                                         prune_rate=0.5, growth=growth, seed=1)

    ref = copy.deepcopy(model)
    opt, mgr = make(model)
    ref_opt, ref_mgr = make(ref)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):           # warm-up (momentum buffers, autotuning) off the graph
        for _ in range(3):               # through the first update (step 3)
            train_step(model, opt, x, y, mgr)
            train_step(ref, ref_opt, x, y, ref_mgr)
    torch.cuda.current_stream().wait_stream(s)
    assert not any(m._capturing for _, m in mgr.layers)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_loss = train_step(model, opt, x, y, None)
    for _ in range(8):                   # steps 4..11: updates at 6 and 9
        if any(m._capturing for _, m in mgr.layers):
            train_step(model, opt, x, y, None)
        else:
            g.replay()
        mgr.step()
        train_step(ref, ref_opt, x, y, ref_mgr)
    torch.cuda.synchronize()
    assert mgr.step_count == ref_mgr.step_count == 11
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert torch.isfinite(static_loss).all()
