"""Guard bands around the Triton kernels' outputs, so that an out-of-bounds write shows.

A kernel that writes one row too many (a mask ``offs < M`` turned ``<= M``) corrupts the memory
next to its output without a word on a GPU; only the interpreter may crash on it. Under
:func:`guarded_outputs`, every output the Triton wrappers allocate (``empty_output`` in
``itop_kernels.triton_linear`` / ``triton_conv``: ``Y``, ``dX``, ``dW`` and the conv
weight-gradient workspace) is a view into the middle of a larger buffer filled with NaN: a band
at least as long as the output itself on each side. The output starts as NaN too (so unwritten
elements show, like the ``poison`` fixture). On exit, every band must still be all NaN.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, List, Tuple
from unittest import mock

import torch

_KERNEL_MODULES = ("itop_kernels.triton_linear", "itop_kernels.triton_conv")
_MIN_BAND = 1024   # elements on each side, at least (and at least the output's own size)
_ALIGN = 64        # band lengths in elements: keeps the output as aligned as its buffer


class GuardBands:
    """Allocates kernel outputs inside NaN guard bands and checks the bands afterwards."""

    def __init__(self) -> None:
        self.outputs: List[Tuple[torch.Tensor, int, int, tuple]] = []  # (buffer, band, numel, shape)

    def empty_output(self, shape, dtype: torch.dtype, device: torch.device,
                     memory_format: torch.memory_format = torch.contiguous_format
                     ) -> torch.Tensor:
        """Stands in for ``itop_kernels.dispatch.empty_output``: a NaN tensor of ``shape``,
        dense in ``memory_format`` (contiguous, or channels-last for a 4-D shape), in the middle
        of a NaN buffer."""
        if not dtype.is_floating_point:
            raise TypeError(f"guard bands need a float output (NaN sentinel), got {dtype}")
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        band = -(-max(_MIN_BAND, numel) // _ALIGN) * _ALIGN
        buf = torch.full((band + numel + band,), float("nan"), dtype=dtype, device=device)
        self.outputs.append((buf, band, numel, shape))
        inner = buf[band:band + numel]
        if memory_format == torch.channels_last:
            n, c, h, w = shape
            return inner.view(n, h, w, c).permute(0, 3, 1, 2)
        if memory_format != torch.contiguous_format:
            raise ValueError(f"guard bands take contiguous or channels-last outputs, got "
                             f"{memory_format}")
        return inner.view(shape)

    @property
    def shapes(self) -> List[tuple]:
        """Shapes of the outputs handed out so far, in order."""
        return [shape for _, _, _, shape in self.outputs]

    def check(self) -> None:
        """Raise ``AssertionError`` if anything was written into a guard band."""
        for buf, band, numel, shape in self.outputs:
            for side, part, base in (("before", buf[:band], -band),
                                     ("after", buf[band + numel:], numel)):
                written = (~torch.isnan(part)).nonzero().flatten().cpu()
                if written.numel():
                    first = int(written[0]) + base
                    raise AssertionError(
                        f"a kernel wrote {written.numel()} element(s) {side} its output of shape "
                        f"{shape} {part.dtype} (first at element offset {first} of the output)")


@contextlib.contextmanager
def guarded_outputs() -> Iterator[GuardBands]:
    """Within the block, the Triton wrappers allocate their outputs inside guard bands; the
    bands are checked on exit."""
    import importlib

    guards = GuardBands()
    with contextlib.ExitStack() as stack:
        for name in _KERNEL_MODULES:
            stack.enter_context(mock.patch.object(importlib.import_module(name), "empty_output",
                                                  guards.empty_output))
        yield guards
    guards.check()
