"""The arithmetic of the Triton kernels' float32 dots: TF32 or IEEE fp32, from torch's switches.

The one place that decides it, so that the block-sparse ops round like the dense torch op they
replace:

- ``"matmul"`` (:func:`~itop_kernels.block_sparse_linear`) follows the cuBLAS switch,
  ``torch.backends.cuda.matmul.fp32_precision`` (``allow_tf32`` on older torch): IEEE by default.
- ``"conv"`` (:func:`~itop_kernels.block_sparse_conv2d`) follows the cuDNN convolution switch,
  ``torch.backends.cudnn.conv.fp32_precision`` (``cudnn.allow_tf32`` on older torch): TF32 by
  default, as ``F.conv2d`` on a GPU.

16-bit dots are always ``"ieee"`` (a 16-bit product is exact in the fp32 accumulator). The
answer is the same on every device: the interpreter ignores it, a GPU honours it.
"""
from __future__ import annotations

import torch

__all__ = ["OPS", "torch_allows_tf32", "dot_precision"]

OPS = ("matmul", "conv")


def torch_allows_tf32(op: str) -> bool:
    """Whether torch's own switch for ``op`` (``"matmul"`` or ``"conv"``) allows TF32 now.

    Reads the ``fp32_precision`` API of torch >= 2.9 where it exists: once a program has set it,
    torch refuses to read the legacy ``allow_tf32`` flags (``RuntimeError``), and it reports the
    effective setting (a global ``torch.backends.fp32_precision`` included).
    """
    if op == "matmul":
        backend = torch.backends.cuda.matmul
    elif op == "conv":
        backend = getattr(torch.backends.cudnn, "conv", None)
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    new = getattr(backend, "fp32_precision", None) if backend is not None else None
    if new is not None:
        return new == "tf32"
    if op == "matmul":
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return bool(torch.backends.cudnn.allow_tf32)


def dot_precision(dtype: torch.dtype, op: str) -> str:
    """``tl.dot``'s ``input_precision`` for inputs of ``dtype`` in ``op``: ``"tf32"`` for float32
    where :func:`torch_allows_tf32` says so, else ``"ieee"``."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if dtype == torch.float32 and torch_allows_tf32(op):
        return "tf32"
    return "ieee"
