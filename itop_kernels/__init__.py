"""itop_kernels: block-sparse layouts and kernels (Triton on GPU, a real sparse CPU path).

Public names: :class:`BlockLayout`, :func:`block_sparse_linear`, :func:`block_sparse_conv2d`.
"""
from .layout import BlockLayout
from .linear import block_sparse_linear
from .conv import block_sparse_conv2d

__all__ = ["BlockLayout", "block_sparse_linear", "block_sparse_conv2d"]
__version__ = "0.1.0"
