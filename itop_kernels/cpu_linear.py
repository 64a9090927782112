"""CPU implementation of the block-sparse linear ops. It touches only the active weights.

Two paths, chosen by the block size:

* ``block_size >= 2`` (block-sparse). Block-rows (forward) and block-columns (backward) are
  sorted by their number of active blocks; every run of rows with the same count ``k`` is one
  batched GEMM (``torch.bmm``: ``[n, M, k·bs] @ [n, k·bs, bs]``), so a call makes a few dozen
  BLAS calls, not one per row. The operand blocks are gathered *once per call*, in that sorted
  order, by one ``index_select`` into a reused workspace (``X`` through ``col_idx``, ``dY``
  through ``t_row_idx``); each batch reads its slice of the gather in place (strided views,
  no copy) and the outputs are put back in row order by one row copy. There are no transposes
  of ``X`` or ``dY``. The backward computes ``dX`` and ``dW`` in the same pass over the
  block-columns from one gather of ``dY``. Few, large parallel regions also keep the path
  steady when the cores are shared (hundreds of tiny multi-threaded GEMMs stall on every
  preempted thread).
* ``block_size == 1`` (unstructured). ``W`` is a CSR matrix built zero-copy from the layout's
  ``row_ptr``/``col_idx`` (int32, taken without conversion) and ``values.view(-1)``;
  ``Wᵀ`` is the CSR of the transpose metadata (``col_ptr``/``t_row_idx``) with the values
  re-gathered through ``t_block_idx`` each call (``W`` changes every step). ``Y`` and ``dX`` are
  CSR × dense products (``torch.sparse.mm(..., reduce="sum")``: ATen's native row-parallel
  kernel, faster here than the MKL path), ``dW`` at the nonzeros is
  ``torch.sparse.sampled_addmm``. The dense operands are handed to them in the row-major
  ``[features, batch]`` layout they are fastest with, transposed into reused workspaces. No
  dense weight and no mask multiply anywhere.

All arithmetic runs in torch's BLAS / sparse kernels, so it uses torch's intra-op thread pool and
scales with ``torch.set_num_threads``. Workspaces (the gathered operands, transposes) are kept
per thread and reused across calls, because fresh multi-megabyte allocations page-fault on every
call; :func:`release_workspace` frees them. Outputs are always fresh tensors.

Shapes (``R``/``C`` block-rows/columns, ``bs`` the block size, ``N = R*bs``, ``K = C*bs``):
``x [M, K]``, ``values [nnz, bs, bs]``, ``dy [M, N]``. float16/bfloat16 inputs are computed in
float32 and rounded once at the end; float32 and float64 compute in their own precision.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from typing import Optional, Tuple

import torch

__all__ = ["linear_forward", "linear_grad_input", "linear_grad_weight", "linear_backward",
           "release_workspace"]

_WS = threading.local()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _workspace(slot: str, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reusable scratch tensor of ``shape`` (contents undefined), one buffer per slot/thread."""
    n = 1
    for s in shape:
        n *= s
    bufs = getattr(_WS, "bufs", None)
    if bufs is None:
        bufs = _WS.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        bufs[slot] = buf
    return buf[:n].view(shape)


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are re-created on the next call)."""
    _WS.bufs = {}


def _csr(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": said once is enough
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, vals, shape, check_invariants=False)


def _fill_bias(out: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if bias is None:
        out.zero_()
    else:
        out.copy_(bias.expand_as(out))


# =========================================================================== block size >= 2
def _plan(ptr: torch.Tensor):
    """Group the block-rows (or block-columns) of a CSR pointer array by their block count.

    Returns ``(order, perm, groups)``: ``order`` lists the rows sorted by count (stable),
    ``perm`` the block indices (into the CSR arrays) in that row order, and ``groups`` the
    ``(i, j, k, s)`` runs of sorted rows ``i:j`` that all hold ``k`` blocks, whose blocks are
    ``perm[s : s + (j-i)·k]``. Rows with equal counts then run as one batched GEMM."""
    counts = ptr[1:] - ptr[:-1]
    counts_sorted, order = torch.sort(counts, stable=True)
    starts = ptr[:-1].long().index_select(0, order)
    cs = counts_sorted.long()
    nnz = int(ptr[-1])
    first = torch.cumsum(cs, 0) - cs                     # sorted-order offset of each row
    perm = (torch.repeat_interleave(starts - first, cs, output_size=nnz)
            + torch.arange(nnz, dtype=torch.long))
    ks = counts_sorted.tolist()
    groups, i, s = [], 0, 0
    while i < len(ks):
        k, j = ks[i], i
        while j < len(ks) and ks[j] == k:
            j += 1
        groups.append((i, j, k, s))
        s += (j - i) * k
        i = j
    return order, perm, groups, torch.argsort(order)


_PLANS: dict = {}      # id(ptr) -> (weakref to ptr, ptr._version, plan)
_PLANS_MAX = 512


def _plan_cached(ptr: torch.Tensor):
    """:func:`_plan` plus the inverse row order, computed once per pointer array: the layout's
    metadata is fixed between topology updates (which build new tensors; an in-place write
    bumps the version counter and is seen too). Per-call host cost, not arithmetic, dominates
    small layers."""
    key = id(ptr)
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is ptr and hit[1] == ptr._version:
        return hit[2]
    plan = _plan(ptr)
    if len(_PLANS) >= _PLANS_MAX:
        for k in [k for k, v in _PLANS.items() if v[0]() is None] or list(_PLANS):
            del _PLANS[k]
    _PLANS[key] = (weakref.ref(ptr), ptr._version, plan)
    return plan


def _block_forward(x, values, row_ptr, col_idx, bias, bs, N, ct):
    M, K = x.shape
    R, C = N // bs, K // bs
    nnz = values.shape[0]
    y = torch.empty(M, N, dtype=ct)
    b = bias.to(ct) if bias is not None else None
    if nnz == 0 or M == 0:
        _fill_bias(y, b)
        return y
    order, perm, groups, inverse = _plan_cached(row_ptr)
    xg = _workspace("gather", (M, nnz, bs), ct)          # X blocks in sorted-row block order
    torch.index_select(x.to(ct).view(M, C, bs), 1, col_idx.index_select(0, perm), out=xg)
    vt = values.to(ct).index_select(0, perm).transpose(1, 2).contiguous()  # [nnz, in, out]
    ys = _workspace("out_sorted", (R, M, bs), ct)        # Y's block-columns, sorted-row order
    for i, j, k, s in groups:
        n = j - i
        if k == 0:
            ys[i:j].zero_()
            continue
        # Y[:, r] = [X_c0 | X_c1 | ...] (M × k·bs) @ [V_0ᵀ; V_1ᵀ; ...] (k·bs × bs), n rows at once
        lhs = xg[:, s:s + n * k].reshape(M, n, k * bs).transpose(0, 1)
        torch.bmm(lhs, vt[s:s + n * k].view(n, k * bs, bs), out=ys[i:j])
    yr = _workspace("out_rows", (R, M, bs), ct)
    torch.index_select(ys, 0, inverse, out=yr)   # back to block-row order
    if b is None:
        y.view(M, R, bs).copy_(yr.transpose(0, 1))
    else:
        torch.add(yr.transpose(0, 1), b.view(R, bs), out=y.view(M, R, bs))
    return y


def _block_backward(dy, x, values, col_ptr, t_row_idx, t_block_idx, bs, K, need_dx, need_dv, ct):
    M, N = dy.shape
    R, C = N // bs, K // bs
    nnz = values.shape[0]
    dx = torch.empty(M, K, dtype=ct) if need_dx else None
    if nnz == 0 or M == 0:
        if need_dx:
            dx.zero_()
        return dx, (torch.zeros(nnz, bs, bs, dtype=ct) if need_dv else None)
    order, perm, groups, inverse = _plan_cached(col_ptr)
    dyg = _workspace("gather", (M, nnz, bs), ct)         # dY blocks in sorted-column order
    torch.index_select(dy.to(ct).view(M, R, bs), 1, t_row_idx.index_select(0, perm), out=dyg)
    vidx = t_block_idx.index_select(0, perm)              # values index of each gathered block
    if need_dx:
        vc = values.to(ct).index_select(0, vidx)          # [nnz, out, in], sorted-column order
        dxs = _workspace("out_sorted", (C, M, bs), ct)
    if need_dv:
        xs = _workspace("x_cols", (M, C, bs), ct)          # X's block-columns, sorted order
        torch.index_select(x.to(ct).view(M, C, bs), 1, order, out=xs)
        dvs = torch.empty(nnz, bs, bs, dtype=ct)
    for i, j, k, s in groups:
        n = j - i
        if k == 0:
            if need_dx:
                dxs[i:j].zero_()
            continue
        g = dyg[:, s:s + n * k].reshape(M, n, k * bs)     # [dY_r0 | dY_r1 | ...] per column
        if need_dx:   # dX[:, c] = g @ [V_0; V_1; ...]  (k·bs × bs)
            torch.bmm(g.transpose(0, 1), vc[s:s + n * k].view(n, k * bs, bs), out=dxs[i:j])
        if need_dv:   # [dV_0; dV_1; ...] = gᵀ @ X[:, c]  (k·bs × bs)
            torch.bmm(g.permute(1, 2, 0), xs[:, i:j].transpose(0, 1),
                      out=dvs[s:s + n * k].view(n, k * bs, bs))
    if need_dx:
        dxr = _workspace("out_rows", (C, M, bs), ct)
        torch.index_select(dxs, 0, inverse, out=dxr)
        dx.view(M, C, bs).copy_(dxr.transpose(0, 1))
    dv = None
    if need_dv:   # sorted-column order -> row-major (values) order
        dv = torch.empty_like(dvs).index_copy_(0, vidx.long(), dvs)
    return dx, dv


# =========================================================================== block size 1 (CSR)
def _rows_of_t(a: torch.Tensor, slot: str) -> torch.Tensor:
    """``aᵀ`` as a row-major tensor: a free view when ``a`` is already a transposed view (the
    layout this path returns), else a copy into a reused workspace."""
    at = a.t()
    if at.is_contiguous():
        return at
    ws = _workspace(slot, tuple(at.shape), a.dtype)
    ws.copy_(at)
    return ws


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """``tᵀ`` for a row-major 2-D ``t``, as a tensor of its own (strides ``(1, rows)``) sharing
    ``t``'s storage rather than a view of it: an op output that is a view could not be modified
    in place by the caller (``ReLU(inplace=True)`` after a layer, say)."""
    out = t.new_empty(0)
    out.set_(t.untyped_storage(), t.storage_offset(), (t.shape[1], t.shape[0]), (1, t.shape[1]))
    return out


def _spmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fresh row-major ``a @ b`` for a CSR ``a`` and a row-major dense ``b``.

    ``reduce="sum"`` selects ATen's native CSR kernel (row-parallel, vectorized over ``b``'s
    rows), which runs about a quarter faster here than the MKL ``addmm`` that a plain
    ``torch.sparse.mm`` calls, and needs no zero-filled output."""
    return torch.sparse.mm(a, b, reduce="sum")


