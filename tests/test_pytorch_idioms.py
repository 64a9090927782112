"""PyTorch idioms on sparsified models, with torch alone: inference_mode, channels_last,
deepcopy/pickle during training, torch.compile(fullgraph=True) with counted graph breaks and
recompiles, torch.export, nn.MultiheadAttention / nn.TransformerEncoder, and magnitude
selection for pretrained weights. (Hugging Face and timm models: tests/test_real_models.py.)"""
import copy
import io
import itertools
import pickle
import warnings

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounter

import itop
from itop.app.models import build_model


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 16))


def _sparse_cnn(block_size=16):
    return itop.sparsify(_small_cnn(), 0.4, block_size=block_size)


# --------------------------------------------------------------------------- inference_mode
@pytest.mark.parametrize("block_size", [16, 1])
def test_inference_mode_matches_no_grad_with_worker_threads(block_size):
    """The CPU conv runs its block-rows on worker threads; they must run in the caller's
    inference mode (Lightning validates under torch.inference_mode())."""
    model = _sparse_cnn(block_size).eval()
    x = torch.randn(3, 16, 8, 8)
    n = torch.get_num_threads()
    torch.set_num_threads(2)   # the worker pool is used with more than one thread
    try:
        with torch.no_grad():
            ref = model(x)
        with torch.inference_mode():
            y = model(x)
            y_cl = model(x.to(memory_format=torch.channels_last))
    finally:
        torch.set_num_threads(n)
    assert y.is_inference()
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(y_cl, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- channels_last
def test_channels_last_model_keeps_outputs_and_trains():
    model = _sparse_cnn(16)
    conv = model[3]
    assert conv.values.dim() == 5
    x = torch.randn(2, 16, 8, 8)
    model.eval()
    ref = model(x)
    params = list(model.parameters())
    model = model.to(memory_format=torch.channels_last)
    assert [p is q for p, q in zip(model.parameters(), params)] == [True] * len(params)
    assert conv.values.dim() == 5 and conv.values.is_contiguous()
    assert model[0].values.dim() == 5
    xc = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(xc), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    # and it trains, topology updates included
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=10, growth="gradient")
    for _ in range(2):
        opt.zero_grad()
        model(xc).square().mean().backward()
        opt.step()
        assert mgr.step()
    assert all(m.nnz == m.values.shape[0] for _, m in mgr.layers)
    # block size 1 (dense masked weights, 4-D) takes the format like nn.Conv2d
    m1 = _sparse_cnn(1).eval()
    ref1 = m1(x)
    m1 = m1.to(memory_format=torch.channels_last)
    torch.testing.assert_close(m1(xc), ref1, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- copies
def _captured_bytes(model):
    return sum(t.numel() * t.element_size()
               for m in model.modules() if isinstance(m, itop.SparseLayer)
               for entry in m._captured for t in entry if t is not None)


def test_a_copy_taken_while_capturing_keeps_nothing_and_captures_nothing():
    """deepcopy / torch.save(model) on the step before a gradient update (capture armed): the
    copy must not go on keeping activations and gradients on every step (it grew without end)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 16))
    model = itop.sparsify(model, 0.3, block_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mgr = itop.TopologyManager(model, opt, update_every=5, total_steps=100, growth="gradient")
    x = torch.randn(32, 64)
    for _ in range(4):                     # the 5th step is an update step: capture is armed
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        mgr.step()
    assert all(m._capturing for _, m in mgr.layers)
    model(x).square().mean().backward()    # something captured now
    assert _captured_bytes(model) > 0

    buf = io.BytesIO()
    torch.save(model, buf)
    with_capture = len(buf.getvalue())
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    for c in copies:
        kept = [_captured_bytes(c)]
        copt = torch.optim.SGD(c.parameters(), lr=0.05)
        for _ in range(10):                # training the copy without a manager
            copt.zero_grad()
            c(x).square().mean().backward()
            copt.step()
            kept.append(_captured_bytes(c))
        assert kept == [0] * 11            # (it grew by X and dY of every layer, every step)
        assert not any(m._capturing for m in c.modules() if isinstance(m, itop.SparseLayer))
    # the file holds no captured tensor: the same size as a save taken with nothing captured
    mgr.close()
    buf = io.BytesIO()
    torch.save(model, buf)
    assert len(buf.getvalue()) == with_capture
    # the original still captures for its manager
    mgr2 = itop.TopologyManager(model, opt, update_every=1, total_steps=10, growth="gradient")
    model(x).square().mean().backward()
    assert _captured_bytes(model) > 0
    mgr2.close()
    assert _captured_bytes(model) == 0


def test_a_new_manager_owns_the_capture_of_its_layers():
    """A layer left armed by something else (an orphaned copy's state, another manager) is
    taken over by a new manager, which can then switch it off."""
    torch.manual_seed(0)
    model = itop.sparsify(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)), 0.5,
                          block_size=8)
    layer = model[0]
    layer._start_capture(owner=object())    # armed by someone no manager knows
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = itop.TopologyManager(model, opt, update_every=10, total_steps=100, growth="random")
    assert not layer._capturing             # random growth captures nothing: disarmed
    layer._start_capture(owner=object())
    mgr = itop.TopologyManager(model, opt, update_every=10, total_steps=100, growth="gradient")
    assert not layer._capturing             # step 1 is no update step
    for _ in range(9):
        mgr.step()
    assert layer._capturing                 # armed for step 10, by this manager
    mgr.close()
    assert not layer._capturing


# --------------------------------------------------------------------------- torch.compile
def _train_steps(fwd, model, opt, mgr, steps, batch):
    changes = 0
    for _ in range(steps):
        opt.zero_grad()
        fwd(batch).square().mean().backward()
        opt.step()
        changes += mgr.step()
    return changes


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_compile_fullgraph_no_graph_break_no_recompile_across_updates(growth):
    """A sparsified model compiles whole (fullgraph=True), and topology updates recompile
    nothing: the layouts change values, never shapes. Gradient growth compiles one more graph
    (the capture step) once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(inplace=True), nn.Linear(64, 64),
                          nn.GELU(), nn.Linear(64, 16))
    model = itop.sparsify(model, 0.4, block_size=16)
    x = torch.randn(8, 32)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    torch._dynamo.reset()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mgr = itop.TopologyManager(model, opt, update_every=3, total_steps=100, growth=growth)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # gradient growth must find captured gradients
        assert _train_steps(compiled, model, opt, mgr, 7, x) == 2
        frames = counter.frame_count
        assert frames == (2 if growth == "gradient" else 1)
        assert _train_steps(compiled, model, opt, mgr, 9, x) == 3
    assert counter.frame_count == frames   # no recompile from the later updates


def test_compiled_capture_gives_the_eager_gradient_scores():
    torch.manual_seed(0)
    model = itop.sparsify(nn.Sequential(nn.Linear(32, 32), nn.ReLU(inplace=True),
                                        nn.Linear(32, 16)), 0.5, block_size=8)
    twin = copy.deepcopy(model)
    x = torch.randn(8, 32)
    for m in (model, twin):
        for layer in m.modules():
            if isinstance(layer, itop.SparseLayer):
                layer._start_capture()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).square().mean().backward()
    twin(x).square().mean().backward()
    for a, b in ((model[0], twin[0]), (model[2], twin[2])):
        assert len(a._captured) == 1
        torch.testing.assert_close(a._grad_scores(), b._grad_scores())


