"""CPU implementation of the block-sparse conv2d ops. It touches only the active blocks.

The weight ``W [Cout, Cin, kh, kw]`` is block-sparse over (out-channel block, in-channel block)
pairs; ``values [nnz, kh, kw, bs, bs]`` holds the active blocks (each tap an ``[out, in]`` tile).
No dense weight is ever formed. Each function loops over block-rows or block-columns of the
layout (never over blocks) and runs one dense oneDNN convolution per row/column on a *compact*
problem:

- forward, per out-channel block-row ``r``: gather the input-channel blocks of the row's active
  columns (``cnt·bs`` channels) and convolve them with the row's compact weight
  ``[bs, cnt·bs, kh, kw]``;
- ``dX``, per in-channel block-column ``c`` (through the transpose metadata): gather the
  ``dY`` channel blocks of the column's active rows and run the input-gradient of a convolution
  with the column's compact weight ``[cnt·bs, bs, kh, kw]``;
- ``dW``, per block-column ``c``: the weight-gradient of the same compact convolution, from the
  input slice of column ``c`` and the gathered ``dY`` blocks.

Tensors stay in their own memory format (NCHW or channels-last; channels-last is faster with
oneDNN): a channel block is a contiguous plane per sample in NCHW and a contiguous run of ``bs``
values per pixel in channels-last, so gathers copy whole runs. float16/bfloat16 inputs are
computed in float32 and rounded once at the end; float32 and float64 compute in their own
precision.

Shapes: ``x [N, Cin, H, W]``, ``dy [N, Cout, Ho, Wo]`` (any memory format), ``R = Cout/bs``,
``C = Cin/bs``. Outputs keep the memory format of the tensor they correspond to
(``x``'s for the forward's input, see :func:`output_memory_format`).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch

__all__ = ["conv_forward", "conv_grad_input", "conv_grad_weight", "output_memory_format",
           "conv_output_size"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def output_memory_format(t: torch.Tensor) -> torch.memory_format:
    """``channels_last`` if the 4-D ``t`` is channels-last and not also NCHW-contiguous, else
    ``contiguous_format``. Every op returns its output in the format of its main input."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def conv_output_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    """Output extent of a convolution along one spatial dimension."""
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


class _ChannelBlocks:
    """A 4-D tensor ``[N, Ch, H, W]`` cut into channel blocks of ``bs``, stored in dtype ``ct``
    in its own memory format (NCHW or channels-last), so that no layout conversion is needed.

    ``take(blocks, batch)`` returns channel blocks ``blocks`` of the samples ``batch`` (a slice)
    as an ``[n, len(blocks)·bs, H, W]`` tensor in the same memory format (a view when every
    block is taken), ``one(c, batch)`` block ``c`` as a view.
    """

    def __init__(self, t: torch.Tensor, ct: torch.dtype, bs: int):
        n, ch, h, w = t.shape
        self.shape = (n, ch, h, w)
        self.nb, self.bs = ch // bs, bs
        self.channels_last = output_memory_format(t) == torch.channels_last
        if self.channels_last:   # [N, H, W, B, bs]: a block is a contiguous run per pixel
            self.data = t.to(ct).permute(0, 2, 3, 1).contiguous().view(n, h, w, self.nb, bs)
        else:                    # [N, B, bs, H, W]: a block is a contiguous plane per sample
            self.data = t.to(ct).contiguous().view(n, self.nb, bs, h, w)

    def take(self, blocks: torch.Tensor, batch: slice = slice(None)) -> torch.Tensor:
        data = self.data[batch]
        n, h, w = data.shape[0], self.shape[2], self.shape[3]
        if self.channels_last:
            d = data if blocks.numel() == self.nb else data.index_select(3, blocks)
            return d.view(n, h, w, blocks.numel() * self.bs).permute(0, 3, 1, 2)
        d = data if blocks.numel() == self.nb else data.index_select(1, blocks)
        return d.view(n, blocks.numel() * self.bs, h, w)

    def one(self, c: int, batch: slice = slice(None)) -> torch.Tensor:
        if self.channels_last:
            return self.data[batch, :, :, c].permute(0, 3, 1, 2)
        return self.data[batch, c]


# --------------------------------------------------------------------------- row workers
# The per-row (per-column) ops are small. Run with torch's intra-op threads, each would be a
# few OpenMP parallel regions, and on a loaded machine every region waits a scheduler slice for
# its second thread (measured on the shared 2-core CI machine: a 5-block forward took 9 ms idle
# and 100-700 ms under load, the per-row copies into the output as slow as the convolutions).
# Instead, independent rows run concurrently on a small pool of worker threads whose own
# intra-op parallelism is 1, each writing its slice of the output: the same work with no
# fork/join barriers. The pool has ``torch.get_num_threads()`` workers and is rebuilt when that
# number or the process (fork) changes.
_POOL: dict = {"key": None, "executor": None}
_POOL_LOCK = threading.Lock()


def _single_threaded_worker(barrier: threading.Barrier) -> None:
    torch.get_num_threads()    # run torch's lazy per-thread init first, so it cannot undo ...
    torch.set_num_threads(1)   # ... this: intra-op parallelism 1 in this worker thread only
    barrier.wait()


def _pool(n: int) -> ThreadPoolExecutor:
    key = (n, os.getpid())
    with _POOL_LOCK:
        if _POOL["key"] != key:
            barrier = threading.Barrier(n + 1)
            ex = ThreadPoolExecutor(n, thread_name_prefix="itop-cpu-conv")
            # Start all n workers now (each blocks on the barrier until all have set up).
            for _ in range(n):
                ex.submit(_single_threaded_worker, barrier)
            barrier.wait()
            # torch.set_num_threads also records a process-wide default; put it back for the
            # calling thread and for threads created later.
            torch.set_num_threads(n)
            _POOL["key"], _POOL["executor"] = key, ex
        return _POOL["executor"]


def _in_callers_grad_mode(fn):
    """``fn`` wrapped to run in a worker under the calling thread's autograd mode.

    Autograd state is thread-local and a new thread starts with grad on and inference mode off.
    The custom op's body runs below autograd on the calling thread, so a worker must not record
    a graph either (``no_grad``); and under ``torch.inference_mode()`` the output buffers are
    inference tensors, which only a thread in inference mode may write into.
    """
    inference = torch.is_inference_mode_enabled()

    def run(item):
        with torch.inference_mode(inference), torch.no_grad():
            return fn(item)
    return run


def _run(fn, indices: list, batch: int) -> list:
    """``fn(i, samples)`` for every index ``i`` and slice of samples, on the worker pool; returns
    ``[(i, samples, result)]`` in order.

    With one intra-op thread (or inside a worker) everything runs here on whole batches.
    Otherwise, when there are fewer than two items per worker, the batch is cut into chunks so
    that every worker has work (a layout with one active block-row still uses all cores).
    """
    n = torch.get_num_threads()
    if (n <= 1 or batch == 0 or not indices
            or threading.current_thread().name.startswith("itop-cpu-conv")):
        return [(i, slice(None), fn(i, slice(None))) for i in indices]
    chunks = max(1, min(batch, -(-2 * n // len(indices))))
    bounds = [(k * batch // chunks, (k + 1) * batch // chunks) for k in range(chunks)]
    items = [(i, slice(b0, b1)) for i in indices for b0, b1 in bounds if b1 > b0]
    call = _in_callers_grad_mode(lambda item: fn(*item))
    return [(i, sl, res) for (i, sl), res in zip(items, _pool(n).map(call, items))]


# --------------------------------------------------------------------------- the three ops
def conv_forward(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                 col_idx: torch.Tensor, bias: Optional[torch.Tensor], block_size: int,
                 out_channels: int, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int]) -> torch.Tensor:
    """``y = conv2d(x, W) (+ bias)`` over the active blocks only.

    ``x [N, Cin, H, W]``, ``values [nnz, kh, kw, bs, bs]``, ``bias [Cout]`` or None ->
    ``y [N, Cout, Ho, Wo]`` in x's dtype and memory format.
    """
    bs = block_size
    N, Cin, H, W = x.shape
    kh, kw = values.shape[1:3]
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    R = out_channels // bs
    ct = _compute_dtype(x.dtype)
    xb = _ChannelBlocks(x, ct, bs)
    # [nnz, kh, kw, bs_o, bs_i] -> [bs_o, nnz, bs_i, kh, kw], once: the compact weight of
    # block-row r is then the view w_all[:, lo:hi] -> [bs, cnt·bs, kh, kw].
    w_all = values.to(ct).permute(3, 0, 4, 1, 2).contiguous()
    b = bias.to(ct) if bias is not None else None
    mf = output_memory_format(x)
    rp = row_ptr.tolist()

    out = torch.empty(N, out_channels, Ho, Wo, dtype=ct, memory_format=mf)

    def row(r: int, sl: slice) -> None:                            # writes out[sl, r-block]
        lo, hi = rp[r], rp[r + 1]
        ch = slice(r * bs, (r + 1) * bs)
        if lo == hi:  # an empty block-row: only the bias
            out[sl, ch] = 0 if b is None else b[ch].view(bs, 1, 1)
            return
        xg = xb.take(col_idx[lo:hi], sl)                           # [n, cnt·bs, H, W]
        w_row = w_all[:, lo:hi].reshape(bs, (hi - lo) * bs, kh, kw)  # a view
        out[sl, ch] = torch.nn.functional.conv2d(xg, w_row, None if b is None else b[ch],
                                                 stride, padding, dilation)

    # Every row, its copy into `out` included, runs on a worker (see _run).
    _run(row, list(range(R)), N)
    return out.to(x.dtype)


def conv_grad_input(dy: torch.Tensor, values: torch.Tensor, col_ptr: torch.Tensor,
                    t_row_idx: torch.Tensor, t_block_idx: torch.Tensor, block_size: int,
                    input_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int]) -> torch.Tensor:
    """``dX`` through the transpose metadata: ``dy [N, Cout, Ho, Wo]`` -> ``[N, Cin, H, W]``
    (``input_size``) in dy's dtype and memory format."""
    bs = block_size
    N, Cin, H, W = input_size
    C = Cin // bs
    kh, kw = values.shape[1:3]
    ct = _compute_dtype(dy.dtype)
    dyb = _ChannelBlocks(dy, ct, bs)
    # Blocks in column-major order as [nnz, bs_o, bs_i, kh, kw], once: the compact weight of
    # block-column c is then the view v_t[lo:hi] -> [cnt·bs_o, bs_i, kh, kw].
    v_t = values.to(ct).index_select(0, t_block_idx).permute(0, 3, 4, 1, 2).contiguous()
    mf = output_memory_format(dy)
    # convolution_backward reads only the shape and memory format of the input it is given
    # (an uninitialized buffer: allocating it touches no memory).
    shape_only = torch.empty(N, bs, H, W, dtype=ct, memory_format=mf)
    cp = col_ptr.tolist()

    dx = torch.empty(N, Cin, H, W, dtype=ct, memory_format=mf)

    def column(c: int, sl: slice) -> None:                         # writes dx[sl, c-block]
        lo, hi = cp[c], cp[c + 1]
        ch = slice(c * bs, (c + 1) * bs)
        if lo == hi:  # no active block in this column: no gradient reaches it
            dx[sl, ch] = 0
            return
        dyg = dyb.take(t_row_idx[lo:hi], sl)                       # [n, cnt·bs, Ho, Wo]
        dx[sl, ch], _, _ = torch.ops.aten.convolution_backward(
            dyg, shape_only[sl], v_t[lo:hi].view(-1, bs, kh, kw), None, stride, padding,
            dilation, False, [0, 0], 1, [True, False, False])

    _run(column, list(range(C)), N)
    return dx.to(dy.dtype)


