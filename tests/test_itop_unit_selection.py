"""itop.unit_selection: exact top-k with the threshold pre-filter, uniform random inactive units,
and the topology-update paths built on them (O(nnz) layout rebuild, score precision)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import itop
from itop import unit_selection
from itop.unit_selection import random_inactive, topk_indices
from itop_kernels import BlockLayout

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_selection(key, got, k, largest):
    """``got`` is a valid top-k of ``key``: k distinct positions whose values are the k
    extreme values (ties may be broken either way)."""
    assert got.dtype == torch.int64 and got.numel() == k
    assert got.unique().numel() == k
    ref = torch.topk(key, k, largest=largest).values
    assert torch.equal(key[got].sort().values, ref.sort().values)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300_000), frac=st.floats(0.0, 1.0), largest=st.booleans(),
       ties=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_topk_indices_is_exact(n, frac, largest, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    key = torch.randn(n, generator=gen)
    if ties:  # few distinct values: the k-th value is tied with many others
        key = key.mul(3).round()
    k = int(frac * n)
    _same_selection(key, topk_indices(key, k, largest=largest), k, largest)


def test_topk_indices_prefilter_runs_and_falls_back(monkeypatch):
    calls = {"full": 0}
    real_topk = torch.topk

    def counting_topk(x, k, *a, **kw):
        if x.numel() == n:
            calls["full"] += 1
        return real_topk(x, k, *a, **kw)

    n, k = 1 << 18, 500
    monkeypatch.setattr(unit_selection.torch, "topk", counting_topk)
    key = torch.rand(n, generator=torch.Generator().manual_seed(0))
    got = topk_indices(key, k)
    assert calls["full"] == 0                    # candidates only, no top-k over the key
    _same_selection(key, got, k, True)
    # adversarial: the strided sample holds the largest values of the key, so its threshold
    # lets fewer than k entries through and the exact full top-k must take over
    stride = n // unit_selection._SAMPLE
    key = torch.rand(n, generator=torch.Generator().manual_seed(1))
    key[::stride] = 2.0 + torch.arange(key[::stride].numel(), dtype=torch.float32)
    calls["full"] = 0
    got = topk_indices(key, k)
    assert calls["full"] == 1                    # the threshold let too few through
    _same_selection(key, got, k, True)
    with pytest.raises(ValueError, match="k must be"):
        topk_indices(key, n + 1)


@settings(max_examples=40, deadline=None)
@given(grid=st.sampled_from([(300, 300), (512, 256), (40, 40), (1, 70_000)]),
       density=st.floats(0.0, 0.6), kfrac=st.floats(0.0, 1.0), seed=st.integers(0, 10 ** 6))
def test_random_inactive_gives_k_distinct_inactive_units(grid, density, kfrac, seed):
    gen = torch.Generator().manual_seed(seed)
    U = grid[0] * grid[1]
    mask = torch.rand(U, generator=gen) < density
    k = int(kfrac * min(U - int(mask.sum()), 20_000))
    got = random_inactive(mask, k, gen)
    assert got.dtype == torch.int64 and got.numel() == k
    assert got.unique().numel() == k
    assert not mask[got].any() and (got >= 0).all() and (got < U).all()


@pytest.mark.parametrize("sampled", [True, False])
def test_random_inactive_is_uniform(monkeypatch, sampled):
    """Each inactive unit is drawn with probability k/free: a chi-square test over many draws,
    through the rank-sampling path and through the per-unit-score path."""
    if sampled:
        monkeypatch.setattr(unit_selection, "_SELECT_MIN", 0)
    U = 400
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(U, dtype=torch.bool)
    mask[torch.randperm(U, generator=gen)[:100]] = True
    free, k, draws = U - 100, 30, 4000
    counts = torch.zeros(U)
    for _ in range(draws):
        counts[random_inactive(mask, k, gen)] += 1
    assert counts[mask].sum() == 0
    expected = draws * k / free
    chi2 = float(((counts[~mask] - expected) ** 2 / expected).sum())
    # free-1 = 299 degrees of freedom: mean 299, sd ~24.5; 420 is ~5 sd
    assert chi2 < 420, chi2
    assert chi2 > 200, chi2  # not suspiciously even either


def test_random_inactive_rejects_too_many():
    with pytest.raises(ValueError, match="k must be"):
        random_inactive(torch.arange(1 << 17) < 100_000, 40_000, torch.Generator())


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 40), C=st.integers(1, 40), density=st.floats(0, 1),
       seed=st.integers(0, 10 ** 6))
def test_layout_from_positions_matches_from_mask(R, C, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(R, C, generator=gen) < density
    ref = BlockLayout.from_mask(mask, 4)
    got = BlockLayout.from_positions(mask.reshape(-1).nonzero().squeeze(1), (R, C), 4)
    assert got.nnz == ref.nnz and torch.equal(got.block_mask, mask)
    for name in ("row_ptr", "col_idx", "row_idx", "col_ptr", "t_row_idx", "t_block_idx"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert torch.equal(got.flat_positions(), mask.reshape(-1).nonzero().squeeze(1))


def test_layout_keeps_its_own_positions():
    mask = torch.tensor([[True, False, True], [False, True, False]])
    pos = mask.reshape(-1).nonzero().squeeze(1)
    lay = BlockLayout.from_positions(pos, (2, 3), 8)
    pos[0] = 5  # the caller's tensor changes; the layout's must not
    assert lay.flat_positions().tolist() == [0, 2, 4]
    assert BlockLayout.from_mask(mask, 8).flat_positions().tolist() == [0, 2, 4]


def test_layout_from_positions_rejects_bad_positions():
    with pytest.raises(ValueError, match="ascending"):
        BlockLayout.from_positions(torch.tensor([3, 1]), (2, 2), 4)
    with pytest.raises(ValueError, match="ascending"):
        BlockLayout.from_positions(torch.tensor([0, 4]), (2, 2), 4)
    with pytest.raises(TypeError, match="positions"):
        BlockLayout.from_positions(torch.tensor([0.0]), (2, 2), 4)


# --------------------------------------------------------------------------- through the manager
def _bench_like_model(bs, width=256, density=0.05):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))
    itop.sparsify(model, density, block_size=bs, distribution="uniform", exclude=["4"])
    return model


@pytest.mark.parametrize("growth", ["random", "gradient", "random_unfired", "momentum"])
def test_large_block1_updates_take_the_sampled_paths_and_stay_exact(monkeypatch, growth):
    """A 256² block-1 layer has 65536 units: the update goes through the threshold top-k and the
    rank sampling (asserted: no torch.topk over a whole grid), keeps nnz and zero-init exact."""
    real_topk = torch.topk
    grid_topks = []

    def watch(x, k, *a, **kw):
        if x.numel() >= 65536:
            grid_topks.append(x.numel())
        return real_topk(x, k, *a, **kw)

    monkeypatch.setattr(unit_selection.torch, "topk", watch)
    model = _bench_like_model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=1000, prune_rate=0.3,
                               growth=growth)
    layers = [model[0], model[2]]
    nnz = [m.nnz for m in layers]
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    for step in range(1, 7):
        before = [m.block_mask.clone() for m in layers]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        changed = mgr.step()
        assert changed == (step % 2 == 0)
        for m, n, old in zip(layers, nnz, before):
            assert int(m.block_mask.sum()) == m.nnz == n == m.layout.nnz
            assert torch.equal(m.layout.block_mask, m.block_mask)
            if changed:
                fresh = m.block_mask & ~old
                k = math.ceil(mgr.prune_rate_at(step) * n)
                assert int(fresh.sum()) == k
                w = m.dense_weight().detach()
                mom = m.layout.scatter(opt.state[m.values]["momentum_buffer"])
                assert (w[fresh] == 0).all() and (mom[fresh] == 0).all()
    assert grid_topks == []


def test_score_precision_is_validated_and_reaches_the_block_norms(monkeypatch):
    import itop.layers as layers_mod
    model = _bench_like_model(32, width=64, density=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="score_precision"):
        itop.TopologyManager(model, opt, update_every=1, total_steps=10, score_precision="fp8")
    seen = []
    real = layers_mod.block_grad_norms

    def spy(x, dy, bs, *, precision="exact"):
        seen.append(precision)
        return real(x, dy, bs, precision=precision)

    real_group = layers_mod.block_grad_norms_group

    def spy_group(xs, dys, bs, *, precision="exact"):   # layers of one shape, scored together
        seen.extend([precision] * len(xs))
        return real_group(xs, dys, bs, precision=precision)

    monkeypatch.setattr(layers_mod, "block_grad_norms", spy)
    monkeypatch.setattr(layers_mod, "block_grad_norms_group", spy_group)
    for precision in ("auto", "exact", "bf16"):
        mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=10,
                                   score_precision=precision)
        loss = F.cross_entropy(model(torch.randn(8, 64)), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert mgr.step()
        mgr.close()
        assert seen[-2:] == [precision, precision]  # both sparse layers
