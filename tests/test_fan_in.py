"""The constant fan-in mode (itop.fan_in): allocation with a floor, exact nnz and constant
fan-in over many updates, no empty row without ablation, the prune-count rule, reconnection of
a layer without gradient signal, resume bit for bit, and the itop train guards."""
import io
import math
import os
import warnings

import pytest
import torch
from torch import nn

import itop
from itop import fan_in as fi
from itop.density import erk_densities, floor_densities

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfi_model(bs, density, ablation, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 16))
    return itop.sparsify(model, density, block_size=bs, fan_in="constant", ablation=ablation)


def _set_mask(layer, mask):
    bs = layer.block_size
    layer.load_state_dict({**layer.state_dict(), "block_mask": mask,
                           "values": torch.randn(int(mask.sum()), bs, bs)})


def _layers(model):
    return [m for m in model.modules() if isinstance(m, itop.SparseLayer)]


# --------------------------------------------------------------------------- allocation
def test_floor_densities_keep_the_budget_and_raise_the_small_layers():
    dens, sizes, floors = [0.5, 0.01, 0.02], [100, 1000, 400], [0.1, 0.05, 0.01]
    out = floor_densities(dens, sizes, floors)
    assert out[1] == 0.05 and out[2] >= 0.01 and out[0] >= 0.1
    assert math.isclose(sum(d * n for d, n in zip(out, sizes)),
                        sum(d * n for d, n in zip(dens, sizes)))
    with pytest.raises(ValueError, match="floors"):
        floor_densities([0.01, 0.01], [100, 100], [0.5, 0.5])


def test_allocate_gives_every_row_a_unit_or_refuses_with_the_reason():
    # 90 % ERK: MNIST-1D cnn1d's sparse layers at block 16, (R, C, weights per unit)
    grids = [(8, 4, 768), (8, 8, 768), (16, 40, 256)]
    shapes = [(128, 64, 1, 3), (128, 128, 1, 3), (256, 640)]
    plan = fi.allocate(grids, erk_densities(shapes, 0.1), ablation=False)
    assert [p[0] for p in plan] == [8, 8, 16]          # every row is live
    total = sum(R * f * u for (R, f), (_, _, u) in zip(plan, grids))
    budget = 0.1 * sum(R * C * u for R, C, u in grids)
    assert abs(total - budget) <= 256 * 16 / 2 + 1     # within half a fan-in step of fc1
    # 98 %: 18 blocks' worth of weights for 32 block-rows
    with pytest.raises(ValueError, match="ablation=True"):
        fi.allocate(grids, erk_densities(shapes, 0.02), ablation=False, names=["a", "b", "c"])
    plan = fi.allocate(grids, erk_densities(shapes, 0.02), ablation=True)
    assert all(1 <= live <= R and f >= 1 for (live, f), (R, _, _) in zip(plan, grids))
    assert plan[0][0] < 8                               # ablated rows


@pytest.mark.parametrize("bs", [1, 8])
def test_sparsify_constant_fan_in(bs):
    model = _cfi_model(bs, 0.2, ablation=False)
    for m in _layers(model):
        live, f = fi.fan_in_of(m.block_mask)
        assert live == m.block_mask.shape[0] and m.nnz == live * f
    with pytest.raises(ValueError, match="fan_in"):
        itop.sparsify(nn.Linear(16, 16), 0.5, block_size=1, fan_in="balanced")
    with pytest.raises(TypeError, match="ablation"):
        itop.sparsify(nn.Linear(16, 16), 0.5, block_size=1, fan_in="constant", ablation=1)


def test_constant_fan_in_covers_attention_and_keeps_frozen_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True),
                          nn.Linear(32, 32))
    itop.sparsify(model, 0.3, block_size=8, fan_in="constant", distribution="uniform")
    attn = model[0].self_attn
    assert isinstance(attn, itop.SparseMultiheadAttention)
    layers = _layers(model)
    assert attn.in_proj in layers and attn.out_proj in layers
    for m in layers:
        live, f = fi.fan_in_of(m.block_mask)
        assert live == m.block_mask.shape[0] and m.nnz == live * f
    with pytest.raises(ValueError, match="init='magnitude' cannot be combined"):
        itop.sparsify(nn.Linear(16, 16), 0.5, block_size=4, fan_in="constant", init="magnitude")
    frozen = model[1]
    frozen.values.requires_grad_(False)
    before = frozen.block_mask.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=40, fan_in="constant")
    x = torch.randn(4, 5, 32)
    moved = False
    for _ in range(6):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        old = attn.in_proj.block_mask.clone()
        mgr.step()
        moved |= not torch.equal(old, attn.in_proj.block_mask)
    assert moved                                          # the attention projections explore
    assert torch.equal(frozen.block_mask, before)         # the frozen layer does not
    for m in layers:
        live, f = fi.fan_in_of(m.block_mask)
        assert live == m.block_mask.shape[0] and m.nnz == live * f


