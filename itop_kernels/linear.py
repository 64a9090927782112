"""``block_sparse_linear``: ``Y = X·Wᵀ + b`` with a block-sparse ``W``, and its autograd.

The three computations are ``torch.library`` custom ops, so ``torch.compile`` traces through
them without a graph break and AMP casts their inputs:

- ``itop_kernels::bsl_forward``     ``Y = X·Wᵀ + b``          ``[M, K] -> [M, N]``
- ``itop_kernels::bsl_grad_input``  ``dX = dY·W``             ``[M, N] -> [M, K]``
- ``itop_kernels::bsl_grad_weight`` ``dW`` at active blocks   ``-> [nnz, bs, bs]``
- ``itop_kernels::bsl_backward``    ``(dX, dW)`` together (what autograd calls; on the CPU both
  come from one pass over ``dY``)

Each op runs the Triton kernels on CUDA tensors (and on CPU tensors under
``TRITON_INTERPRET=1``), and the CPU implementation otherwise.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import cpu_linear
from .dispatch import use_triton
from .arg_checks import check_bias, check_operands
from .layout import BlockLayout

__all__ = ["block_sparse_linear"]



@functools.cache
def _triton():
    """The Triton kernels' module, imported on first use (the CPU path needs no Triton) and
    then held: a function-level import costs about half a µs on every call."""
    from . import triton_linear
    return triton_linear


def _new_output(like: Tensor, rows: int, cols: int, block_size: int) -> Tensor:
    """Shape and strides of an ``[rows, cols]`` output (``Y`` or ``dX``) of the ops.

    Block size 1 runs only on the CPU path, whose CSR products write the transposed matrix
    row-major: its outputs are transposed views (strides ``(1, rows)``), so that the next
    block-size-1 layer reads them without a copy. Other block sizes give row-major outputs."""
    if block_size == 1:
        return like.new_empty((cols, rows)).t()
    return like.new_empty((rows, cols))


# --------------------------------------------------------------------------- implementations
# One implementation of each computation, called by the custom ops (``torch.compile``, export)
# and by the eager ``autograd.Function`` alike.
def _forward_impl(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                  bias: Optional[Tensor], block_size: int, out_features: int) -> Tensor:
    """``Y = X·Wᵀ (+ bias)``, ``x [M, K]`` -> ``[M, N]``: the Triton kernels or the CPU path."""
    if use_triton(x):
        return _triton().linear_forward(x, values, row_ptr, col_idx, bias, block_size, out_features)
    return cpu_linear.linear_forward(x, values, row_ptr, col_idx, bias, block_size, out_features)


def _backward_impl(dy: Tensor, x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                   row_idx: Tensor, col_ptr: Tensor, t_row_idx: Tensor, t_block_idx: Tensor,
                   block_size: int, need_dx: bool, need_dv: bool) -> Tuple[Tensor, Tensor]:
    """``(dX, dV)``; a gradient that is not needed comes back as an empty tensor. The CPU path
    computes both from one gather of ``dY`` (one pass over the block-columns)."""
    if use_triton(dy):
        t = _triton()
        dx = (t.linear_grad_input(dy, values, col_ptr, t_row_idx, t_block_idx, block_size,
                                  x.shape[1]) if need_dx else dy.new_empty(0))
        dv = (t.linear_grad_weight(dy, x, row_idx, col_idx, block_size) if need_dv
              else dy.new_empty(0))
        return dx, dv
    dx, dv = cpu_linear.linear_backward(dy, x, values, row_ptr, col_idx, col_ptr, t_row_idx,
                                        t_block_idx, block_size, need_dx, need_dv)
    return (dx if dx is not None else dy.new_empty(0),
            dv if dv is not None else dy.new_empty(0))


def _bias_grad(dy: Tensor) -> Tensor:
    """``dbias = Σ_m dY[m]``, accumulated in fp32 (fp64 for fp64) and rounded once."""
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.sum(0, dtype=acc).to(dy.dtype)


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("itop_kernels::bsl_forward", mutates_args=())
def _bsl_forward(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, row_idx: Tensor,
                 col_ptr: Tensor, t_row_idx: Tensor, t_block_idx: Tensor,
                 bias: Optional[Tensor], block_size: int, out_features: int) -> Tensor:
    return _forward_impl(x, values, row_ptr, col_idx, bias, block_size, out_features)


@_bsl_forward.register_fake
def _(x, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_block_idx, bias, block_size,
      out_features):
    return _new_output(x, x.shape[0], out_features, block_size)


@torch.library.custom_op("itop_kernels::bsl_grad_input", mutates_args=())
def _bsl_grad_input(dy: Tensor, values: Tensor, col_ptr: Tensor, t_row_idx: Tensor,
                    t_block_idx: Tensor, block_size: int, in_features: int) -> Tensor:
    if use_triton(dy):
        return _triton().linear_grad_input(dy, values, col_ptr, t_row_idx, t_block_idx,
                                           block_size, in_features)
    return cpu_linear.linear_grad_input(dy, values, col_ptr, t_row_idx, t_block_idx, block_size,
                                        in_features)


@_bsl_grad_input.register_fake
def _(dy, values, col_ptr, t_row_idx, t_block_idx, block_size, in_features):
    return _new_output(dy, dy.shape[0], in_features, block_size)


@torch.library.custom_op("itop_kernels::bsl_grad_weight", mutates_args=())
def _bsl_grad_weight(dy: Tensor, x: Tensor, row_idx: Tensor, col_idx: Tensor, col_ptr: Tensor,
                     t_row_idx: Tensor, t_block_idx: Tensor, block_size: int) -> Tensor:
    if use_triton(dy):
        return _triton().linear_grad_weight(dy, x, row_idx, col_idx, block_size)
    row_ptr = None
    if block_size == 1:  # the CSR path reads rows: rebuild row_ptr from the active list
        row_ptr = torch.zeros(dy.shape[1] // block_size + 1, dtype=torch.int32)
        row_ptr[1:] = torch.cumsum(torch.bincount(row_idx.long(), minlength=dy.shape[1]), 0)
    return cpu_linear.linear_grad_weight(dy, x, col_ptr, t_row_idx, t_block_idx, block_size,
                                         row_ptr=row_ptr, col_idx=col_idx)


@_bsl_grad_weight.register_fake
def _(dy, x, row_idx, col_idx, col_ptr, t_row_idx, t_block_idx, block_size):
    return dy.new_empty((row_idx.shape[0], block_size, block_size))


@torch.library.custom_op("itop_kernels::bsl_backward", mutates_args=())
def _bsl_backward(dy: Tensor, x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                  row_idx: Tensor, col_ptr: Tensor, t_row_idx: Tensor, t_block_idx: Tensor,
                  block_size: int, need_dx: bool, need_dv: bool) -> Tuple[Tensor, Tensor]:
    """``(dX, dV)`` together (:func:`_backward_impl`)."""
    return _backward_impl(dy, x, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx,
                          t_block_idx, block_size, need_dx, need_dv)


@_bsl_backward.register_fake
def _(dy, x, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_block_idx, block_size,
      need_dx, need_dv):
    dx = _new_output(dy, dy.shape[0], x.shape[1], block_size) if need_dx else dy.new_empty(0)
    dv = dy.new_empty((row_idx.shape[0], block_size, block_size)) if need_dv else dy.new_empty(0)
    return dx, dv


def _setup_context(ctx, inputs, output):
    (x, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_block_idx, bias, block_size,
     out_features) = inputs
    ctx.save_for_backward(x, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_block_idx)
    ctx.block_size = block_size
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_block_idx = ctx.saved_tensors
    bs = ctx.block_size
    if bs != 1:  # block size 1 takes dY in either layout (a transposed dY is read in place)
        dy = dy.contiguous()
    dx = dv = db = None
    need_dx, need_dv = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    if need_dx or need_dv:
        gx, gv = _bsl_backward(dy, x, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx,
                               t_block_idx, bs, need_dx, need_dv)
        dx = gx if need_dx else None
        dv = gv if need_dv else None
    if ctx.has_bias and ctx.needs_input_grad[8]:
        db = _bias_grad(dy)
    return dx, dv, None, None, None, None, None, None, db, None, None


_bsl_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- block size 1, CPU
@torch.library.custom_op("itop_kernels::bsl_forward_csr", mutates_args=())
def _bsl_forward_csr(xt: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                     row_idx: Tensor, col_ptr: Tensor, t_row_idx: Tensor, t_block_idx: Tensor,
                     bias: Optional[Tensor], out_features: int) -> Tensor:
    """Block size 1 on CPU tensors. Takes ``Xᵀ`` (row-major ``[K, M]``: what the CSR product
    reads) and returns ``Y`` ``[M, N]`` as a transposed view; its gradient for ``xt`` is
    ``dXᵀ``, row-major. :func:`block_sparse_linear` forms ``xt`` with autograd-visible ops
    (free when ``x`` already is a transposed view), so the backward reuses it for ``dW``."""
    return _forward_impl(xt.t(), values, row_ptr, col_idx, bias, 1, out_features)


@_bsl_forward_csr.register_fake
def _(xt, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_block_idx, bias, out_features):
    return _new_output(xt, xt.shape[1], out_features, 1)


def _setup_context_csr(ctx, inputs, output):
    (xt, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_block_idx, bias,
     out_features) = inputs
    ctx.save_for_backward(xt, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_block_idx)
    ctx.has_bias = bias is not None


def _backward_csr(ctx, dy):
    xt, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_block_idx = ctx.saved_tensors
    dxt = dv = db = None
    need_dx, need_dv = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    if need_dx or need_dv:
        gx, gv = _bsl_backward(dy, xt.t(), values, row_ptr, col_idx, row_idx, col_ptr,
                               t_row_idx, t_block_idx, 1, need_dx, need_dv)
        dxt = gx.t() if need_dx else None                 # dXᵀ, row-major like xt
        dv = gv if need_dv else None
    if ctx.has_bias and ctx.needs_input_grad[8]:
        db = _bias_grad(dy)
    return dxt, dv, None, None, None, None, None, None, db, None


_bsl_forward_csr.register_autograd(_backward_csr, setup_context=_setup_context_csr)


# --------------------------------------------------------------------------- eager path
class _EagerLinear(torch.autograd.Function):
    """The eager (not compiling) path: the same implementations as the custom ops, without the
    ``torch.library`` dispatch (about 55 µs a call, 125 µs with autograd, on a CPU; the host
    cost that dominated small and sparse GPU steps). Saves and returns exactly what the
    custom ops' autograd does.

    ``csr=True`` is block size 1 on the CPU: the first input is ``Xᵀ`` (row-major ``[K, M]``)
    and its gradient is ``dXᵀ``, as for ``itop_kernels::bsl_forward_csr``."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Optional[Tensor], row_ptr: Tensor,
                col_idx: Tensor, row_idx: Tensor, col_ptr: Tensor, t_row_idx: Tensor,
                t_block_idx: Tensor, block_size: int, out_features: int, csr: bool) -> Tensor:
        ctx.save_for_backward(x, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx,
                              t_block_idx)
        ctx.block_size = block_size
        ctx.csr = csr
        ctx.has_bias = bias is not None
        return _forward_impl(x.t() if csr else x, values, row_ptr, col_idx, bias, block_size,
                             out_features)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, values, row_ptr, col_idx, row_idx, col_ptr, t_row_idx, t_block_idx = ctx.saved_tensors
        bs = ctx.block_size
        if bs != 1:  # block size 1 takes dY in either layout (a transposed dY is read in place)
            dy = dy.contiguous()
        dx = dv = db = None
        need_dx, need_dv = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_dx or need_dv:
            gx, gv = _backward_impl(dy, x.t() if ctx.csr else x, values, row_ptr, col_idx,
                                    row_idx, col_ptr, t_row_idx, t_block_idx, bs, need_dx,
                                    need_dv)
            if need_dx:
                dx = gx.t() if ctx.csr else gx      # dXᵀ, row-major like xt, on the CSR path
            dv = gv if need_dv else None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = _bias_grad(dy)
        return dx, dv, db, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- public function
