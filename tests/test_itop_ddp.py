"""TopologyManager under DistributedDataParallel: 2 CPU processes, gloo, gradient growth."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import itop

STEPS = 12
UPDATE_EVERY = 2


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(rank)  # each rank starts from other masks: rank 0's must win
        model = nn.Sequential(itop.SparseLinear(16, 32, density=0.3, block_size=4), nn.ReLU(),
                              itop.SparseLinear(32, 32, density=0.3, block_size=1), nn.ReLU(),
                              itop.SparseLinear(32, 8, density=0.5, block_size=4))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        mgr = itop.TopologyManager(ddp, opt, update_every=UPDATE_EVERY, total_steps=40,
                                   growth="gradient", prune_rate=0.5)
        assert [n for n, _ in mgr.layers] == ["0", "2", "4"]  # found through ddp.module
        changes = []
        for t in range(1, STEPS + 1):
            g = torch.Generator().manual_seed(100 * rank + t)  # each rank sees its own batch
            x = torch.randn(16, 16, generator=g)
            y = torch.randint(0, 8, (16,), generator=g)
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            changes.append(mgr.step())
        out = {"changes": changes, "itop_rate": mgr.itop_rate,
               "state": {k: v.clone() for k, v in model.state_dict().items()},
               "fired": {k: v.clone() for k, v in mgr.fired.items()},
               "layouts": [(m.layout.row_idx.clone(), m.layout.col_idx.clone())
                           for m in model if isinstance(m, itop.SparseLayer) and m.layout]}
        # layers of one shape (updated as one batched group): the choices broadcast from rank
        # 0 as a group's [G, k] rows, for random and gradient growth
        out["twins"] = {}
        for growth in ("random", "gradient"):
            torch.manual_seed(rank)
            twins = nn.Sequential(*[itop.SparseLinear(16, 16, density=0.25, block_size=4)
                                    for _ in range(3)])
            tddp = nn.parallel.DistributedDataParallel(twins)
            topt = torch.optim.AdamW(tddp.parameters(), lr=0.05)
            tmgr = itop.TopologyManager(tddp, topt, update_every=1, total_steps=20,
                                        growth=growth, prune_rate=0.5, seed=rank)
            for t in range(1, 5):
                g = torch.Generator().manual_seed(100 * rank + t)
                topt.zero_grad()
                tddp(torch.randn(8, 16, generator=g)).square().mean().backward()
                topt.step()
                assert tmgr.step()
            out["twins"][growth] = {
                "state": {k: v.clone() for k, v in twins.state_dict().items()},
                "layout": [m.layout.t_block_idx.clone() for m in twins],
                "fired": {k: v.clone() for k, v in tmgr.fired.items()},
                "opt": [topt.state[m.values]["exp_avg"].clone() for m in twins]}
        # a model that is not wrapped in DDP trains on its own: its masks stay rank-local,
        # unless distributed=True asks for synchronization
        local = nn.Sequential(itop.SparseLinear(16, 16, density=0.5, block_size=4))
        itop.TopologyManager(local, torch.optim.SGD(local.parameters(), lr=0.1),
                             update_every=1, total_steps=10)
        out["local_mask"] = local[0].block_mask.clone()
        forced = nn.Sequential(itop.SparseLinear(16, 16, density=0.5, block_size=4))
        itop.TopologyManager(forced, torch.optim.SGD(forced.parameters(), lr=0.1),
                             update_every=1, total_steps=10, distributed=True)
        out["forced"] = {k: v.clone() for k, v in forced.state_dict().items()}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_ranks_reach_identical_topologies(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["changes"] == r1["changes"] == [t % UPDATE_EVERY == 0 for t in range(1, STEPS + 1)]
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    for k in r0["fired"]:
        assert torch.equal(r0["fired"][k], r1["fired"][k]), k
    for (a_r, a_c), (b_r, b_c) in zip(r0["layouts"], r1["layouts"]):
        assert torch.equal(a_r, b_r) and torch.equal(a_c, b_c)
    assert r0["itop_rate"] == r1["itop_rate"] > 0.45  # the topology really moved
    assert not torch.equal(r0["local_mask"], r1["local_mask"])
    for growth in ("random", "gradient"):
        a, b = r0["twins"][growth], r1["twins"][growth]
        for k in a["state"]:
            if not k.endswith("bias"):    # the manager syncs the topology, not the biases
                assert torch.equal(a["state"][k], b["state"][k]), (growth, k)
        for k in a["fired"]:
            assert torch.equal(a["fired"][k], b["fired"][k]), (growth, k)
            assert int(a["fired"][k].sum()) > 4        # 4 active blocks: the topology moved
        for x, y in zip(a["layout"] + a["opt"], b["layout"] + b["opt"]):
            assert torch.equal(x, y), growth
    for k in ("0.block_mask", "0.values"):  # the manager syncs the topology, not the biases
        assert torch.equal(r0["forced"][k], r1["forced"][k]), k
    for k, v in r0["state"].items():
        if k.endswith("block_mask"):
            assert int(v.sum()) == {"0.block_mask": 10, "2.block_mask": 307,
                                    "4.block_mask": 8}[k]
