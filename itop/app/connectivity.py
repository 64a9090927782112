"""Does a sparse model's output depend on its input at all?

At high sparsity and large blocks, a random topology can cut every path from the input to the
output: MNIST-1D's cnn1d at 98 % sparsity and block 16 keeps one block in each of two
convolutions, and unless the second one reads the first one's output channels, every output
is a constant. Such a model trains at chance (its gradients below the cut are exactly zero, so
gradient growth cannot find the way either). ``itop train`` checks this before training with
:func:`output_depends_on_input`, draws the topology again when the check fails, and refuses a
static run (or warns about a dynamic one) that stays cut off.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["output_depends_on_input"]


@torch.no_grad()
def output_depends_on_input(model: nn.Module, x: Tensor, *, rtol: float = 1e-6) -> bool:
    """True when the model's outputs differ between the samples of ``x`` (eval mode).

    The model runs in eval mode (batch norm from its running statistics, no dropout), without
    gradients, so nothing in it changes; its training mode is restored.

    Args:
        model: any model returning a tensor ``[B, ...]``.
        x: a batch of at least two distinct inputs ``[B, ...]``.
        rtol: outputs whose spread over the batch is at most ``rtol·(1 + max |output|)`` count
            as constant.

    Returns:
        ``False`` when every sample gets the same output: no signal reaches the output.
    """
    if x.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 samples, got shape {tuple(x.shape)}")
    was = model.training
    model.eval()
    try:
        out = model(x).float()
    finally:
        model.train(was)
    spread = (out.max(0).values - out.min(0).values).abs().max()
    return bool(spread > rtol * (1.0 + out.abs().max()))
