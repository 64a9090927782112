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

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .dispatch import empty_output
from .dot_precision import dot_precision

__all__ = ["linear_forward", "linear_grad_input", "linear_grad_weight", "aot_cases",
           "SUPPORTED_BLOCK_SIZES"]

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _bsl_fwd_kernel(
    x_ptr, v_ptr, b_ptr, y_ptr, row_ptr, col_idx,
    M, K, N,
    HAS_BIAS: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    r = tl.program_id(0)                    # block-row of W = column block of Y
    pid_m = tl.program_id(1)                # row tile of X and Y
    offs_m = pid_m * BM + tl.arange(0, BM)  # rows of X / Y owned by this program
    offs_n = tl.arange(0, BS)               # columns of Y within block-row r
    offs_k = tl.arange(0, BK)               # columns within one BK-wide slice of a block
    m_ok = offs_m < M
    NK: tl.constexpr = BS // BK             # slices per block
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    acc = tl.zeros((BM, BS), dtype=tl.float32)
    # One flat loop over (active block i, slice s): t = i*NK + s, so the loop is pipelined.
    for t in range(start * NK, end * NK):
        i = t // NK
        k0 = (t % NK) * BK
        c = tl.load(col_idx + i)
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
def _bsl_dx_kernel(
    dy_ptr, v_ptr, dx_ptr, col_ptr, t_row_idx, t_block_idx,
    M, K, N,
    BS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    c = tl.program_id(0)                    # block-column of W = column block of dX
    pid_m = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)  # rows of dY / dX
    offs_n = tl.arange(0, BK)               # slice of the block-row's BS outputs
    offs_k = tl.arange(0, BS)               # columns of dX within block-column c
    m_ok = offs_m < M
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
def _bsl_dw_kernel(
    dy_ptr, x_ptr, dv_ptr, row_idx, col_idx,
    M, K, N,
    BS: tl.constexpr, BT: tl.constexpr, BKM: tl.constexpr, PRECISION: tl.constexpr,
):
    TILES: tl.constexpr = BS // BT          # sub-tiles per block side
    pid = tl.program_id(0)
    i = pid // (TILES * TILES)              # active block
    sub = pid % (TILES * TILES)
    n0 = (sub // TILES) * BT                # first output row of the sub-tile within the block
    k0 = (sub % TILES) * BT                 # first input column of the sub-tile
    r = tl.load(row_idx + i)
    c = tl.load(col_idx + i)
    offs_n = n0 + tl.arange(0, BT)
    offs_k = k0 + tl.arange(0, BT)
    offs_mm = tl.arange(0, BKM)             # rows of the M slice being reduced
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    for m0 in range(0, M, BKM):
        rows = m0 + offs_mm
        m_ok = rows < M
        # dYᵀ slice [BT, BKM]: dY[m, r*BS + n] at m*N + r*BS + n.
        dy_t = tl.load(dy_ptr + rows[None, :] * N + (r * BS + offs_n)[:, None],
                       mask=m_ok[None, :], other=0.0)
        # X slice [BKM, BT]: X[m, c*BS + k] at m*K + c*BS + k.
        x = tl.load(x_ptr + rows[:, None] * K + (c * BS + offs_k)[None, :],
                    mask=m_ok[:, None], other=0.0)
        acc = tl.dot(dy_t, x, acc, input_precision=PRECISION)
    # dV[i, n, k] at i*BS*BS + n*BS + k.
    tl.store(dv_ptr + i * BS * BS + offs_n[:, None] * BS + offs_k[None, :],
             acc.to(dv_ptr.dtype.element_ty))


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class _Cfg:
    """Tile sizes and launch options of one kernel for one (arch, block size, element size)."""
    tile_m: int        # BM (fwd/dx) or BKM (dw): rows of M per tile
    tile_k: int        # BK (fwd/dx): slice of a block per step, or BT (dw): output sub-tile
    num_warps: int
    num_stages: int


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


def _arch(device: torch.device) -> int:
    """The config-table architecture for ``device``: 90 for Hopper and newer, else 80."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return 90 if major >= 9 else 80
    return 80  # the interpreter: any table works, sm_80's is the smaller


def _config(kernel: str, device: torch.device, block_size: int, dtype: torch.dtype) -> _Cfg:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} has no Triton kernel; use one of "
                         f"{SUPPORTED_BLOCK_SIZES} (other sizes run on CPU tensors only)")
    kind = "16bit" if dtype in (torch.float16, torch.bfloat16) else _precision(dtype)
    return CONFIGS[_arch(device)][kernel][(block_size, kind)]


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul switch (:mod:`itop_kernels.dot_precision`)."""
    return dot_precision(dtype, "matmul")


# --------------------------------------------------------------------------- wrappers
def linear_forward(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                   col_idx: torch.Tensor, bias: Optional[torch.Tensor], block_size: int,
                   out_features: int) -> torch.Tensor:
    """``Y = X·Wᵀ (+ bias)``: ``x [M, K]``, ``values [nnz, bs, bs]`` -> ``[M, N]``, x's dtype."""
    x = x.contiguous()
    values = values.contiguous()
    M, K = x.shape
    N = out_features
    cfg = _config("fwd", x.device, block_size, x.dtype)
    y = empty_output((M, N), x.dtype, x.device)
    grid = (N // block_size, triton.cdiv(M, cfg.tile_m))
    _bsl_fwd_kernel[grid](
        x, values, bias if bias is not None else y, y, row_ptr, col_idx, M, K, N,
        HAS_BIAS=bias is not None, BS=block_size, BM=cfg.tile_m, BK=cfg.tile_k,
        PRECISION=_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def linear_grad_input(dy: torch.Tensor, values: torch.Tensor, col_ptr: torch.Tensor,
                      t_row_idx: torch.Tensor, t_block_idx: torch.Tensor, block_size: int,
                      in_features: int) -> torch.Tensor:
    """``dX = dY·W``: ``dy [M, N]`` -> ``[M, K]`` in dy's dtype, via the transpose metadata."""
    dy = dy.contiguous()
    values = values.contiguous()
    M, N = dy.shape
    K = in_features
    cfg = _config("dx", dy.device, block_size, dy.dtype)
    dx = empty_output((M, K), dy.dtype, dy.device)
    grid = (K // block_size, triton.cdiv(M, cfg.tile_m))
    _bsl_dx_kernel[grid](
        dy, values, dx, col_ptr, t_row_idx, t_block_idx, M, K, N,
        BS=block_size, BM=cfg.tile_m, BK=cfg.tile_k, PRECISION=_precision(dy.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dx


def linear_grad_weight(dy: torch.Tensor, x: torch.Tensor, row_idx: torch.Tensor,
                       col_idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """``dV[i] = dY[:, r_i]ᵀ · X[:, c_i]`` at the active blocks: -> ``[nnz, bs, bs]``."""
    dy = dy.contiguous()
    x = x.contiguous()
    M, N = dy.shape
    K = x.shape[1]
    nnz = row_idx.numel()
    cfg = _config("dw", dy.device, block_size, dy.dtype)
    dv = empty_output((nnz, block_size, block_size), dy.dtype, dy.device)
    tiles = (block_size // cfg.tile_k) ** 2
    if nnz == 0:
        return dv
    _bsl_dw_kernel[(nnz * tiles,)](
        dy, x, dv, row_idx, col_idx, M, K, N,
        BS=block_size, BT=cfg.tile_k, BKM=cfg.tile_m, PRECISION=_precision(dy.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dv


# --------------------------------------------------------------------------- AOT cases
# config kind -> (Triton element types, dot precision) it is compiled for
_KIND_TYPES = {"16bit": (("fp16", "bf16"), "ieee"), "tf32": (("fp32",), "tf32"),
               "ieee": (("fp32",), "ieee")}


def aot_cases(arch: int) -> list:
    """Every shipped (kernel, block size, dtype, precision) config for ``sm_<arch>``."""
    from .compile_check import AotCase

    def ptrs(dt: str, *names: str) -> dict:
        return {n: f"*{dt}" for n in names}

    ints = {"M": "i32", "K": "i32", "N": "i32"}
    specs = {  # kernel -> (JIT fn, signature builder, constexpr builder)
        "fwd": (_bsl_fwd_kernel,
                lambda dt: {**ptrs(dt, "x_ptr", "v_ptr", "b_ptr", "y_ptr"),
                            "row_ptr": "*i32", "col_idx": "*i32", **ints},
                lambda bs, cfg: {"BS": bs, "BM": cfg.tile_m, "BK": cfg.tile_k}),
        "dx": (_bsl_dx_kernel,
               lambda dt: {**ptrs(dt, "dy_ptr", "v_ptr", "dx_ptr"), "col_ptr": "*i32",
                           "t_row_idx": "*i32", "t_block_idx": "*i32", **ints},
               lambda bs, cfg: {"BS": bs, "BM": cfg.tile_m, "BK": cfg.tile_k}),
        "dw": (_bsl_dw_kernel,
               lambda dt: {**ptrs(dt, "dy_ptr", "x_ptr", "dv_ptr"), "row_idx": "*i32",
                           "col_idx": "*i32", **ints},
               lambda bs, cfg: {"BS": bs, "BT": cfg.tile_k, "BKM": cfg.tile_m}),
    }
    cases = []
    for kernel, (fn, signature, constexprs) in specs.items():
        for (bs, kind), cfg in CONFIGS[arch][kernel].items():
            dtypes, prec = _KIND_TYPES[kind]
            for dt in dtypes:
                for has_bias in ((False, True) if kernel == "fwd" else (None,)):
                    const = {**constexprs(bs, cfg), "PRECISION": prec}
                    if has_bias is not None:
                        const["HAS_BIAS"] = has_bias
                    sig = {**signature(dt), **{k: "constexpr" for k in const}}
                    name = f"linear_{kernel} bs={bs} {dt} {prec}"
                    name += f" bias={has_bias}" if has_bias is not None else ""
                    cases.append(AotCase(name, fn, sig, const, cfg.num_warps, cfg.num_stages))
    return cases
