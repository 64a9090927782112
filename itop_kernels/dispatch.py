"""Which implementation runs for a given tensor: the Triton kernels or the CPU path."""
from __future__ import annotations

import os

import torch

__all__ = ["use_triton", "triton_interpreting"]


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: CPU tensors then go through the Triton kernels."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under Triton's interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and triton_interpreting())
