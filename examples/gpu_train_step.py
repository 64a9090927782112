"""A GPU training step with block-sparse layers, timed against the same dense model.

On a CUDA device the sparse layers run the Triton kernels in bfloat16 autocast (products
accumulate in float32). Without a GPU the script says so and runs the same code on the CPU
(float32, the CPU block-sparse path), which is how CI runs it.

    python examples/gpu_train_step.py           # 3 layers of 4096x4096, batch 4096 on a GPU
    python examples/gpu_train_step.py --tiny    # small shapes, a few steps (what CI runs)
"""
import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import itop


def time_steps(model: nn.Module, opt: torch.optim.Optimizer, mgr, x: torch.Tensor,
               y: torch.Tensor, steps: int) -> float:
    """Median milliseconds of one training step (forward, backward, optimizer, topology)."""
    cuda = x.is_cuda
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mgr is not None:
            mgr.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[2:])            # the first steps warm up (Triton compiles its kernels)
    return 1e3 * times[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small shapes, a few steps (CI)")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--block-size", type=int, default=64, help="16, 32, 64 or 128 on a GPU")
    args = p.parse_args()
    if torch.cuda.is_available():
        device = torch.device("cuda")
        print(f"device: {torch.cuda.get_device_name()} (Triton kernels, bf16 autocast)")
    else:
        device = torch.device("cpu")
        print("device: no CUDA device found, so this runs on the CPU (float32, the CPU "
              "block-sparse path); on a GPU the same script runs the Triton kernels")
    # tiny: 640 = 10 blocks of 64, so that 10 % gives every block-row a block
    width, batch, steps = (640, 64, 8) if args.tiny else (4096, 4096, 20)

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)).to(device)
    sparse = itop.sparsify(copy.deepcopy(dense), density=args.density, distribution="uniform",
                           block_size=args.block_size, exclude=["6"])
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    results = {}
    for name, model in [("dense", dense), ("sparse", sparse)]:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        mgr = (itop.TopologyManager(model, opt, update_every=100, growth="gradient",
                                    total_steps=10_000) if name == "sparse" else None)
        results[name] = time_steps(model, opt, mgr, x, y, steps)
    print(itop.sparsity_summary(sparse))
    print(f"training step, batch {batch}: dense {results['dense']:.2f} ms, sparse "
          f"{results['sparse']:.2f} ms ({results['dense'] / results['sparse']:.2f}x dense)")


if __name__ == "__main__":
    main()
