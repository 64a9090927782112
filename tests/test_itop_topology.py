"""TopologyManager: schedules, exact nnz, zero-init regrowth and optimizer state, ITOP rate,
gradient growth against a masked-dense reference, AMP skips, checkpoint -> resume."""
import copy
import io
import math
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import itop
from itop import unit_selection

GROWTH = ["random", "gradient", "momentum", "random_unfired"]


# Tiny matrices: one intra-op thread avoids thread-pool contention (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(bs=8, density=0.3, dtype=torch.float32):
    return nn.Sequential(itop.SparseLinear(16, 32, density=density, block_size=bs, dtype=dtype),
                         nn.ReLU(),
                         itop.SparseLinear(32, 16, density=density, block_size=bs, dtype=dtype))


def _dense_view(layer, t):
    """A values-shaped tensor as the dense weight it stands for."""
    return t * layer.block_mask if layer.layout is None else layer.layout.scatter(t)


def _expand(layer, mask):
    if layer.layout is None:
        return mask
    bs = layer.block_size
    m = mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    return m if layer.values.dim() == 3 else m[:, :, None, None]


# --------------------------------------------------------------------------- arguments
def test_bad_arguments():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ok = dict(update_every=10, total_steps=100)
    for kw, match in [({"update_every": 0}, "update_every"), ({"total_steps": 0}, "total_steps"),
                      ({"prune_rate": 1.5}, "prune_rate"), ({"prune_rate": -0.1}, "prune_rate"),
                      ({"schedule": "step"}, "schedule"), ({"growth": "magic"}, "growth"),
                      ({"prune": "taylor"}, "prune"), ({"stop_step": 200}, "stop_step"),
                      ({"update_every": 2.5}, "update_every")]:
        with pytest.raises(ValueError, match=match):
            itop.TopologyManager(model, opt, **{**ok, **kw})
    with pytest.raises(TypeError, match="optimizer"):
        itop.TopologyManager(model, None, **ok)
    with pytest.raises(ValueError, match="no sparse layers"):
        itop.TopologyManager(nn.Linear(4, 4), torch.optim.SGD(nn.Linear(4, 4).parameters(), 0.1),
                             **ok)
    with pytest.raises(ValueError, match="does not train"):
        itop.TopologyManager(model, torch.optim.SGD(model[0].parameters(), lr=0.1), **ok)
    with pytest.raises(TypeError, match="seed"):
        itop.TopologyManager(model, opt, seed="0", **ok)


def test_schedules():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cos = itop.TopologyManager(model, opt, update_every=10, total_steps=100, prune_rate=0.4)
    assert cos.prune_rate_at(0) == pytest.approx(0.4)
    assert cos.prune_rate_at(50) == pytest.approx(0.2)
    assert cos.prune_rate_at(25) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert cos.prune_rate_at(100) == 0.0
    lin = itop.TopologyManager(model, opt, update_every=10, total_steps=100, prune_rate=0.4,
                               schedule="linear")
    assert lin.prune_rate_at(75) == pytest.approx(0.1)
    const = itop.TopologyManager(model, opt, update_every=10, total_steps=100, prune_rate=0.4,
                                 schedule="constant", stop_step=60)
    assert const.prune_rate_at(59) == 0.4 and const.prune_rate_at(60) == 0.0
    assert [t for t in range(1, 101) if const.is_update_step(t)] == [10, 20, 30, 40, 50]
    stopped = itop.TopologyManager(model, opt, update_every=10, total_steps=100, stop_step=50)
    assert stopped.prune_rate_at(25) == pytest.approx(0.25)  # horizon is the stop step


# --------------------------------------------------------------------------- exact nnz
@settings(max_examples=10, deadline=None)
@given(growth=st.sampled_from(GROWTH), schedule=st.sampled_from(["cosine", "linear", "constant"]),
       prune_rate=st.floats(0.0, 1.0), density=st.floats(0.01, 1.0), bs=st.sampled_from([1, 2, 4]),
       poison_every=st.sampled_from([0, 7, 50]), seed=st.integers(0, 2 ** 31),
       sampled=st.booleans())
