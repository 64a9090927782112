"""``python -m itop_kernels``: a one-minute demo of the block-sparse linear layer.

Checks ``block_sparse_linear`` (forward and all gradients) against a float64 dense reference on
random data, then times fwd+bwd against dense ``F.linear`` at a few densities on the default
device and prints a table. The full sweeps live in ``benchmarks/``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from . import BlockLayout, block_sparse_linear


def _check(device: torch.device) -> float:
    """Largest relative error of y, dX, dW, db against float64 at a small random problem."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(8, 6, generator=g) < 0.3
    lay = BlockLayout.from_mask(mask, 32)
    ref = {"x": torch.randn(37, 192, dtype=torch.float64, generator=g),
           "v": lay.gather(torch.randn(256, 192, dtype=torch.float64, generator=g)),
           "b": torch.randn(256, dtype=torch.float64, generator=g)}
    dy = torch.randn(37, 256, dtype=torch.float64, generator=g)
    ours = {k: t.to(device, torch.float32).requires_grad_() for k, t in ref.items()}
    for t in ref.values():
        t.requires_grad_()
    y = block_sparse_linear(ours["x"], ours["v"], lay.to(device), ours["b"])
    y.backward(dy.to(device, torch.float32))
    y_ref = ref["x"] @ lay.scatter(ref["v"]).t() + ref["b"]
    y_ref.backward(dy)
    pairs = [(y, y_ref)] + [(ours[k].grad, ref[k].grad) for k in ref]
    return max(float((a.detach().double().cpu() - r.detach()).norm() / r.detach().norm())
               for a, r in pairs)


def _time(fn, device: torch.device, reps: int = 5) -> float:
    fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m itop_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=2048, help="in = out features (default 2048)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--block-size", type=int, default=32)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    err = _check(device)
    print(f"correctness vs float64 (y, dX, dW, db), fp32 on {device}: max relative error {err:.2e}")
    if not err < 1e-4:
        print("FAILED: relative error above 1e-4", file=sys.stderr)
        return 1
    n, bs = args.size, args.block_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(args.batch, n, device=device, dtype=dtype, requires_grad=True)
    W = torch.randn(n, n, device=device, dtype=dtype, requires_grad=True)
    dense_ms = _time(lambda: F.linear(x, W).backward(torch.ones(args.batch, n, device=device, dtype=dtype)), device)
    print(f"\nfwd+bwd, batch {args.batch}, {n}x{n}, block {bs}, {dtype}, "
          f"{torch.get_num_threads()} threads: dense F.linear {dense_ms:.1f} ms")
    print(f"{'density':>8} {'ours ms':>9} {'speedup':>8}")
    g = torch.Generator().manual_seed(1)
    for density in (0.2, 0.1, 0.05, 0.02):
        R = n // bs
        k = max(1, round(density * R * R))
        mask = torch.zeros(R * R, dtype=torch.bool)
        mask[torch.randperm(R * R, generator=g)[:k]] = True
        lay = BlockLayout.from_mask(mask.view(R, R).to(device), bs)
        v = lay.gather(W.detach()).requires_grad_()
        dy = torch.ones(args.batch, n, device=device, dtype=dtype)
        ms = _time(lambda: block_sparse_linear(x, v, lay).backward(dy), device)
        print(f"{density:>8.2f} {ms:>9.1f} {dense_ms / ms:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
