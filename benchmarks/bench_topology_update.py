"""Cost of one topology update against one training step (issue 4, "Overhead").

For an MLP-heavy model of sparse layers, it times
- a plain training step (forward, backward, optimizer step, ``mgr.step()`` with nothing to do),
- an update step: the same, with the growth-score hooks armed and the topology update inside
  ``mgr.step()``,
and reports ``extra = update_step - plain_step`` and the overhead at ``update_every=100``:
``extra / (100 · plain_step)`` (the target is < 1 %).

Writes raw timings with the device, versions and git commit to JSON:

    python benchmarks/bench_topology_update.py [--device cpu|cuda] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import itop  # noqa: E402


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:  # pragma: no cover - not a checkout
        return "unknown"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(device, width, depth, batch, density, block_size, growth, repeats, dtype):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10)).to(device=device, dtype=dtype)
    itop.sparsify(model, density, block_size=block_size, distribution="uniform",
                  exclude=[str(2 * depth)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    # update_every=2: odd steps are plain steps, even steps are update steps
    mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=10 ** 9, prune_rate=0.3,
                               schedule="constant", growth=growth)
    x = torch.randn(batch, width, device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), device=device)
    plain, update = [], []
    for i in range(2 * (repeats + 2)):
        _sync(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        changed = mgr.step()
        _sync(device)
        dt = time.perf_counter() - t0
        if i >= 4:  # warm-up
            (update if changed else plain).append(dt)
    p, u = statistics.median(plain), statistics.median(update)
    return {"width": width, "depth": depth, "batch": batch, "density": density,
            "block_size": block_size, "growth": growth, "dtype": str(dtype),
            "plain_step_s": plain, "update_step_s": update,
            "plain_step_median_s": p, "update_step_median_s": u,
            "update_extra_s": u - p, "overhead_at_update_every_100": (u - p) / (100 * p)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = []
    for bs in (32, 1):
        for growth in ("random", "gradient"):
            r = run_case(device, args.width, args.depth, args.batch, args.density, bs, growth,
                         args.repeats, dtype)
            print(f"block {bs:2d} {growth:8s}: step {r['plain_step_median_s'] * 1e3:8.2f} ms, "
                  f"update step {r['update_step_median_s'] * 1e3:8.2f} ms, overhead at "
                  f"update_every=100: {100 * r['overhead_at_update_every_100']:.3f} %")
            cases.append(r)
    result = {
        "benchmark": "topology_update", "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "git_commit": _git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": cases,
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"topology_update_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
