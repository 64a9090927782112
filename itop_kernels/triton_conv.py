"""Triton kernels for the block-sparse conv2d: forward, dX (dgrad) and dW (wgrad).

Notation: ``x [N, Cin, H, W]``, ``y [N, Cout, Ho, Wo]``, kernel ``KH × KW``. The weight
``W [Cout, Cin, KH, KW]`` is block-sparse over (out-channel block, in-channel block) pairs with
square blocks of side ``BS``: ``R = Cout / BS`` block-rows, ``C = Cin / BS`` block-columns.
``values [nnz, KH, KW, BS, BS]`` holds the active blocks in the layout's row-major block order,
each tap a contiguous ``[out, in]`` tile::

    values[i, a, b, o, k] = W[r_i*BS + o, c_i*BS + k, a, b]
    at element offset ((i*KH + a)*KW + b)*BS*BS + o*BS + k = (i*KHW + tap)*BS*BS + o*BS + k

with ``tap = a*KW + b`` and ``KHW = KH*KW``. The kernels read and write activations in
channels-last layout (channel stride 1, so a block's channels are one contiguous, vectorized
run per pixel) through their ``n, h, w`` strides; the wrappers convert NCHW tensors (a copy)
and hand outputs back in the requested memory format.

One kernel per concern, each an implicit GEMM (no im2col buffer):

- ``_conv_fwd_kernel``: ``GEMM M = N·Ho·Wo`` output pixels × ``BS`` out-channels of block-row
  ``r``; the K loop runs over (active block of row ``r``) × (tap) × (``BK`` slice of the
  block's in-channels). Bias fused in the epilogue.
- ``_conv_dgrad_kernel``: ``dX``, a transposed implicit GEMM: ``M = N·H·W`` input pixels ×
  ``BS`` in-channels of block-column ``c``; the K loop runs over the column's active blocks
  (transpose metadata, no atomics) × taps × out-channel slices. With stride ``s`` an input row
  ``h`` receives tap ``a`` from output row ``ho = (h + pad - a·dil) / s`` only when that division
  is exact, which depends only on the stride phase ``h % s``: a program owns the pixels of one
  phase and loops over just the taps that reach it (bounds ``0 <= ho < Ho`` checked per pixel),
  so stride > 1 is exact and costs no wasted MMAs.
- ``_conv_wgrad_kernel``: ``dV[i, tap] = Σ_m dY[m, r_i-block]ᵀ · X[m shifted by tap, c_i-block]``,
  only at active blocks. A program owns a ``[BO, BS]`` slice of one (block, tap) tile and
  reduces over one split of the ``N·Ho·Wo`` pixels; splits write fp32 partial sums to a
  workspace that is summed afterwards (deterministic, no atomics).

Each has a stacked-taps variant (``_conv_fwd_taps_kernel``, ``_conv_dgrad_taps_kernel``,
``_conv_wgrad_taps_kernel``, chosen by :class:`ConvOptions`): several taps of one block in one
MMA, ``taps·BS`` deep (forward, dgrad) or tall (wgrad), for fewer and fuller loop steps.

All products accumulate in fp32. fp32 inputs use TF32 dots where torch's cuDNN convolution
switch allows TF32 (its default, as for ``F.conv2d``) and IEEE fp32 dots otherwise
(``PRECISION``, decided by :mod:`itop_kernels.dot_precision`). Tile sizes are ``tl.constexpr``
and come from ``CONFIGS`` (16-bit and TF32) and ``IEEE_CONFIGS`` (fp32 with IEEE dots), tables
per GPU architecture and block size.
``aot_cases(arch)`` lists every shipped config for the ahead-of-time compile check
(``python -m itop_kernels.compile_check --filter conv``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import triton
import triton.language as tl

from .dispatch import empty_output
from . import triton_launch
from .triton_launch import aligned, cdiv, cuda_facts
from .triton_split_sum import sum_splits
from .dot_precision import dot_precision

__all__ = ["conv_forward", "conv_grad_input", "conv_grad_weight", "aot_cases", "CONFIGS",
           "IEEE_CONFIGS", "CANDIDATES", "SUPPORTED_BLOCK_SIZES", "ConvConfig", "ConvOptions",
           "OPTIONS", "options", "set_options", "wgrad_splits", "WGRAD_REDUCES", "WGRAD_KERNELS",
           "TAP_KERNELS", "STACKED_TAPS", "stacked_tiles"]

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


# --------------------------------------------------------------------------- kernels
# Every int argument is left unspecialized (``do_not_specialize``): Triton would otherwise compile
# a variant per divisibility-by-16 / equals-1 pattern of the geometry, i.e. about one per layer
# shape (a second or so each, at the start of a run on a GPU). The kernels state the alignment
# they rely on with ``tl.multiple_of`` instead.
_FWD_INTS = ["N", "H", "W", "Ho", "Wo", "KH", "KW", "CB_IN", "CB_OUT", "stride_h", "stride_w",
             "pad_h", "pad_w", "dil_h", "dil_w"]
_DGRAD_INTS = _FWD_INTS + ["step_h", "step_w"]
_WGRAD_INTS = _FWD_INTS + ["nnz", "m_per_split"]


@triton.jit
def _fwd_tile(pid, N, Ho, Wo, CB_OUT, stride_h, stride_w, pad_h, pad_w, BM: tl.constexpr):
    """What forward program ``pid`` owns: out-channel block-row ``r`` and a tile of ``BM`` output
    pixels (``offs_m``, ``m_ok`` for pixels that exist, their image ``n``), with the input row
    ``h0`` and column ``w0`` that tap (0, 0) reads for each. 1-D grid, block-row fastest, so the
    programs that run together share one tile of pixels and read its input rows from L2:
    ``pid = pid_m*CB_OUT + r``."""
    r = pid % CB_OUT                        # out-channel block-row
    pid_m = pid // CB_OUT                   # tile of output pixels
    offs_m = pid_m * BM + tl.arange(0, BM)  # flat output pixel m = (n*Ho + ho)*Wo + wo
    m_ok = offs_m < N * Ho * Wo
    wo = offs_m % Wo
    ho = (offs_m // Wo) % Ho
    n = offs_m // (Wo * Ho)
    h0 = ho * stride_h - pad_h              # input row read by tap row 0
    w0 = wo * stride_w - pad_w              # input column read by tap column 0
    return r, offs_m, m_ok, n, h0, w0


@triton.jit
def _fwd_store(acc, b_ptr, y_ptr, r, offs_m, m_ok, COUT, HAS_BIAS: tl.constexpr,
               BS: tl.constexpr):
    """The forward epilogue: ``acc [BM, BS]`` (+ the bias of block-row ``r``) into
    ``y[m, r*BS + o]`` at ``m*COUT + r*BS + o``. Empty block-rows still write (zeros or the
    bias)."""
    offs_o = tl.arange(0, BS)
    if HAS_BIAS:
        acc += tl.load(b_ptr + r * BS + offs_o).to(tl.float32)[None, :]
    y_row = tl.multiple_of(y_ptr + (offs_m * COUT + r * BS), 16)
    tl.store(y_row[:, None] + offs_o[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None])


@triton.jit(do_not_specialize=_FWD_INTS)
def _conv_fwd_kernel(
    x_ptr, v_ptr, b_ptr, y_ptr, row_ptr, col_idx,
    N, H, W, Ho, Wo, KH, KW, CB_IN, CB_OUT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # x: NHWC [N, H, W, CB_IN*BS], y: NHWC [N, Ho, Wo, CB_OUT*BS], both contiguous.
    r, offs_m, m_ok, n, h0, w0 = _fwd_tile(tl.program_id(0), N, Ho, Wo, CB_OUT, stride_h,
                                           stride_w, pad_h, pad_w, BM)
    CIN = CB_IN * BS                        # a multiple of BS: pixel offsets stay aligned
    COUT = CB_OUT * BS
    offs_o = tl.arange(0, BS)               # out-channels within block-row r
    offs_k = tl.arange(0, BK)               # in-channels within one BK slice of a block
    NK: tl.constexpr = BS // BK             # slices per block
    KHW = KH * KW
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    acc = tl.zeros((BM, BS), dtype=tl.float32)
    # One flat loop over t = ((i - start)*KHW + tap)*NK + s for active block i of row r,
    # tap = a*KW + b, slice s. The block's column index is loaded one iteration ahead (a
    # loop-carried value): an index load inside the iteration would stop the software pipeline.
    T = (end - start) * KHW * NK
    c = tl.load(col_idx + start, mask=T > 0, other=0)   # in-channel block of active block i
    for t in range(0, T):
        s = t % NK
        tap = (t // NK) % KHW
        i = start + t // (NK * KHW)
        a = tap // KW
        b = tap % KW
        hi = h0 + a * dil_h                 # input pixel this tap reads, per output pixel
        wi = w0 + b * dil_w
        ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)   # zero padding
        # x[n, hi, wi, c*BS + s*BK + k] at ((n*H + hi)*W + wi)*CIN + c*BS + s*BK + k; each
        # pixel's run of BK channels starts 16-byte aligned (CIN, BS, BK multiples of 16).
        x_row = tl.multiple_of(x_ptr + (((n * H + hi) * W + wi) * CIN + c * BS + s * BK), 16)
        xt = tl.load(x_row[:, None] + offs_k[None, :], mask=ok[:, None], other=0.0)
        # Wᵀ slice [BK, BS]: values[i, a, b, o, s*BK + k] at (i*KHW + tap)*BS*BS + o*BS + s*BK + k
        w_blk = tl.multiple_of(v_ptr + ((i * KHW + tap) * (BS * BS) + s * BK), 16)
        wt = tl.load(w_blk + offs_o[None, :] * BS + offs_k[:, None])
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        c = tl.load(col_idx + start + (t + 1) // (NK * KHW), mask=t + 1 < T, other=0)
    _fwd_store(acc, b_ptr, y_ptr, r, offs_m, m_ok, COUT, HAS_BIAS, BS)


@triton.jit(do_not_specialize=_FWD_INTS)
def _conv_fwd_taps_kernel(
    x_ptr, v_ptr, b_ptr, y_ptr, row_ptr, col_idx,
    N, H, W, Ho, Wo, KH, KW, CB_IN, CB_OUT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, TG: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # The forward with TG kernel taps stacked along the reduction: each loop step multiplies X
    # gathered at TG taps of one active block, [BM, TG*BS], by those taps' weight tiles stacked,
    # [TG*BS, BS]: one MMA TG*BS deep where _conv_fwd_kernel makes TG steps BS deep, so the
    # loop's index arithmetic, barriers and pipeline waits are paid once per TG taps (at block
    # 16 a 16-deep step is mostly overhead). The last group of a block is padded with masked
    # taps (KHW = 9 in groups of 4: 12 slots) whose loads read nothing.
    # Grid and layouts as _conv_fwd_kernel; x, y NHWC, contiguous.
    r, offs_m, m_ok, n, h0, w0 = _fwd_tile(tl.program_id(0), N, Ho, Wo, CB_OUT, stride_h,
                                           stride_w, pad_h, pad_w, BM)
    CIN = CB_IN * BS
    COUT = CB_OUT * BS
    offs_o = tl.arange(0, BS)               # out-channels within block-row r
    cols = tl.arange(0, TG * BS)            # stacked reduction index u*BS + k:
    u = cols // BS                          #   tap u of the group,
    k = cols % BS                           #   in-channel k of the block-column
    KHW = KH * KW
    G = (KHW + TG - 1) // TG                # tap groups per block
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    acc = tl.zeros((BM, BS), dtype=tl.float32)
    # One flat loop over t = (i - start)*G + g: active block i of row r, tap group g. The
    # block's column index is loaded one iteration ahead, as in _conv_fwd_kernel.
    T = (end - start) * G
    c = tl.load(col_idx + start, mask=T > 0, other=0)   # in-channel block of active block i
    for t in range(0, T):
        g = t % G
        i = start + t // G
        tap = g * TG + u                    # the tap of each stacked column (>= KHW: padding)
        tap_ok = tap < KHW
        a = tap // KW
        b = tap % KW
        hi = h0[:, None] + (a * dil_h)[None, :]   # input pixel per (output pixel, column)
        wi = w0[:, None] + (b * dil_w)[None, :]
        ok = (m_ok[:, None] & tap_ok[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W))
        # x[n, hi, wi, c*BS + k] at ((n*H + hi)*W + wi)*CIN + c*BS + k: runs of BS channels,
        # 16-byte aligned (CIN and BS are multiples of 16), one run per (pixel, tap).
        x_off = ((n[:, None] * H + hi) * W + wi) * CIN + c * BS
        xt = tl.load(x_ptr + (x_off + k[None, :]), mask=ok, other=0.0)
        # Wᵀ stacked [TG*BS, BS]: row u*BS + k, column o = values[i, tap, o, k]
        #   at (i*KHW + tap)*BS*BS + o*BS + k
        w_off = (i * KHW + tap) * (BS * BS) + k
        wt = tl.load(v_ptr + (w_off[:, None] + offs_o[None, :] * BS), mask=tap_ok[:, None],
                     other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        c = tl.load(col_idx + start + (t + 1) // G, mask=t + 1 < T, other=0)
    _fwd_store(acc, b_ptr, y_ptr, r, offs_m, m_ok, COUT, HAS_BIAS, BS)


@triton.jit
def _dgrad_tile(pid, N, H, W, KH, KW, CB_IN, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                step_h, step_w, BM: tl.constexpr):
    """What dgrad program ``pid`` owns: block-column ``c``, a tile of ``BM`` input pixels of
    one stride phase ``(qh, qw)`` (``n, ih, iw`` in the phase's grid, ``h, w`` in the input,
    ``m_ok`` for pixels that exist), and the phase's taps: rows ``a0h + uh*step_h`` (``uh <
    nah``), columns ``a0w + uw*step_w`` (``uw < naw``). The grid is 1-D, block-column fastest:
    ``pid = (phase*TQ + pid_m)*CB_IN + c``, ``TQ`` pixel tiles per phase, ``phase = qh*stride_w
    + qw``."""
    Hq = (H + stride_h - 1) // stride_h     # rows of phase 0 (the tallest); others are masked
    Wq = (W + stride_w - 1) // stride_w
    Mq = N * Hq * Wq
    TQ = (Mq + BM - 1) // BM
    c = pid % CB_IN                         # in-channel block-column
    pid_m = (pid // CB_IN) % TQ             # tile of pixels within the phase
    phase = pid // (CB_IN * TQ)
    qh = phase // stride_w
    qw = phase % stride_w
    offs_q = pid_m * BM + tl.arange(0, BM)  # flat phase pixel q = (n*Hq + ih)*Wq + iw
    iw = offs_q % Wq
    ih = (offs_q // Wq) % Hq
    n = offs_q // (Wq * Hq)
    h = qh + ih * stride_h                  # the input pixel it stands for
    w = qw + iw * stride_w
    m_ok = (offs_q < Mq) & (h < H) & (w < W)
    # First tap row/column that reaches this phase (KH/KW: none). Solutions repeat with period
    # step <= stride, so the first one is below min(K, stride). `%` may be negative here; only
    # "== 0" is tested.
    a0h = KH
    for a in range(0, tl.minimum(KH, stride_h)):
        a0h = tl.where(((qh + pad_h - a * dil_h) % stride_h == 0) & (a0h == KH), a, a0h)
    a0w = KW
    for b in range(0, tl.minimum(KW, stride_w)):
        a0w = tl.where(((qw + pad_w - b * dil_w) % stride_w == 0) & (a0w == KW), b, a0w)
    nah = (KH - a0h + step_h - 1) // step_h  # taps of the phase: 0 if a0h == KH
    naw = (KW - a0w + step_w - 1) // step_w
    return c, n, ih, iw, h, w, m_ok, qh, qw, a0h, a0w, nah, naw


@triton.jit(do_not_specialize=_DGRAD_INTS)
def _conv_dgrad_kernel(
    dy_ptr, v_ptr, dx_ptr, col_ptr, t_row_idx, t_block_idx,
    N, H, W, Ho, Wo, KH, KW, CB_IN, CB_OUT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, step_h, step_w,
    BS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    # dy: NHWC [N, Ho, Wo, CB_OUT*BS], dx: NHWC [N, H, W, CB_IN*BS], both contiguous.
    #
    # Stride phases. The forward reads input row h = ho*stride_h - pad_h + a*dil_h, so input
    # row h receives tap row a exactly when (h + pad_h - a*dil_h) % stride_h == 0, which depends
    # only on the phase qh = h % stride_h. A program owns input pixels of one phase (qh, qw), so
    # it visits only the taps that reach them: a = a0h + u*step_h (u < nah), where
    # step_h = stride_h / gcd(dil_h, stride_h); with stride 1 that is every tap. No MMA is
    # spent on taps a stride skips.
    #
    # 1-D grid, block-column fastest: pid = (phase*TQ + pid_m)*CB_IN + c, with TQ the pixel
    # tiles per phase and phase = qh*stride_w + qw.
    c, n, ih, iw, h, w, m_ok, qh, qw, a0h, a0w, nah, naw = _dgrad_tile(
        tl.program_id(0), N, H, W, KH, KW, CB_IN, stride_h, stride_w, pad_h, pad_w, dil_h,
        dil_w, step_h, step_w, BM)
    CIN = CB_IN * BS
    COUT = CB_OUT * BS
    offs_i = tl.arange(0, BS)               # in-channels within block-column c
    offs_k = tl.arange(0, BK)               # out-channels within one BK slice of a block
    NK: tl.constexpr = BS // BK
    KHW = KH * KW
    PER_BLOCK = nah * naw * NK              # iterations per active block
    start = tl.load(col_ptr + c)
    end = tl.load(col_ptr + c + 1)
    acc = tl.zeros((BM, BS), dtype=tl.float32)
    # t = ((j - start)*nah*naw + uh*naw + uw)*NK + s for the j-th active block of column c
    # (column-major), phase taps (a0h + uh*step_h, a0w + uw*step_w) and slice s. As in the
    # forward, the block's indices are loaded one iteration ahead.
    T = (end - start) * PER_BLOCK
    r = tl.load(t_row_idx + start, mask=T > 0, other=0)      # out-channel block of block j
    blk = tl.load(t_block_idx + start, mask=T > 0, other=0)  # its index into values
    for t in range(0, T):
        s = t % NK
        uw = (t // NK) % naw
        uh = (t // (NK * naw)) % nah
        a = a0h + uh * step_h
        b = a0w + uw * step_w
        tap = a * KW + b
        # ho = (h + pad_h - a*dil_h) / stride_h = ih + (qh + pad_h - a*dil_h) / stride_h, an
        # exact division (so truncation and floor agree for negative numerators).
        ho = ih + (qh + pad_h - a * dil_h) // stride_h
        wo = iw + (qw + pad_w - b * dil_w) // stride_w
        ok = m_ok & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo)
        # dy[n, ho, wo, r*BS + s*BK + k] at ((n*Ho + ho)*Wo + wo)*COUT + r*BS + s*BK + k
        dy_row = tl.multiple_of(dy_ptr + (((n * Ho + ho) * Wo + wo) * COUT + r * BS + s * BK), 16)
        dyt = tl.load(dy_row[:, None] + offs_k[None, :], mask=ok[:, None], other=0.0)
        # W slice [BK, BS] (out × in): values[blk, a, b, s*BK + k, i]
        #   at (blk*KHW + tap)*BS*BS + (s*BK + k)*BS + i
        w_blk = tl.multiple_of(v_ptr + ((blk * KHW + tap) * (BS * BS) + s * BK * BS), 16)
        wt = tl.load(w_blk + offs_k[:, None] * BS + offs_i[None, :])
        acc = tl.dot(dyt, wt, acc, input_precision=PRECISION)
        j_next = start + (t + 1) // PER_BLOCK
        r = tl.load(t_row_idx + j_next, mask=t + 1 < T, other=0)
        blk = tl.load(t_block_idx + j_next, mask=t + 1 < T, other=0)
    # dx[n, h, w, c*BS + i] at ((n*H + h)*W + w)*CIN + c*BS + i. Every input pixel belongs to
    # exactly one phase, so each is written once; pixels no tap reaches get zeros.
    x_row = tl.multiple_of(dx_ptr + (((n * H + h) * W + w) * CIN + c * BS), 16)
    tl.store(x_row[:, None] + offs_i[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None])


@triton.jit(do_not_specialize=_DGRAD_INTS)
def _conv_dgrad_taps_kernel(
    dy_ptr, v_ptr, dx_ptr, col_ptr, t_row_idx, t_block_idx,
    N, H, W, Ho, Wo, KH, KW, CB_IN, CB_OUT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, step_h, step_w,
    BS: tl.constexpr, BM: tl.constexpr, TG: tl.constexpr, PRECISION: tl.constexpr,
):
    # dX with TG of the phase's taps stacked along the reduction (as _conv_fwd_taps_kernel does
    # for the forward): each loop step multiplies dY gathered at TG taps of one active block,
    # [BM, TG*BS], by those taps' weight tiles stacked, [TG*BS, BS]. Stride phases, grid and
    # layouts as _conv_dgrad_kernel; the phase's nah*naw taps are numbered p = uh*naw + uw and
    # grouped by TG, the last group padded with masked taps.
    c, n, ih, iw, h, w, m_ok, qh, qw, a0h, a0w, nah, naw = _dgrad_tile(
        tl.program_id(0), N, H, W, KH, KW, CB_IN, stride_h, stride_w, pad_h, pad_w, dil_h,
        dil_w, step_h, step_w, BM)
    CIN = CB_IN * BS
    COUT = CB_OUT * BS
    offs_i = tl.arange(0, BS)               # in-channels within block-column c
    cols = tl.arange(0, TG * BS)            # stacked reduction index u*BS + k:
    u = cols // BS                          #   phase tap u of the group,
    k = cols % BS                           #   out-channel k of the block-row
    KHW = KH * KW
    NP = nah * naw                          # taps that reach this phase
    G = (NP + TG - 1) // TG                 # tap groups per block (0 if no tap reaches it)
    start = tl.load(col_ptr + c)
    end = tl.load(col_ptr + c + 1)
    acc = tl.zeros((BM, BS), dtype=tl.float32)
    # t = (j - start)*G + g for the j-th active block of column c (column-major) and tap group
    # g; the block's indices are loaded one iteration ahead.
    T = (end - start) * G
    r = tl.load(t_row_idx + start, mask=T > 0, other=0)      # out-channel block of block j
    blk = tl.load(t_block_idx + start, mask=T > 0, other=0)  # its index into values
    for t in range(0, T):
        g = t % G
        p = g * TG + u                      # phase tap of each stacked column (>= NP: padding)
        p_ok = p < NP
        a = a0h + (p // naw) * step_h
        b = a0w + (p % naw) * step_w
        tap = a * KW + b
        # ho = ih + (qh + pad_h - a*dil_h) / stride_h, an exact division (see _conv_dgrad_kernel)
        ho = ih[:, None] + ((qh + pad_h - a * dil_h) // stride_h)[None, :]
        wo = iw[:, None] + ((qw + pad_w - b * dil_w) // stride_w)[None, :]
        ok = (m_ok[:, None] & p_ok[None, :] & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo))
        # dy[n, ho, wo, r*BS + k] at ((n*Ho + ho)*Wo + wo)*COUT + r*BS + k
        dy_off = ((n[:, None] * Ho + ho) * Wo + wo) * COUT + r * BS
        dyt = tl.load(dy_ptr + (dy_off + k[None, :]), mask=ok, other=0.0)
        # W stacked [TG*BS, BS] (out × in): row u*BS + k, column i = values[blk, tap, k, i]
        #   at (blk*KHW + tap)*BS*BS + k*BS + i
        w_off = (blk * KHW + tap) * (BS * BS) + k * BS
        wt = tl.load(v_ptr + (w_off[:, None] + offs_i[None, :]), mask=p_ok[:, None], other=0.0)
        acc = tl.dot(dyt, wt, acc, input_precision=PRECISION)
        j_next = start + (t + 1) // G
        r = tl.load(t_row_idx + j_next, mask=t + 1 < T, other=0)
        blk = tl.load(t_block_idx + j_next, mask=t + 1 < T, other=0)
    # dx[n, h, w, c*BS + i] at ((n*H + h)*W + w)*CIN + c*BS + i; pixels no tap reaches get zeros.
    x_row = tl.multiple_of(dx_ptr + (((n * H + h) * W + w) * CIN + c * BS), 16)
    tl.store(x_row[:, None] + offs_i[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None])


@triton.jit(do_not_specialize=_WGRAD_INTS)
def _conv_wgrad_kernel(
    dy_ptr, x_ptr, ws_ptr, row_idx, col_idx,
    N, H, W, Ho, Wo, KH, KW, CB_IN, CB_OUT, nnz, m_per_split,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    BS: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr, PRECISION: tl.constexpr,
):
    # dy: NHWC [N, Ho, Wo, CB_OUT*BS], x: NHWC [N, H, W, CB_IN*BS], both contiguous;
    # ws: [splits, nnz, KH*KW, BS, BS], fp32 partial sums (or, with one split, dW itself in its
    # own dtype: the sum of one split needs no reduction).
    pid = tl.program_id(0)                  # pid = (i*KHW + tap)*NO + q: block, tap, out-slice
    split = tl.program_id(1)                # which range of output pixels to reduce over
    NO: tl.constexpr = BS // BO             # out-channel slices per block
    CIN = CB_IN * BS
    COUT = CB_OUT * BS
    KHW = KH * KW
    q = pid % NO
    tap = (pid // NO) % KHW
    i = pid // (NO * KHW)
    a = tap // KW
    b = tap % KW
    r = tl.load(row_idx + i)                # block-row (out-channel block) of active block i
    c = tl.load(col_idx + i)                # block-column (in-channel block)
    offs_o = tl.arange(0, BO)               # out-channels within this program's slice
    offs_i = tl.arange(0, BS)               # in-channels within the block
    M = N * Ho * Wo
    m_lo = split * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((BO, BS), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        offs_m = m0 + tl.arange(0, BM)      # flat output pixel m = (n*Ho + ho)*Wo + wo
        m_ok = offs_m < m_hi
        wo = offs_m % Wo
        ho = (offs_m // Wo) % Ho
        n = offs_m // (Wo * Ho)
        hi = ho * stride_h - pad_h + a * dil_h  # input pixel read by tap (a, b)
        wi = wo * stride_w - pad_w + b * dil_w
        x_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        # dYᵀ [BO, BM]: dy[m, r*BS + q*BO + o] at m*COUT + r*BS + q*BO + o
        dy_col = tl.multiple_of(dy_ptr + (offs_m * COUT + r * BS + q * BO), 16)
        dyt = tl.load(dy_col[None, :] + offs_o[:, None], mask=m_ok[None, :], other=0.0)
        # X [BM, BS]: x[n, hi, wi, c*BS + k] at ((n*H + hi)*W + wi)*CIN + c*BS + k
        x_row = tl.multiple_of(x_ptr + (((n * H + hi) * W + wi) * CIN + c * BS), 16)
        xt = tl.load(x_row[:, None] + offs_i[None, :], mask=x_ok[:, None], other=0.0)
        acc = tl.dot(dyt, xt, acc, input_precision=PRECISION)
    # ws[split, i, tap, q*BO + o, k] at ((split*nnz + i)*KHW + tap)*BS*BS + (q*BO + o)*BS + k
    ws_blk = ((split * nnz + i) * KHW + tap) * (BS * BS) + q * BO * BS
    tl.store(ws_ptr + ws_blk + offs_o[:, None] * BS + offs_i[None, :],
             acc.to(ws_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=_WGRAD_INTS)
def _conv_wgrad_taps_kernel(
    dy_ptr, x_ptr, ws_ptr, row_idx, col_idx,
    N, H, W, Ho, Wo, KH, KW, CB_IN, CB_OUT, nnz, m_per_split,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    BS: tl.constexpr, BM: tl.constexpr, TG: tl.constexpr, PRECISION: tl.constexpr,
):
    # The wgrad with TG kernel taps stacked into one MMA: a program owns active block i and taps
    # g*TG .. g*TG + TG - 1, and accumulates dWᵀ for all of them, [TG*BS, BS] (row
    # r = (tap - g*TG)*BS + k: in-channel k of that tap; column o: out-channel), as
    # Xᵀ-stacked [TG*BS, BM] · dY [BM, BS]. dY is loaded once for TG taps (the per-tap kernel
    # loads it once per tap), and the MMA is TG*BS rows tall (Hopper's wgmma wants 64).
    pid = tl.program_id(0)                  # pid = i*G + g, G = tap groups per block
    split = tl.program_id(1)
    CIN = CB_IN * BS
    COUT = CB_OUT * BS
    KHW = KH * KW
    G = (KHW + TG - 1) // TG
    g = pid % G
    i = pid // G
    r = tl.load(row_idx + i)
    c = tl.load(col_idx + i)
    rows = tl.arange(0, TG * BS)
    tap = g * TG + rows // BS               # the tap of each stacked row (>= KHW: padding)
    k = rows % BS                           # its in-channel within block-column c
    tap_ok = tap < KHW
    a = tap // KW
    b = tap % KW
    offs_o = tl.arange(0, BS)
    M = N * Ho * Wo
    m_lo = split * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((TG * BS, BS), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        m_ok = offs_m < m_hi
        wo = offs_m % Wo
        ho = (offs_m // Wo) % Ho
        n = offs_m // (Wo * Ho)
        # Xᵀ stacked [TG*BS, BM]: x[n, hi, wi, c*BS + k] with (hi, wi) shifted by each row's tap
        hi = ho[None, :] * stride_h - pad_h + a[:, None] * dil_h
        wi = wo[None, :] * stride_w - pad_w + b[:, None] * dil_w
        ok = (m_ok[None, :] & tap_ok[:, None] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W))
        xt = tl.load(x_ptr + (((n[None, :] * H + hi) * W + wi) * CIN + c * BS + k[:, None]),
                     mask=ok, other=0.0)
        # dY [BM, BS]: dy[m, r*BS + o] at m*COUT + r*BS + o
        dy_row = tl.multiple_of(dy_ptr + (offs_m * COUT + r * BS), 16)
        dyt = tl.load(dy_row[:, None] + offs_o[None, :], mask=m_ok[:, None], other=0.0)
        acc = tl.dot(xt, dyt, acc, input_precision=PRECISION)
    # ws[split, i, tap, o, k] at ((split*nnz + i)*KHW + tap)*BS*BS + o*BS + k  (acc[row, o])
    ws_off = ((split * nnz + i) * KHW + tap) * (BS * BS) + k
    tl.store(ws_ptr + ws_off[:, None] + offs_o[None, :] * BS, acc.to(ws_ptr.dtype.element_ty),
             mask=tap_ok[:, None])


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class ConvConfig:
    """Tiles for one block size: ``BM``/``BK`` for the forward and dgrad implicit GEMMs,
    ``WBM``/``WBO`` (pixels per reduction step / out-channels per program) for wgrad, and
    ``wsplit``: how many wgrad programs per SM the split of the pixel reduction aims at."""

    BM: int
    BK: int
    warps: int
    stages: int
    WBM: int
    WBO: int
    wwarps: int
    wstages: int
    wsplit: int = 4


# CONFIGS[arch][block_size]: 16-bit and TF32 dots (fp32 with TF32 fits these tiles too).
CONFIGS = {
    80: {
        16: ConvConfig(BM=128, BK=16, warps=4, stages=3, WBM=64, WBO=16, wwarps=4, wstages=3),
        32: ConvConfig(BM=128, BK=32, warps=4, stages=3, WBM=64, WBO=32, wwarps=4, wstages=3),
        64: ConvConfig(BM=128, BK=32, warps=8, stages=3, WBM=64, WBO=64, wwarps=4, wstages=3),
        128: ConvConfig(BM=64, BK=32, warps=4, stages=3, WBM=32, WBO=64, wwarps=4, wstages=3),
    },
    90: {
        16: ConvConfig(BM=128, BK=16, warps=4, stages=3, WBM=64, WBO=16, wwarps=4, wstages=3),
        32: ConvConfig(BM=128, BK=32, warps=4, stages=3, WBM=64, WBO=32, wwarps=4, wstages=3),
        64: ConvConfig(BM=128, BK=64, warps=4, stages=3, WBM=64, WBO=64, wwarps=4, wstages=3),
        128: ConvConfig(BM=128, BK=32, warps=8, stages=3, WBM=32, WBO=64, wwarps=4, wstages=3),
    },
}

# IEEE_CONFIGS[arch][block_size]: fp32 with IEEE dots (torch's cuDNN TF32 switch off). The FMA
# path holds its operands in registers, so most of the tiles above spill; these smaller ones
# compile without spills on both archs in both specializations (``compile_check``; block 128
# takes BK 16: with BK 32 its forward with bias spills 8 bytes on sm_90 once the pointers are
# known to be aligned, as they are at run time). Correctness first: the GPU conv tuning owns
# their speed.
_IEEE = {
    16: ConvConfig(BM=64, BK=16, warps=4, stages=2, WBM=64, WBO=16, wwarps=4, wstages=2),
    32: ConvConfig(BM=32, BK=32, warps=4, stages=2, WBM=32, WBO=32, wwarps=4, wstages=2),
    64: ConvConfig(BM=32, BK=32, warps=8, stages=2, WBM=32, WBO=32, wwarps=8, wstages=2),
    128: ConvConfig(BM=32, BK=16, warps=8, stages=2, WBM=32, WBO=32, wwarps=8, wstages=2),
}
IEEE_CONFIGS = {80: _IEEE, 90: _IEEE}

# CANDIDATES[block_size][name]: 16-bit tiles the GPU benchmark times against the shipped
# CONFIGS (``benchmarks/bench_conv.py`` times every kernel of every candidate separately, so the
# forward, dgrad and wgrad parts can be chosen independently offline). Each one is correct under
# the interpreter and compiles for sm_80 and sm_90 without spills (``aot_cases``). Select one
# with ``options(config=...)``.
_C = ConvConfig
CANDIDATES = {
    16: {
        "bm64_s4|w128_s4": _C(BM=64, BK=16, warps=4, stages=4, WBM=128, WBO=16, wwarps=4, wstages=4),
        "bm128_s4|w64_sp8": _C(BM=128, BK=16, warps=4, stages=4, WBM=64, WBO=16, wwarps=4,
                                wstages=3, wsplit=8),
        "bm256_w8|w128_sp2": _C(BM=256, BK=16, warps=8, stages=3, WBM=128, WBO=16, wwarps=4,
                                 wstages=3, wsplit=2),
        "bm128_w8_s2|w256_w8": _C(BM=128, BK=16, warps=8, stages=2, WBM=256, WBO=16, wwarps=8,
                                   wstages=3),
        "bm64_w2|w32_s4_sp8": _C(BM=64, BK=16, warps=2, stages=3, WBM=32, WBO=16, wwarps=2,
                                  wstages=4, wsplit=8),
        # one stage: plain ld.global loads, cached in L1, instead of pipelined cp.async.cg
        # (which bypasses L1): neighbouring taps read overlapping pixels, so with the taps of
        # one block in consecutive steps most of a 3×3 layer's X reads may hit L1
        "bm128_s1|w64_s1": _C(BM=128, BK=16, warps=4, stages=1, WBM=64, WBO=16, wwarps=4,
                               wstages=1),
    },
    32: {
        "bk16_s4|w128": _C(BM=128, BK=16, warps=4, stages=4, WBM=128, WBO=32, wwarps=4, wstages=3),
        "bm64_s4|w64_s4_sp8": _C(BM=64, BK=32, warps=4, stages=4, WBM=64, WBO=32, wwarps=4,
                                  wstages=4, wsplit=8),
        "bm256_w8|w128_w8_sp2": _C(BM=256, BK=32, warps=8, stages=3, WBM=128, WBO=32, wwarps=8,
                                    wstages=3, wsplit=2),
        "bm128_w8|wbo16": _C(BM=128, BK=32, warps=8, stages=3, WBM=64, WBO=16, wwarps=4,
                              wstages=3),
        "bm256_bk16_w8_s4|w256_w8_s2": _C(BM=256, BK=16, warps=8, stages=4, WBM=256, WBO=32,
                                           wwarps=8, wstages=2),
        # L1-cached loads, as for block 16; the wgrad with 8 warps (with 4, triton 3.6 spills
        # 12 B on sm_90 when it writes bf16 directly)
        "bm128_s1|w64_w8_s1": _C(BM=128, BK=32, warps=4, stages=1, WBM=64, WBO=32, wwarps=8,
                                  wstages=1),
    },
}
del _C


# --------------------------------------------------------------------------- run-time options
ROUTES_1X1 = ("conv", "gemm", "gemm_fwd_dx")
WGRAD_REDUCES = ("triton", "torch")
# the kernels each of the forward, dgrad and wgrad can run: the table's choice for the block size
# (STACKED_TAPS), a tap (and BK slice) per loop step, or taps stacked
TAP_KERNELS = ("auto", "per_tap", "taps")
WGRAD_KERNELS = TAP_KERNELS

# STACKED_TAPS[arch][block_size][kernel]: taps stacked per loop step of the forward, dgrad and
# wgrad when their option is "auto" (1: the per-tap kernel). Chosen from the GPU run's per-kernel
# timings (benchmarks/pick_conv_configs.py); per-tap everywhere until one is measured.
STACKED_TAPS = {arch: {bs: {"fwd": 1, "dgrad": 1, "wgrad": 1} for bs in SUPPORTED_BLOCK_SIZES}
                for arch in (80, 90)}


@dataclass(frozen=True)
class ConvOptions:
    """Choices the GPU benchmark measures side by side (``options(...)`` sets them).

    - ``route_1x1``: a 1×1, stride-1, unpadded convolution is ``Y[N·H·W, Cout] = X[N·H·W, Cin]·Wᵀ``
      over the channels-last pixels: ``"conv"`` runs the implicit-GEMM conv kernels,
      ``"gemm"`` the block-sparse linear kernels (forward, dX and dW), ``"gemm_fwd_dx"`` the
      linear kernels for the forward and dX and the conv wgrad kernel (split over the pixels)
      for dW. fp32 takes the GEMM route only where torch's matmul and cuDNN TF32 switches agree
      (the linear kernels follow the matmul switch).
    - ``config``: a :class:`ConvConfig` used instead of ``CONFIGS`` for 16-bit and TF32 dots
      (IEEE fp32 keeps ``IEEE_CONFIGS``), e.g. one of ``CANDIDATES``.
    - ``wgrad_kernel``: ``"auto"`` (``STACKED_TAPS`` of the GPU and block size), ``"per_tap"``
      (a program per (block, tap, out-slice), ``WBM``/``WBO`` tiles) or ``"taps"`` (a program
      per block and group of ``wgrad_taps`` taps: one dY load for the group and a
      ``wgrad_taps·BS``-row MMA, the shape Hopper's wgmma wants; pixel tile ``WBM``; at most
      ``128 / BS`` taps).
    - ``wgrad_reduce``: how the wgrad's fp32 partial sums become ``dW`` in the input dtype:
      ``"triton"`` one kernel (sum over the splits and cast), ``"torch"`` ``ws.sum(0)`` then
      ``.to(dtype)`` (two launches and an fp32 round trip through memory). With one split
      there is nothing to reduce: the wgrad kernel writes ``dW`` in the input dtype itself.
    - ``fwd_kernel`` / ``dgrad_kernel``: ``"auto"`` (``STACKED_TAPS``), ``"per_tap"`` (each
      loop step one tap and one ``BK`` slice of a block: an MMA ``BK`` deep) or ``"taps"``
      (each loop step ``fwd_taps`` / ``dgrad_taps`` taps of a block stacked: an MMA ``taps·BS``
      deep, at most 128; fewer, fuller steps, the last group of a block padded with masked
      taps; pixel tile, warps and stages from :func:`stacked_tiles`).
      Kernels with one tap (1×1) and IEEE fp32 (whose FMA path holds the operands in registers)
      always run the per-tap kernels.
    - ``taps_stages``: ``num_stages`` of the three stacked-taps kernels instead of their tiles'
      own; ``1`` loads with plain ``ld.global``, which is cached in L1 (Triton's pipelined
      ``cp.async`` copies bypass it), so the overlapping pixels of the taps in one stacked load
      are read from L2 once. ``None``: the tiles' own.
    """

    route_1x1: str = "conv"
    config: Optional[ConvConfig] = None
    wgrad_reduce: str = "triton"
    wgrad_kernel: str = "auto"
    wgrad_taps: int = 4
    fwd_kernel: str = "auto"
    fwd_taps: int = 4
    dgrad_kernel: str = "auto"
    dgrad_taps: int = 4
    taps_stages: Optional[int] = None


OPTIONS = ConvOptions()


@contextlib.contextmanager
def options(**changes) -> Iterator[ConvOptions]:
    """Within the block, the conv wrappers use ``OPTIONS`` with ``changes`` applied (fields of
    :class:`ConvOptions`); ``ValueError`` names a bad field or value."""
    global OPTIONS
    new = set_options(**changes)
    old, OPTIONS = OPTIONS, new
    try:
        yield new
    finally:
        OPTIONS = old


def set_options(**changes) -> ConvOptions:
    """``OPTIONS`` with ``changes`` applied and checked (not installed; see :func:`options`)."""
    fields = set(ConvOptions.__dataclass_fields__)
    for name in changes:
        if name not in fields:
            raise ValueError(f"unknown conv option {name!r}; fields are {sorted(fields)}")
    new = dataclasses.replace(OPTIONS, **changes)
    if new.route_1x1 not in ROUTES_1X1:
        raise ValueError(f"route_1x1 must be one of {ROUTES_1X1}, got {new.route_1x1!r}")
    for name in ("fwd_kernel", "dgrad_kernel", "wgrad_kernel"):
        if getattr(new, name) not in TAP_KERNELS:
            raise ValueError(f"{name} must be one of {TAP_KERNELS}, got {getattr(new, name)!r}")
    for name in ("wgrad_taps", "fwd_taps", "dgrad_taps"):
        if getattr(new, name) not in (1, 2, 4, 8):
            raise ValueError(f"{name} must be 1, 2, 4 or 8, got {getattr(new, name)!r}")
    if new.taps_stages not in (None, 1, 2, 3, 4):
        raise ValueError(f"taps_stages must be None or 1 to 4, got {new.taps_stages!r}")
    if new.wgrad_reduce not in WGRAD_REDUCES:
        raise ValueError(f"wgrad_reduce must be one of {WGRAD_REDUCES}, got {new.wgrad_reduce!r}")
    if new.config is not None and not isinstance(new.config, ConvConfig):
        raise TypeError(f"config must be a ConvConfig or None, got {type(new.config).__name__}")
    return new


def _arch(device: torch.device) -> int:
    """The config table for ``device``: sm_90 for Hopper and newer, sm_80 otherwise (and for
    the CPU interpreter)."""
    if device.type == "cuda":
        return cuda_facts(device)[0]
    return 80


@functools.lru_cache(maxsize=256)
def _config_cached(block_size: int, device: torch.device, ieee_fp32: bool,
                   override: Optional[ConvConfig]) -> ConvConfig:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} is not supported by the Triton conv kernels; "
                         f"use one of {SUPPORTED_BLOCK_SIZES}")
    if ieee_fp32:
        return IEEE_CONFIGS[_arch(device)][block_size]
    return override if override is not None else CONFIGS[_arch(device)][block_size]


def _config(block_size: int, device: torch.device, dtype: torch.dtype,
            precision: str) -> ConvConfig:
    """The tiles for ``block_size`` on ``device``, inputs of ``dtype`` with dots of ``precision``
    (:func:`~itop_kernels.dot_precision.dot_precision`): fp32 with IEEE dots has its own,
    ``OPTIONS.config`` replaces the others. Cached per (block size, device, kind, override)."""
    return _config_cached(block_size, device, dtype == torch.float32 and precision == "ieee",
                          OPTIONS.config)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_facts(device)[1]
    return 1  # the interpreter runs programs one after another: fewer, longer ones


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


_INT32_MAX = 2**31 - 1


def _kernel_input(t: torch.Tensor, name: str) -> torch.Tensor:
    """``[N, C, H, W]`` as a contiguous channels-last tensor whose data starts 16-byte aligned
    (the kernels promise the compiler aligned, vectorizable channel runs). No copy for an
    aligned channels-last tensor."""
    t = aligned(t, torch.channels_last)
    if t.numel() > _INT32_MAX:
        raise ValueError(f"{name} has {t.numel()} elements; the Triton conv kernels index with "
                         "int32 (at most 2**31 - 1 elements): split the batch")
    return t


def _empty_nhwc(shape, dtype, device) -> torch.Tensor:
    """A kernel output ``[N, Ch, H, W]`` in channels-last layout (poisoned when tests ask)."""
    n, ch, h, w = shape
    if n * ch * h * w > _INT32_MAX:
        raise ValueError(f"an output of shape {tuple(shape)} has more than 2**31 - 1 elements; "
                         "the Triton conv kernels index with int32: split the batch")
    return empty_output(shape, dtype, device, torch.channels_last)


def _in_format(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """A channels-last kernel output handed back in ``memory_format``."""
    return t if memory_format == torch.channels_last else t.contiguous()


def _pixels(t: torch.Tensor) -> torch.Tensor:
    """A contiguous channels-last ``[N, C, H, W]`` as its ``[N·H·W, C]`` pixel matrix (a view)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).view(n * h * w, c)