def test_manager_refuses_a_model_without_constant_fan_in_or_with_empty_rows():
    torch.manual_seed(0)
    model = nn.Sequential(itop.SparseLinear(32, 32, density=0.3, block_size=4))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0, :3] = True
    mask[1:, 0] = True                                   # row 0 holds 3, the others 1
    _set_mask(model[0], mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'0'.*not a constant fan-in"):
        itop.TopologyManager(model, opt, update_every=1, total_steps=10, fan_in="constant")
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4, :2] = True                                  # 4 empty rows
    _set_mask(model[0], mask)
    with pytest.raises(ValueError, match="4 empty rows"):
        itop.TopologyManager(model, opt, update_every=1, total_steps=10, fan_in="constant")
    itop.TopologyManager(model, opt, update_every=1, total_steps=10, fan_in="constant",
                         ablation=True)
    with pytest.raises(ValueError, match="fan_in"):
        itop.TopologyManager(model, opt, update_every=1, total_steps=10, fan_in="rows")


# --------------------------------------------------------------------------- updates
def test_prune_count_keeps_a_strict_majority_and_a_unit_per_row():
    assert [fi.prune_count(0.5, n) for n in (1, 2, 3, 4, 8, 1000)] == [0, 0, 1, 1, 3, 499]
    assert fi.prune_count(0.1, 1000) == 100 and fi.prune_count(0.0, 50) == 0
    assert fi.prune_count(0.5, 8, live_rows=8) == 0 and fi.prune_count(0.5, 48, 16) == 23


def test_plan_update_never_prunes_a_rows_strongest_unit():
    """k = 3 of 8 units on 4 rows of 2: the three weakest include both units of row 0, but
    row 0 keeps its stronger one, so the fourth weakest goes instead."""
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :2] = True
    active = mask.reshape(-1).nonzero().squeeze(1)          # rows 0,0,1,1,2,2,3,3
    magnitude = torch.tensor([0.1, 0.2, 5.0, 0.3, 5.0, 0.4, 5.0, 6.0])
    grow = torch.arange(24, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    new = fi.plan_update(mask, active, magnitude, grow, 3, 2, 4, g)
    assert int(new.sum()) == 8 and fi.fan_in_of(new) == (4, 2)
    assert bool(new[0, 1]) and not bool(new[0, 0])          # row 0 kept its 0.2, lost its 0.1
    assert not bool(new[1, 1]) and not bool(new[2, 1])       # 0.3 and 0.4 went
    assert bool(new[3, 0]) and bool(new[3, 1])
    assert new[:, 5].sum() == 3                             # regrown at the best scores


@pytest.mark.parametrize("bs,density,ablation,growth", [
    (1, 0.1, False, "gradient"), (4, 0.25, False, "random"), (1, 0.02, True, "gradient"),
    (8, 0.05, True, "momentum")])
def test_constant_fan_in_and_exact_nnz_over_1000_updates(bs, density, ablation, growth):
    model = _cfi_model(bs, density, ablation)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=10 ** 6, growth=growth,
                               schedule="constant", prune_rate=0.5, fan_in="constant",
                               ablation=ablation, seed=3)
    layers = _layers(model)
    ref = [(m.nnz, fi.fan_in_of(m.block_mask)) for m in layers]
    if ablation:
        assert any(live < m.block_mask.shape[0] for m, (_, (live, _)) in zip(layers, ref))
    g = torch.Generator().manual_seed(0)
    changed = 0
    for t in range(1000):
        x = torch.randn(4, 32, generator=g)
        loss = model(x).square().mean()
        if t % 5 == 0:
            loss = loss * 0.0                    # now and then a batch without any signal
        if t % 97 == 0:
            loss = loss * float("nan")           # and one with NaN gradients
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():                    # keep the weights finite after a NaN step
            for p in model.parameters():
                p.nan_to_num_(0.0)
        changed += mgr.step()
        for m, (nnz, (live, f)) in zip(layers, ref):
            assert m.nnz == nnz == int(m.block_mask.sum())
            counts = fi.row_counts(m.block_mask)
            assert int((counts > 0).sum()) == live and set(counts[counts > 0].tolist()) == {f}
            if not ablation:
                assert bool((counts > 0).all())
    assert changed > 300
    assert mgr.itop_rate > 2 * sum(m.nnz * m.unit_numel for m in layers) / sum(
        m.num_units * m.unit_numel for m in layers)


