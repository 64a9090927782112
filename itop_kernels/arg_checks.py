"""Argument checks shared by the public ops: clear errors that name the bad argument."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dispatch import use_triton
from .layout import BlockLayout

__all__ = ["FLOAT_DTYPES", "check_operands", "check_bias"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_operands(x: Tensor, values: Tensor, layout: BlockLayout) -> None:
    """Types, dtypes and devices of ``x``, ``values`` and ``layout`` (not their shapes).

    Raises ``TypeError`` for a wrong type or dtype (float64 included where the Triton kernels
    would run) and ``ValueError`` when the three are not on one device.
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    for name, t in (("x", x), ("values", values)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"values has dtype {values.dtype} but x has {x.dtype}; they must match")
    if x.device != values.device or x.device != layout.device:
        raise ValueError(f"x ({x.device}), values ({values.device}) and layout "
                         f"({layout.device}) must be on the same device")
    if x.dtype == torch.float64 and use_triton(x):
        raise TypeError("float64 runs on the CPU path only; the Triton kernels take "
                        "float16, bfloat16 and float32")


def check_bias(bias: Optional[Tensor], x: Tensor, size: int, label: str) -> None:
    """``bias`` is None or a ``[size]`` tensor with ``x``'s dtype and device; ``label`` names
    the size in messages (``"out_features"``, ``"Cout"``)."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (size,):
        raise ValueError(f"bias must have shape [{label}={size}], got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"bias has dtype {bias.dtype} but x has {x.dtype}; they must match")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device}, x on {x.device}")
