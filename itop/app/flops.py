"""FLOP accounting of sparse training against its dense counterpart (as RigL counts it).

Only the multiply-adds of linear and convolution layers count (2 FLOPs each); everything
else (norms, activations, pooling) is the same for both and small. A sparse layer costs its
density × the FLOPs of the dense layer of the same shape.

- inference fraction: ``f_S / f_D``, sparse over dense forward FLOPs per sample.
- training fraction: a training step costs the forward and twice the forward for the backward
  (``dX`` and ``dW``), ``3·f``. Gradient growth (RigL) also computes the dense weight gradient of
  the sparse layers on each topology-update step (``f_D`` of those layers; the block-norm op
  reduces it block by block), and momentum growth does so on every step::

      training = (steps · 3·f_S + dense_grad_steps · f_D,sparse) / (steps · 3·f_D)

  with the densities a run actually had (they are constant: nnz is kept exact per layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import nn

from ..layers import SparseConv2d, SparseLayer, SparseLinear

__all__ = ["LayerFlops", "layer_flops", "FlopReport", "flop_report"]


@dataclass
class LayerFlops:
    """Forward FLOPs of one layer for one sample: ``dense`` (all weights) and ``density``."""

    name: str
    dense: float
    density: float
    sparse_layer: bool

    @property
    def sparse(self) -> float:
        """FLOPs at the layer's density."""
        return self.dense * self.density


def _conv_out_elems(out: torch.Tensor) -> int:
    return math.prod(out.shape[2:])


def layer_flops(model: nn.Module, in_shape: Sequence[int],
                device: torch.device = torch.device("cpu")) -> List[LayerFlops]:
    """Per-layer forward FLOPs for one sample of ``in_shape = (C, H, W)``, found by running the
    model once (eval mode, no grad) on zeros with forward hooks on the linear/conv layers."""
    rows: List[LayerFlops] = []
    handles = []

    def hook(name: str):
        def fn(m: nn.Module, args, out):
            x = args[0]
            if isinstance(m, (SparseLinear, nn.Linear)):
                fin = m.in_features
                fout = m.out_features
                dense = 2.0 * fin * fout * (x.numel() // fin) / x.shape[0]
            else:
                if isinstance(m, SparseConv2d):
                    cout, cin_g, kh, kw = m.dense_weight_shape
                else:
                    cout, cin_g, kh, kw = m.weight.shape
                dense = 2.0 * cout * cin_g * kh * kw * _conv_out_elems(out)
            sp = isinstance(m, SparseLayer)
            rows.append(LayerFlops(name, dense, m.density if sp else 1.0, sp))
        return fn

    for name, m in model.named_modules():
        if isinstance(m, SparseLayer) or type(m) in (nn.Linear, nn.Conv2d):
            handles.append(m.register_forward_hook(hook(name)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *in_shape, device=device))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return rows


@dataclass
class FlopReport:
    """Forward FLOPs per sample (dense and sparse) and the achieved fractions of dense."""

    dense_forward: float
    sparse_forward: float
    dense_forward_of_sparse_layers: float
    training_fraction: float
    inference_fraction: float

    def as_dict(self) -> Dict[str, float]:
        """The report as a JSON-friendly dict."""
        return dict(self.__dict__)


def flop_report(rows: Sequence[LayerFlops], steps: int, dense_grad_steps: int = 0) -> FlopReport:
    """Training and inference FLOP fractions of a run of ``steps`` optimizer steps, of which
    ``dense_grad_steps`` also computed the dense gradient of the sparse layers (RigL updates).
    """
    f_d = sum(r.dense for r in rows)
    f_s = sum(r.sparse for r in rows)
    f_grow = sum(r.dense for r in rows if r.sparse_layer)
    inference = f_s / f_d if f_d else 1.0
    if steps <= 0 or not f_d:
        training = inference
    else:
        training = (steps * 3.0 * f_s + dense_grad_steps * f_grow) / (steps * 3.0 * f_d)
    return FlopReport(f_d, f_s, f_grow, training, inference)
