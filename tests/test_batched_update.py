"""Topology updates batched across layers of the same shape (issue 14: the ops of an update grow
with the number of shape groups, not of layers; ``itop.topology._BATCH_LAYERS``).

On the CPU the batched path must train BIT FOR BIT like the per-layer path (masks, every layout
tensor, values, gradients, optimizer state, fired masks, losses, the manager's generator) for
magnitude pruning with random, gradient and momentum growth, on a model with repeated linear
and conv shapes interleaved as in GPT-2 plus layers without a twin (per-layer path).

Random growth draws the uniform scores of all grouped layers with one ``torch.rand`` in layer
order, before the layers without a twin draw theirs: where such a layer comes first, the draws
differ from the per-layer path's. Tested here: the choices stay exact (k distinct units inactive
before the update, k smallest magnitudes pruned), seeded, and uniform.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import itop
from itop import storage, topology
from itop.layers import SparseLayer
from training_state import LAYOUT_TENSORS, assert_same_state, training_state



class Repeated(nn.Module):
    """conv 3×3 16→16 ×3 (one group; ``stem_twin=False``: the first one 8→16, without a twin),
    pooled, then 3 blocks of GPT-2's four linear shapes at d = 16 (QKV 16→48, proj 16→16,
    fc 16→32, fc2 32→16: four groups of three, interleaved) and a 16→12 head (no twin), of
    which 10 logits are used."""

    def __init__(self, stem_twin: bool = True):
        super().__init__()
        cin = 16 if stem_twin else 8
        self.convs = nn.ModuleList([nn.Conv2d(cin, 16, 3, padding=1),
                                    nn.Conv2d(16, 16, 3, padding=1),
                                    nn.Conv2d(16, 16, 3, padding=1)])
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "qkv": nn.Linear(16, 48), "proj": nn.Linear(16, 16), "fc": nn.Linear(16, 32),
            "fc2": nn.Linear(32, 16)}) for _ in range(3))
        self.head = nn.Linear(16, 12)
        self.cin = cin

    def forward(self, x):
        h = x[:, :self.cin]
        for c in self.convs:
            h = torch.relu(c(h))
        h = h.mean((2, 3))
        for b in self.blocks:
            q, k, v = b["qkv"](h).split(16, dim=-1)
            h = h + b["proj"](torch.tanh(q * k) * v)
            h = h + b["fc2"](torch.relu(b["fc"](h)))
        return self.head(h)[:, :10]


def _model(stem_twin=True):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return itop.sparsify(Repeated(stem_twin), 0.3, block_size=4, distribution="uniform")


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 16, 4, 4, generator=g), torch.randint(0, 10, (4,), generator=g)


def _run(batch_layers, optimizer, growth, monkeypatch, *, prune="magnitude", stem_twin=True,
         steps=11, seed=0):
    monkeypatch.setattr(topology, "_BATCH_LAYERS", batch_layers)
    calls = []
    group = SparseLayer._apply_topology_group

    def spy(layers, *a, **kw):
        calls.append(len(layers))
        return group(layers, *a, **kw)

    monkeypatch.setattr(SparseLayer, "_apply_topology_group", staticmethod(spy))
    model = _model(stem_twin)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-2))
    mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=40, prune_rate=0.5,
                               growth=growth, prune=prune, seed=seed)
    losses = []
    for i in range(steps):
        x, y = _batch(i)
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        mgr.step()
        losses.append(loss.detach())
    monkeypatch.setattr(topology, "_BATCH_LAYERS", True)
    monkeypatch.setattr(SparseLayer, "_apply_topology_group", group)
    return model, opt, mgr, torch.stack(losses), calls




@pytest.mark.parametrize("optimizer,growth,prune,state_move", [
    ("sgd", "random", "magnitude", "auto"), ("adamw", "random", "magnitude", "auto"),
    ("sgd", "gradient", "magnitude", "auto"), ("adamw", "gradient", "magnitude_l2", "auto"),
    ("sgd", "momentum", "magnitude", "auto"), ("adamw", "momentum", "magnitude", "auto"),
    ("adamw", "random_unfired", "magnitude", "auto"), ("sgd", "gradient", "magnitude",
                                                        "per_tensor")])
def test_batched_update_matches_per_layer_bit_for_bit(optimizer, growth, prune, state_move,
                                                      monkeypatch):
    monkeypatch.setattr(storage, "_STATE_MOVE", state_move)
    m_ref, o_ref, g_ref, l_ref, calls_ref = _run(False, optimizer, growth, monkeypatch,
                                                 prune=prune)
    m_new, o_new, g_new, l_new, calls = _run(True, optimizer, growth, monkeypatch, prune=prune)
    assert calls_ref == []
    # five updates, each with the conv group and the four linear groups of three
    assert calls == [3] * 25, calls
    assert any(not torch.equal(g_new.fired[n], m.block_mask) for n, m in g_new.layers)
    assert torch.equal(l_new, l_ref)
    assert_same_state(training_state(m_new, o_new, g_new), training_state(m_ref, o_ref, g_ref))


def test_the_comparison_sees_a_wrong_batched_move(monkeypatch):
    """The check can fail: a batched move that keeps the optimizer state of new units."""
    m_ref, o_ref, g_ref, _, _ = _run(False, "adamw", "random", monkeypatch)
    move = storage._move_rows_group
    monkeypatch.setattr(storage, "_move_rows_group",
                        lambda gs, order, keep: move([g[:1] for g in gs], order, keep) or
                        move([g[1:] for g in gs], order, torch.ones_like(keep)))
    m_new, o_new, g_new, _, _ = _run(True, "adamw", "random", monkeypatch)
    with pytest.raises(AssertionError):
        assert_same_state(training_state(m_new, o_new, g_new), training_state(m_ref, o_ref, g_ref))


def test_batched_topk_selects_per_row_as_the_1d_topk():
    """What the bit-for-bit claim rests on: on the CPU a ``topk`` over the rows of a ``[G, n]``
    key returns, row by row, the indices (order included) of the 1-D ``topk`` of that row,
    ties (pruned-to-zero blocks, a NaN mapped to the lowest value) included."""
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        G, n = 2 + trial % 11, 2 + int(torch.randint(2000, (1,), generator=g))
        k = 1 + int(torch.randint(n - 1, (1,), generator=g))
        x = torch.randn(G, n, generator=g)
        if trial % 3 == 0:
            x = (2 * x).round()
        elif trial % 3 == 1:
            x[:, : n // 2] = 0
        for largest in (True, False):
            rows = torch.topk(x, k, dim=1, largest=largest, sorted=False).indices
            for r in range(G):
                assert torch.equal(rows[r], torch.topk(x[r].clone(), k, largest=largest,
                                                       sorted=False).indices)


def test_one_draw_for_all_layers_is_the_per_layer_stream_on_the_cpu():
    """One ``torch.rand(sum n)`` on a CPU generator gives the draws (and the generator state) of
    the per-layer ``torch.rand(n)`` calls in a row."""
    sizes = [48, 16, 32, 32, 48, 16]
    a = torch.Generator().manual_seed(5)
    per_layer = torch.cat([torch.rand(n, generator=a) for n in sizes])
    b = torch.Generator().manual_seed(5)
    assert torch.equal(torch.rand(sum(sizes), generator=b), per_layer)
    assert torch.equal(a.get_state(), b.get_state())


def test_a_singleton_drawing_first_changes_the_draws_not_the_rules(monkeypatch):
    """With a layer without a twin first (it draws after the groups), random growth draws other
    units than the per-layer path, but every update still prunes each layer's k smallest
    magnitudes and grows k distinct units that were inactive, at zero, with zero state; the
    result is seeded (a second run is identical)."""
    _, _, g_ref, _, _ = _run(False, "sgd", "random", monkeypatch, stem_twin=False)
    model, opt, mgr, _, calls = _run(True, "sgd", "random", monkeypatch, stem_twin=False)
    assert calls[:5] == [2, 3, 3, 3, 3]   # the two conv twins, the four linear groups
    assert any(not torch.equal(mgr.fired[n], g_ref.fired[n]) for n, _ in mgr.layers)
    m2, o2, g2, _, _ = _run(True, "sgd", "random", monkeypatch, stem_twin=False)
    assert_same_state(training_state(model, opt, mgr), training_state(m2, o2, g2))
    # one more update by hand, checked against the rules
    before = {n: (m.block_mask.clone(), m.values.detach().clone(),
                  tuple(t.clone() for t in m._active_units(1))) for n, m in mgr.layers}
    mgr.step_count = 11
    assert mgr._update(12)
    k_rate = mgr.prune_rate_at(12)
    for n, m in mgr.layers:
        old, vals, (pos, mag) = before[n]
        new = m.block_mask
        k = min(math.ceil(k_rate * m.nnz), m.num_units - m.nnz)
        assert int(new.sum()) == m.nnz == int(old.sum())
        grown = new & ~old
        gone = old & ~new
        assert int(grown.sum()) == int(gone.sum()) == k
        gone_pos = gone.reshape(-1).nonzero().squeeze(1)
        kept_mag = mag[torch.isin(pos, gone_pos, invert=True)]
        assert mag[torch.isin(pos, gone_pos)].max() <= kept_mag.min()
        new_pos = m.layout.flat_positions()
        fresh = torch.isin(new_pos, grown.reshape(-1).nonzero().squeeze(1))
        assert torch.all(m.values.detach()[fresh] == 0)
        assert torch.all(opt.state[m.values]["momentum_buffer"][fresh] == 0)


def test_batched_random_growth_is_uniform_over_inactive_units(monkeypatch):
    """Over 400 draws of one group's growth choice, every inactive unit is grown about equally
    often (chi-square over the inactive units of the QKV group), never an active one, and each
    draw has k distinct units per layer."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=40, prune_rate=0.5,
                               growth="random")
    idxs = [i for i, (n, _) in enumerate(mgr.layers) if n.endswith("qkv")]
    ms = [mgr.layers[i][1] for i in idxs]
    k = 3
    ks = [k if i in idxs else 0 for i in range(len(mgr.layers))]
    groups, singles = mgr._batch_plan(ks, [None] * len(mgr.layers))
    assert groups == [idxs] and singles == []
    counts = torch.zeros(len(ms), ms[0].num_units)
    trials = 400
    for _ in range(trials):
        (_, _, _, add), = mgr._group_choices(groups, ks, [None] * len(mgr.layers), 1)
        assert add.shape == (len(ms), k)
        for g, m in enumerate(ms):
            assert add[g].unique().numel() == k
            assert not m.block_mask.reshape(-1)[add[g]].any()
            counts[g, add[g]] += 1
    for g, m in enumerate(ms):
        c = counts[g][~m.block_mask.reshape(-1)]
        expected = trials * k / c.numel()
        chi2 = float(((c - expected) ** 2 / expected).sum())
        dof = c.numel() - 1          # 33 inactive units: the 1e-4 quantile is about 72
        assert chi2 < 72, (chi2, dof)