def test_compile_matches_eager_on_a_sparse_cnn():
    """inductor (CPU) for inference, channels-last input included; aot_eager (the same
    autograd graphs, without inductor's slow CPU code generation) for a training step."""
    model = _sparse_cnn(16).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    xc = x.to(memory_format=torch.channels_last)
    y, ref = compiled(xc), model(xc)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    params = [m.values for m in model.modules() if isinstance(m, itop.SparseLayer)]
    assert len(params) == 2
    g = torch.autograd.grad(y.square().sum(), params)
    g_ref = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_resnet18_compiles_whole():
    """The paper ResNet-18 (block 16; the 3-channel stem stays dense): one graph, no break."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # the stem is left dense, with a warning
        model = itop.sparsify(build_model("resnet-18", (3, 16, 16), 10), 0.1, block_size=16)
    x = torch.randn(2, 3, 16, 16)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    torch._dynamo.reset()


# --------------------------------------------------------------------------- torch.export
def test_export_for_inference_matches_eager():
    model = _sparse_cnn(16).eval()
    x = torch.randn(2, 16, 8, 8)
    ep = torch.export.export(model, (x,))
    x2 = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(ep.module()(x2), model(x2), rtol=1e-6, atol=1e-6)
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("itop_kernels.bsc_forward" in t for t in names)


# --------------------------------------------------------------------------- attention
def _mha_cases(E, H, bf):
    N, L, S = 3, 5, 6
    shp = (lambda n: (N, n, E)) if bf else (lambda n: (n, N, E))
    q, kv = torch.randn(*shp(L), dtype=torch.float64), torch.randn(*shp(S), dtype=torch.float64)
    pad = torch.rand(N, S) < 0.3
    pad[:, 0] = False
    bool_mask = torch.rand(L, S) < 0.3
    bool_mask[:, 0] = False
    float_mask = torch.randn(N * H, L, S, dtype=torch.float64)
    for self_attn, kpm, am, need, avg in itertools.product(
            [True, False], [None, pad], [None, bool_mask, float_mask], [True, False],
            [True, False]):
        if self_attn:   # query is key is value: masks over L keys
            args = (q, q, q)
            kpm = None if kpm is None else kpm[:, :L]
            am = None if am is None else am[..., :L]
        else:
            args = (q, kv, kv)
        yield args, dict(key_padding_mask=kpm, need_weights=need, attn_mask=am,
                         average_attn_weights=avg)


@pytest.mark.parametrize("batch_first", [False, True])
def test_sparse_multihead_attention_matches_nn_multihead_attention(batch_first):
    torch.manual_seed(0)
    E, H = 32, 4
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64)
    sparse = itop.SparseMultiheadAttention.from_dense(mha, density=0.5, block_size=8)
    assert isinstance(sparse.in_proj, itop.SparseLinear) and sparse.in_proj.density == 0.5
    ref = itop.densify(copy.deepcopy(sparse))
    assert type(ref) is nn.MultiheadAttention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch warns on mixed bool/float masks
        for args, kw in _mha_cases(E, H, batch_first):
            y, w = sparse(*args, **kw)
            y_ref, w_ref = ref(*args, **kw)
            torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
            assert (w is None) == (w_ref is None)
            if w is not None:
                torch.testing.assert_close(w, w_ref, rtol=1e-9, atol=1e-12)
    L = 5
    q = torch.randn(3, L, E, dtype=torch.float64)
    if not batch_first:
        q = q.transpose(0, 1)
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    y, _ = sparse(q, q, q, attn_mask=causal, is_causal=True, need_weights=False)
    y_ref, _ = ref(q, q, q, attn_mask=causal, is_causal=True, need_weights=False)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    u = torch.randn(L, E, dtype=torch.float64)           # unbatched
    (y, w), (y_ref, w_ref) = sparse(u, u, u), ref(u, u, u)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(w, w_ref)
    # with its density-1 pieces dense, it is nn.MultiheadAttention itself
    full = itop.SparseMultiheadAttention.from_dense(mha, density=1.0)
    assert type(full.in_proj) is nn.Linear
    torch.testing.assert_close(full(u, u, u)[0], mha(u, u, u)[0])


def test_transformer_encoder_is_sparsified_listed_and_trains():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True,
                                       dropout=0.0)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True),
                          nn.Linear(32, 8))
    dense_summary = itop.sparsity_summary(model)
    # the attention projections are listed while dense: overall density is honest
    assert "0.layers.0.self_attn.in_proj" in {r["name"] for r in dense_summary}
    model = itop.sparsify(model, 0.3, block_size=8)
    attn = model[0].layers[0].self_attn
    assert isinstance(attn, itop.SparseMultiheadAttention)
    summary = itop.sparsity_summary(model)
    names = {r["name"] for r in summary}
    assert {"0.layers.0.self_attn.in_proj", "0.layers.1.self_attn.out_proj"} <= names
    assert all(r["block_size"] == 8 for r in summary)
    assert summary.overall_density == pytest.approx(0.3, abs=0.02)
    x = torch.randn(2, 6, 32)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    dense = itop.densify(copy.deepcopy(model)).eval()
    model.eval()
    with torch.no_grad():   # eval + no_grad + padding mask: where torch takes its fast path
        y = model[0](x, src_key_padding_mask=pad)
        y_ref = dense[0](x, src_key_padding_mask=pad)
    keep = ~pad
    torch.testing.assert_close(y[keep], y_ref[keep], rtol=1e-4, atol=1e-5)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=10)
    assert {n for n, _ in mgr.layers} >= {"0.layers.0.self_attn.in_proj",
                                          "0.layers.0.self_attn.out_proj"}
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert mgr.step()
    assert attn.in_proj.values.grad is not None


def test_excluding_out_proj_keeps_it_dense_inside_sparse_attention():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True))
    model = itop.sparsify(model, 0.3, block_size=8, exclude=["0.self_attn.out_proj"])
    attn = model[0].self_attn
    assert isinstance(attn.in_proj, itop.SparseLinear) and type(attn.out_proj) is nn.Linear
    x = torch.randn(2, 5, 32)
    dense = itop.densify(copy.deepcopy(model))
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-6)


def test_unsupported_attention_and_weight_layers_are_named_and_listed():
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.cross = nn.MultiheadAttention(32, 4, kdim=16, vdim=16)
            self.conv1d = nn.Conv1d(32, 32, 3)
            self.fc = nn.Linear(32, 32)
            self.emb = nn.Embedding(100, 32)

    with pytest.warns(UserWarning) as rec:
        model = itop.sparsify(M(), 0.5, block_size=8)
    msg = " ".join(str(w.message) for w in rec)
    assert "cross (kdim/vdim differ from embed_dim)" in msg and "conv1d (Conv1d" in msg
    assert "emb (" not in msg
    assert type(model.cross) is nn.MultiheadAttention
    rows = {r["name"]: r for r in itop.sparsity_summary(model)}
    assert rows["conv1d"]["density"] == 1.0 and rows["conv1d"]["shape"] == (32, 32, 3)
    assert "emb" not in rows and rows["fc"]["block_size"] == 8
    assert rows["cross.k_proj_weight"]["shape"] == (32, 16)


# --------------------------------------------------------------------------- pretrained
def test_sparsify_magnitude_init_keeps_the_largest_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():                  # "pretrained": a few blocks much larger
        for lin in (model[0], model[2]):
            lin.weight.mul_(0.01)
            lin.weight[:8, 8:16] += 1.0
            lin.weight[8:16, :8] -= 2.0
    ref = copy.deepcopy(model)
    itop.sparsify(model, 0.25, distribution="uniform", block_size=8, init="magnitude")
    for sparse, dense in ((model[0], ref[0]), (model[2], ref[2])):
        assert sparse.block_mask[0, 1] and sparse.block_mask[1, 0]
        expect = itop.SparseLinear.from_dense(dense, density=sparse.density, block_size=8,
                                              init="magnitude")
        assert torch.equal(sparse.block_mask, expect.block_mask)
        norms = dense.weight.reshape(-1, 8, dense.in_features // 8, 8).square().sum((1, 3))
        kept, dropped = norms[sparse.block_mask], norms[~sparse.block_mask]
        assert kept.min() >= dropped.max()
    with pytest.raises(ValueError, match="init"):
        itop.sparsify(ref, 0.25, init="largest")