def _from_pixels(t: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """A row-major ``[N·H·W, C]`` pixel matrix as a channels-last ``[N, C, H, W]`` (a view)."""
    return t.view(n, h, w, t.shape[1]).permute(0, 3, 1, 2)


def _gemm_1x1(kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
              dtype: torch.dtype, wgrad: bool = False) -> bool:
    """Whether this convolution runs on the linear kernels (``OPTIONS.route_1x1``): a 1×1
    kernel, stride 1, no padding (dilation does not matter), and for fp32 the same dot
    precision under the matmul switch as under the conv switch."""
    route = OPTIONS.route_1x1
    if route == "conv" or (wgrad and route == "gemm_fwd_dx"):
        return False
    if tuple(kernel_size) != (1, 1) or tuple(stride) != (1, 1) or tuple(padding) != (0, 0):
        return False
    return dtype != torch.float32 or dot_precision(dtype, "conv") == dot_precision(dtype, "matmul")


def _linear():
    from . import triton_linear  # the 1×1 GEMM route's kernels
    return triton_linear


# --------------------------------------------------------------------------- launches
def _launch(kernel, grid: tuple, args: tuple, consts: dict, warps: int, stages: int) -> None:
    """``kernel[grid](*args, **consts, num_warps=warps, num_stages=stages)``, through
    :func:`itop_kernels.triton_launch.launch` (which replays the compiled handle of each
    specialization in its ``"cached"`` mode)."""
    triton_launch.launch(kernel, grid, args, consts, warps, stages)


# --------------------------------------------------------------------------- wrappers
def conv_forward(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                 col_idx: torch.Tensor, bias: Optional[torch.Tensor], block_size: int,
                 out_channels: int, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], memory_format: torch.memory_format) -> torch.Tensor:
    """``y = conv2d(x, W) (+ bias)``: ``x [N, Cin, H, W]`` (any format; NCHW is copied to
    channels-last), ``values [nnz, KH, KW, BS, BS]`` -> ``y [N, Cout, Ho, Wo]`` in
    ``memory_format``, x's dtype."""
    prec = dot_precision(x.dtype, "conv")
    cfg = _config(block_size, x.device, x.dtype, prec)
    N, Cin, H, W = x.shape
    KH, KW = values.shape[1:3]
    Ho = _out_size(H, KH, stride[0], padding[0], dilation[0])
    Wo = _out_size(W, KW, stride[1], padding[1], dilation[1])
    M = N * Ho * Wo
    if M and out_channels and _gemm_1x1((KH, KW), stride, padding, x.dtype):
        x = _kernel_input(x, "x")
        y = _linear().linear_forward(_pixels(x), values.view(-1, block_size, block_size),
                                     row_ptr, col_idx, bias, block_size, out_channels)
        return _in_format(_from_pixels(y, N, Ho, Wo), memory_format)
    y = _empty_nhwc((N, out_channels, Ho, Wo), x.dtype, x.device)
    if M == 0 or out_channels == 0:
        return _in_format(y, memory_format)
    x = _kernel_input(x, "x")
    values = aligned(values)
    has_bias = bias is not None
    args = (x, values, aligned(bias) if has_bias else values, y, row_ptr, col_idx,
            N, H, W, Ho, Wo, KH, KW, Cin // block_size, out_channels // block_size,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    tg = _tap_kernel("fwd", block_size, KH * KW, x.dtype, prec, x.device)
    if tg > 1:
        bm, warps, stages = stacked_tiles(block_size, tg)
        _launch(_conv_fwd_taps_kernel, (cdiv(M, bm) * (out_channels // block_size),), args,
                {"HAS_BIAS": has_bias, "BS": block_size, "BM": bm, "TG": tg,
                 "PRECISION": prec}, warps, stages)
    else:
        _launch(_conv_fwd_kernel, (cdiv(M, cfg.BM) * (out_channels // block_size),), args,
                {"HAS_BIAS": has_bias, "BS": block_size, "BM": cfg.BM, "BK": cfg.BK,
                 "PRECISION": prec}, cfg.warps, cfg.stages)
    return _in_format(y, memory_format)


def conv_grad_input(dy: torch.Tensor, values: torch.Tensor, col_ptr: torch.Tensor,
                    t_row_idx: torch.Tensor, t_block_idx: torch.Tensor, block_size: int,
                    input_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], memory_format: torch.memory_format) -> torch.Tensor:
    """``dX``: ``dy [N, Cout, Ho, Wo]`` (any format) -> ``[N, Cin, H, W]`` (``input_size``) in
    ``memory_format``, dy's dtype. Walks each block-column through the transpose metadata."""
    prec = dot_precision(dy.dtype, "conv")
    cfg = _config(block_size, dy.device, dy.dtype, prec)
    N, Cin, H, W = input_size
    _, Cout, Ho, Wo = dy.shape
    KH, KW = values.shape[1:3]
    M = N * H * W
    if M and Cin and _gemm_1x1((KH, KW), stride, padding, dy.dtype):
        dy = _kernel_input(dy, "dy")
        dx = _linear().linear_grad_input(_pixels(dy), values.view(-1, block_size, block_size),
                                         col_ptr, t_row_idx, t_block_idx, block_size, Cin)
        return _in_format(_from_pixels(dx, N, H, W), memory_format)
    dx = _empty_nhwc((N, Cin, H, W), dy.dtype, dy.device)
    if M == 0 or Cin == 0:
        return _in_format(dx, memory_format)
    dy = _kernel_input(dy, "dy")
    values = aligned(values)
    # One pixel space per stride phase, sized for phase 0 (the largest).
    sh, sw = stride
    mq = N * cdiv(H, sh) * cdiv(W, sw)
    args = (dy, values, dx, col_ptr, t_row_idx, t_block_idx,
            N, H, W, Ho, Wo, KH, KW, Cin // block_size, Cout // block_size,
            sh, sw, padding[0], padding[1], dilation[0], dilation[1],
            sh // math.gcd(dilation[0], sh), sw // math.gcd(dilation[1], sw))
    tg = _tap_kernel("dgrad", block_size, KH * KW, dy.dtype, prec, dy.device)
    if tg > 1:
        bm, warps, stages = stacked_tiles(block_size, tg)
        _launch(_conv_dgrad_taps_kernel, (sh * sw * cdiv(mq, bm) * (Cin // block_size),), args,
                {"BS": block_size, "BM": bm, "TG": tg, "PRECISION": prec}, warps, stages)
    else:
        _launch(_conv_dgrad_kernel, (sh * sw * cdiv(mq, cfg.BM) * (Cin // block_size),), args,
                {"BS": block_size, "BM": cfg.BM, "BK": cfg.BK, "PRECISION": prec},
                cfg.warps, cfg.stages)
    return _in_format(dx, memory_format)


def _stacked_taps(block_size: int, taps: int) -> int:
    """Taps stacked per MMA: ``taps``, at most ``128 / block_size`` (the wgrad's accumulator,
    and the forward's and dgrad's reduction depth, at most 128 rows: no spills)."""
    return max(1, min(taps, 128 // block_size))


def stacked_tiles(block_size: int, taps: int) -> tuple[int, int, int]:
    """``(BM, warps, stages)`` of the stacked-taps forward and dgrad (``fwd_kernel`` /
    ``dgrad_kernel`` ``"taps"``): 128 pixels, 8 warps, 3 stages while the stacked operand is at
    most 64 deep and 2 at 128 (shared memory: 2 × 48 KB for block 64, so two programs fit an
    SM), or ``OPTIONS.taps_stages``. Every block size and group size compiles without spills
    for sm_80 and sm_90 (``aot_cases``), with wgmma on sm_90."""
    return 128, 8, OPTIONS.taps_stages or (3 if taps * block_size <= 64 else 2)


def _tap_kernel(kind: str, block_size: int, taps_total: int, dtype: torch.dtype,
                precision: str, device: torch.device) -> int:
    """Taps stacked per loop step (per program, for the wgrad) of the ``kind`` (``"fwd"``,
    ``"dgrad"`` or ``"wgrad"``) kernel: 1 for the per-tap kernel, which runs for 1×1 kernels,
    IEEE fp32 (whose FMA path holds the operands in registers) and when
    ``OPTIONS.<kind>_kernel`` is ``"per_tap"``; ``"taps"`` takes ``OPTIONS.<kind>_taps``,
    ``"auto"`` the ``STACKED_TAPS`` entry of the device's arch and the block size."""
    choice = getattr(OPTIONS, f"{kind}_kernel")
    if choice == "per_tap" or taps_total == 1 or (dtype == torch.float32 and precision == "ieee"):
        return 1
    if choice == "taps":
        taps = getattr(OPTIONS, f"{kind}_taps")
    else:
        taps = STACKED_TAPS[_arch(device)][block_size][kind]
    return _stacked_taps(block_size, taps) if taps > 1 else 1


def _taps_tiles(block_size: int, taps: int) -> tuple[int, int, int]:
    """``(BM, warps, stages)`` of the stacked-taps wgrad: 8 warps, 64 pixels per step for a
    64-row accumulator and 32 for 128 rows, 3 stages or ``OPTIONS.taps_stages`` (every group
    size compiles without spills for sm_80 and sm_90, with wgmma on sm_90)."""
    return (64 if taps * block_size <= 64 else 32), 8, OPTIONS.taps_stages or 3


def wgrad_splits(tiles: int, pixels: int, cfg: ConvConfig, sm_count: int) -> tuple[int, int]:
    """``(splits, pixels per split)`` of the wgrad reduction over ``pixels`` output pixels for
    ``tiles`` (block, tap, out-slice) programs: about ``cfg.wsplit`` programs per SM, each
    reducing at least 4 steps of ``WBM`` pixels; every split but the last a multiple of WBM."""
    want = cdiv(cfg.wsplit * sm_count, tiles)
    splits = max(1, min(want, cdiv(pixels, 4 * cfg.WBM)))
    per_split = cdiv(cdiv(pixels, splits), cfg.WBM) * cfg.WBM
    return cdiv(pixels, per_split), per_split


def conv_grad_weight(dy: torch.Tensor, x: torch.Tensor, row_idx: torch.Tensor,
                     col_idx: torch.Tensor, block_size: int, kernel_size: Sequence[int],
                     stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int]) -> torch.Tensor:
    """``dW`` at the active blocks: ``dy [N, Cout, Ho, Wo]``, ``x [N, Cin, H, W]`` (any format)
    -> ``[nnz, KH, KW, BS, BS]`` in dy's dtype (fp32 partial sums, rounded once)."""
    prec = dot_precision(dy.dtype, "conv")
    cfg = _config(block_size, dy.device, dy.dtype, prec)
    bs = block_size
    N, Cin, H, W = x.shape
    _, Cout, Ho, Wo = dy.shape
    KH, KW = kernel_size
    nnz = row_idx.numel()
    M = N * Ho * Wo
    if nnz == 0 or M == 0:
        return torch.zeros((nnz, KH, KW, bs, bs), dtype=dy.dtype, device=dy.device)
    dy, x = _kernel_input(dy, "dy"), _kernel_input(x, "x")
    if _gemm_1x1((KH, KW), stride, padding, dy.dtype, wgrad=True):
        dv = _linear().linear_grad_weight(_pixels(dy), _pixels(x), row_idx, col_idx, bs)
        return dv.view(nnz, 1, 1, bs, bs)
    tg = _tap_kernel("wgrad", bs, KH * KW, dy.dtype, prec, dy.device)
    taps = tg > 1
    if taps:
        tiles = nnz * cdiv(KH * KW, tg)
    else:
        tiles = nnz * KH * KW * (bs // cfg.WBO)
    splits, m_per_split = wgrad_splits(tiles, M, cfg, _sm_count(dy.device))
    # fp32 partial sums per split; one split writes dW in dy's dtype directly (rounded once
    # either way), with no reduction launch: the kernel's split 0 starts at ws's base, so dW is
    # allocated in its own shape
    if splits == 1:
        ws = empty_output((nnz, KH, KW, bs, bs), dy.dtype, dy.device)
    else:
        ws = empty_output((splits, nnz, KH, KW, bs, bs), torch.float32, dy.device)
    args = (dy, x, ws, row_idx, col_idx,
            N, H, W, Ho, Wo, KH, KW, Cin // bs, Cout // bs, nnz, m_per_split,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    if taps:
        tbm, twarps, tstages = _taps_tiles(bs, tg)
        _launch(_conv_wgrad_taps_kernel, (tiles, splits), args,
                {"BS": bs, "BM": tbm, "TG": tg, "PRECISION": prec}, twarps, tstages)
    else:
        _launch(_conv_wgrad_kernel, (tiles, splits), args,
                {"BS": bs, "BM": cfg.WBM, "BO": cfg.WBO, "PRECISION": prec},
                cfg.wwarps, cfg.wstages)
    if splits == 1:
        return ws
    if OPTIONS.wgrad_reduce == "torch":
        dv = ws.sum(0)
        return dv if dv.dtype == dy.dtype else dv.to(dy.dtype)
    dv = empty_output((nnz, KH, KW, bs, bs), dy.dtype, dy.device)
    sum_splits(ws, dv)
    return dv


# --------------------------------------------------------------------------- AOT cases
# (name, pointer type, dot precision): fp32 ships both, TF32 and IEEE (torch's cuDNN switch)
_KINDS = [("fp16", "*fp16", "ieee"), ("bf16", "*bf16", "ieee"), ("fp32", "*fp32", "tf32"),
          ("fp32_ieee", "*fp32", "ieee")]
_GEOM = ["N", "H", "W", "Ho", "Wo", "KH", "KW", "CB_IN", "CB_OUT"]
_CONV = ["stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]


def _ints(names) -> dict:
    return {n: "i32" for n in names}


def _kernel_cases(name: str, cfg: ConvConfig, bs: int, ptr: str, prec: str,
                  biases=(True, False)) -> list:
    """The forward (with and without bias), dgrad and wgrad compile cases of one config."""
    from .compile_check import AotCase

    cases = []
    for has_bias in biases:
        sig = {"x_ptr": ptr, "v_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr,
               "row_ptr": "*i32", "col_idx": "*i32", **_ints(_GEOM), **_ints(_CONV),
               "HAS_BIAS": "constexpr", "BS": "constexpr", "BM": "constexpr",
               "BK": "constexpr", "PRECISION": "constexpr"}
        cases.append(AotCase(
            name.format(kernel="fwd") + ("_bias" if has_bias else ""), _conv_fwd_kernel,
            sig, {"HAS_BIAS": has_bias, "BS": bs, "BM": cfg.BM, "BK": cfg.BK,
                  "PRECISION": prec},
            cfg.warps, cfg.stages))
    sig = {"dy_ptr": ptr, "v_ptr": ptr, "dx_ptr": ptr, "col_ptr": "*i32",
           "t_row_idx": "*i32", "t_block_idx": "*i32", **_ints(_GEOM), **_ints(_CONV),
           **_ints(["step_h", "step_w"]),
           "BS": "constexpr", "BM": "constexpr", "BK": "constexpr",
           "PRECISION": "constexpr"}
    cases.append(AotCase(name.format(kernel="dgrad"), _conv_dgrad_kernel, sig,
                         {"BS": bs, "BM": cfg.BM, "BK": cfg.BK, "PRECISION": prec},
                         cfg.warps, cfg.stages))
    for ws, tag in _wgrad_outputs(ptr):
        sig = {"dy_ptr": ptr, "x_ptr": ptr, "ws_ptr": ws, "row_idx": "*i32",
               "col_idx": "*i32", **_ints(_GEOM), **_ints(["nnz", "m_per_split"]),
               **_ints(_CONV), "BS": "constexpr", "BM": "constexpr", "BO": "constexpr",
               "PRECISION": "constexpr"}
        cases.append(AotCase(name.format(kernel="wgrad") + tag, _conv_wgrad_kernel, sig,
                             {"BS": bs, "BM": cfg.WBM, "BO": cfg.WBO, "PRECISION": prec},
                             cfg.wwarps, cfg.wstages))
    return cases


def _wgrad_outputs(ptr: str) -> list:
    """``(ws_ptr type, name suffix)`` the wgrad kernels are launched with for operands of type
    ``ptr``: the fp32 workspace, and for 16-bit operands also dW itself (one split)."""
    return [("*fp32", "")] + ([(ptr, "_direct")] if ptr != "*fp32" else [])


def _wgrad_taps_signature(ptr: str = "*bf16", ws: str = "*fp32") -> dict:
    """The stacked-taps wgrad's argument types (``ptr`` operands, ``ws`` output)."""
    return {"dy_ptr": ptr, "x_ptr": ptr, "ws_ptr": ws, "row_idx": "*i32",
            "col_idx": "*i32", **_ints(_GEOM), **_ints(["nnz", "m_per_split"]),
            **_ints(_CONV), "BS": "constexpr", "BM": "constexpr", "TG": "constexpr",
            "PRECISION": "constexpr"}


def _stacked_cases(name: str, bs: int, tg: int, ptr: str, prec: str) -> list:
    """The stacked-taps forward (with and without bias) and dgrad compile cases, with the
    tiles of :func:`stacked_tiles`."""
    from .compile_check import AotCase

    bm, warps, stages = stacked_tiles(bs, tg)
    cases = []
    for has_bias in (True, False):
        sig = {"x_ptr": ptr, "v_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr,
               "row_ptr": "*i32", "col_idx": "*i32", **_ints(_GEOM), **_ints(_CONV),
               "HAS_BIAS": "constexpr", "BS": "constexpr", "BM": "constexpr",
               "TG": "constexpr", "PRECISION": "constexpr"}
        cases.append(AotCase(name.format(kernel="fwd") + ("_bias" if has_bias else ""),
                             _conv_fwd_taps_kernel, sig,
                             {"HAS_BIAS": has_bias, "BS": bs, "BM": bm, "TG": tg,
                              "PRECISION": prec}, warps, stages))
    sig = {"dy_ptr": ptr, "v_ptr": ptr, "dx_ptr": ptr, "col_ptr": "*i32",
           "t_row_idx": "*i32", "t_block_idx": "*i32", **_ints(_GEOM), **_ints(_CONV),
           **_ints(["step_h", "step_w"]), "BS": "constexpr", "BM": "constexpr",
           "TG": "constexpr", "PRECISION": "constexpr"}
    cases.append(AotCase(name.format(kernel="dgrad"), _conv_dgrad_taps_kernel, sig,
                         {"BS": bs, "BM": bm, "TG": tg, "PRECISION": prec}, warps, stages))
    return cases


def aot_cases(arch: int) -> list:
    """Every shipped config for ``sm_<arch>``: the three kernels × block sizes × fp16/bf16/fp32
    (fp32 with TF32 and with IEEE dots; the forward with and without bias), the stacked-taps
    wgrad, forward and dgrad (bf16 and TF32) at every group size, the three of them
    again with one stage (``taps_stages=1``, bf16), then every tuning
    candidate of ``CANDIDATES`` in bf16 (what the GPU benchmark runs; the forward without
    bias)."""
    from .compile_check import AotCase

    cases = []
    for bs in SUPPORTED_BLOCK_SIZES:
        for dname, ptr, prec in _KINDS:
            cfg = (IEEE_CONFIGS if dname == "fp32_ieee" else CONFIGS)[arch][bs]
            cases += _kernel_cases(f"conv_{{kernel}}_bs{bs}_{dname}", cfg, bs, ptr, prec)
    for bs in SUPPORTED_BLOCK_SIZES:   # the stacked-taps wgrad, every group size it allows
        for tg in (t for t in (2, 4, 8) if t * bs <= 128):
            tbm, twarps, tstages = _taps_tiles(bs, tg)
            for dname, ptr, prec in _KINDS[1:3]:   # bf16 (fp16 compiles alike) and TF32
                for ws, tag in _wgrad_outputs(ptr):
                    cases.append(AotCase(f"conv_wgrad_taps{tg}_bs{bs}_{dname}{tag}",
                                         _conv_wgrad_taps_kernel,
                                         _wgrad_taps_signature(ptr, ws),
                                         {"BS": bs, "BM": tbm, "TG": tg, "PRECISION": prec},
                                         twarps, tstages))
    for bs in SUPPORTED_BLOCK_SIZES:   # the stacked-taps forward and dgrad, every group size
        for tg in (t for t in (2, 4, 8) if t * bs <= 128):
            for dname, ptr, prec in _KINDS[1:3]:   # bf16 (fp16 compiles alike) and TF32
                cases += _stacked_cases(f"conv_{{kernel}}_taps{tg}_bs{bs}_{dname}", bs, tg,
                                        ptr, prec)
    with options(taps_stages=1):   # the three stacked-taps kernels with L1-cached loads
        for bs in SUPPORTED_BLOCK_SIZES:
            for tg in (t for t in (2, 4, 8) if t * bs <= 128):
                cases += [dataclasses.replace(c, name=c.name + "_s1") for c in _stacked_cases(
                    f"conv_{{kernel}}_taps{tg}_bs{bs}_bf16", bs, tg, "*bf16", "ieee")]
                tbm, twarps, tstages = _taps_tiles(bs, tg)
                for ws, tag in _wgrad_outputs("*bf16"):
                    cases.append(AotCase(f"conv_wgrad_taps{tg}_bs{bs}_bf16{tag}_s1",
                                         _conv_wgrad_taps_kernel,
                                         _wgrad_taps_signature("*bf16", ws),
                                         {"BS": bs, "BM": tbm, "TG": tg, "PRECISION": "ieee"},
                                         twarps, tstages))
    for bs, cands in CANDIDATES.items():
        for cname, cfg in cands.items():
            cases += _kernel_cases(f"conv_cand[{cname}]_{{kernel}}_bs{bs}_bf16", cfg, bs, "*bf16",
                                   "ieee", biases=(False,))
    return cases
