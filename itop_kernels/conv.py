"""``block_sparse_conv2d``: a 2-D convolution whose weight is block-sparse over channel blocks.

The weight ``W [Cout, Cin, kh, kw]`` is cut into ``bs × bs`` blocks over (out-channel,
in-channel); an active block carries all of its kernel taps. ``values [nnz, kh, kw, bs, bs]``
holds the active blocks (see :meth:`BlockLayout.gather`).

The three computations are ``torch.library`` custom ops, so ``torch.compile`` traces through
them without a graph break and AMP casts their inputs:

- ``itop_kernels::bsc_forward``      ``y = conv2d(x, W) + b``   ``[N, Cin, H, W] -> [N, Cout, Ho, Wo]``
- ``itop_kernels::bsc_grad_input``   ``dX``                     ``[N, Cout, Ho, Wo] -> [N, Cin, H, W]``
- ``itop_kernels::bsc_grad_weight``  ``dW`` at active blocks    ``-> [nnz, kh, kw, bs, bs]``

Each op runs the Triton kernels on CUDA tensors (and on CPU tensors under
``TRITON_INTERPRET=1``), and the CPU implementation otherwise. Every op returns its activation
output in the memory format of its activation input (NCHW or channels-last).
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch
from torch import Tensor

from . import cpu_conv
from .cpu_conv import conv_output_size, output_memory_format
from .dispatch import use_triton
from .arg_checks import check_bias, check_operands
from .layout import BlockLayout

__all__ = ["block_sparse_conv2d"]

_TRITON_BLOCK_SIZES = (16, 32, 64, 128)


@functools.cache
def _triton():
    """The Triton kernels' module, imported on first use (the CPU path needs no Triton) and
    then held: a function-level import costs about half a µs on every call."""
    from . import triton_conv
    return triton_conv


def _empty_activation(t: Tensor, shape) -> Tensor:
    """An uninitialized ``shape`` tensor like ``t`` in ``t``'s memory format (fake impls)."""
    return torch.empty(shape, dtype=t.dtype, device=t.device,
                       memory_format=output_memory_format(t))


# --------------------------------------------------------------------------- implementations
# One implementation of each computation; the custom ops (traced by torch.compile) and the
# eager autograd Function (no custom-op dispatch on the host) both call these.
def _forward_impl(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                  bias: Optional[Tensor], block_size: int, out_channels: int, stride: list[int],
                  padding: list[int], dilation: list[int]) -> Tensor:
    if use_triton(x):
        return _triton().conv_forward(x, values, row_ptr, col_idx, bias, block_size,
                                      out_channels, stride, padding, dilation,
                                      output_memory_format(x))
    return cpu_conv.conv_forward(x, values, row_ptr, col_idx, bias, block_size, out_channels,
                                 stride, padding, dilation)