def _check_args(x: Tensor, values: Tensor, layout: BlockLayout, bias: Optional[Tensor]) -> None:
    check_operands(x, values, layout)
    if x.dim() < 1 or x.shape[-1] != layout.shape[1]:
        raise ValueError(f"x must have shape [..., in_features={layout.shape[1]}], "
                         f"got {tuple(x.shape)}")
    bs = layout.block_size
    if values.dim() != 3 or values.shape[0] != layout.nnz or values.shape[1] != bs \
            or values.shape[2] != bs:
        raise ValueError(f"values must have shape [nnz, bs, bs] = {[layout.nnz, bs, bs]}, "
                         f"got {list(values.shape)}")
    check_bias(bias, x, layout.shape[0], "out_features")


def _linear(x: Tensor, values: Tensor, layout: BlockLayout, bias: Optional[Tensor],
            custom_ops: bool) -> Tensor:
    """:func:`block_sparse_linear` through the custom ops (``custom_ops=True``: what
    ``torch.compile`` and ``torch.export`` trace) or the eager ``autograd.Function``."""
    _check_args(x, values, layout, bias)
    N = layout.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    meta = (layout.row_ptr, layout.col_idx, layout.row_idx, layout.col_ptr, layout.t_row_idx,
            layout.t_block_idx)
    if layout.block_size == 1 and not use_triton(x2):
        # block size 1 reads Xᵀ row-major: free when x already is a transposed view, else one
        # copy, which the backward reuses (autograd routes dXᵀ back through the transpose)
        xt = x2.t().contiguous()
        if custom_ops:
            y = _bsl_forward_csr(xt, values.contiguous(), *meta, bias, N)
        else:
            y = _EagerLinear.apply(xt, values.contiguous(), bias, *meta, 1, N, True)
    elif custom_ops:
        y = _bsl_forward(x2.contiguous(), values.contiguous(), *meta, bias, layout.block_size, N)
    else:
        y = _EagerLinear.apply(x2.contiguous(), values.contiguous(), bias, *meta,
                               layout.block_size, N, False)
    return y.reshape(*lead, N) if len(lead) != 1 else y