def test_exact_nnz_over_1000_updates(growth, schedule, prune_rate, density, bs, poison_every, seed,
                                     sampled):
    # sampled: the threshold top-k and the rank sampling of itop.unit_selection, which large
    # grids take, forced onto this small one
    with mock.patch.object(unit_selection, "_SELECT_MIN", 0 if sampled else
                           unit_selection._SELECT_MIN), warnings.catch_warnings():
        # no backward here: gradient growth falls back to random (and says so)
        warnings.filterwarnings("ignore", "gradient growth: no gradient was captured")
        _exact_nnz_run(growth, schedule, prune_rate, density, bs, poison_every, seed)


def test_gradient_growth_without_a_backward_warns_once_and_grows_at_random():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=100, growth="gradient")
    with pytest.warns(UserWarning, match=r"no gradient was captured for sparse layers \['0', '2'\]"):
        assert mgr.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mgr.step()  # once per manager


def _exact_nnz_run(growth, schedule, prune_rate, density, bs, poison_every, seed):
    torch.manual_seed(seed % 1000)
    layer = itop.SparseLinear(8, 12, density=density, block_size=bs)
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=1001, prune_rate=prune_rate,
                               schedule=schedule, growth=growth, seed=seed)
    nnz = layer.nnz
    gen = torch.Generator().manual_seed(seed)
    for t in range(1, 1001):
        if poison_every and t % poison_every == 0:
            with torch.no_grad():  # NaN / Inf scores must not break exact nnz
                v = layer.values.view(-1)
                i = torch.randint(v.numel(), (3,), generator=gen)
                v[i] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        old = layer.block_mask.clone()
        mgr.step()
        new = layer.block_mask
        k = min(math.ceil(mgr.prune_rate_at(t) * nnz), layer.num_units - nnz)
        assert int(new.sum()) == nnz == layer.nnz
        # exactly k dropped and k grown: nothing pruned in this update came straight back
        assert int((old & ~new).sum()) == k and int((new & ~old).sum()) == k
        if layer.layout is not None:
            assert layer.layout.nnz == nnz and torch.equal(layer.layout.block_mask, new)
            assert layer.values.shape[0] == nnz
    assert layer.values.shape == (nnz, bs, bs)  # block 1 included (CSR storage)


def test_exact_nnz_with_nan_gradients_gradient_growth():
    torch.manual_seed(0)
    model = _mlp(bs=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=100, growth="gradient")
    nnz = [m.nnz for m in model if isinstance(m, itop.SparseLayer)]
    for t in range(1, 21):
        x = torch.randn(8, 16)
        if t % 4 == 0:
            x[0, 0] = float("nan")
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        mgr.step()  # no optimizer step: NaN gradients must not corrupt the topology
        assert [int(m.block_mask.sum()) for m in model if isinstance(m, itop.SparseLayer)] == nnz


