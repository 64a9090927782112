"""The GPU route's host work, timed on a CPU.

Inside :func:`gpu_route_without_kernels` every tensor claims to be on CUDA device 0 and every
``@triton.jit`` kernel of ``itop_kernels`` is a stand-in whose compiled handle launches nothing.
A call of ``block_sparse_linear`` or ``block_sparse_conv2d`` on CPU tensors then runs all of our
own Python on the way to a GPU: argument checks, configs, output allocation, and
:func:`itop_kernels.triton_launch.launch` with its specialization key and handle replay (the
``"cached"`` mode) or ``kernel[grid]`` on the stand-in (``"plain"``; that skips Triton's own
binder, so a plain launch costs less here than on a GPU). What it leaves out: Triton's C
launcher, the CUDA driver, and the caching allocator (CPU allocations stand in for it). The
config tables are sm_80's and the SM count the interpreter's, since the tensors' device is
still the CPU.

Shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this directory is
on ``sys.path``).
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator
from unittest import mock

import torch

__all__ = ["KERNEL_MODULES", "gpu_route_without_kernels"]

KERNEL_MODULES = ("itop_kernels.triton_linear", "itop_kernels.triton_conv",
                  "itop_kernels.triton_split_sum")


class _NoLaunch:
    """A compiled kernel whose launcher does nothing but count its calls (``runs``: the
    replays of :func:`itop_kernels.triton_launch.launch`)."""

    function = None
    packed_metadata = None

    def __init__(self) -> None:
        self.runs = 0

    def run(self, *args) -> None:
        self.runs += 1


class _NoKernel:
    """Stands in for a ``@triton.jit`` kernel: same parameter names, ``kernel[grid](...)``
    launches nothing and hands back a :class:`_NoLaunch` (what ``launch`` caches)."""

    def __init__(self, kernel) -> None:
        self.arg_names = list(kernel.arg_names)
        self.__name__ = getattr(kernel, "__name__", type(kernel).__name__)
        self.compiled = _NoLaunch()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.compiled


@contextlib.contextmanager
def gpu_route_without_kernels(launch_mode: str = "cached") -> Iterator[None]:
    """Within the block, the ``itop_kernels`` ops take their GPU route on CPU tensors with no
    kernel work, launching in ``launch_mode`` (see the module docstring)."""
    from triton.runtime.jit import KernelInterface

    from itop_kernels import triton_launch

    with contextlib.ExitStack() as stack:
        patch = stack.enter_context
        for name in KERNEL_MODULES:
            mod = importlib.import_module(name)
            for attr, obj in list(vars(mod).items()):
                if isinstance(obj, KernelInterface):
                    patch(mock.patch.object(mod, attr, _NoKernel(obj)))
        patch(mock.patch.object(torch.Tensor, "is_cuda", property(lambda self: True)))
        patch(mock.patch.object(torch._C, "_cuda_getCurrentRawStream", lambda device: 0,
                                create=True))
        patch(mock.patch.object(torch.cuda, "current_device", lambda: 0))
        # Triton's interpreter (if TRITON_INTERPRET is set) would never hand back a handle
        patch(mock.patch.object(triton_launch, "_interpreting", lambda: False))
        patch(mock.patch.object(triton_launch, "_handles", {}))
        patch(mock.patch.object(triton_launch, "_failed", False))
        patch(triton_launch.launching(launch_mode))
        yield
