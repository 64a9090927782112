"""Triton kernels for the block-sparse linear layer: forward, dX and the sampled dW.

Notation: ``X [M, K]``, ``W [N, K]`` block-sparse with square blocks of side ``BS``,
``R = N / BS`` block-rows and ``C = K / BS`` block-columns; ``values [nnz, BS, BS]`` holds the
active blocks in row-major block order (``values[i] = W[r_i*BS:(r_i+1)*BS, c_i*BS:(c_i+1)*BS]``).
All tensors are row-major and contiguous; the wrappers make them so.

One kernel per concern:

- ``_bsl_fwd_kernel``: ``Y = X·Wᵀ (+ b)``. A program owns a ``[BM, BS]`` tile of ``Y`` (rows
  ``m``, block-row ``r``) and walks the active blocks of block-row ``r`` through the row CSR.
- ``_bsl_dx_kernel``: ``dX = dY·W``. A program owns a ``[BM, BS]`` tile of ``dX`` (block-column
  ``c``) and walks the active blocks of block-column ``c`` through the transpose metadata, so no
  program writes what another writes (no atomics).
- ``_bsl_dw_kernel``: ``dV[i] = dY[:, r_i]ᵀ · X[:, c_i]``, only at the active blocks. A program
  owns a ``[BT, BT]`` sub-tile of one active block and reduces over all ``M``.

Tile sizes are ``tl.constexpr`` and come from ``CONFIGS``, a small table per GPU architecture,
block size and element size. ``aot_cases(arch)`` lists every shipped config for the
ahead-of-time compile check (``python -m itop_kernels.compile_check``).
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .dispatch import empty_output
from .dot_precision import dot_precision
from .triton_launch import aligned, cdiv, cuda_facts, launch
from .triton_split_sum import sum_splits

__all__ = ["linear_forward", "linear_grad_input", "linear_grad_weight", "aot_cases",
           "sweep_cases", "CONFIGS", "SWEEP", "SUPPORTED_BLOCK_SIZES"]

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _tile_ids(pid, NT, NM, GROUP_M: tl.constexpr):
    """``(t, pid_m)`` of program ``pid`` over ``NT`` output column groups × ``NM`` row tiles in
    grouped order: groups of ``GROUP_M`` row tiles, row tile fastest within a group (the
    classic swizzle: the X/dY tiles and the weight blocks of a group both stay in L2).
    ``GROUP_M == 1`` runs a 2-D grid instead: column group fastest, so the programs that run
    together share one row tile."""
    per_group = GROUP_M * NT
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(NM - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    t = (pid % per_group) // size_m
    return t, pid_m


@triton.jit
def _fwd_block_row(x_ptr, v_ptr, b_ptr, y_ptr, row_ptr, col_idx, r, m0, offs_m, m_ok, K, N,
                   HAS_BIAS: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr,
                   BK: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """``Y[offs_m, r-th column block] = X[offs_m] · (block-row r of W)ᵀ (+ b)``. With ``TMA``,
    ``x_ptr`` is a descriptor of ``X [M, K]`` (block ``[BM, BK]``) and ``v_ptr`` one of the
    values as ``[nnz·BS, BS]`` (block ``[BS, BK]``): TMA loads, rows past ``M`` read as zero."""
    offs_n = tl.arange(0, BS)               # columns of Y within block-row r
    offs_k = tl.arange(0, BK)               # columns within one BK-wide slice of a block
    NK: tl.constexpr = BS // BK             # slices per block
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    acc = tl.zeros((BM, BS), dtype=tl.float32)
    # One flat loop over (active block i, slice s): t = i*NK + s, so the loop is pipelined.
    for t in range(start * NK, end * NK):
        i = t // NK
        k0 = (t % NK) * BK
        c = tl.load(col_idx + i)
        if TMA:
            x = x_ptr.load([m0, c * BS + k0])
            w_t = v_ptr.load([i * BS, k0]).T        # values[i, :, k0:k0+BK]ᵀ
        else:
            # X[m, c*BS + k0 + k]: row m of X starts at m*K.
            x = tl.load(x_ptr + offs_m[:, None] * K + (c * BS + k0 + offs_k)[None, :],
                        mask=m_ok[:, None], other=0.0)
            # Wᵀ slice [BK, BS]: values[i, n, k0 + k] sits at i*BS*BS + n*BS + k0 + k.
            w_t = tl.load(v_ptr + i * BS * BS + offs_n[None, :] * BS + (k0 + offs_k)[:, None])
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + r * BS + offs_n).to(tl.float32)[None, :]
    # Y[m, r*BS + n] at m*N + r*BS + n. Empty block-rows still write (zeros or the bias).
    tl.store(y_ptr + offs_m[:, None] * N + (r * BS + offs_n)[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _bsl_fwd_kernel(
    x_ptr, v_ptr, b_ptr, y_ptr, row_ptr, col_idx, order_ptr,
    M, K, N,
    HAS_BIAS: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, GROUP_M: tl.constexpr = 1, WIDE: tl.constexpr = 1,
    ORDERED: tl.constexpr = False, TMA: tl.constexpr = False,
):
    # ORDERED: program slot g runs block-row order_ptr[g] (block-rows by nnz, largest first, so
    # the longest programs start first); else block-row g.
    # Program = (group g of WIDE block-rows of W = column blocks of Y, row tile of X and Y).
    # GROUP_M == 1: a 2-D grid, g fastest. Else a 1-D grid in grouped order (_tile_ids).
    # TMA: x_ptr and v_ptr are tensor descriptors (see _fwd_block_row).
    if GROUP_M == 1:
        g = tl.program_id(0)
        pid_m = tl.program_id(1)
    else:
        g, pid_m = _tile_ids(tl.program_id(0), tl.cdiv(N // BS, WIDE), tl.cdiv(M, BM), GROUP_M)
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)          # rows of X / Y owned by this program
    m_ok = offs_m < M
    if WIDE == 1:
        r = g
        if ORDERED:
            r = tl.load(order_ptr + g)
        _fwd_block_row(x_ptr, v_ptr, b_ptr, y_ptr, row_ptr, col_idx, r, m0, offs_m, m_ok, K, N,
                       HAS_BIAS, BS, BM, BK, PRECISION, TMA)
    else:
        for w in tl.static_range(WIDE):
            slot = g * WIDE + w
            if slot < N // BS:
                r = slot
                if ORDERED:
                    r = tl.load(order_ptr + slot)
                _fwd_block_row(x_ptr, v_ptr, b_ptr, y_ptr, row_ptr, col_idx, r, m0, offs_m,
                               m_ok, K, N, HAS_BIAS, BS, BM, BK, PRECISION, TMA)


@triton.jit
def _dx_block_col(dy_ptr, v_ptr, dx_ptr, col_ptr, t_row_idx, t_block_idx, c, m0, offs_m, m_ok,
                  K, N, BS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                  PRECISION: tl.constexpr, TMA: tl.constexpr):
    """``dX[offs_m, c-th column block] = dY[offs_m] · (block-column c of W)``. With ``TMA``,
    ``dy_ptr`` is a descriptor of ``dY [M, N]`` (block ``[BM, BK]``) and ``v_ptr`` one of the
    values as ``[nnz·BS, BS]`` (block ``[BK, BS]``)."""
    offs_n = tl.arange(0, BK)               # slice of the block-row's BS outputs
    offs_k = tl.arange(0, BS)               # columns of dX within block-column c
    NK: tl.constexpr = BS // BK
    start = tl.load(col_ptr + c)
    end = tl.load(col_ptr + c + 1)
    acc = tl.zeros((BM, BS), dtype=tl.float32)
    # Flat loop over (column-major entry j, slice s): t = j*NK + s.
    for t in range(start * NK, end * NK):
        j = t // NK
        n0 = (t % NK) * BK
        r = tl.load(t_row_idx + j)          # block-row of the j-th block of this column
        blk = tl.load(t_block_idx + j)      # its index into values
        if TMA:
            dy = dy_ptr.load([m0, r * BS + n0])
            w = v_ptr.load([blk * BS + n0, 0])
        else:
            # dY[m, r*BS + n0 + n] at m*N + r*BS + n0 + n.
            dy = tl.load(dy_ptr + offs_m[:, None] * N + (r * BS + n0 + offs_n)[None, :],
                         mask=m_ok[:, None], other=0.0)
            # W slice [BK, BS]: values[blk, n0 + n, k] at blk*BS*BS + (n0 + n)*BS + k.
            w = tl.load(v_ptr + blk * BS * BS + (n0 + offs_n)[:, None] * BS + offs_k[None, :])
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    # dX[m, c*BS + k] at m*K + c*BS + k. Empty block-columns write zeros.
    tl.store(dx_ptr + offs_m[:, None] * K + (c * BS + offs_k)[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _bsl_dx_kernel(
    dy_ptr, v_ptr, dx_ptr, col_ptr, t_row_idx, t_block_idx, order_ptr,
    M, K, N,
    BS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr = 1, WIDE: tl.constexpr = 1, ORDERED: tl.constexpr = False,
    TMA: tl.constexpr = False,
):
    # Program = (group g of WIDE block-columns of W = column blocks of dX, row tile of dY/dX),
    # ordered as in the forward. TMA: dy_ptr and v_ptr are descriptors (see _dx_block_col).
    if GROUP_M == 1:
        g = tl.program_id(0)
        pid_m = tl.program_id(1)
    else:
        g, pid_m = _tile_ids(tl.program_id(0), tl.cdiv(K // BS, WIDE), tl.cdiv(M, BM), GROUP_M)
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)          # rows of dY / dX
    m_ok = offs_m < M
    if WIDE == 1:
        c = g
        if ORDERED:
            c = tl.load(order_ptr + g)
        _dx_block_col(dy_ptr, v_ptr, dx_ptr, col_ptr, t_row_idx, t_block_idx, c, m0, offs_m,
                      m_ok, K, N, BS, BM, BK, PRECISION, TMA)
    else:
        for w in tl.static_range(WIDE):
            slot = g * WIDE + w
            if slot < K // BS:
                c = slot
                if ORDERED:
                    c = tl.load(order_ptr + slot)
                _dx_block_col(dy_ptr, v_ptr, dx_ptr, col_ptr, t_row_idx, t_block_idx, c, m0,
                              offs_m, m_ok, K, N, BS, BM, BK, PRECISION, TMA)


@triton.jit(do_not_specialize=["m_per_split", "nnz"])
def _bsl_dw_kernel(
    dy_ptr, x_ptr, dv_ptr, row_idx, col_idx,
    M, K, N, m_per_split, nnz,
    BS: tl.constexpr, BT: tl.constexpr, BKM: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr = False, TMA: tl.constexpr = False,
):
    # Program = (active block i, BT×BT sub-tile) on axis 0 and a range of M on axis 1.
    # TMA: dy_ptr / x_ptr are descriptors of dY [M, N] / X [M, K] with block [BKM, BT]; a split
    # range is a whole number of BKM tiles, so only the last tile of M is ragged (zero-filled).
    # SPLIT=False: one range (all of M), dV written in its dtype. SPLIT=True: dv_ptr is an fp32
    # workspace [splits, nnz, BS, BS] of partial sums, reduced afterwards in a fixed order.
    TILES: tl.constexpr = BS // BT          # sub-tiles per block side
    pid = tl.program_id(0)
    split = tl.program_id(1)
    i = pid // (TILES * TILES)              # active block
    sub = pid % (TILES * TILES)
    n0 = (sub // TILES) * BT                # first output row of the sub-tile within the block
    k0 = (sub % TILES) * BT                 # first input column of the sub-tile
    r = tl.load(row_idx + i)
    c = tl.load(col_idx + i)
    offs_n = n0 + tl.arange(0, BT)
    offs_k = k0 + tl.arange(0, BT)
    offs_mm = tl.arange(0, BKM)             # rows of the M slice being reduced
    m_lo = split * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BKM):
        if TMA:
            dy_t = dy_ptr.load([m0, r * BS + n0]).T
            x = x_ptr.load([m0, c * BS + k0])
        else:
            rows = m0 + offs_mm
            m_ok = rows < m_hi
            # dYᵀ slice [BT, BKM]: dY[m, r*BS + n] at m*N + r*BS + n.
            dy_t = tl.load(dy_ptr + rows[None, :] * N + (r * BS + offs_n)[:, None],
                           mask=m_ok[None, :], other=0.0)
            # X slice [BKM, BT]: X[m, c*BS + k] at m*K + c*BS + k.
            x = tl.load(x_ptr + rows[:, None] * K + (c * BS + offs_k)[None, :],
                        mask=m_ok[:, None], other=0.0)
        acc = tl.dot(dy_t, x, acc, input_precision=PRECISION)
    # dV[i, n, k] at i*BS*BS + n*BS + k (plus split*nnz*BS*BS in the workspace).
    out = dv_ptr + split * nnz * BS * BS + i * BS * BS + offs_n[:, None] * BS + offs_k[None, :]
    if SPLIT:
        tl.store(out, acc)
    else:
        tl.store(out, acc.to(dv_ptr.dtype.element_ty))


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class _Cfg:
    """Tile sizes and launch options of one kernel for one (arch, block size, element size)."""
    tile_m: int        # BM (fwd/dx) or BKM (dw): rows of M per tile
    tile_k: int        # BK (fwd/dx): slice of a block per step, or BT (dw): output sub-tile
    num_warps: int
    num_stages: int
    group_m: int = 1   # fwd/dx: row tiles per program group (1: column block fastest)
    wide: int = 1      # fwd: block-rows per program; dx: block-columns per program
    split: int = 1     # dw: M splits (1: none, dV written directly; 0: from SM count and nnz)
    ordered: bool = False  # fwd/dx: block-rows (columns) by nnz, largest first
    tma: bool = False  # sm_90: dense operand and weight tiles through TMA tensor descriptors

    def tag(self) -> str:
        """A short name for benchmark rows: ``bm128 bk64 w8 s3 [g8] [x2] [split:auto] [tma]``."""
        t = f"bm{self.tile_m} bk{self.tile_k} w{self.num_warps} s{self.num_stages}"
        t += f" g{self.group_m}" if self.group_m != 1 else ""
        t += f" x{self.wide}" if self.wide != 1 else ""
        t += (f" split:{self.split or 'auto'}") if self.split != 1 else ""
        t += " nnz-ordered" if self.ordered else ""
        t += " tma" if self.tma else ""
        return t


def _table() -> dict:
    """``CONFIGS[arch][kernel][(block_size, kind)] -> _Cfg``, ``kind`` one of ``"16bit"``
    (fp16/bf16), ``"tf32"`` and ``"ieee"`` (fp32 on the FMA units, a heavier register load).

    Chosen so every entry compiles without spills and within shared memory on its arch
    (checked by ``compile_check``); speed tuning lives in ``benchmarks/`` and its notes.
    """
    C = _Cfg
    fwd_dx = {
        (16, "16bit"): C(128, 16, 4, 3), (32, "16bit"): C(128, 32, 4, 3),
        (64, "16bit"): C(128, 64, 8, 3), (128, "16bit"): C(64, 64, 4, 3),
        (16, "tf32"): C(64, 16, 4, 3), (32, "tf32"): C(64, 32, 4, 3),
        (64, "tf32"): C(64, 32, 4, 3), (128, "tf32"): C(64, 32, 8, 2),
        (16, "ieee"): C(64, 16, 4, 2), (32, "ieee"): C(32, 32, 4, 2),
        (64, "ieee"): C(32, 32, 8, 2), (128, "ieee"): C(32, 32, 8, 2),
    }
    dw = {
        (16, "16bit"): C(128, 16, 4, 3), (32, "16bit"): C(128, 32, 4, 3),
        (64, "16bit"): C(64, 64, 4, 3), (128, "16bit"): C(64, 64, 4, 3),
        (16, "tf32"): C(64, 16, 4, 3), (32, "tf32"): C(64, 32, 4, 3),
        (64, "tf32"): C(32, 64, 4, 3), (128, "tf32"): C(32, 64, 4, 3),
        (16, "ieee"): C(64, 16, 4, 2), (32, "ieee"): C(32, 32, 4, 2),
        (64, "ieee"): C(32, 32, 8, 2), (128, "ieee"): C(32, 32, 8, 2),
    }
    common = {"fwd": fwd_dx, "dx": fwd_dx, "dw": dw}
    return {80: common, 90: common}


CONFIGS = _table()


def _sweep_table() -> dict:
    """``SWEEP[arch][kernel][block_size] -> [_Cfg, ...]``: 16-bit candidates the GPU benchmark
    times next to the shipped ``CONFIGS`` entry (each compiled ahead of time by the AOT test).
    Each is one idea: a larger ``BM``, grouped program order (``group_m``), wider programs
    (``wide``), other warps/stages, for dW the split-M reduction (``split``), and on sm_90 TMA
    loads (``tma``)."""
    C = _Cfg
    fwd = {
        16: [C(256, 16, 4, 3), C(128, 16, 4, 4), C(128, 16, 4, 3, wide=2), C(128, 16, 4, 3, wide=4),
             C(128, 16, 4, 3, group_m=8), C(64, 16, 2, 4)],
        32: [C(256, 32, 8, 3), C(128, 32, 4, 4), C(128, 32, 4, 3, wide=2), C(128, 32, 8, 3, wide=2),
             C(128, 32, 4, 3, group_m=8), C(64, 32, 4, 3)],
        64: [C(128, 32, 8, 3), C(256, 32, 8, 3), C(128, 32, 4, 4), C(128, 64, 8, 4),
             C(128, 64, 8, 3, group_m=8), C(64, 64, 4, 3)],
        128: [C(128, 64, 8, 3), C(128, 32, 8, 3), C(64, 64, 4, 4), C(64, 128, 8, 3),
              C(64, 64, 4, 3, group_m=8), C(128, 64, 8, 3, group_m=8)],
    }
    shipped = {bs: CONFIGS[90]["fwd"][(bs, "16bit")] for bs in fwd}
    for bs in fwd:   # the shipped tiles with block-rows ordered by nnz (load balance)
        fwd[bs] = fwd[bs] + [dataclasses.replace(shipped[bs], ordered=True)]
    dw = {
        16: [C(128, 16, 4, 3, split=0), C(256, 16, 4, 3, split=0), C(64, 16, 4, 4, split=0)],
        32: [C(128, 32, 4, 3, split=0), C(64, 32, 4, 4, split=0), C(256, 32, 8, 3, split=0)],
        64: [C(64, 64, 4, 3, split=0), C(128, 64, 8, 3, split=0), C(64, 64, 4, 4, split=0),
             C(32, 64, 4, 3, split=0)],
        128: [C(64, 64, 4, 3, split=0), C(64, 64, 8, 3, split=0), C(32, 128, 8, 3, split=0),
              C(64, 64, 4, 4, split=0)],
    }
    dx = dict(fwd)   # the dX tile holds the same registers, but sm_80 spills on two of them
    dx[64] = [C(128, 32, 8, 3), C(256, 32, 8, 3), C(128, 32, 8, 4), C(128, 64, 8, 4),
              C(128, 64, 8, 3, group_m=8), C(64, 64, 4, 3)]
    dx[128] = [C(128, 32, 8, 3), C(64, 32, 4, 3), C(64, 64, 4, 4), C(64, 128, 8, 3),
               C(64, 64, 4, 3, group_m=8), C(128, 32, 8, 3, group_m=8),
               dataclasses.replace(shipped[128], ordered=True)]
    dx[64] = dx[64] + [dataclasses.replace(shipped[64], ordered=True)]
    # The larger tiles of the TMA candidates below, with pointer loads: as launched (aligned
    # operands) they hold 113-115 registers on sm_90 and 166-202 on sm_80, no spills; beside
    # their TMA twins they show what TMA itself is worth.
    for table in (fwd, dx):
        table[64] = table[64] + [C(128, 64, 4, 3), C(256, 64, 8, 3)]
        table[128] = table[128] + [C(128, 128, 8, 3)]
    common = {"fwd": fwd, "dx": dx, "dw": dw}
    # sm_90 only (sm_80 has no TMA): operand tiles through TMA descriptors, which take the
    # address arithmetic and the per-thread cp.async instructions out of the loop (registers
    # are about the same as the pointer tiles' as launched: 58-94 against 60-124).
    tma = {
        32: [C(128, 32, 4, 3, tma=True)],
        64: [C(128, 64, 8, 3, tma=True), C(128, 64, 4, 3, tma=True), C(256, 64, 8, 3, tma=True)],
        128: [C(64, 64, 4, 3, tma=True), C(128, 128, 8, 3, tma=True)],
    }
    tma_dw = {64: [C(64, 64, 4, 3, split=0, tma=True), C(128, 64, 8, 3, split=0, tma=True)],
              128: [C(64, 64, 4, 3, split=0, tma=True)]}
    hopper = {k: {bs: cfgs + (tma_dw if k == "dw" else tma).get(bs, [])
                  for bs, cfgs in table.items()} for k, table in common.items()}
    return {80: common, 90: hopper}


SWEEP = _sweep_table()


def _arch(device: torch.device) -> int:
    """The config-table architecture for ``device``: 90 for Hopper and newer, else 80."""
    if device.type == "cuda":
        return cuda_facts(device)[0]
    return 80  # the interpreter: any table works, sm_80's is the smaller


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_facts(device)[1]
    return 2  # the interpreter: a small count still exercises the split path


def _config(kernel: str, device: torch.device, block_size: int, dtype: torch.dtype) -> _Cfg:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} has no Triton kernel; use one of "
                         f"{SUPPORTED_BLOCK_SIZES} (other sizes run on CPU tensors only)")
    kind = "16bit" if dtype in (torch.float16, torch.bfloat16) else _precision(dtype)
    return CONFIGS[_arch(device)][kernel][(block_size, kind)]


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul switch (:mod:`itop_kernels.dot_precision`)."""
    return dot_precision(dtype, "matmul")


