"""Norm-aware prune scores: a unit's magnitude scaled by what the following batch norm does to
its outputs.

A batch norm right after a layer divides each output channel by its running standard
deviation σ and multiplies it by its weight γ. A block's magnitude before the norm therefore
says little about its effect after it: a channel with small weights and a small σ can matter
as much as one with large weights. ``TopologyManager(prune="magnitude_bn")`` scores a unit by
its L1 magnitude times the mean ``|γ|/σ`` of the output channels of its row (the ``bs``
channels of a block-row, or the one channel of a row at block size 1).

The following norm is found by registration order: the module registered right after the
sparse layer, when it is a ``BatchNorm`` with running statistics, an affine weight and as many
features as the layer has outputs (``conv → bn`` in a ``Sequential`` or in the usual
``self.conv1 = ...; self.bn1 = ...`` order). Layers without one keep their plain magnitude.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["following_norms", "row_scale"]


def following_norms(root: nn.Module, layers: Sequence[Tuple[str, nn.Module]]
                    ) -> Dict[str, nn.modules.batchnorm._BatchNorm]:
    """``{layer name: the batch norm registered right after it}`` for the sparse ``layers``
    of ``root`` that have one (see the module docstring)."""
    mods = list(root.named_modules())
    index = {id(m): i for i, (_, m) in enumerate(mods)}
    out = {}
    for name, layer in layers:
        i = index.get(id(layer))
        if i is None or i + 1 >= len(mods):
            continue
        nxt = mods[i + 1][1]
        if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.affine and \
                nxt.track_running_stats and nxt.num_features == layer.dense_weight_shape[0]:
            out[name] = nxt
    return out


@torch.no_grad()
def row_scale(bn: nn.modules.batchnorm._BatchNorm, rows: int) -> Tensor:
    """float32 ``[rows]``: the mean ``|γ| / sqrt(running_var + eps)`` over each row's
    channels (``num_features / rows`` consecutive channels per row)."""
    s = bn.weight.detach().abs().float() / (bn.running_var.float() + bn.eps).sqrt()
    return s.view(rows, -1).mean(1)