def _grad_input_impl(dy: Tensor, values: Tensor, col_ptr: Tensor, t_row_idx: Tensor,
                     t_block_idx: Tensor, block_size: int, input_size: list[int],
                     stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    if use_triton(dy):
        return _triton().conv_grad_input(dy, values, col_ptr, t_row_idx, t_block_idx,
                                         block_size, input_size, stride, padding, dilation,
                                         output_memory_format(dy))
    return cpu_conv.conv_grad_input(dy, values, col_ptr, t_row_idx, t_block_idx, block_size,
                                    input_size, stride, padding, dilation)


def _grad_weight_impl(dy: Tensor, x: Tensor, row_idx: Tensor, col_idx: Tensor, col_ptr: Tensor,
                      t_row_idx: Tensor, t_block_idx: Tensor, block_size: int,
                      kernel_size: list[int], stride: list[int], padding: list[int],
                      dilation: list[int]) -> Tensor:
    if use_triton(dy):
        return _triton().conv_grad_weight(dy, x, row_idx, col_idx, block_size, kernel_size,
                                          stride, padding, dilation)
    return cpu_conv.conv_grad_weight(dy, x, col_ptr, t_row_idx, t_block_idx, block_size,
                                     kernel_size, stride, padding, dilation)


def _backward_with(grad_input, grad_weight, dy: Tensor, saved: tuple, block_size: int,
                   conv_args: tuple, need_dx: bool, need_dv: bool, need_db: bool) -> tuple:
    """``(dx, dv, db)`` (None where not needed) from the saved ``(x, values, row_idx, col_idx,
    col_ptr, t_row_idx, t_block_idx)``, computed by ``grad_input``/``grad_weight``: the custom
    ops on the traced path, the implementations on the eager one."""
    x, values, row_idx, col_idx, col_ptr, t_row_idx, t_block_idx = saved
    stride, padding, dilation = conv_args
    # dy may arrive with any strides (even expanded zeros): give it x's memory format, so dX
    # comes back in that format too (no copy when it already has it).
    dy = dy.contiguous(memory_format=output_memory_format(x))
    dx = dv = db = None
    if need_dx:
        dx = grad_input(dy, values, col_ptr, t_row_idx, t_block_idx, block_size, list(x.shape),
                        stride, padding, dilation)
    if need_dv:
        dv = grad_weight(dy, x, row_idx, col_idx, col_ptr, t_row_idx, t_block_idx, block_size,
                         list(values.shape[1:3]), stride, padding, dilation)
    if need_db:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        db = dy.sum((0, 2, 3), dtype=acc).to(dy.dtype)
    return dx, dv, db


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("itop_kernels::bsc_forward", mutates_args=())
def _bsc_forward(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, row_idx: Tensor,
                 col_ptr: Tensor, t_row_idx: Tensor, t_block_idx: Tensor,
                 bias: Optional[Tensor], block_size: int, out_channels: int,
                 stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    return _forward_impl(x, values, row_ptr, col_idx, bias, block_size, out_channels, stride,
                         padding, dilation)


@_bsc_forward.register_fake
def _(x, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_block_idx, bias, block_size,
      out_channels, stride, padding, dilation):
    N, _, H, W = x.shape
    kh, kw = values.shape[1:3]
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    return _empty_activation(x, (N, out_channels, Ho, Wo))


@torch.library.custom_op("itop_kernels::bsc_grad_input", mutates_args=())
def _bsc_grad_input(dy: Tensor, values: Tensor, col_ptr: Tensor, t_row_idx: Tensor,
                    t_block_idx: Tensor, block_size: int, input_size: list[int],
                    stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    return _grad_input_impl(dy, values, col_ptr, t_row_idx, t_block_idx, block_size, input_size,
                            stride, padding, dilation)


@_bsc_grad_input.register_fake
def _(dy, values, col_ptr, t_row_idx, t_block_idx, block_size, input_size, stride, padding,
      dilation):
    return _empty_activation(dy, tuple(input_size))


@torch.library.custom_op("itop_kernels::bsc_grad_weight", mutates_args=())
def _bsc_grad_weight(dy: Tensor, x: Tensor, row_idx: Tensor, col_idx: Tensor, col_ptr: Tensor,
                     t_row_idx: Tensor, t_block_idx: Tensor, block_size: int,
                     kernel_size: list[int], stride: list[int], padding: list[int],
                     dilation: list[int]) -> Tensor:
    return _grad_weight_impl(dy, x, row_idx, col_idx, col_ptr, t_row_idx, t_block_idx,
                             block_size, kernel_size, stride, padding, dilation)


@_bsc_grad_weight.register_fake
def _(dy, x, row_idx, col_idx, col_ptr, t_row_idx, t_block_idx, block_size, kernel_size, stride,
      padding, dilation):
    return dy.new_empty((row_idx.shape[0], *kernel_size, block_size, block_size))


def _setup_context(ctx, inputs, output):
    (x, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_block_idx, bias, block_size,
     out_channels, stride, padding, dilation) = inputs
    ctx.save_for_backward(x, values, row_idx, col_idx, col_ptr, t_row_idx, t_block_idx)
    ctx.block_size = block_size
    ctx.conv_args = (list(stride), list(padding), list(dilation))
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    need = ctx.needs_input_grad
    dx, dv, db = _backward_with(_bsc_grad_input, _bsc_grad_weight, dy, ctx.saved_tensors,
                                ctx.block_size, ctx.conv_args, need[0], need[1],
                                ctx.has_bias and need[8])
    return dx, dv, None, None, None, None, None, None, db, None, None, None, None, None


_bsc_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- eager fast path
class _EagerConv(torch.autograd.Function):
    """The eager path of :func:`block_sparse_conv2d`: the same computations and saved tensors as
    the custom ops' autograd, without the custom-op dispatch on the host (see
    ``EAGER_FAST_PATH``)."""

    @staticmethod
    def forward(ctx, x, values, bias, row_ptr, col_idx, row_idx, col_ptr, t_row_idx,
                t_block_idx, block_size, out_channels, stride, padding, dilation):
        ctx.save_for_backward(x, values, row_idx, col_idx, col_ptr, t_row_idx, t_block_idx)
        ctx.block_size = block_size
        ctx.conv_args = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        return _forward_impl(x, values, row_ptr, col_idx, bias, block_size, out_channels,
                             stride, padding, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        need = ctx.needs_input_grad
        dx, dv, db = _backward_with(_grad_input_impl, _grad_weight_impl, dy, ctx.saved_tensors,
                                    ctx.block_size, ctx.conv_args, need[0], need[1],
                                    ctx.has_bias and need[2])
        return (dx, dv, db) + (None,) * 11


#: Eager calls (not traced by ``torch.compile``/``torch.export``) go through ``_EagerConv``
#: instead of the custom ops: one autograd node and no custom-op dispatch, about 55 µs less
#: host time per forward and 125 µs per backward on the development CPU. False routes every
#: call through the custom ops (the benchmarks measure both).
EAGER_FAST_PATH = True


# --------------------------------------------------------------------------- argument checks
def _pair(value, name: str, minimum: int) -> list[int]:
    """An int or a pair of ints (each ``>= minimum``) -> ``[h, w]``."""
    items = value if isinstance(value, (tuple, list)) else (value,) * 2
    if (len(items) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in items)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return [int(items[0]), int(items[1])]


def _padding(padding, stride: list[int], dilation: list[int], kernel: tuple) -> list[int]:
    """``padding`` as ``[h, w]``: an int, a pair, ``"valid"`` (0) or ``"same"`` (stride 1 and
    an even total padding ``dilation·(k - 1)`` per dimension, so that it is symmetric)."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0]
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', "
                             f"got {padding!r}")
        if stride != [1, 1]:
            raise ValueError(f"padding='same' needs stride 1, got stride {tuple(stride)}")
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t % 2 for t in total):
            raise ValueError(f"padding='same' with kernel {tuple(kernel)} and dilation "
                             f"{tuple(dilation)} needs asymmetric padding, which is not "
                             "supported; pad x yourself")
        return [t // 2 for t in total]
    return _pair(padding, "padding", 0)


def _check_args(x, values, layout, bias, groups) -> None:
    check_operands(x, values, layout)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups != 1:
        raise ValueError(f"groups={groups} is not supported: block_sparse_conv2d takes groups=1 "
                         "(block sparsity over channel blocks replaces grouping)")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, Cin, H, W], got shape {tuple(x.shape)}")
    cout, cin = layout.shape
    bs = layout.block_size
    if x.shape[1] != cin:
        raise ValueError(f"x has {x.shape[1]} channels (shape {tuple(x.shape)}), but the layout "
                         f"covers Cin={cin} in-channels ({layout.grid_shape[1]} blocks of {bs})")
    if (values.dim() != 5 or values.shape[0] != layout.nnz or tuple(values.shape[3:]) != (bs, bs)
            or values.shape[1] < 1 or values.shape[2] < 1):
        raise ValueError(f"values must have shape [nnz={layout.nnz}, kh, kw, {bs}, {bs}] "
                         f"(kh, kw >= 1), got {list(values.shape)}")
    check_bias(bias, x, cout, "Cout")
    if use_triton(x):
        if bs not in _TRITON_BLOCK_SIZES:
            raise ValueError(f"layout.block_size={bs} is not supported by the Triton kernels; "
                             f"use one of {_TRITON_BLOCK_SIZES}")


# --------------------------------------------------------------------------- public function
def block_sparse_conv2d(x: Tensor, values: Tensor, layout: BlockLayout,
                        bias: Optional[Tensor] = None,
                        stride: Union[int, tuple[int, int]] = 1,
                        padding: Union[int, tuple[int, int], str] = 0,
                        dilation: Union[int, tuple[int, int]] = 1,
                        groups: int = 1) -> Tensor:
    """``y = conv2d(x, W, bias, stride, padding, dilation)`` with a block-sparse weight ``W``,
    computing only the active blocks.

    Args:
        x: ``[N, Cin, H, W]``, NCHW or channels-last (other strides are copied to NCHW),
            float16, bfloat16, float32, or float64 (CPU path only).
        values: ``[nnz, kh, kw, bs, bs]`` active blocks of ``W [Cout, Cin, kh, kw]`` in the
            layout's row-major block order, each tap an ``[out, in]`` tile (see
            :meth:`BlockLayout.gather`); same dtype as ``x``.
        layout: the :class:`BlockLayout` of ``W`` over ``[Cout/bs, Cin/bs]`` channel blocks, on
            ``x``'s device. The Triton kernels take ``bs`` in 16, 32, 64, 128.
        bias: optional ``[Cout]``, same dtype as ``x``.
        stride, padding, dilation: an int or an ``(h, w)`` pair, as in ``F.conv2d``
            (``stride``/``dilation`` >= 1, ``padding`` >= 0; zero padding). ``padding`` may also
            be ``"valid"`` or ``"same"`` (stride 1, symmetric padding only).
        groups: must be 1.

    Returns:
        ``[N, Cout, Ho, Wo]`` in ``x``'s dtype and memory format, with
        ``Ho = (H + 2·padding - dilation·(kh - 1) - 1) // stride + 1`` (likewise ``Wo``).
        Products accumulate in float32 (float64 for float64 inputs). Differentiable with
        respect to ``x``, ``values`` and ``bias``.
    """
    _check_args(x, values, layout, bias, groups)
    kh, kw = values.shape[1:3]
    stride, padding, dilation = _conv_args(stride, padding, dilation, kh, kw)
    H, W = x.shape[2:]
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(f"x's spatial size {H}x{W} (padding {padding}) is smaller than the "
                         f"dilated kernel {kh}x{kw} (dilation {dilation}): empty output")
    x = x.contiguous(memory_format=output_memory_format(x))
    values = values.contiguous()
    bias = None if bias is None else bias.contiguous()
    if EAGER_FAST_PATH and not torch.compiler.is_compiling():
        return _EagerConv.apply(x, values, bias, layout.row_ptr, layout.col_idx, layout.row_idx,
                                layout.col_ptr, layout.t_row_idx, layout.t_block_idx,
                                layout.block_size, layout.shape[0], stride, padding, dilation)
    return _bsc_forward(x, values, layout.row_ptr, layout.col_idx, layout.row_idx,
                        layout.col_ptr, layout.t_row_idx, layout.t_block_idx, bias,
                        layout.block_size, layout.shape[0], stride, padding, dilation)


def _typed(a) -> tuple:
    """A cache key for one conv argument that keeps the types (``True`` must not hit ``1``)."""
    if isinstance(a, (list, tuple)):
        return (tuple, tuple((type(v), v) for v in a))
    return (type(a), a)


def _untyped(key: tuple):
    kind, val = key
    return tuple(v for _, v in val) if kind is tuple else val


@functools.lru_cache(maxsize=1024)
def _conv_args_cached(stride: tuple, padding: tuple, dilation: tuple, kh: int, kw: int) -> tuple:
    stride, padding, dilation = _untyped(stride), _untyped(padding), _untyped(dilation)
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    return tuple(stride), tuple(_padding(padding, stride, dilation, (kh, kw))), tuple(dilation)


def _conv_args(stride, padding, dilation, kh: int, kw: int) -> tuple:
    """``(stride, padding, dilation)`` as checked ``[h, w]`` lists (new lists on every call),
    cached per argument values and types: no per-call parsing on the hot path."""
    try:
        s, p, d = _conv_args_cached(_typed(stride), _typed(padding), _typed(dilation), kh, kw)
    except TypeError as exc:   # an unhashable argument: checked without the cache
        if "unhashable" not in str(exc):
            raise
        s = _pair(stride, "stride", 1)
        d = _pair(dilation, "dilation", 1)
        p = _padding(padding, s, d, (kh, kw))
    return list(s), list(p), list(d)
