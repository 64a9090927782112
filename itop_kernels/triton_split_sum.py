"""The fixed-order sum of split-K partial sums, in one Triton kernel.

The weight-gradient kernels of the linear (split-M ``dW``) and conv (split-pixel ``wgrad``)
layers reduce over many rows. They split that reduction across programs, and each split
writes fp32 partial sums to a workspace ``ws [S, *out.shape]``. :func:`sum_splits` then
computes ``out = Σ_s ws[s]`` in a fixed order (deterministic: no atomics) and rounds once to
``out``'s dtype, in one pass (torch would take two: ``ws.sum(0)`` then ``.to(dtype)``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_launch import cdiv, launch

__all__ = ["sum_splits", "aot_cases"]

_BLOCK = 1024   # elements per program
_WARPS = 4


@triton.jit(do_not_specialize=["S"])
def _sum_splits_kernel(ws_ptr, out_ptr, L, S, BLOCK: tl.constexpr):
    # out[l] = Σ_s ws[s, l]: ws is [S, L] row-major fp32, so ws[s, l] sits at s*L + l.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(ws_ptr + s * L + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_splits(ws: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = ws.sum(0)`` in split order, rounded once to ``out.dtype``.

    Args:
        ws: ``[S, *out.shape]`` float32, contiguous: the splits' partial sums.
        out: the result buffer, contiguous, float16/bfloat16/float32, on ws's device.

    Returns:
        ``out``.
    """
    L = out.numel()
    if ws.dtype != torch.float32 or not ws.is_contiguous() or ws.numel() != ws.shape[0] * L:
        raise ValueError(f"ws must be a contiguous float32 [S, *{tuple(out.shape)}] workspace, "
                         f"got {ws.dtype} {tuple(ws.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if L:
        launch(_sum_splits_kernel, (cdiv(L, _BLOCK),), (ws, out, L, ws.shape[0]),
               {"BLOCK": _BLOCK}, _WARPS, 1)
    return out


def aot_cases(arch: int) -> list:
    """The kernel for every output dtype, for the ahead-of-time compile check."""
    from .compile_check import AotCase

    return [AotCase(f"sum_splits {dt}", _sum_splits_kernel,
                    {"ws_ptr": "*fp32", "out_ptr": f"*{dt}", "L": "i32", "S": "i32",
                     "BLOCK": "constexpr"}, {"BLOCK": _BLOCK}, _WARPS, 1)
            for dt in ("fp16", "bf16", "fp32")]
