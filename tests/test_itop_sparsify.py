"""Density distributions (ERK/ER/uniform), sparsify/densify and the density summary."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import itop
from itop import er_densities, erk_densities, uniform_densities


# Tiny matrices: one intra-op thread avoids thread-pool contention (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- distributions
def test_erk_worked_example_no_dense_layer():
    shapes = [(64, 32), (128, 64, 3, 3), (10, 128)]
    density = 0.02
    n = [64 * 32, 128 * 64 * 9, 10 * 128]
    # RigL: p_i = sum(shape) / prod(shape); eps = density * sum(n) / sum(p_i n_i)
    p = [(64 + 32) / (64 * 32), (128 + 64 + 3 + 3) / (128 * 64 * 9), (10 + 128) / (10 * 128)]
    eps = density * sum(n) / sum(pi * ni for pi, ni in zip(p, n))
    expected = [eps * pi for pi in p]
    assert max(expected) < 1.0  # the example must not trigger the dense rule
    got = erk_densities(shapes, density)
    assert got == pytest.approx(expected, rel=1e-12)
    assert sum(d * m for d, m in zip(got, n)) == pytest.approx(density * sum(n), rel=1e-12)


def test_erk_worked_example_with_dense_layer():
    # Layer 2 (10 x 1000) has p = 1010/10000 = 0.101, layer 1 (1000 x 1000) p = 0.002.
    # First pass: eps = 0.5*1010000 / (0.002*1e6 + 0.101*1e4) = 505000/3010 -> p2*eps ~ 16.9 > 1,
    # so layer 2 becomes dense and eps = (0.5*1e6 - 0.5*1e4) / (0.002*1e6) = 247.5,
    # giving layer 1 density 0.002 * 247.5 = 0.495.
    got = erk_densities([(1000, 1000), (10, 1000)], 0.5)
    assert got[1] == 1.0
    assert got[0] == pytest.approx(0.495, rel=1e-12)
    assert got[0] * 1e6 + 1e4 == pytest.approx(0.5 * 1010000, rel=1e-12)


def test_er_ignores_kernel_dims_erk_uses_them():
    shapes = [(32, 16, 3, 3), (32, 16, 1, 1)]
    er = er_densities(shapes, 0.2)
    erk = erk_densities(shapes, 0.2)
    # ER: both layers have the same (out, in), hence the same density
    assert er[0] == pytest.approx(er[1])
    # ERK: the 1x1 conv has a larger sum/prod ratio, hence a larger density
    assert erk[1] > erk[0]
    assert uniform_densities(shapes, 0.2) == [0.2, 0.2]


@pytest.mark.parametrize("dist", ["erk", "er"])
@pytest.mark.parametrize("power", [0.5, 2.0])
def test_power_scale_raises_the_raw_probabilities(dist, power):
    """RigL's ``power_scale``: ``d_i = eps * p_i ** power``, ``eps`` solved for the density."""
    shapes = [(64, 32), (128, 64, 3, 3), (10, 128)]
    density = 0.02
    n = [math.prod(s) for s in shapes]
    dims = shapes if dist == "erk" else [s[:2] for s in shapes]
    p = [(sum(d) / math.prod(d)) ** power for d in dims]
    eps = density * sum(n) / sum(pi * ni for pi, ni in zip(p, n))
    expected = [eps * pi for pi in p]
    assert max(expected) < 1.0  # the example must not trigger the dense rule
    fn = erk_densities if dist == "erk" else er_densities
    got = fn(shapes, density, power_scale=power)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got != pytest.approx(fn(shapes, density), rel=1e-3)  # the exponent matters
    # a power above 1 widens the spread between the sparsest and densest layer, below 1 narrows it
    spread = max(got) / min(got)
    plain = fn(shapes, density)
    assert (spread > max(plain) / min(plain)) == (power > 1)