# --------------------------------------------------------------------------- state handling
def _make_opt(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    return torch.optim.RMSprop(params, lr=1e-3, momentum=0.5)


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize("bs", [1, 4])
def test_regrown_blocks_zero_with_zero_state_survivors_keep_theirs(opt_name, bs):
    torch.manual_seed(0)
    model = _mlp(bs=bs, density=0.4)
    opt = _make_opt(opt_name, model.parameters())
    mgr = itop.TopologyManager(model, opt, update_every=3, total_steps=30, prune_rate=0.5,
                               growth="gradient")
    layers = [m for m in model if isinstance(m, itop.SparseLayer)]
    params = [m.values for m in layers]
    shapes = [tuple(p.shape) for p in params]
    updates = 0
    for t in range(1, 13):
        x = torch.randn(16, 16)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = []
        for m in layers:
            state = {k: _dense_view(m, v).clone() for k, v in opt.state[m.values].items()
                     if torch.is_tensor(v) and v.shape == m.values.shape}
            assert state  # the optimizer keeps per-weight state
            before.append((m.block_mask.clone(), _dense_view(m, m.values.detach()).clone(), state))
        changed = mgr.step()
        assert changed == (t % 3 == 0)
        updates += changed
        for m, (mask0, w0, s0) in zip(layers, before):
            mask1 = m.block_mask
            survive = _expand(m, mask0 & mask1)
            grown = _expand(m, mask1 & ~mask0)
            w1 = _dense_view(m, m.values.detach())
            assert torch.equal(w1[survive], w0[survive])
            assert torch.all(w1[grown] == 0)
            for k, v in opt.state[m.values].items():
                if torch.is_tensor(v) and v.shape == m.values.shape:
                    s1 = _dense_view(m, v)
                    assert torch.equal(s1[survive], s0[k][survive]), k
                    assert torch.all(s1[grown] == 0), k
            if changed:
                assert bool((mask1 & ~mask0).any())
    assert updates == 4
    # same Parameter objects, same shapes, still the ones the optimizer trains
    assert all(m.values is p for m, p in zip(layers, params))
    assert [tuple(p.shape) for p in params] == shapes
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in params)


