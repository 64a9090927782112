"""CPU implementation of the block-sparse linear ops. It touches only the active blocks.

Each function loops over block-rows (or block-columns) of the layout, never over blocks, and
runs one dense GEMM per block-row over the gathered operand, so all arithmetic goes through
torch's BLAS and its intra-op thread pool. No dense weight is ever formed.

Shapes (``R``/``C`` block-rows/columns, ``bs`` the block size, ``N = R*bs``, ``K = C*bs``):
``x [M, K]``, ``values [nnz, bs, bs]``, ``dy [M, N]``. float16/bfloat16 inputs are computed in
float32 and rounded once at the end; float32 and float64 compute in their own precision.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["linear_forward", "linear_grad_input", "linear_grad_weight"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def linear_forward(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                   col_idx: torch.Tensor, bias: Optional[torch.Tensor], block_size: int,
                   out_features: int) -> torch.Tensor:
    """``Y = X·Wᵀ (+ bias)``: ``x [M, K]``, ``values [nnz, bs, bs]`` -> ``[M, N]`` in x's dtype."""
    bs = block_size
    M, K = x.shape
    R, C = out_features // bs, K // bs
    ct = _compute_dtype(x.dtype)
    xt = x.t().to(ct).contiguous().view(C, bs, M)          # block-column c of X is xt[c]: [bs, M]
    v = values.to(ct)
    yt = torch.zeros(R, bs, M, dtype=ct)                    # Yᵀ, one [bs, M] slab per block-row
    rp = row_ptr.tolist()
    for r in range(R):
        a, b = rp[r], rp[r + 1]
        if a == b:
            continue
        # Yᵀ[r] = [V_a | V_a+1 | ...]  (bs × (b-a)·bs)  @  stack(xt[col])  ((b-a)·bs × M)
        v_row = v[a:b].permute(1, 0, 2).reshape(bs, (b - a) * bs)
        torch.mm(v_row, xt.index_select(0, col_idx[a:b]).view(-1, M), out=yt[r])
    y = yt.view(R * bs, M).t()
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype).contiguous()


def linear_grad_input(dy: torch.Tensor, values: torch.Tensor, col_ptr: torch.Tensor,
                      t_row_idx: torch.Tensor, t_block_idx: torch.Tensor, block_size: int,
                      in_features: int, dyt: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dX = dY·W`` through the transpose metadata: ``dy [M, N]`` -> ``[M, K]`` in dy's dtype.

    ``dyt``, if given, is ``dyᵀ`` already laid out as ``[R, bs, M]`` in the compute dtype.
    """
    bs = block_size
    M, N = dy.shape
    R, C = N // bs, in_features // bs
    ct = _compute_dtype(dy.dtype)
    if dyt is None:
        dyt = dy.t().to(ct).contiguous().view(R, bs, M)
    v_t = values.to(ct).index_select(0, t_block_idx)       # values in column-major block order
    dxt = torch.zeros(C, bs, M, dtype=ct)
    cp = col_ptr.tolist()
    for c in range(C):
        a, b = cp[c], cp[c + 1]
        if a == b:
            continue
        # dXᵀ[c] = [V_aᵀ | V_a+1ᵀ | ...]  (bs × (b-a)·bs)  @  stack(dyt[row])  ((b-a)·bs × M)
        v_col = v_t[a:b].permute(2, 0, 1).reshape(bs, (b - a) * bs)
        torch.mm(v_col, dyt.index_select(0, t_row_idx[a:b]).view(-1, M), out=dxt[c])
    return dxt.view(C * bs, M).t().to(dy.dtype).contiguous()


def linear_grad_weight(dy: torch.Tensor, x: torch.Tensor, col_ptr: torch.Tensor,
                       t_row_idx: torch.Tensor, t_block_idx: torch.Tensor, block_size: int,
                       dyt: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dW`` at the active blocks only: ``dV[i] = dY[:, r_i]ᵀ · X[:, c_i]`` -> ``[nnz, bs, bs]``.

    Walks block-columns so that each column slice of ``X`` is read in place (no gather of X).
    """
    bs = block_size
    M, N = dy.shape
    K = x.shape[1]
    R, C = N // bs, K // bs
    ct = _compute_dtype(dy.dtype)
    if dyt is None:
        dyt = dy.t().to(ct).contiguous().view(R, bs, M)
    xc = x.to(ct)
    nnz = t_row_idx.numel()
    dv_t = torch.empty(nnz, bs, bs, dtype=ct)               # gradients in column-major order
    cp = col_ptr.tolist()
    for c in range(C):
        a, b = cp[c], cp[c + 1]
        if a == b:
            continue
        # [dV_a; dV_a+1; ...]  ((b-a)·bs × bs) = stack(dyt[row]) @ X[:, c·bs:(c+1)·bs]
        torch.mm(dyt.index_select(0, t_row_idx[a:b]).view(-1, M), xc[:, c * bs:(c + 1) * bs],
                 out=dv_t[a:b].view(-1, bs))
    dv = torch.empty_like(dv_t)
    dv[t_block_idx.long()] = dv_t                            # back to row-major (values) order
    return dv.to(dy.dtype)