@pytest.mark.parametrize("fn", [erk_densities, er_densities])
def test_power_scale_keeps_the_density_exact_with_dense_layers(fn):
    shapes = [(1000, 1000), (10, 1000), (50, 1000)]
    for power in (0.5, 1.0, 1.5):
        got = fn(shapes, 0.5, power_scale=power)
        n = [math.prod(s) for s in shapes]
        assert got[1] == 1.0 and all(0.0 < d <= 1.0 for d in got)
        assert sum(d * m for d, m in zip(got, n)) == pytest.approx(0.5 * sum(n), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300),
                                 st.sampled_from([1, 3, 5])), min_size=1, max_size=6),
       density=st.floats(0.01, 1.0), dist=st.sampled_from(["erk", "er", "uniform"]))
def test_distributions_keep_overall_density_exact(shapes, density, dist):
    shapes = [(o, i, k, k) if k > 1 else (o, i) for o, i, k in shapes]
    fn = {"erk": erk_densities, "er": er_densities, "uniform": uniform_densities}[dist]
    ds = fn(shapes, density)
    n = [math.prod(s) for s in shapes]
    assert all(0.0 < d <= 1.0 for d in ds)
    assert sum(d * m for d, m in zip(ds, n)) == pytest.approx(density * sum(n), rel=1e-9)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_density_out_of_range(bad):
    with pytest.raises(ValueError, match="density"):
        erk_densities([(4, 4)], bad)
    with pytest.raises(ValueError, match="density"):
        itop.sparsify(nn.Linear(32, 32), bad, block_size=16)


def test_density_wrong_type():
    with pytest.raises(TypeError, match="density"):
        uniform_densities([(4, 4)], "0.5")


# --------------------------------------------------------------------------- sparsify
def _mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 16))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 16))


def test_sparsify_mlp_exact_nnz_and_outputs_match_densify():
    torch.manual_seed(0)
    model = _mlp()
    sm = itop.sparsify(model, 0.25, block_size=16, distribution="erk")
    assert sm is model
    shapes = [(128, 64), (64, 128), (16, 64)]
    ds = erk_densities(shapes, 0.25)
    layers = [m for m in model if isinstance(m, itop.SparseLinear)]
    assert len(layers) == 3
    for layer, s, d in zip(layers, shapes, ds):
        units = (s[0] // 16) * (s[1] // 16)
        assert layer.nnz == max(1, round(d * units))
        assert int(layer.block_mask.sum()) == layer.nnz
        assert layer.values.shape == (layer.nnz, 16, 16)
    x = torch.randn(5, 64)
    y = model(x)
    dense = itop.densify(model)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in dense)
    torch.testing.assert_close(dense(x), y, rtol=1e-5, atol=1e-6)


def test_sparsify_keeps_dense_weights_at_active_blocks():
    torch.manual_seed(1)
    lin = nn.Linear(32, 48)
    w = lin.weight.detach().clone()
    sl = itop.sparsify(lin, 0.5, block_size=16, distribution="uniform")
    assert isinstance(sl, itop.SparseLinear)
    mask = sl.block_mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
    torch.testing.assert_close(sl.dense_weight().detach(), w * mask, rtol=0, atol=0)


def test_sparsify_exclude_by_name_and_type_and_dense_first():
    model = _mlp()
    itop.sparsify(model, 0.3, block_size=16, exclude=["2"])
    assert isinstance(model[0], itop.SparseLinear) and type(model[2]) is nn.Linear
    model = nn.Sequential(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)), nn.Linear(32, 32))
    itop.sparsify(model, 0.3, block_size=16, exclude=["0"])  # a name covers its children
    assert type(model[0][0]) is nn.Linear and type(model[0][1]) is nn.Linear
    assert isinstance(model[1], itop.SparseLinear)
    model = _cnn()
    itop.sparsify(model, 0.3, block_size=16, exclude=[nn.Conv2d])
    assert type(model[2]) is nn.Conv2d and isinstance(model[6], itop.SparseLinear)
    model = _mlp()
    itop.sparsify(model, 0.3, block_size=16, dense_first=True)
    assert type(model[0]) is nn.Linear and isinstance(model[2], itop.SparseLinear)