def _csr_forward(x, values, row_ptr, col_idx, bias, N, ct):
    """Returns ``Y`` as the transposed view of a fresh row-major ``Yᵀ [N, M]``."""
    M, K = x.shape
    b = bias.to(ct) if bias is not None else None
    if values.shape[0] == 0 or M == 0:
        yt = torch.empty(N, M, dtype=ct)
        _fill_bias(yt, None if b is None else b[:, None])
        return _transposed(yt)
    w = _csr(row_ptr, col_idx, values.to(ct).reshape(-1), (N, K))
    xt = _rows_of_t(x.to(ct), "xt")                        # Xᵀ, row-major [K, M]
    yt = _spmm(w, xt)                                      # Yᵀ = W · Xᵀ
    if b is not None:
        yt.add_(b[:, None])
    return _transposed(yt)


def _csr_backward(dy, x, values, row_ptr, col_idx, col_ptr, t_row_idx, t_block_idx, K,
                  need_dx, need_dv, ct):
    """``dX`` comes back as the transposed view of a fresh row-major ``dXᵀ [K, M]``."""
    M, N = dy.shape
    nnz = values.shape[0]
    dx = dv = None
    if nnz == 0 or M == 0:
        if need_dx:
            dx = _transposed(torch.zeros(K, M, dtype=ct))
        if need_dv:
            dv = torch.zeros(nnz, 1, 1, dtype=ct)
        return dx, dv
    dyt = _rows_of_t(dy.to(ct), "dyt")                     # dYᵀ, row-major [N, M]
    if need_dx:
        vflat = values.to(ct).reshape(-1)
        wt = _csr(col_ptr, t_row_idx, vflat.index_select(0, t_block_idx), (K, N))
        dx = _transposed(_spmm(wt, dyt))                   # dXᵀ = Wᵀ · dYᵀ
    if need_dv:
        xt = _rows_of_t(x.to(ct), "xt")
        pattern = _csr(row_ptr, col_idx, torch.zeros(nnz, dtype=ct), (N, K))
        # dW[i, j] = dYᵀ[i] · Xᵀ[j] at the nonzeros only (mat2 = Xᵀ.t() is read row-wise in place)
        dv = torch.sparse.sampled_addmm(pattern, dyt, xt.t(), beta=0.0).values().view(nnz, 1, 1)
    return dx, dv


