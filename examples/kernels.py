"""The kernels directly: a block-sparse linear layer and a block-sparse convolution.

Builds a :class:`itop_kernels.BlockLayout` from a block mask, keeps only the active blocks of a
weight (``layout.gather``), runs forward and backward through ``block_sparse_linear`` and
``block_sparse_conv2d``, and checks every output and gradient against the dense computation on
the masked weight in float64. CUDA tensors run the Triton kernels; CPU tensors run the CPU path
that touches only the active blocks.

    python examples/kernels.py           # 2048x2048 linear, batch 256; 128-channel conv
    python examples/kernels.py --tiny    # small shapes (what CI runs)
"""
import argparse
import time

import torch
import torch.nn.functional as F

from itop_kernels import BlockLayout, block_sparse_conv2d, block_sparse_linear


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a - ref‖ / ‖ref‖, computed in float64."""
    return float((a.double() - ref).norm() / ref.norm())


def linear_demo(device: torch.device, n: int, batch: int, bs: int, density: float) -> None:
    block_mask = torch.rand(n // bs, n // bs, device=device) < density   # bool [out/bs, in/bs]
    layout = BlockLayout.from_mask(block_mask, block_size=bs)
    W = torch.randn(n, n, device=device) / n ** 0.5                       # a dense weight [out, in]
    values = layout.gather(W).requires_grad_()                            # [nnz, bs, bs]
    bias = torch.zeros(n, device=device, requires_grad=True)
    x = torch.randn(batch, n, device=device, requires_grad=True)
    print(f"linear {n}x{n}, block {bs}: {layout.nnz} of {block_mask.numel()} blocks active "
          f"(density {layout.density:.3f})")

    y = block_sparse_linear(x, values, layout, bias)                      # [batch, n]
    dy = torch.randn_like(y)
    y.backward(dy)

    # the same computation, dense, in float64 on the masked weight
    x64, v64 = x.detach().double().requires_grad_(), values.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    y64 = F.linear(x64, layout.scatter(v64), b64)                         # scatter: [n, n]
    y64.backward(dy.double())
    for name, ours, ref in [("y", y, y64), ("dx", x.grad, x64.grad),
                            ("dvalues", values.grad, v64.grad), ("dbias", bias.grad, b64.grad)]:
        err = rel_err(ours.detach(), ref.detach())
        print(f"  {name:8s} relative error vs float64 {err:.1e}")
        assert err < 1e-4, name


def conv_demo(device: torch.device, channels: int, hw: int, batch: int, bs: int,
              density: float) -> None:
    block_mask = torch.rand(channels // bs, channels // bs, device=device) < density
    block_mask[0, 0] = True                                               # at least one block
    layout = BlockLayout.from_mask(block_mask, block_size=bs)
    W = torch.randn(channels, channels, 3, 3, device=device) / (9 * channels) ** 0.5
    values = layout.gather(W).requires_grad_()                            # [nnz, 3, 3, bs, bs]
    x = torch.randn(batch, channels, hw, hw, device=device, requires_grad=True)
    x_cl = x.contiguous(memory_format=torch.channels_last)                # NCHW works as well
    print(f"conv2d 3x3 {channels}->{channels}, {hw}x{hw}, block {bs}: {layout.nnz} of "
          f"{block_mask.numel()} channel blocks active")

    y = block_sparse_conv2d(x_cl, values, layout, padding=1)             # [batch, C, hw, hw]
    dy = torch.randn_like(y)
    y.backward(dy)

    x64, v64 = x.detach().double().requires_grad_(), values.detach().double().requires_grad_()
    y64 = F.conv2d(x64, layout.scatter(v64), padding=1)
    y64.backward(dy.double())
    for name, ours, ref in [("y", y, y64), ("dx", x.grad, x64.grad),
                            ("dvalues", values.grad, v64.grad)]:
        err = rel_err(ours.detach(), ref.detach())
        print(f"  {name:8s} relative error vs float64 {err:.1e}")
        assert err < 1e-4, name


def timing_demo(device: torch.device, n: int, batch: int, bs: int, density: float) -> None:
    """Median fwd+bwd time against dense ``F.linear`` (a rough look; see benchmarks/)."""
    layout = BlockLayout.from_mask(torch.rand(n // bs, n // bs, device=device) < density, bs)
    values = torch.randn(layout.nnz, bs, bs, device=device, requires_grad=True)
    W = torch.randn(n, n, device=device, requires_grad=True)
    x = torch.randn(batch, n, device=device, requires_grad=True)
    dy = torch.randn(batch, n, device=device)

    def median_ms(fn, reps: int = 7) -> float:
        times = []
        for _ in range(reps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn().backward(dy)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return 1e3 * sorted(times[1:])[reps // 2]

    sparse = median_ms(lambda: block_sparse_linear(x, values, layout))
    dense = median_ms(lambda: F.linear(x, W))
    print(f"fwd+bwd at density {layout.density:.2f}: sparse {sparse:.2f} ms, dense {dense:.2f} ms "
          f"({dense / sparse:.1f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small shapes (CI)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device}")
    torch.manual_seed(0)
    if device.type == "cuda":
        # fp32 dots use tf32 only when this is on; the float64 check below wants full fp32
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.tiny:
        linear_demo(device, n=128, batch=16, bs=32, density=0.3)
        conv_demo(device, channels=32, hw=6, batch=2, bs=16, density=0.5)
        timing_demo(device, n=256, batch=64, bs=32, density=0.1)
    else:
        linear_demo(device, n=2048, batch=256, bs=32, density=0.1)
        conv_demo(device, channels=128, hw=16, batch=8, bs=16, density=0.2)
        timing_demo(device, n=4096, batch=512, bs=32, density=0.05)


if __name__ == "__main__":
    main()
