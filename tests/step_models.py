"""A small sparse model with every kind of sparse layer (conv, attention, linear) and its
training step, shared by the host-sync, in-place-update and memory tests."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import itop


class ConvAttnMLP(nn.Module):
    """``[B, 16, 4, 4]`` -> conv 3×3 (16 -> 32) -> self-attention over the 16 pixels (E = 32,
    2 heads, SDPA) -> linear 32 -> 64 -> linear 64 -> 16 -> 16 logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.fc = nn.Linear(32, 64)
        self.out = nn.Linear(64, 16)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)      # [B, 16, 32]
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(torch.relu(self.fc(h.mean(1))))


def sparse_model(device="cpu", seed: int = 0) -> nn.Module:
    """:class:`ConvAttnMLP` at density 0.5, block 16 (every layer sparse), on ``device``."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # tiny layers: starved-layer warnings
        return itop.sparsify(ConvAttnMLP(), 0.5, block_size=16,
                             distribution="uniform").to(device)


def batch(device="cpu", seed: int = 1, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 16, 4, 4, generator=g).to(device),
            torch.randint(0, 16, (n,), generator=g).to(device))


def train_step(model, opt, x, y, mgr=None, autocast_dtype=None) -> torch.Tensor:
    """zero_grad, forward, backward, optimizer step, ``mgr.step()``; returns the loss (a tensor:
    nothing here reads a value on the host)."""
    opt.zero_grad(set_to_none=False)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if mgr is not None:
        mgr.step()
    return loss.detach()