# =========================================================================== entry points
def linear_forward(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                   col_idx: torch.Tensor, bias: Optional[torch.Tensor], block_size: int,
                   out_features: int) -> torch.Tensor:
    """``Y = X·Wᵀ (+ bias)``: ``x [M, K]``, ``values [nnz, bs, bs]`` -> ``[M, N]`` in x's dtype."""
    ct = _compute_dtype(x.dtype)
    if block_size == 1:
        y = _csr_forward(x, values.contiguous(), row_ptr, col_idx, bias, out_features, ct)
    else:
        y = _block_forward(x.contiguous(), values, row_ptr, col_idx, bias, block_size,
                           out_features, ct)
    return y.to(x.dtype)


def linear_backward(dy: torch.Tensor, x: torch.Tensor, values: torch.Tensor,
                    row_ptr: torch.Tensor, col_idx: torch.Tensor, col_ptr: torch.Tensor,
                    t_row_idx: torch.Tensor, t_block_idx: torch.Tensor, block_size: int,
                    need_dx: bool = True, need_dv: bool = True
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dX, dV)`` from one pass over ``dY`` (either may be skipped: ``None`` is returned).

    ``dX = dY·W`` is ``[M, K]`` in dy's dtype; ``dV`` holds ``dW`` at the active blocks only,
    ``[nnz, bs, bs]`` in the layout's row-major block order.
    """
    ct = _compute_dtype(dy.dtype)
    K = x.shape[1]
    if block_size == 1:
        dx, dv = _csr_backward(dy, x, values.contiguous(), row_ptr, col_idx, col_ptr, t_row_idx,
                               t_block_idx, K, need_dx, need_dv, ct)
    else:
        dx, dv = _block_backward(dy.contiguous(), x.contiguous(), values, col_ptr, t_row_idx,
                                 t_block_idx, block_size, K, need_dx, need_dv, ct)
    return (dx.to(dy.dtype) if dx is not None else None,
            dv.to(dy.dtype) if dv is not None else None)


def linear_grad_input(dy: torch.Tensor, values: torch.Tensor, col_ptr: torch.Tensor,
                      t_row_idx: torch.Tensor, t_block_idx: torch.Tensor, block_size: int,
                      in_features: int, dyt: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dX = dY·W`` through the transpose metadata: ``dy [M, N]`` -> ``[M, K]`` in dy's dtype.

    ``dyt`` is accepted for backward compatibility and ignored.
    """
    x_stub = dy.new_empty((0, in_features))  # only its width is read when dV is not needed
    ct = _compute_dtype(dy.dtype)
    if block_size == 1:
        empty = col_ptr.new_empty(0)
        dx, _ = _csr_backward(dy, x_stub, values.contiguous(), empty, empty, col_ptr, t_row_idx,
                              t_block_idx, in_features, True, False, ct)
    else:
        dx, _ = _block_backward(dy.contiguous(), x_stub, values, col_ptr, t_row_idx,
                                t_block_idx, block_size, in_features, True, False, ct)
    return dx.to(dy.dtype)


def linear_grad_weight(dy: torch.Tensor, x: torch.Tensor, col_ptr: torch.Tensor,
                       t_row_idx: torch.Tensor, t_block_idx: torch.Tensor, block_size: int,
                       dyt: Optional[torch.Tensor] = None, *, row_ptr: Optional[torch.Tensor] = None,
                       col_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dW`` at the active blocks only: ``dV[i] = dY[:, r_i]ᵀ · X[:, c_i]`` -> ``[nnz, bs, bs]``.

    Block size 1 also needs the row-wise CSR (``row_ptr``, ``col_idx``). ``dyt`` is ignored.
    """
    if block_size == 1 and (row_ptr is None or col_idx is None):
        raise ValueError("linear_grad_weight at block_size=1 needs row_ptr and col_idx")
    nnz = t_row_idx.numel()
    values_stub = dy.new_empty((nnz, block_size, block_size))  # only its shape is read
    _, dv = linear_backward(dy, x, values_stub, row_ptr if row_ptr is not None else col_ptr,
                            col_idx if col_idx is not None else t_row_idx, col_ptr, t_row_idx,
                            t_block_idx, block_size, need_dx=False, need_dv=True)
    return dv
