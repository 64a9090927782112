"""Block norms of a dense weight gradient, without materializing that gradient.

Gradient-based growth (RigL) scores every block ``(r, c)`` of a weight, active or not, by the
norm of the dense gradient restricted to that block. For a linear layer ``Y = X·Wᵀ`` that block
is ``dW[r, c] = dY[:, r-block]ᵀ · X[:, c-block]``. The ops below compute ``‖dW[r, c]‖₂`` for
all ``R × C`` blocks while only ever holding a chunk of block-rows of ``dW`` at a time: each
chunk is one GEMM (or one weight-gradient convolution) whose result is reduced to its block
norms at once. The chunk (one reused GEMM-output buffer, plus a float32 copy for bf16 GEMMs)
holds at most ``max(bs·K, 2**18)`` elements on the CPU (``2**24`` on a GPU), whatever the number
of output features ``N``.

Two ``torch.library`` custom ops (the implementation is plain torch ops, so it runs on any
device; on CUDA tensors the chunked GEMMs are cuBLAS calls):

- ``itop_kernels::block_grad_norms(x [M, K], dy [M, N], block_size, precision) -> [N/bs, K/bs]``
  float32
- ``itop_kernels::conv2d_block_grad_norms(xs [B, Cin, H, W][], dys [B, Cout, Ho, Wo][],
  weight_shape, block_size, stride, padding, dilation, groups, reduce_taps, precision)
  -> [Cout/bs, Cin/bs]`` float32 (micro-batches' gradients summed)
  (or ``[Cout, Cin/groups, kh, kw]`` element magnitudes when ``block_size == 1`` and
  ``reduce_taps`` is False).

Precision (``precision=``): ``"exact"`` runs the GEMMs in the inputs' dtype (float16/bfloat16
inputs in float32). ``"bf16"`` runs them on bfloat16 copies of the inputs (float32 accumulation,
as cuBLAS and oneDNN do) and reduces in float32, for norms within ~1e-3 relative of the exact
ones. On the development CPU (AVX512-BF16) that makes a RigL topology update about 1.7× cheaper
(``benchmarks/bench_topology_update.py``, ``auto`` against ``exact``); bf16 tensor cores give a
GPU the same kind of gain (not measured yet). The norms only rank
blocks for growth, and measured on MNIST-1D MLP gradients the bf16 top-k growth set matches the
exact one (100 % at block 16 and 32, 99.7 % of the units at block 1;
``benchmarks/score_precision_agreement.py``). ``"auto"`` (what
:class:`itop.TopologyManager` uses by default) picks ``"bf16"`` for float32/float16/bfloat16
inputs on a device with native bf16 matrix multiplication (:func:`native_bf16_matmul`), else
``"exact"``.

Layers of one shape together (issue 14, update cost): ``itop_kernels::block_grad_norms_group``
(:func:`block_grad_norms_group`) scores ``G`` linear layers with the same ``M, K, N``, block size
and dtypes in one chain of ops: one GEMM-output buffer ``[G, rows, K]`` per chunk of block-rows
and one copy/square/block-sum/sqrt per chunk for all ``G`` layers. The GEMMs either stay one
``torch.mm`` per layer on the layer's own tensors (``gemm="mm"``: what :func:`block_grad_norms`
runs, so the norms are bit for bit the per-layer ones) or run as one ``torch.bmm`` over the
inputs and output gradients stacked as ``X [G, M, K]`` and ``dY [G, M, N]`` (``"bmm"``: ~7
launches per group, as one layer costs, for a copy of the inputs). ``"auto"`` takes ``"mm"`` on
the CPU, where a ``bmm`` is not bit for bit the ``mm`` of each slice at every shape (measured
with torch 2.13 on the development CPU: float32 at ``M = 2048, K = N = 512`` on a third of the
block-rows, bfloat16 from ``M = 1024, K = N = 768``, where ``mm`` takes oneDNN; equal at the
smaller shapes tried), and on CUDA ``"bmm"`` for small layers, ``"mm"`` for large ones
(:data:`GROUP_GEMMS`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["block_grad_norms", "block_grad_norms_group", "conv2d_block_grad_norms",
           "native_bf16_matmul", "resolve_precision", "PRECISIONS", "GROUP_GEMMS"]

PRECISIONS = ("auto", "exact", "bf16")

# Elements of dW held at once (per chunk of block-rows), unless one block-row is larger:
# 1 MiB of fp32 on the CPU (cache-sized), 64 MiB on a GPU (few, large GEMMs).
_CHUNK_ELEMENTS = 1 << 18
_CHUNK_ELEMENTS_GPU = 1 << 24
# A group of layers (block_grad_norms_group) is scored a sub-group at a time, as many layers as
# keep (a) the stacked inputs X [g, M, K] and dY [g, M, N] within _STACK_ELEMENTS* elements (of
# the inputs' dtype, plus as many of the GEMM dtype when that differs) and (b) the chunk of dW
# of all g layers within _GROUP_CHUNK_ELEMENTS* elements (of the GEMM dtype, plus a float32 copy
# for bf16 GEMMs); one layer at a time when a single layer exceeds them.
_STACK_ELEMENTS = 1 << 24
_STACK_ELEMENTS_GPU = 1 << 28
_GROUP_CHUNK_ELEMENTS = 1 << 20
_GROUP_CHUNK_ELEMENTS_GPU = 1 << 25
# How block_grad_norms_group multiplies: "bmm" (the inputs stacked, one batched GEMM per chunk),
# "mm" (one GEMM per layer and chunk on the layer's own tensors, bit for bit block_grad_norms),
# "auto" ("bmm" on CUDA for layers of M·(K+N) <= _BMM_MAX_ELEMENTS, "mm" otherwise and on the
# CPU). The stacking copy reads and writes every captured element once (~1.3 ps per bf16 element
# at ~3 TB/s) to save g - 1 launches (~5 µs each) per chunk: it pays up to ~4 M elements per
# layer (GPT-2 small at 8192 rows: 12.6-31.5 M, so "mm"; at 1024 rows "bmm"). A prediction:
# bench_topology_update.py --group-gemm bmm|mm times both on a GPU.
GROUP_GEMMS = ("auto", "bmm", "mm")
_BMM_MAX_ELEMENTS = 1 << 22
# what block_grad_norms_group(gemm=None) uses (benchmarks set it to compare "bmm" with "mm")
_GROUP_GEMM = "auto"


def native_bf16_matmul(device: torch.device) -> bool:
    """True when ``device`` multiplies bfloat16 matrices natively (faster than float32): a CUDA
    GPU with bf16 tensor cores (sm_80+), or a CPU with AVX512-BF16 or AMX tiles."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return torch.cuda.is_available() and \
                torch.cuda.get_device_capability(device) >= (8, 0)
        if device.type == "cpu":
            return bool(torch.cpu._is_avx512_bf16_supported() or
                        torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # private CPU probes missing in this torch build
        return False
    return False


def resolve_precision(precision: str, dtype: torch.dtype, device: torch.device) -> str:
    """``"exact"`` or ``"bf16"``: what ``precision`` (one of :data:`PRECISIONS`) means for
    inputs of ``dtype`` on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    low = dtype in (torch.float32, torch.float16, torch.bfloat16)
    return "bf16" if low and native_bf16_matmul(device) else "exact"


def _compute_dtype(dtype: torch.dtype, precision: str) -> torch.dtype:
    if precision == "bf16":
        return torch.bfloat16
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _square_in_fp32(g: Tensor) -> Tensor:
    """``g²`` in float32 (float64 stays), in place when ``g`` is already that dtype."""
    if g.dtype not in (torch.float32, torch.float64):
        return g.float().square_()
    return g.square_()


def _rows_per_chunk(R: int, row_elements: int, device: torch.device) -> int:
    cap = _CHUNK_ELEMENTS if device.type == "cpu" else _CHUNK_ELEMENTS_GPU
    return max(1, min(R, cap // max(1, row_elements)))


@torch.library.custom_op("itop_kernels::block_grad_norms", mutates_args=())
def _block_grad_norms(x: Tensor, dy: Tensor, block_size: int, precision: str) -> Tensor:
    bs = block_size
    M, K = x.shape
    N = dy.shape[1]
    R, C = N // bs, K // bs
    ct = _compute_dtype(x.dtype, precision)
    xc = x.to(ct)
    dyt = dy.to(ct).t()                                    # [N, M] view
    out = torch.empty(R, C, dtype=torch.float32, device=x.device)
    step = _rows_per_chunk(R, bs * K, x.device)
    # One GEMM-output buffer and one float32 buffer for all chunks: fresh allocations of this
    # size cost page faults on the CPU every chunk.
    gbuf = torch.empty(step * bs, K, dtype=ct, device=x.device)
    sq_dtype = torch.float64 if ct == torch.float64 else torch.float32
    sbuf = gbuf if sq_dtype == ct else torch.empty(step * bs, K, dtype=sq_dtype, device=x.device)
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        n = (r1 - r0) * bs
        g = torch.mm(dyt[r0 * bs:r1 * bs], xc, out=gbuf[:n])  # [n, K]: these block-rows of dW
        sq = sbuf[:n]
        if sq is not g:
            sq.copy_(g)
        if bs == 1:                                        # element level: the norm is |dW|
            out[r0:r1] = sq.abs_()
            continue
        out[r0:r1] = sq.square_().view(r1 - r0, bs, C, bs).sum((1, 3)).sqrt_()
    return out


@_block_grad_norms.register_fake
def _(x, dy, block_size, precision):
    return x.new_empty((dy.shape[1] // block_size, x.shape[1] // block_size), dtype=torch.float32)


_WIDER = {torch.float16: (torch.float32, torch.float64),
          torch.bfloat16: (torch.float32, torch.float64), torch.float32: (torch.float64,)}


def _dy_operand(dy: Tensor, xdt: torch.dtype, ct: torch.dtype) -> Tensor:
    """``dy.to(xdt).to(ct)`` (the layers cast ``dY`` to the input's dtype, the op to the GEMM
    dtype), without the casts that change no value: a ``dY`` already in ``ct`` whose round trip
    through a wider ``xdt`` is exact (bf16 ``dY`` of an fp32 input under autocast, "auto")."""
    if dy.dtype == ct and (xdt == ct or xdt in _WIDER.get(ct, ())):
        return dy
    if dy.dtype != xdt:
        dy = dy.to(xdt)
    return dy if ct == xdt else dy.to(ct)


def _use_bmm(gemm: str, device: torch.device, M: int, K: int, N: int) -> bool:
    """Whether a group of layers of ``M`` rows, ``K`` inputs and ``N`` outputs is scored by a
    stacked ``bmm``: ``gemm="bmm"``, or ``"auto"`` on CUDA while stacking costs less than the
    launches it saves (``M·(K+N) <= _BMM_MAX_ELEMENTS``); else one ``mm`` per layer (always on
    the CPU with ``"auto"``: bit for bit the per-layer op)."""
    return gemm == "bmm" or (gemm == "auto" and torch.device(device).type == "cuda" and
                             M * (K + N) <= _BMM_MAX_ELEMENTS)


def _sub_groups(G: int, M: int, K: int, N: int, rows_elements: int, stack_cap: int,
                chunk_cap: int) -> List[int]:
    """Sizes of the sub-groups ``G`` layers are scored in (balanced, in order): as many layers
    as keep ``g·M·(K+N) <= stack_cap`` and ``g·rows_elements <= chunk_cap``, at least one."""
    per = max(1, min(G, stack_cap // max(1, M * (K + N)), chunk_cap // max(1, rows_elements)))
    n = -(-G // per)
    return [G // n + (1 if i < G % n else 0) for i in range(n)]


@torch.library.custom_op("itop_kernels::block_grad_norms_group", mutates_args=())
def _block_grad_norms_group(xs: List[Tensor], dys: List[Tensor], layers: int, block_size: int,
                            precision: str, gemm: str) -> Tensor:
    # xs/dys: the row pieces (micro-batches) of every layer, layer after layer; each layer's
    # pieces hold the same M rows in all
    G, bs = layers, block_size
    K, N = xs[0].shape[1], dys[0].shape[1]
    M = sum(x.shape[0] for x in xs) // G
    R, C = N // bs, K // bs
    dev, xdt = xs[0].device, xs[0].dtype
    ct = _compute_dtype(xdt, precision)
    sq_dtype = torch.float64 if ct == torch.float64 else torch.float32
    use_bmm = _use_bmm(gemm, dev, M, K, N)
    gpu = dev.type != "cpu"
    step = _rows_per_chunk(R, bs * K, dev)       # block-rows per chunk: block_grad_norms' own
    per_layer = len(xs) // G
    # stacked, concatenated (micro-batches) or cast copies of a sub-group's inputs held
    copies = use_bmm or per_layer > 1 or ct != xdt or dys[0].dtype != ct
    sizes = _sub_groups(G, M, K, N, step * bs * K,
                        (_STACK_ELEMENTS_GPU if gpu else _STACK_ELEMENTS) if copies else 1 << 62,
                        _GROUP_CHUNK_ELEMENTS_GPU if gpu else _GROUP_CHUNK_ELEMENTS)
    out = torch.empty(G, R, C, dtype=torch.float32, device=dev)
    g0 = 0
    for g in sizes:
        if use_bmm:
            # [g, M, K] and [g, M, N]: each layer's micro-batches back to back, as
            # block_grad_norms gets them (torch.cat of one layer's pieces)
            pieces = slice(g0 * per_layer, (g0 + g) * per_layer)
            X = torch.cat(xs[pieces]).view(g, M, K)
            Xs = X if ct == xdt else X.to(ct)
            DYts = _dy_operand(torch.cat(dys[pieces]).view(g, M, N), xdt, ct).transpose(1, 2)
        else:
            # each layer's own operands, exactly as block_grad_norms builds them (no stacking)
            Xs, DYts = [], []
            for j in range(g0, g0 + g):
                px = xs[j * per_layer:(j + 1) * per_layer]
                pd = dys[j * per_layer:(j + 1) * per_layer]
                x = px[0] if per_layer == 1 else torch.cat(px)
                Xs.append(x if ct == xdt else x.to(ct))
                DYts.append(_dy_operand(pd[0] if per_layer == 1 else torch.cat(pd), xdt, ct).t())
        # one flat buffer per dtype: each chunk's [g, n, K] is contiguous (as in the per-layer op)
        gflat = torch.empty(g * step * bs * K, dtype=ct, device=dev)
        sflat = gflat if sq_dtype == ct else torch.empty(gflat.numel(), dtype=sq_dtype,
                                                         device=dev)
        for r0 in range(0, R, step):
            r1 = min(R, r0 + step)
            n = (r1 - r0) * bs
            gb = gflat[:g * n * K].view(g, n, K)         # these block-rows of dW, g layers
            if use_bmm:
                torch.bmm(DYts[:, r0 * bs:r1 * bs], Xs, out=gb)
            else:
                for j in range(g):
                    torch.mm(DYts[j][r0 * bs:r1 * bs], Xs[j], out=gb[j])
            sq = sflat[:g * n * K].view(g, n, K)
            if sflat is not gflat:
                sq.copy_(gb)
            if bs == 1:                                  # element level: the norm is |dW|
                out[g0:g0 + g, r0:r1] = sq.abs_()
                continue
            norms = sq.square_().view(g, r1 - r0, bs, C, bs)
            if r1 - r0 == R:                             # one chunk: straight into out
                torch.sum(norms, (2, 4), out=out[g0:g0 + g]).sqrt_()
            else:
                out[g0:g0 + g, r0:r1] = norms.sum((2, 4)).sqrt_()
        g0 += g
    return out


@_block_grad_norms_group.register_fake
def _(xs, dys, layers, block_size, precision, gemm):
    return xs[0].new_empty((layers, dys[0].shape[1] // block_size, xs[0].shape[1] // block_size),
                           dtype=torch.float32)


def block_grad_norms_group(xs: Sequence[Union[Tensor, Sequence[Tensor]]],
                           dys: Sequence[Union[Tensor, Sequence[Tensor]]], block_size: int, *,
                           precision: str = "exact", gemm: Optional[str] = None) -> Tensor:
    """:func:`block_grad_norms` of ``G`` linear layers of one shape at once.

    Args:
        xs: per layer, its input ``[M, K]``, or a list of micro-batches ``[m_i, K]`` (their
            rows concatenated, as :func:`block_grad_norms` of ``torch.cat`` of them); every
            layer with the same total ``M``, all of one dtype and device
            (float16/bfloat16/float32/float64).
        dys: per layer, the gradient of its output ``[M, N]`` (or micro-batches matching
            ``xs``), all of one dtype (cast to the inputs' dtype first, as the layers do).
        block_size: ``bs``, dividing ``N`` and ``K``.
        precision: ``"exact"`` (default), ``"bf16"`` or ``"auto"`` (see the module docstring).
        gemm: ``"auto"`` (``"mm"`` on the CPU; on CUDA ``"bmm"`` for ``M·(K+N) <= 2**22``,
            else ``"mm"``), ``"bmm"`` (the inputs stacked, one batched GEMM per chunk of
            block-rows) or ``"mm"`` (one GEMM per layer and chunk on its own tensors: bit for bit
            :func:`block_grad_norms` of each layer); None (default): ``"auto"`` unless a
            benchmark set the module's ``_GROUP_GEMM``.

    Returns:
        float32 ``[G, N/bs, K/bs]``: row ``g`` is ``block_grad_norms(xs[g], dys[g], bs)`` (bit
        for bit with ``"mm"``; with ``"bmm"`` up to the rounding of a batched GEMM).

    Memory, besides the inputs (the bound holds whatever ``G``: larger groups are scored a
    sub-group at a time, balanced, in layer order):

    - the chunk of ``dW`` of a sub-group, at most ``max(bs·K·rows, 2**20)`` elements on the CPU
      (``2**25`` on a GPU; ``rows``: one chunk of :func:`block_grad_norms`'s block-rows) in the
      GEMM dtype, plus a float32 copy for bf16 GEMMs;
    - with ``"bmm"``, micro-batches, or inputs that are cast (float32 inputs at
      ``precision="bf16"``), the stacked, concatenated or cast copies of a sub-group's inputs,
      at most ``max(M·(K+N), 2**24)`` elements
      on the CPU (``2**28`` on a GPU: 512 MiB in bf16; GPT-2 small's fc/fc2 at 8192 rows,
      31.5 M elements per layer, would be scored 6 + 6 of 12), plus as many in the GEMM dtype
      when stacked and cast.
    """
    if gemm is None:
        gemm = _GROUP_GEMM
    if gemm not in GROUP_GEMMS:
        raise ValueError(f"gemm must be one of {GROUP_GEMMS}, got {gemm!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    xs, dys = list(xs), list(dys)
    if not xs or len(xs) != len(dys):
        raise ValueError(f"xs and dys must be equally long, non-empty lists (one entry per "
                         f"layer), got {len(xs)} and {len(dys)}")
    flat_x: List[Tensor] = []
    flat_dy: List[Tensor] = []
    per_layer = None
    for i, (x, dy) in enumerate(zip(xs, dys)):
        px = list(x) if isinstance(x, (list, tuple)) else [x]
        pd = list(dy) if isinstance(dy, (list, tuple)) else [dy]
        if not px or len(px) != len(pd):
            raise ValueError(f"xs[{i}] and dys[{i}] must be tensors or equally long lists")
        if per_layer is not None and len(px) != per_layer:
            raise ValueError(f"every layer must have the same number of micro-batches, got "
                             f"{len(px)} for layer {i} and {per_layer} before")
        per_layer = len(px)
        for a, b in zip(px, pd):
            if not isinstance(a, Tensor) or not isinstance(b, Tensor):
                raise TypeError("xs and dys must hold torch.Tensors")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
                raise ValueError(f"layer {i}: x must be [M, K] and dy [M, N] with the same M, "
                                 f"got {tuple(a.shape)} and {tuple(b.shape)}")
        flat_x += px
        flat_dy += pd
    x0, d0 = flat_x[0], flat_dy[0]
    M0 = sum(a.shape[0] for a in flat_x[:per_layer])
    for i in range(len(xs)):
        rows = sum(a.shape[0] for a in flat_x[i * per_layer:(i + 1) * per_layer])
        if rows != M0:
            raise ValueError(f"every layer must have the same M, got {rows} for layer {i} and "
                             f"{M0} for layer 0")
    for a, b in zip(flat_x, flat_dy):
        if a.shape[1] != x0.shape[1] or b.shape[1] != d0.shape[1]:
            raise ValueError(f"every layer must have the same K and N, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)} against {tuple(x0.shape)} and {tuple(d0.shape)}")
        if a.dtype != x0.dtype or b.dtype != d0.dtype or a.device != x0.device or \
                b.device != x0.device:
            raise ValueError(f"xs must share one dtype and device and dys one dtype, got "
                             f"{a.dtype}/{b.dtype} on {a.device}/{b.device} against "
                             f"{x0.dtype}/{d0.dtype} on {x0.device}")
    if x0.shape[1] % block_size or d0.shape[1] % block_size:
        raise ValueError(f"block_size {block_size} must divide K={x0.shape[1]} and "
                         f"N={d0.shape[1]}")
    return _block_grad_norms_group(flat_x, flat_dy, len(xs), block_size,
                                   resolve_precision(precision, x0.dtype, x0.device), gemm)


@torch.library.custom_op("itop_kernels::conv2d_block_grad_norms", mutates_args=())
def _conv2d_block_grad_norms(xs: List[Tensor], dys: List[Tensor], weight_shape: List[int],
                             block_size: int, stride: List[int], padding: List[int],
                             dilation: List[int], groups: int, reduce_taps: bool,
                             precision: str) -> Tensor:
    bs = block_size
    cout, cin_g, kh, kw = weight_shape
    ct = _compute_dtype(xs[0].dtype, precision)
    xcs = [x.to(ct) for x in xs]
    dycs = [dy.to(ct) for dy in dys]

    def dw(o0: int, o1: int, g: int) -> Tensor:
        """Output channels o0:o1 of the weight gradient, summed over the micro-batches."""
        total = None
        for xc, dyc in zip(xcs, dycs):
            part = torch.nn.grad.conv2d_weight(xc, [o1 - o0, cin_g, kh, kw],
                                               dyc[:, o0:o1].contiguous(), stride, padding,
                                               dilation, g)
            total = part if total is None else total.add_(part)
        return total

    if groups != 1:
        # Only element-level (block 1) layers may be grouped; the gradient has the size of the
        # weight, which such a layer stores densely anyway.
        g = dw(0, cout, groups).to(torch.float32).abs_()
        return g if not reduce_taps else g.square().sum(dim=(2, 3)).sqrt()
    R, C = cout // bs, cin_g // bs
    out_shape = (R, C) if reduce_taps else (R, C, kh, kw)
    out = torch.empty(out_shape, dtype=torch.float32, device=xs[0].device)
    step = _rows_per_chunk(R, bs * cin_g * kh * kw, xs[0].device)
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        g = dw(r0 * bs, r1 * bs, 1)                        # [rows, Cin, kh, kw]
        # contiguous: a channels-last input gives a channels-last gradient
        g = _square_in_fp32(g).contiguous()
        if reduce_taps:
            sq = g.view(r1 - r0, bs, C, bs * kh * kw).sum((1, 3))
        else:
            sq = g.view(r1 - r0, bs, C, bs, kh, kw).sum((1, 3))
        out[r0:r1] = sq.sqrt()
    return out


@_conv2d_block_grad_norms.register_fake
def _(xs, dys, weight_shape, block_size, stride, padding, dilation, groups, reduce_taps,
      precision):
    cout, cin_g, kh, kw = weight_shape
    R, C = cout // block_size, cin_g // block_size
    shape = (R, C) if reduce_taps else (R, C, kh, kw)
    return xs[0].new_empty(shape, dtype=torch.float32)


def block_grad_norms(x: Tensor, dy: Tensor, block_size: int, *,
                     precision: str = "exact") -> Tensor:
    """Block norms of the dense gradient of a linear weight, ``‖dY[:, r]ᵀ·X[:, c]‖₂``.

    Args:
        x: ``[M, K]`` layer input (rows are samples), float16/bfloat16/float32/float64.
        dy: ``[M, N]`` gradient of the layer output, same dtype and device as ``x``.
        block_size: ``bs``, which must divide ``N`` and ``K``.
        precision: ``"exact"`` (default), ``"bf16"`` or ``"auto"`` (see the module docstring).

    Returns:
        float32 ``[N/bs, K/bs]``: entry ``(r, c)`` is the Frobenius norm of block ``(r, c)`` of
        ``dW = dYᵀ·X`` (for ``bs = 1``, ``|dW|``). ``dW`` is never held whole.
    """
    if not isinstance(x, Tensor) or not isinstance(dy, Tensor):
        raise TypeError("x and dy must be torch.Tensors")
    if x.dim() != 2 or dy.dim() != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"x must be [M, K] and dy [M, N] with the same M, got "
                         f"{tuple(x.shape)} and {tuple(dy.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if x.shape[1] % block_size or dy.shape[1] % block_size:
        raise ValueError(f"block_size {block_size} must divide K={x.shape[1]} and N={dy.shape[1]}")
    if x.device != dy.device or x.dtype != dy.dtype:
        raise ValueError(f"x ({x.dtype}, {x.device}) and dy ({dy.dtype}, {dy.device}) must match")
    return _block_grad_norms(x, dy, block_size, resolve_precision(precision, x.dtype, x.device))


def conv2d_block_grad_norms(x, dy, weight_shape, block_size: int, stride=1,
                            padding=0, dilation=1, groups: int = 1,
                            reduce_taps: bool = True, *, precision: str = "exact") -> Tensor:
    """Block norms of the dense gradient of a conv2d weight ``[Cout, Cin/groups, kh, kw]``.

    Args:
        x: ``[B, Cin, H, W]`` layer input, or a list of micro-batches (their spatial sizes may
            differ); the gradient is then the sum over them, as in gradient accumulation.
        dy: ``[B, Cout, Ho, Wo]`` gradient of the layer output (same dtype/device as ``x``), or
            the list matching ``x``.
        weight_shape: ``(Cout, Cin/groups, kh, kw)``.
        block_size: ``bs``, dividing ``Cout`` and ``Cin``; ``groups`` must be 1 unless ``bs == 1``.
        stride, padding, dilation: the convolution's, ints or pairs.
        reduce_taps: True gives one norm per (out-block, in-block) over all kernel taps,
            ``[Cout/bs, Cin/bs]``; False keeps the taps, ``[Cout/bs, Cin/bs, kh, kw]``.
        precision: ``"exact"`` (default), ``"bf16"`` or ``"auto"`` (see the module docstring).

    Returns:
        float32 norms; the dense ``dW`` is only ever held a chunk of block-rows at a time
        (``groups > 1`` computes the weight-sized gradient in one go).
    """
    def pair(v, name):
        if isinstance(v, int):
            return [v, v]
        v = list(v)
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {v!r}")
        return [int(a) for a in v]

    weight_shape = [int(s) for s in weight_shape]
    if len(weight_shape) != 4:
        raise ValueError(f"weight_shape must be (Cout, Cin/groups, kh, kw), got {weight_shape}")
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    dys = list(dy) if isinstance(dy, (list, tuple)) else [dy]
    if not xs or len(xs) != len(dys):
        raise ValueError(f"x and dy must be tensors or equally long lists of tensors, got "
                         f"{len(xs)} and {len(dys)}")
    for x, dy in zip(xs, dys):
        if not isinstance(x, Tensor) or not isinstance(dy, Tensor):
            raise TypeError("x and dy must be torch.Tensors (or lists of them)")
        if x.dim() != 4 or dy.dim() != 4 or x.shape[0] != dy.shape[0]:
            raise ValueError(f"x must be [B, Cin, H, W] and dy [B, Cout, Ho, Wo], got "
                             f"{tuple(x.shape)} and {tuple(dy.shape)}")
        if x.device != xs[0].device or x.dtype != xs[0].dtype or dy.device != x.device or \
                dy.dtype != x.dtype:
            raise ValueError(f"x ({x.dtype}, {x.device}) and dy ({dy.dtype}, {dy.device}) "
                             f"must match, in every micro-batch")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if weight_shape[0] % block_size or weight_shape[1] % block_size:
        raise ValueError(f"block_size {block_size} must divide Cout and Cin/groups of "
                         f"{weight_shape}")
    if groups != 1 and block_size != 1:
        raise ValueError("groups > 1 is only supported with block_size 1")
    return _conv2d_block_grad_norms(xs, dys, weight_shape, block_size, pair(stride, "stride"),
                                    pair(padding, "padding"), pair(dilation, "dilation"),
                                    int(groups), bool(reduce_taps),
                                    resolve_precision(precision, xs[0].dtype, xs[0].device))
