"""itop_kernels: block-sparse layouts and kernels (Triton on GPU, a real sparse CPU path).

Public names: :class:`BlockLayout`, :func:`block_sparse_linear`.
"""
from .layout import BlockLayout
from .linear import block_sparse_linear

__all__ = ["BlockLayout", "block_sparse_linear"]
__version__ = "0.1.0"
