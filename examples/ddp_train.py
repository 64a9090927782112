"""Dynamic sparse training under DistributedDataParallel (torchrun; gloo on CPUs, nccl on GPUs).

Every process builds and sparsifies the same model, wraps it in DDP and gives the DDP model to
the ``TopologyManager``. The manager then keeps the topology identical on every rank: growth
scores are all-reduced, random growth is seeded alike, and rank 0's new masks are broadcast.
At the end every rank hashes its masks and rank 0 checks that they agree.

    torchrun --nproc_per_node 2 examples/ddp_train.py            # 2 CPU processes
    torchrun --nproc_per_node 2 examples/ddp_train.py --tiny     # a few steps (what CI runs)
"""
import argparse
import gc
import hashlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import itop


def mask_hash(model: nn.Module) -> int:
    """A 63-bit hash of every sparse layer's block mask (equal on ranks with equal topologies)."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        if isinstance(m, itop.SparseLayer):
            h.update(name.encode())
            h.update(m.block_mask.to(torch.uint8).cpu().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def train(tiny: bool, rank: int, world: int, device: torch.device) -> str:
    """Train the sparse MLP on this rank; returns rank 0's closing line (others: "")."""
    width, n, epochs = (512, 1024, 2) if tiny else (512, 16384, 3)

    # the same model and data on every rank (same seed); DistributedSampler splits the data
    torch.manual_seed(0)
    x = torch.randn(n, 512)
    y = (x[:, :10] + 0.5 * x[:, 10:20]).argmax(1)      # a learnable 10-class target
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=256 // world, sampler=sampler)   # global batch 256

    model = nn.Sequential(nn.Linear(512, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))
    model = itop.sparsify(model, density=0.1, block_size=32, exclude=["4"]).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                  else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    mgr = itop.TopologyManager(ddp, opt, update_every=5, growth="gradient",
                               total_steps=epochs * len(loader))   # DDP model: synchronized

    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            loss = F.cross_entropy(ddp(xb.to(device)), yb.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            mgr.step()

    hashes = [None] * world
    dist.all_gather_object(hashes, mask_hash(model))
    if rank != 0:
        return ""
    same = len(set(hashes)) == 1
    return (f"{world} processes ({dist.get_backend()}), {mgr.step_count} steps, ITOP rate "
            f"{mgr.itop_rate:.3f}, last loss {loss.item():.3f}\n"
            f"mask hashes per rank: {hashes} -> {'identical' if same else 'DIFFERENT'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes and a few steps (CI)")
    args = p.parse_args()
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("run me with torchrun, e.g. torchrun --nproc_per_node 2 "
                         "examples/ddp_train.py")
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)         # one thread per process on a small CPU
    report = train(args.tiny, rank, world, device)
    # DDP holds the process group, and modules with hooks sit in reference cycles: collect
    # them and wait for every rank before destroying the group, so that no gloo/NCCL state
    # is torn down later, at interpreter exit.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    if report:
        print(report)
        if "DIFFERENT" in report:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
