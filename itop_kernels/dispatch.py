"""Which implementation runs for a given tensor: the Triton kernels or the CPU path."""
from __future__ import annotations

import os

import torch

__all__ = ["use_triton", "triton_interpreting", "poison_enabled", "empty_output"]


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: CPU tensors then go through the Triton kernels."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under Triton's interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and triton_interpreting())


def poison_enabled() -> bool:
    """True when ``ITOP_POISON_OUTPUTS=1``: kernel outputs start as NaN (tests use this so that
    an element a kernel forgot to write shows up)."""
    return os.environ.get("ITOP_POISON_OUTPUTS", "0") not in ("", "0")


def empty_output(shape, dtype: torch.dtype, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``torch.empty`` for a kernel's output (in ``memory_format``), filled with NaN when
    poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if poison_enabled():
        out.fill_(float("nan"))
    return out