def test_hooks_only_armed_for_update_steps():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mgr = itop.TopologyManager(model, opt, update_every=4, total_steps=40, growth="gradient")
    layer = model[0]
    for t in range(1, 13):
        armed = layer._capturing
        assert armed == (t % 4 == 0), t  # armed during the backward of the update step only
        loss = model(torch.randn(4, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mgr.step()
    for _ in range(3):
        mgr.step()
    assert mgr.step_count == 15 and layer._capturing  # armed for step 16
    mgr.close()
    assert not layer._capturing
    other = itop.TopologyManager(model, opt, update_every=1, total_steps=40, growth="gradient")
    assert layer._capturing  # step 1 is an update step: armed at construction
    del other  # a dropped manager leaves no capture behind
    assert not layer._capturing
    random_mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=40, growth="random")
    assert not layer._capturing and random_mgr.step()  # random growth captures nothing


def test_a_dropped_manager_leaves_its_successors_hooks_armed():
    """Replacing a manager (``mgr = TopologyManager(...)`` again, after loading a checkpoint,
    say) drops the old one after the new one armed the layers: the old one's cleanup must not
    disarm them, or the first gradient update would silently fall back to random growth."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=40, growth="gradient")
    mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=40, growth="gradient")
    assert all(m._capturing for m in (model[0], model[2]))
    model(torch.randn(4, 16)).square().mean().backward()
    assert all(m._grad_scores() is not None for m in (model[0], model[2]))
    mgr.close()
    assert not any(m._capturing for m in (model[0], model[2]))


# --------------------------------------------------------------------------- reference
def _reference_run(layer, xs, targets, update_every, rate_fn, steps, growth="gradient", p=1,
                   beta=0.9):
    """Dense weights, block masks and SGD momentum following the update rules of
    docs/topology.md, with autograd's dense dW.

    Prune: the ``k`` active blocks of smallest L``p`` norm. Grow: the ``k`` inactive blocks of
    largest dense-gradient block norm (``"gradient"``), or of largest exponential moving average
    of it over every step (``"momentum"``: ``(1 - beta)·g`` first, then ``beta·ema + (1 - beta)·g``).
    Returns the final mask, weight, bias and EMA, and whether the alternative rule (L1 for L2,
    the step's gradient for momentum) would have chosen differently at some update."""
    bs = layer.block_size
    mask = layer.block_mask.clone()
    W = layer.dense_weight().detach().clone()
    b = layer.bias.detach().clone()
    buf_w, buf_b = torch.zeros_like(W), torch.zeros_like(b)
    nnz = int(mask.sum())
    R, C = mask.shape
    ema = None
    alternative_differs = False

    def expand(m):
        return m.repeat_interleave(bs, 0).repeat_interleave(bs, 1)

    def block_sums(t):
        return t.reshape(R, bs, C, bs).sum((1, 3)).reshape(-1)

    for t in range(1, steps + 1):
        Wd = (W * expand(mask)).requires_grad_()
        bb = b.clone().requires_grad_()
        loss = (F.linear(xs[t], Wd, bb) - targets[t]).square().mean()
        gW, gb = torch.autograd.grad(loss, (Wd, bb))
        grad_norm = block_sums(gW.square()).sqrt()
        ema = (1 - beta) * grad_norm if ema is None else beta * ema + (1 - beta) * grad_norm
        gW = gW * expand(mask)
        buf_w = 0.9 * buf_w + gW
        buf_b = 0.9 * buf_b + gb
        W = W - 0.1 * buf_w
        b = b - 0.1 * buf_b
        if t % update_every == 0:
            k = min(math.ceil(rate_fn(t) * nnz), R * C - nnz)
            l1, l2 = block_sums(W.abs()), block_sums(W.square()).sqrt()
            flat = mask.reshape(-1)

            def lowest(score):
                return torch.topk(torch.where(flat, score, torch.inf), k, largest=False).indices

            def highest(score):
                return torch.topk(torch.where(flat, -torch.inf, score), k).indices

            drop = lowest(l1 if p == 1 else l2)
            add = highest(grad_norm if growth == "gradient" else ema)
            other_drop = lowest(l2 if p == 1 else l1)
            other_add = highest(ema if growth == "gradient" else grad_norm)
            alternative_differs |= (set(drop.tolist()) != set(other_drop.tolist())
                                    if p == 2 else set(add.tolist()) != set(other_add.tolist()))
            new = flat.clone()
            new[drop] = False
            new[add] = True
            survive = expand((flat & new).view(R, C))
            W, buf_w = W * survive, buf_w * survive
            mask = new.view(R, C)
    return mask, W * expand(mask), b, ema.view(R, C), alternative_differs


@pytest.mark.parametrize("bs,growth,prune", [(1, "gradient", "magnitude"),
                                             (4, "gradient", "magnitude"),
                                             (4, "gradient", "magnitude_l2"),
                                             (4, "momentum", "magnitude")])
def test_growth_and_prune_match_masked_dense_reference(bs, growth, prune):
    """Gradient (RigL) and momentum (SNFS) growth, L1 and L2 magnitude pruning, against a
    masked-dense float64 reference; for L2 and momentum the reference also shows that L1, or
    the step's own gradient, would have chosen other blocks (so the test tells them apart)."""
    torch.manual_seed(0)
    layer = itop.SparseLinear(16, 24, density=0.3, block_size=bs, dtype=torch.float64)
    ref_layer = copy.deepcopy(layer)
    steps = 18
    xs = [torch.randn(10, 16, dtype=torch.float64) for _ in range(steps + 1)]
    targets = [torch.randn(10, 24, dtype=torch.float64) for _ in range(steps + 1)]
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    mgr = itop.TopologyManager(layer, opt, update_every=3, total_steps=40, prune_rate=0.4,
                               growth=growth, prune=prune)
    masks = []
    for t in range(1, steps + 1):
        loss = (layer(xs[t]) - targets[t]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mgr.step()
        masks.append(layer.block_mask.clone())
    mask, W, b, ema, differs = _reference_run(ref_layer, xs, targets, 3, mgr.prune_rate_at, steps,
                                              growth=growth, p=2 if prune == "magnitude_l2" else 1)
    assert len({tuple(m.reshape(-1).tolist()) for m in masks}) > 3  # the topology did move
    assert torch.equal(layer.block_mask, mask)
    torch.testing.assert_close(layer.dense_weight().detach(), W, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.bias.detach(), b, rtol=1e-9, atol=1e-12)
    if growth == "momentum":  # the scores themselves: the manager keeps them in its state
        torch.testing.assert_close(mgr.state_dict()["ema"][""].double(), ema, rtol=1e-5,
                                   atol=1e-7)
    if prune == "magnitude_l2" or growth == "momentum":
        assert differs


# --------------------------------------------------------------------------- ITOP rate
@pytest.mark.parametrize("growth", ["random_unfired", "random"])
def test_itop_rate_monotone_and_reaches_one(growth):
    torch.manual_seed(0)
    model = _mlp(bs=8, density=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=10_000, prune_rate=0.5,
                               schedule="constant", growth=growth, seed=3)
    rates = [mgr.itop_rate]
    assert rates[0] == pytest.approx(0.25)
    for _ in range(60 if growth == "random" else 8):
        mgr.step()
        rates.append(mgr.itop_rate)
    assert all(b >= a for a, b in zip(rates, rates[1:]))
    assert rates[-1] == 1.0
    if growth == "random_unfired":
        # 8 blocks per layer, nnz 2, k = ceil(0.5 * 2) = 1 unfired block regrown per update:
        # the 6 unfired blocks are all explored after exactly 6 updates
        assert rates[6] == 1.0 and rates[5] < 1.0
        assert rates[:7] == pytest.approx([(2 + i) / 8 for i in range(7)])
    summary = mgr.summary()
    assert all(r["itop_rate"] == 1.0 for r in summary) and "itop_rate" in str(summary)
    assert mgr.layer_itop_rates() == {"0": 1.0, "2": 1.0}


# --------------------------------------------------------------------------- AMP skips
class _FakeScaler:
    """Stands in for torch.amp.GradScaler: the scale halves when a step was skipped."""

    def __init__(self):
        self.scale = 1024.0

    def get_scale(self):
        return self.scale

    def is_enabled(self):
        return True


def test_skipped_amp_step_postpones_the_update():
    torch.manual_seed(0)
    model = _mlp(bs=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = _FakeScaler()
    mgr = itop.TopologyManager(model, opt, update_every=3, total_steps=30, growth="gradient",
                               grad_scaler=scaler)
    changes = []
    for t in range(1, 8):
        x = torch.randn(8, 16)
        loss = model(x).square().mean() * scaler.scale
        if t == 3:
            loss = loss * float("inf")  # inf gradients: the scaler skips this optimizer step
        opt.zero_grad()
        loss.backward()
        if t == 3:
            scaler.scale /= 2
        else:
            opt.step()
        changes.append(mgr.step())
    # no update at step 3 (its gradients were inf); it happened at step 4 instead, then at 6
    assert changes == [False, False, False, True, False, True, False]


def test_real_grad_scaler_cpu():
    torch.manual_seed(0)
    model = _mlp(bs=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=30, grad_scaler=scaler)
    changes = []
    for t in range(1, 6):
        loss = model(torch.randn(8, 16)).square().mean()
        if t == 2:
            loss = loss * float("inf")
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        changes.append(mgr.step())
    assert changes == [False, False, True, True, False]
    assert all(int(m.block_mask.sum()) == m.nnz for m in model if isinstance(m, itop.SparseLayer))


# --------------------------------------------------------------------------- checkpoints
def _resume_model():
    layers = [itop.SparseConv2d(8, 16, 3, padding=1, density=0.4, block_size=8), nn.ReLU()]
    layers += [itop.SparseConv2d(16, 16, 3, padding=1, density=0.3, block_size=1), nn.ReLU(),
               nn.AdaptiveAvgPool2d(2), nn.Flatten(),
               itop.SparseLinear(64, 32, density=0.3, block_size=8), nn.ReLU(),
               itop.SparseLinear(32, 8, density=0.5, block_size=1)]
    return nn.Sequential(*layers)


def _train(model, opt, mgr, steps, first):
    for t in range(first, first + steps):
        g = torch.Generator().manual_seed(1000 + t)
        x = torch.randn(4, 8, 6, 6, generator=g)
        y = torch.randint(0, 8, (4,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mgr.step()


def _build(seed, growth):
    torch.manual_seed(seed)
    model = _resume_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mgr = itop.TopologyManager(model, opt, update_every=3, total_steps=40, growth=growth, seed=7)
    return model, opt, mgr


@pytest.mark.parametrize("growth", GROWTH)
def test_checkpoint_resume_is_bit_identical(growth):
    straight = _build(0, growth)
    _train(*straight, steps=20, first=1)

    first = _build(0, growth)
    _train(*first, steps=8, first=1)  # step 9 is an update step: hooks must re-arm on resume
    buf = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(),
                "mgr": first[2].state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = _build(123, growth)  # a fresh model with other random masks and values
    resumed[0].load_state_dict(ckpt["model"])
    resumed[1].load_state_dict(ckpt["opt"])
    resumed[2].load_state_dict(ckpt["mgr"])
    assert resumed[2].step_count == 8
    _train(*resumed, steps=12, first=9)

    sd_a, sd_b = straight[0].state_dict(), resumed[0].state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    for (n, a), (_, b) in zip(straight[2].fired.items(), resumed[2].fired.items()):
        assert torch.equal(a, b), n
    assert straight[2].itop_rate == resumed[2].itop_rate > 0.3


def test_load_state_dict_rejects_other_model():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=10)
    other = nn.Sequential(itop.SparseLinear(16, 16, block_size=8))
    mgr2 = itop.TopologyManager(other, torch.optim.SGD(other.parameters(), lr=0.1),
                                update_every=2, total_steps=10)
    with pytest.raises(ValueError, match="layers"):
        mgr2.load_state_dict(mgr.state_dict())


# --------------------------------------------------------------------------- training
def _teacher_data(image, n=256):
    """Separable synthetic classes: a fixed random template per class plus noise."""
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 8, (n,), generator=g)
    shape = (4, 8, 8) if image else (32,)
    templates = torch.randn(8, *shape, generator=g)
    x = templates[y] + 0.5 * torch.randn(n, *shape, generator=g)
    return x, y


@pytest.mark.parametrize("growth", GROWTH)
@pytest.mark.parametrize("image", [False, True])
def test_small_models_train_with_every_growth_mode(growth, image):
    torch.manual_seed(0)
    if image:
        model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                              nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))
        model[0] = itop.SparseConv2d.from_dense(model[0], density=0.5, block_size=4)
    else:
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                              nn.Linear(64, 8))
    itop.sparsify(model, 0.3, block_size=8, distribution="uniform")
    n_sparse = sum(isinstance(m, itop.SparseLayer) for m in model.modules())
    assert n_sparse >= 3
    x, y = _teacher_data(image)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = 60
    mgr = itop.TopologyManager(model, opt, update_every=8, total_steps=steps, growth=growth)
    losses, updates = [], 0
    for t in range(steps):
        idx = torch.arange(t * 64, t * 64 + 64) % x.shape[0]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        updates += mgr.step()
        losses.append(loss.item())
    assert updates == 7
    assert mgr.itop_rate > 0.3
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.6 * first, (first, last)


def test_random_growth_draws_on_the_layers_device_and_reseeds_across_device_types():
    """The growth generator lives with the layers; a checkpoint from another device type is
    reseeded from its generator state (with a warning), reproducibly."""
    def fresh():
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, itop.TopologyManager(model, opt, update_every=1, total_steps=100,
                                                growth="random")
    model, opt, mgr = fresh()
    assert mgr._generator.device == model[0].block_mask.device
    state = mgr.state_dict()
    assert state["rng_device"] == "cpu"
    state["rng_device"] = "cuda"  # as if saved by a run on a GPU
    masks = []
    for _ in range(2):
        model, opt, mgr = fresh()
        with pytest.warns(UserWarning, match="reseeded"):
            mgr.load_state_dict(state)
        mgr.step()
        masks.append([m.block_mask.clone() for m in (model[0], model[2])])
    assert all(torch.equal(a, b) for a, b in zip(*masks))
