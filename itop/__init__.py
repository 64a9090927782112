"""itop: dynamic sparse training (In-Time Over-Parameterization) on real block-sparse kernels.

Public names:

- :class:`SparseLinear`, :class:`SparseConv2d`: layers whose weight is stored as active blocks
  (``values``, ``layout``), or as element masks on a dense weight for ``block_size=1``.
- :func:`sparsify`, :func:`densify`, :func:`sparsity_summary`: model surgery and the per-layer
  density table.
- :class:`TopologyManager`: prune/regrow every ``update_every`` steps (SET, RigL, SNFS-like
  momentum, random-unfired growth), the ITOP rate, checkpoint state and DDP consistency.
- :func:`erk_densities`, :func:`er_densities`, :func:`uniform_densities`: per-layer density
  distributions.
"""
from .density import er_densities, erk_densities, uniform_densities
from .layers import SparseConv2d, SparseLayer, SparseLinear
from .sparsify import SparsitySummary, densify, sparsify, sparsity_summary
from .topology import TopologyManager

__all__ = [
    "SparseLinear", "SparseConv2d", "SparseLayer", "sparsify", "densify", "sparsity_summary",
    "SparsitySummary", "TopologyManager", "erk_densities", "er_densities", "uniform_densities",
]