def _linear_custom_op(x: Tensor, values: Tensor, layout: BlockLayout,
                      bias: Optional[Tensor] = None) -> Tensor:
    """:func:`block_sparse_linear` through the ``torch.library`` custom ops (tests, benchmarks)."""
    return _linear(x, values, layout, bias, True)


def _linear_eager(x: Tensor, values: Tensor, layout: BlockLayout,
                  bias: Optional[Tensor] = None) -> Tensor:
    """:func:`block_sparse_linear` through the eager ``autograd.Function`` (tests, benchmarks)."""
    return _linear(x, values, layout, bias, False)


def block_sparse_linear(x: Tensor, values: Tensor, layout: BlockLayout,
                        bias: Optional[Tensor] = None) -> Tensor:
    """``y = x · Wᵀ + bias`` where ``W`` is block-sparse, computing only the active blocks.

    Args:
        x: ``[..., in_features]`` with any number of leading dims (any strides), float16,
            bfloat16, float32, or float64 (CPU only).
        values: ``[nnz, bs, bs]`` active blocks of ``W [out_features, in_features]`` in the
            layout's row-major block order (see :meth:`BlockLayout.gather`); same dtype as ``x``.
        layout: the :class:`BlockLayout` of ``W``, on ``x``'s device.
        bias: optional ``[out_features]``.

    Returns:
        ``[..., out_features]`` in ``x``'s dtype. Products accumulate in float32 (float64 for
        float64 inputs). Differentiable with respect to ``x``, ``values`` and ``bias``.

    Block size 1 (unstructured, ``values [nnz, 1, 1]``) runs a CSR path on CPU tensors (CSR
    × dense products and a sampled ``dW``; see :mod:`itop_kernels.cpu_linear`); its
    output (and ``dX``) are transposed views of row-major ``[out, M]`` buffers, which the next
    block-size-1 layer reads without a copy. The Triton kernels have no block size 1: on CUDA
    tensors it raises ``ValueError`` (the ``itop`` layers run block size 1 there as masked dense).

    Eagerly it runs an ``autograd.Function`` that calls the kernels directly (little host
    cost per call); under ``torch.compile``/``torch.export`` it is the ``itop_kernels::bsl_*``
    custom ops, which trace without a graph break. Both give bit-identical results.
    """
    return _linear(x, values, layout, bias, torch.compiler.is_compiling())