def test_groups_follow_shape_nnz_and_k(monkeypatch):
    """Layers group by (grid, block size, nnz, k, values shape, dtype, device, scores or not);
    a layer whose k differs, or a frozen one, takes the per-layer path."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=40, growth="random")
    names = [n for n, _ in mgr.layers]
    ks = [2] * len(names)
    groups, singles = mgr._batch_plan(ks, [None] * len(names))
    assert sorted(len(g) for g in groups) == [3] * 5
    assert [names[i] for i in singles] == ["head"]
    ks[names.index("blocks.1.fc")] = 1
    groups, singles = mgr._batch_plan(ks, [None] * len(names))
    assert [names[i] for i in singles] == ["blocks.1.fc", "head"]
    monkeypatch.setattr(topology, "_BATCH_LAYERS", False)
    assert mgr._batch_plan(ks, [None] * len(names)) == ([], list(range(len(names))))


def _twins(device):
    """Three SparseLinear 64→64 (block 16, density 0.5: one group) and a 64→32 (no twin)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return itop.sparsify(model, 0.5, block_size=16, distribution="uniform").to(device)


def _twin_update(device, growth, monkeypatch):
    model = _twins(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=40, growth=growth)
    calls = []
    group = SparseLayer._apply_topology_group
    monkeypatch.setattr(SparseLayer, "_apply_topology_group",
                        staticmethod(lambda ls, *a, **kw: calls.append(len(ls)) or
                                     group(ls, *a, **kw)))
    x = torch.randn(8, 64, device=device)

    def step():
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()
    for _ in range(3):        # one update already (caches built), then the armed step
        step()
        mgr.step()
    step()
    return mgr, calls


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_batched_update_makes_no_host_sync(growth, monkeypatch):
    from host_syncs import HostSyncRecorder
    mgr, calls = _twin_update("cpu", growth, monkeypatch)
    with HostSyncRecorder() as rec:
        assert mgr.step()
    assert calls == [3, 3]
    assert not rec.syncs, "host syncs in a batched topology update:\n" + rec.report()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_batched_update_sync_free_on_gpu(growth, monkeypatch):
    mgr, calls = _twin_update("cuda", growth, monkeypatch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert mgr.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert calls == [3, 3]
    for _, m in mgr.layers:
        assert int(m.block_mask.sum()) == m.nnz == m.layout.nnz
        assert torch.equal(m.layout.flat_positions(), m.block_mask.reshape(-1).nonzero()[:, 0])


def _twin_run(device, batch_layers, monkeypatch, updates=4):
    """``updates`` RigL updates of :func:`_twins` on ``device`` (gradient growth, AdamW), with
    the batched path on or off; the masks, layouts and values after them."""
    monkeypatch.setattr(topology, "_BATCH_LAYERS", batch_layers)
    model = _twins(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=40, growth="gradient",
                               prune_rate=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(2 * updates):
        x = torch.randn(8, 64, generator=g).to(device)
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()
        mgr.step()
    monkeypatch.setattr(topology, "_BATCH_LAYERS", True)
    out = {}
    for name, m in mgr.layers:
        for t in LAYOUT_TENSORS:
            out[f"{name}.{t}"] = getattr(m.layout, t).cpu()
        out[f"{name}.values"] = m.values.detach().cpu()
        out[f"{name}.fired"] = mgr.fired[name].cpu()
    return out


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA GPU"))])
def test_batched_update_matches_per_layer_on_the_device(device, monkeypatch):
    """The batched ops on the device (stacked magnitudes, row-wise ``topk``, ``scatter_``,
    ``sort(dim=1)``, batched layout rebuild, ``_foreach_copy_``) choose and move exactly what the
    per-layer path does: gradient growth and magnitude pruning over continuous random values
    leave no ties, so masks, layouts, values and fired masks must be equal."""
    new = _twin_run(device, True, monkeypatch)
    ref = _twin_run(device, False, monkeypatch)
    assert_same_state(new, ref)
    assert any(not torch.equal(new[k], new[k.replace(".fired", ".block_mask")])
               for k in new if k.endswith(".fired"))   # the topology did move
