"""itop: dynamic sparse training (In-Time Over-Parameterization) on real block-sparse kernels.

Public names:

- :class:`SparseLinear`, :class:`SparseConv2d`: layers whose weight is stored as active blocks
  (``values``, ``layout``). At ``block_size=1`` a SparseLinear stores its active weights in CSR
  (real sparse products on CPU tensors; masked dense with a one-time warning on CUDA) and a
  SparseConv2d keeps element masks on a dense weight.
- :class:`SparseMultiheadAttention`: ``nn.MultiheadAttention`` with sparse q/k/v and output
  projections (what :func:`sparsify` makes of one).
- :func:`sparsify`, :func:`densify`, :func:`sparsity_summary`: model surgery and the per-layer
  density table.
- :class:`TopologyManager`: prune/regrow every ``update_every`` steps (SET, RigL, SNFS-like
  momentum, random-unfired growth), the ITOP rate, checkpoint state and DDP consistency.
  ``fan_in="constant"`` (with ``sparsify(..., fan_in="constant")``) keeps every row of a layer
  at the same number of active units (:mod:`itop.fan_in`).
- :func:`erk_densities`, :func:`er_densities`, :func:`uniform_densities`: per-layer density
  distributions.

Typical use::

    model = itop.sparsify(model, density=0.05, distribution="erk", block_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)   # after sparsify
    mgr = itop.TopologyManager(model, opt, update_every=100, total_steps=T, growth="gradient")
    for x, y in loader:
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        mgr.step()                      # True on steps where the topology changed
    print(mgr.itop_rate, mgr.summary())
"""
from .density import er_densities, erk_densities, uniform_densities
from .attention import SparseMultiheadAttention
from .layers import SparseConv2d, SparseLayer, SparseLinear
from .sparsify import SparsitySummary, densify, sparsify, sparsity_summary
from .topology import TopologyManager

__all__ = [
    "SparseLinear", "SparseConv2d", "SparseLayer", "SparseMultiheadAttention", "sparsify",
    "densify", "sparsity_summary",
    "SparsitySummary", "TopologyManager", "erk_densities", "er_densities", "uniform_densities",
]