def conv_grad_weight(dy: torch.Tensor, x: torch.Tensor, col_ptr: torch.Tensor,
                     t_row_idx: torch.Tensor, t_block_idx: torch.Tensor, block_size: int,
                     kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int]) -> torch.Tensor:
    """``dW`` at the active blocks only -> ``[nnz, kh, kw, bs, bs]`` in dy's dtype.

    ``dV[i, a, b] = Σ_{n,ho,wo} dY[n, r_i-block, ho, wo] ⊗ X[n, c_i-block, tap (a, b)]``, computed
    per block-column as the weight gradient of the column's compact convolution.
    """
    bs = block_size
    N, Cin, H, W = x.shape
    C = Cin // bs
    kh, kw = kernel_size
    ct = _compute_dtype(dy.dtype)
    dyb = _ChannelBlocks(dy, ct, bs)
    xb = _ChannelBlocks(x, ct, bs)
    nnz = t_row_idx.numel()
    cp = col_ptr.tolist()

    dv_t = torch.empty(nnz, kh, kw, bs, bs, dtype=ct)      # gradients in column-major order

    def column(c: int, sl: slice) -> torch.Tensor:    # -> [cnt·bs_o, bs_i, kh, kw], samples sl
        lo, hi = cp[c], cp[c + 1]
        dyg = dyb.take(t_row_idx[lo:hi], sl)                       # [n, cnt·bs, Ho, Wo]
        x_c = xb.one(c, sl)                                        # [n, bs, H, W] (a view)
        shape_only = torch.empty(1, dtype=ct).expand((hi - lo) * bs, bs, kh, kw)
        _, dw_col, _ = torch.ops.aten.convolution_backward(
            dyg, x_c, shape_only, None, stride, padding, dilation, False, [0, 0], 1,
            [False, True, False])
        return dw_col

    for c, sl, dw_col in _run(column, [c for c in range(C) if cp[c + 1] > cp[c]], N):
        lo, hi = cp[c], cp[c + 1]
        # [cnt·bs_o, bs_i, kh, kw] -> [cnt, kh, kw, bs_o, bs_i]; batch chunks add up
        part = dw_col.view(hi - lo, bs, bs, kh, kw).permute(0, 3, 4, 1, 2)
        if sl.start in (None, 0):
            dv_t[lo:hi] = part
        else:
            dv_t[lo:hi] += part
    dv = torch.empty_like(dv_t)
    dv[t_block_idx.long()] = dv_t                            # back to row-major (values) order
    return dv.to(dy.dtype)