def test_a_layer_without_gradient_signal_moves_and_reconnects():
    """Layer 2 reads only a dead input row of layer 1 (ablated rows): every gradient is zero.
    Dead-unit replacement must move the units until a path carries signal again."""
    torch.manual_seed(0)
    a = itop.SparseLinear(16, 16, density=0.25, block_size=4, bias=False)
    b = itop.SparseLinear(16, 16, density=0.25, block_size=4, bias=False)
    ma = torch.zeros(4, 4, dtype=torch.bool)
    ma[0, 0] = True                               # layer a: only output rows 0..3 live
    mb = torch.zeros(4, 4, dtype=torch.bool)
    mb[2, 3] = True                               # layer b reads inputs 12..15: dead
    a.load_state_dict({"values": torch.randn(1, 4, 4), "block_mask": ma})
    b.load_state_dict({"values": torch.randn(1, 4, 4), "block_mask": mb})
    model = nn.Sequential(a, b)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=1000, fan_in="constant",
                               ablation=True, schedule="constant", seed=0)
    x = torch.randn(8, 16)
    assert float(model(x).detach().abs().max()) == 0.0
    for _ in range(60):
        loss = model(x).square().mean() - model(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mgr.step()
        assert a.nnz == b.nnz == 1
    # a regrown unit starts at zero, so the path shows in the gradient rather than the output
    cols_b = set(b.block_mask.nonzero()[:, 1].tolist())
    rows_a = set(a.block_mask.nonzero()[:, 0].tolist())
    assert cols_b & rows_a, (rows_a, cols_b)


def test_fan_in_rule_changes_nothing_in_the_default_mode():
    """fan_in='any' keeps ceil(rate·nnz) (the ITOP/RigL count), even for a 1-unit layer."""
    torch.manual_seed(0)
    model = nn.Sequential(itop.SparseLinear(16, 16, density=1 / 16, block_size=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=100, growth="random")
    before = model[0].block_mask.clone()
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    assert mgr.step() and not torch.equal(before, model[0].block_mask)


# --------------------------------------------------------------------------- resume
def _build(seed, growth):
    model = _cfi_model(4, 0.3, ablation=True, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mgr = itop.TopologyManager(model, opt, update_every=3, total_steps=40, growth=growth,
                               seed=7, fan_in="constant", ablation=True)
    return model, opt, mgr


def _train(model, opt, mgr, steps, first):
    for t in range(first, first + steps):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(8, 32, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mgr.step()


@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_checkpoint_resume_is_bit_identical(growth):
    straight = _build(0, growth)
    _train(*straight, steps=20, first=1)
    first = _build(0, growth)
    _train(*first, steps=8, first=1)
    buf = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(),
                "mgr": first[2].state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = _build(0, growth)
    resumed[0].load_state_dict(ckpt["model"])
    resumed[1].load_state_dict(ckpt["opt"])
    resumed[2].load_state_dict(ckpt["mgr"])
    _train(*resumed, steps=12, first=9)
    sd_a, sd_b = straight[0].state_dict(), resumed[0].state_dict()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    for n, f in straight[2].fired.items():
        assert torch.equal(f, resumed[2].fired[n]), n
    assert straight[2].itop_rate > 0.2


# --------------------------------------------------------------------------- itop train
TINY = ["--data", "synthetic", "--batch-size", "64", "--update-every", "2", "--no-progress",
        "--no-plots"]


def test_itop_train_constant_fan_in_resumes_bit_for_bit(tmp_path, capsys):
    from itop.app.cli import main
    from itop.app.train import read_metrics
    args = ["train", *TINY, "--model", "mlp", "--block-size", "4", "--density", "0.05",
            "--fan-in", "constant", "--ablation", "--epochs", "2", "--seed", "5"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main([*args, "--out", a]) == 0
    assert main([*args, "--out", b, "--stop-after-epoch", "1"]) == 0
    assert main([*args, "--out", b, "--resume"]) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k not in (
        "epoch_time", "wall_time", "train_time", "out", "resume", "stop_after_epoch")}
        for r in rs]
    ra, rb = strip(read_metrics(a)), strip(read_metrics(b))
    assert ra == rb
    assert ra[0]["fan_in"] == "constant" and ra[0]["ablation"] is True
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, "--model", "mlp", "--block-size", "4", "--density", "0.01",
              "--fan-in", "constant", "--epochs", "1", "--out", str(tmp_path / "c")])
    assert exc.value.code == 2
    assert "cannot give every row one unit" in capsys.readouterr().err


def test_itop_train_refuses_a_static_run_cut_off_from_its_input(tmp_path, monkeypatch, capsys):
    from itop.app import train as train_mod
    from itop.app.cli import main
    monkeypatch.setattr(train_mod, "output_depends_on_input", lambda model, x: False)
    monkeypatch.setattr(train_mod, "TOPOLOGY_DRAWS", 3)
    args = ["train", *TINY, "--model", "mlp", "--block-size", "4", "--epochs", "1"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--static", "--out", str(tmp_path / "s")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cut every path" in err and "static training would stay at chance" in err
    assert main([*args, "--out", str(tmp_path / "d")]) == 0
    assert "warning: 3 random topologies" in capsys.readouterr().err


def test_output_depends_on_input_sees_a_cut():
    torch.manual_seed(0)
    lin = itop.SparseLinear(8, 8, density=0.25, block_size=4, bias=True)
    mask = torch.tensor([[True, False], [False, False]])
    lin.load_state_dict({**lin.state_dict(), "block_mask": mask,
                         "values": torch.randn(1, 4, 4)})
    model = nn.Sequential(nn.Linear(8, 8), lin, nn.Linear(8, 4))
    from itop.app.connectivity import output_depends_on_input
    x = torch.randn(5, 8)
    assert output_depends_on_input(model, x)
    with torch.no_grad():
        model[0].weight[:4] = 0.0                 # the live block reads inputs 0..3: now zero
        model[0].bias[:4] = 0.0
    assert not output_depends_on_input(model, x)
    assert model.training


def test_itop_train_warns_when_it_ends_at_chance(tmp_path, capsys):
    from itop.app.cli import main
    assert main(["train", *TINY, "--model", "mlp", "--block-size", "4", "--epochs", "1",
                 "--lr", "1e-9", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "warning: the sparse model ended at chance level" in err


# --------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    import torch.nn.functional as F
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model = _cfi_model(4, 0.05, ablation=True, seed=rank)   # other masks on each rank
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        mgr = itop.TopologyManager(ddp, opt, update_every=1, total_steps=100, prune_rate=0.5,
                                   fan_in="constant", ablation=True)
        for t in range(8):
            g = torch.Generator().manual_seed(100 * rank + t)    # each rank its own batch
            loss = F.cross_entropy(ddp(torch.randn(8, 32, generator=g)),
                                   torch.randint(0, 16, (8,), generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
            mgr.step()
        torch.save({"masks": [m.block_mask.clone() for m in _layers(model)],
                    "fired": {k: v.clone() for k, v in mgr.fired.items()},
                    "rows": mgr._rows}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_keep_identical_constant_fan_in_topologies(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for a, b, (live, f) in zip(r0["masks"], r1["masks"], r0["rows"]):
        assert torch.equal(a, b) and fi.fan_in_of(a) == (live, f)
    for k in r0["fired"]:
        assert torch.equal(r0["fired"][k], r1["fired"][k])
    assert any(int(v.sum()) > int(m.sum()) for v, m in zip(r0["fired"].values(), r0["masks"]))


def test_itop_train_draws_again_a_topology_cut_off_from_its_input(capsys):
    """cnn1d at 98 % and block 16 keeps one block per strided convolution: most random draws
    cut the input off. _build must hand over a connected one, and say how many it dropped."""
    from itop.app.connectivity import output_depends_on_input
    from itop.app.data import load_dataset, prepare_batch
    from itop.app.train import TrainConfig, _build, _Dist
    ds = load_dataset("synthetic")
    x = prepare_batch(ds, ds.train_x[:100], train=False, device=torch.device("cpu"))
    redrawn = 0
    for seed in range(6):
        cfg = TrainConfig(data="synthetic", density=0.02, block_size=16, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _build(cfg, ds, torch.device("cpu"), _Dist())
        assert output_depends_on_input(model, x)
        redrawn += "cut every path from the input to the output; using draw" in \
            capsys.readouterr().out
    assert redrawn >= 2



def test_layers_the_distribution_makes_dense_stay_dense():
    """ERK makes cnn1d's first convolution and last linear layer dense at 90 % (block 1); the
    constant fan-in budget must not sparsify them (nor count them)."""
    from itop.app.models import build_model
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        any_fan = itop.sparsify(build_model("cnn1d", (1, 1, 40), 10), 0.1, block_size=1)
        cfi = itop.sparsify(build_model("cnn1d", (1, 1, 40), 10), 0.1, block_size=1,
                            fan_in="constant")
    names = lambda m: [n for n, x in m.named_modules() if isinstance(x, itop.SparseLayer)]
    assert names(cfi) == names(any_fan) == ["features.3", "features.6", "classifier.0"]
    a, c = itop.sparsity_summary(any_fan), itop.sparsity_summary(cfi)
    assert abs(c.overall_density - a.overall_density) < 0.005