_ORDERS: dict = {}     # id(ptr) -> (weakref to ptr, ptr._version, order)


def _by_nnz(ptr: torch.Tensor) -> torch.Tensor:
    """Block-rows (or columns) of a CSR pointer array by block count, largest first (int32, on
    ptr's device), computed once per layout tensor (an in-place rewrite is seen through the
    version counter); no host sync. A rewritten layout's order is written into the same tensor,
    so a CUDA graph captured before a topology update reads the new order when replayed."""
    hit = _ORDERS.get(id(ptr))
    same = hit is not None and hit[0]() is ptr
    if same and hit[1] == ptr._version:
        return hit[2]
    counts = ptr[1:] - ptr[:-1]
    order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
    if same:
        order = hit[2].copy_(order)
    if len(_ORDERS) >= 512:
        for k in [k for k, v in _ORDERS.items() if v[0]() is None] or list(_ORDERS):
            del _ORDERS[k]
    _ORDERS[id(ptr)] = (weakref.ref(ptr), ptr._version, order)
    return order


def _dw_splits(cfg: _Cfg, M: int, nnz: int, block_size: int, device: torch.device) -> int:
    """M splits of the dW reduction: ``cfg.split`` when fixed, else (``split=0``) enough that
    about 4 programs run per SM, each reducing at least 4 steps of ``BKM`` rows, and at most
    64 (the fp32 workspace is ``splits × nnz × bs²``)."""
    if cfg.split >= 1:
        want = cfg.split
    else:
        tiles = nnz * (block_size // cfg.tile_k) ** 2
        want = cdiv(4 * _sm_count(device), max(tiles, 1))
    return max(1, min(want, 64, cdiv(M, 4 * cfg.tile_m)))


# --------------------------------------------------------------------------- wrappers
def _use_tma(cfg: _Cfg, rows: int, nnz: int) -> bool:
    """Whether ``cfg`` runs its TMA kernel: a TMA config with something to read (with ``rows``
    or ``nnz`` zero, where a descriptor of zero rows would be invalid, the pointer kernel runs).
    The operands are contiguous and aligned (:func:`~itop_kernels.triton_launch.aligned`), and
    their rows are multiples of
    16 elements (block sizes are), so TMA can always read them."""
    return bool(cfg.tma and rows and nnz)


def _desc(t: torch.Tensor, rows: int, cols: int, block: tuple) -> TensorDescriptor:
    """A TMA descriptor of ``t`` read as a row-major ``[rows, cols]`` matrix, ``block`` tiles."""
    return TensorDescriptor(t, [rows, cols], [cols, 1], list(block))


def _grid(groups: int, m_tiles: int, cfg: _Cfg) -> tuple:
    """fwd/dx grid: 2-D ``(groups, m_tiles)``, or 1-D in grouped order when ``group_m > 1``."""
    return (groups, m_tiles) if cfg.group_m == 1 else (groups * m_tiles,)


def linear_forward(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                   col_idx: torch.Tensor, bias: Optional[torch.Tensor], block_size: int,
                   out_features: int, *, config: Optional[_Cfg] = None) -> torch.Tensor:
    """``Y = X·Wᵀ (+ bias)``: ``x [M, K]``, ``values [nnz, bs, bs]`` -> ``[M, N]``, x's dtype.
    ``config`` overrides the table (benchmarks)."""
    x = aligned(x, warn_as="x")
    values = aligned(values, warn_as="values")
    if bias is not None:
        bias = aligned(bias, warn_as="bias")
    M, K = x.shape
    N = out_features
    cfg = config or _config("fwd", x.device, block_size, x.dtype)
    y = empty_output((M, N), x.dtype, x.device)
    grid = _grid(cdiv(N // block_size, cfg.wide), cdiv(M, cfg.tile_m), cfg)
    order = _by_nnz(row_ptr) if cfg.ordered else row_ptr
    tma = _use_tma(cfg, M, values.shape[0])
    xa, va = x, values
    if tma:
        xa = _desc(x, M, K, (cfg.tile_m, cfg.tile_k))
        va = _desc(values, values.shape[0] * block_size, block_size, (block_size, cfg.tile_k))
    launch(_bsl_fwd_kernel, grid,
           (xa, va, bias if bias is not None else y, y, row_ptr, col_idx, order, M, K, N),
           dict(HAS_BIAS=bias is not None, BS=block_size, BM=cfg.tile_m, BK=cfg.tile_k,
                PRECISION=_precision(x.dtype), GROUP_M=cfg.group_m, WIDE=cfg.wide,
                ORDERED=cfg.ordered, TMA=tma),
           cfg.num_warps, cfg.num_stages)
    return y


def linear_grad_input(dy: torch.Tensor, values: torch.Tensor, col_ptr: torch.Tensor,
                      t_row_idx: torch.Tensor, t_block_idx: torch.Tensor, block_size: int,
                      in_features: int, *, config: Optional[_Cfg] = None) -> torch.Tensor:
    """``dX = dY·W``: ``dy [M, N]`` -> ``[M, K]`` in dy's dtype, via the transpose metadata.
    ``config`` overrides the table (benchmarks)."""
    dy = aligned(dy, warn_as="dy")
    values = aligned(values, warn_as="values")
    M, N = dy.shape
    K = in_features
    cfg = config or _config("dx", dy.device, block_size, dy.dtype)
    dx = empty_output((M, K), dy.dtype, dy.device)
    grid = _grid(cdiv(K // block_size, cfg.wide), cdiv(M, cfg.tile_m), cfg)
    order = _by_nnz(col_ptr) if cfg.ordered else col_ptr
    tma = _use_tma(cfg, M, values.shape[0])
    dya, va = dy, values
    if tma:
        dya = _desc(dy, M, N, (cfg.tile_m, cfg.tile_k))
        va = _desc(values, values.shape[0] * block_size, block_size, (cfg.tile_k, block_size))
    launch(_bsl_dx_kernel, grid,
           (dya, va, dx, col_ptr, t_row_idx, t_block_idx, order, M, K, N),
           dict(BS=block_size, BM=cfg.tile_m, BK=cfg.tile_k, PRECISION=_precision(dy.dtype),
                GROUP_M=cfg.group_m, WIDE=cfg.wide, ORDERED=cfg.ordered, TMA=tma),
           cfg.num_warps, cfg.num_stages)
    return dx


def linear_grad_weight(dy: torch.Tensor, x: torch.Tensor, row_idx: torch.Tensor,
                       col_idx: torch.Tensor, block_size: int, *,
                       config: Optional[_Cfg] = None) -> torch.Tensor:
    """``dV[i] = dY[:, r_i]ᵀ · X[:, c_i]`` at the active blocks: -> ``[nnz, bs, bs]``.

    With a split config the reduction over M runs in ``splits`` parallel ranges into an fp32
    workspace, summed afterwards in a fixed order (deterministic, one rounding).
    ``config`` overrides the table (benchmarks)."""
    dy = aligned(dy, warn_as="dy")
    x = aligned(x, warn_as="x")
    M, N = dy.shape
    K = x.shape[1]
    nnz = row_idx.numel()
    cfg = config or _config("dw", dy.device, block_size, dy.dtype)
    tiles = (block_size // cfg.tile_k) ** 2
    prec = _precision(dy.dtype)
    splits = _dw_splits(cfg, M, nnz, block_size, dy.device) if nnz else 1
    if nnz == 0:
        return empty_output((0, block_size, block_size), dy.dtype, dy.device)
    tma = _use_tma(cfg, M, nnz)
    consts = dict(BS=block_size, BT=cfg.tile_k, BKM=cfg.tile_m, PRECISION=prec, TMA=tma)
    dya, xa = dy, x
    if tma:
        dya = _desc(dy, M, N, (cfg.tile_m, cfg.tile_k))
        xa = _desc(x, M, K, (cfg.tile_m, cfg.tile_k))
    if splits == 1:
        dv = empty_output((nnz, block_size, block_size), dy.dtype, dy.device)
        launch(_bsl_dw_kernel, (nnz * tiles, 1), (dya, xa, dv, row_idx, col_idx, M, K, N, M, nnz),
               dict(consts, SPLIT=False), cfg.num_warps, cfg.num_stages)
        return dv
    m_per_split = cdiv(cdiv(M, splits), cfg.tile_m) * cfg.tile_m
    splits = cdiv(M, m_per_split)
    ws = empty_output((splits, nnz, block_size, block_size), torch.float32, dy.device)
    launch(_bsl_dw_kernel, (nnz * tiles, splits),
           (dya, xa, ws, row_idx, col_idx, M, K, N, m_per_split, nnz),
           dict(consts, SPLIT=True), cfg.num_warps, cfg.num_stages)
    return sum_splits(ws, empty_output((nnz, block_size, block_size), dy.dtype, dy.device))


# --------------------------------------------------------------------------- AOT cases
# config kind -> (Triton element types, dot precision) it is compiled for
_KIND_TYPES = {"16bit": (("fp16", "bf16"), "ieee"), "tf32": (("fp32",), "tf32"),
               "ieee": (("fp32",), "ieee")}


def _aot_specs() -> dict:
    """kernel -> (JIT fn, signature builder, constexpr builder)."""
    def ptrs(dt: str, *names: str) -> dict:
        return {n: f"*{dt}" for n in names}

    ints = {"M": "i32", "K": "i32", "N": "i32"}
    return {
        "fwd": (_bsl_fwd_kernel,
                lambda dt: {**ptrs(dt, "x_ptr", "v_ptr", "b_ptr", "y_ptr"),
                            "row_ptr": "*i32", "col_idx": "*i32", "order_ptr": "*i32", **ints},
                lambda bs, cfg: {"BS": bs, "BM": cfg.tile_m, "BK": cfg.tile_k,
                                 "GROUP_M": cfg.group_m, "WIDE": cfg.wide,
                                 "ORDERED": cfg.ordered, "TMA": cfg.tma}),
        "dx": (_bsl_dx_kernel,
               lambda dt: {**ptrs(dt, "dy_ptr", "v_ptr", "dx_ptr"), "col_ptr": "*i32",
                           "t_row_idx": "*i32", "t_block_idx": "*i32", "order_ptr": "*i32",
                           **ints},
               lambda bs, cfg: {"BS": bs, "BM": cfg.tile_m, "BK": cfg.tile_k,
                                "GROUP_M": cfg.group_m, "WIDE": cfg.wide,
                                "ORDERED": cfg.ordered, "TMA": cfg.tma}),
        "dw": (_bsl_dw_kernel,
               lambda dt: {**ptrs(dt, "dy_ptr", "x_ptr"), "dv_ptr": f"*{dt}",
                           "row_idx": "*i32", "col_idx": "*i32", **ints,
                           "m_per_split": "i32", "nnz": "i32"},
               lambda bs, cfg: {"BS": bs, "BT": cfg.tile_k, "BKM": cfg.tile_m,
                                "SPLIT": cfg.split != 1, "TMA": cfg.tma}),
    }


def _tma_blocks(kernel: str, bs: int, cfg: _Cfg) -> dict:
    """kernel argument -> TMA block shape, as the wrappers build the descriptors."""
    if kernel == "fwd":
        return {"x_ptr": (cfg.tile_m, cfg.tile_k), "v_ptr": (bs, cfg.tile_k)}
    if kernel == "dx":
        return {"dy_ptr": (cfg.tile_m, cfg.tile_k), "v_ptr": (cfg.tile_k, bs)}
    return {"dy_ptr": (cfg.tile_m, cfg.tile_k), "x_ptr": (cfg.tile_m, cfg.tile_k)}


def _case(kernel: str, bs: int, cfg: _Cfg, dt: str, prec: str, has_bias, prefix: str):
    from .compile_check import AotCase

    fn, signature, constexprs = _aot_specs()[kernel]
    const = {**constexprs(bs, cfg), "PRECISION": prec}
    if has_bias is not None:
        const["HAS_BIAS"] = has_bias
    sig = {**signature(dt), **{k: "constexpr" for k in const}}
    if kernel == "dw" and const["SPLIT"]:
        sig["dv_ptr"] = "*fp32"   # the split kernel writes an fp32 workspace
    if cfg.tma:   # the operands the wrapper passes as TMA descriptors, with their tiles
        sig.update({name: f"tensordesc<{dt}[{rows}, {cols}]>"
                    for name, (rows, cols) in _tma_blocks(kernel, bs, cfg).items()})
    name = f"{prefix}_{kernel} bs={bs} {dt} {prec}"
    name += f" bias={has_bias}" if has_bias is not None else ""
    name += f" [{cfg.tag()}]"
    # M (the rows: a batch) can be anything; K and N are whole blocks, multiples of 16
    return AotCase(name, fn, sig, const, cfg.num_warps, cfg.num_stages, ragged=("M",))


def aot_cases(arch: int) -> list:
    """Every shipped (kernel, block size, dtype, precision) config for ``sm_<arch>``, every
    sweep candidate (bf16: fp16 compiles to the same code). The split-sum kernel that the split
    ``dW`` uses has its own cases (:mod:`itop_kernels.triton_split_sum`)."""
    cases = []
    for kernel in ("fwd", "dx", "dw"):
        for (bs, kind), cfg in CONFIGS[arch][kernel].items():
            dtypes, prec = _KIND_TYPES[kind]
            for dt in dtypes:
                for has_bias in ((False, True) if kernel == "fwd" else (None,)):
                    cases.append(_case(kernel, bs, cfg, dt, prec, has_bias, "linear"))
    cases += sweep_cases(arch)
    return cases


def sweep_cases(arch: int) -> list:
    """The ``SWEEP`` candidates for ``sm_<arch>``, bf16 (the GPU benchmark's dtype)."""
    return [_case(kernel, bs, cfg, "bf16", "ieee", False if kernel == "fwd" else None, "linear_sweep")
            for kernel in ("fwd", "dx", "dw") for bs, cfgs in SWEEP[arch][kernel].items()
            for cfg in cfgs]