def test_sparsify_bad_arguments():
    with pytest.raises(ValueError, match="exclude"):
        itop.sparsify(_mlp(), 0.3, block_size=16, exclude=["nope"])
    with pytest.raises(TypeError, match="exclude"):
        itop.sparsify(_mlp(), 0.3, block_size=16, exclude=[3])
    with pytest.raises(ValueError, match="distribution"):
        itop.sparsify(_mlp(), 0.3, distribution="erdos")
    with pytest.raises(ValueError, match="block_size"):
        itop.sparsify(_mlp(), 0.3, block_size=0)


def test_sparsify_leaves_indivisible_layers_dense_with_warning():
    model = _cnn()  # first conv has 3 input channels
    with pytest.warns(UserWarning, match="dense"):
        itop.sparsify(model, 0.3, block_size=16, distribution="uniform")
    assert type(model[0]) is nn.Conv2d
    assert isinstance(model[2], itop.SparseConv2d) and isinstance(model[6], itop.SparseLinear)
    model = nn.Sequential(nn.Linear(30, 32))
    with pytest.warns(UserWarning, match="does not divide"):
        itop.sparsify(model, 0.3, block_size=16)
    assert type(model[0]) is nn.Linear


def test_sparsify_erk_dense_layer_stays_plain():
    # the tiny last layer's ERK density exceeds 1 -> it stays an nn.Linear
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 4))
    ds = erk_densities([(256, 256), (4, 256)], 0.5)
    assert ds[1] == 1.0
    itop.sparsify(model, 0.5, block_size=4)
    assert isinstance(model[0], itop.SparseLinear) and type(model[1]) is nn.Linear
    summary = itop.sparsity_summary(model)
    assert summary.overall_density == pytest.approx(0.5, abs=2e-3)


def test_sparsify_replaces_multihead_attention_whole():
    # out_proj's weight is read by its parent's functional forward: the parent is replaced
    # whole, never the child inside a dense nn.MultiheadAttention
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 2)
            self.fc = nn.Linear(32, 32)

    m = itop.sparsify(M(), 0.5, block_size=16)
    assert type(m.attn) is itop.SparseMultiheadAttention
    assert isinstance(m.attn.out_proj, itop.SparseLinear)
    assert isinstance(m.attn.in_proj, itop.SparseLinear)
    assert isinstance(m.fc, itop.SparseLinear)


def test_summary_is_printable_and_correct(capsys):
    model = _mlp()
    itop.sparsify(model, 0.25, block_size=16, verbose=True)
    out = capsys.readouterr().out
    assert "SparseLinear" in out and "overall density" in out
    s = itop.sparsity_summary(model)
    assert len(s) == 3
    assert s["0"]["density"] == model[0].density
    expected = sum(m.nnz * 256 for m in model if isinstance(m, itop.SparseLinear)) / \
        (64 * 128 * 2 + 64 * 16)
    assert s.overall_density == pytest.approx(expected)
    assert "0.25" in str(s) or "overall density" in str(s)


def test_sparsify_block1_and_cnn_forward_matches_densified():
    torch.manual_seed(2)
    model = _cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # block 1 divides everything: no warning
        itop.sparsify(model, 0.2, block_size=1)
    assert all(isinstance(model[i], itop.SparseLayer) for i in (0, 2, 6))
    assert model[0].values.shape == (16, 3, 3, 3) and model[0].layout is None
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    torch.testing.assert_close(itop.densify(model)(x), y)


def test_sparsify_rejects_ddp_wrapped_model():
    class FakeDDP(nn.parallel.DistributedDataParallel):
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module

    with pytest.raises(TypeError, match="before wrapping"):
        itop.sparsify(FakeDDP(_mlp()), 0.3, block_size=16)
