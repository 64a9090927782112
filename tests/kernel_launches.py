"""Test helpers around the Triton kernel launches: record their arguments, make operands the
kernels must not get as they are (misaligned), and flip torch's TF32 switches through either of
torch's APIs."""
from __future__ import annotations

from typing import Dict, List

import torch


class LaunchSpy:
    """Stands in for a ``@triton.jit`` kernel in its module: ``spy[grid](*args, **kwargs)``
    records the keyword arguments (constexprs and launch options) and launches the real kernel."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.calls: List[Dict] = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append(dict(kwargs))
            return launch(*args, **kwargs)
        return run


def spy_launches(monkeypatch, module, names) -> Dict[str, LaunchSpy]:
    """Replace the kernels ``names`` of ``module`` by :class:`LaunchSpy` for this test."""
    spies = {}
    for name in names:
        spies[name] = LaunchSpy(getattr(module, name))
        monkeypatch.setattr(module, name, spies[name])
    return spies


def at_odd_offset(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (same shape, contiguous) whose data starts 2 elements past a 16-byte
    boundary: Triton specializes on 16-byte alignment, and the kernels are compiled for it."""
    buf = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    out = buf[2:2 + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def record_operand_bases(monkeypatch, module, name: str) -> List[int]:
    """Wrap ``module.<name>``, a launcher ``(kernel, grid, args, constexprs, warps, stages)``,
    so that each launch appends ``data_ptr() % 16`` of every tensor argument to the returned
    list (all zeros: every operand the kernels got was 16-byte aligned)."""
    bases: List[int] = []
    real = getattr(module, name)

    def spy(kernel, grid, args, consts, warps, stages):
        bases.extend(a.data_ptr() % 16 for a in args if isinstance(a, torch.Tensor))
        return real(kernel, grid, args, consts, warps, stages)
    monkeypatch.setattr(module, name, spy)
    return bases


class TF32Switches:
    """Sets torch's TF32 switches for a test and puts them back afterwards (the ``tf32_switch``
    fixture). torch reads its switches through module ``__getattr__``, which ``monkeypatch``
    cannot restore, and refuses legacy reads after some mixes of its two APIs, so each switch
    is put back, in reverse order, through the API that set it."""

    def __init__(self) -> None:
        self._undo: List[tuple] = []   # (object, attribute, previous value)

    @staticmethod
    def _target(op: str, api: str) -> tuple:
        if op not in ("matmul", "conv"):
            raise ValueError(f"op must be 'matmul' or 'conv', got {op!r}")
        if api == "legacy":
            return (torch.backends.cuda.matmul if op == "matmul" else torch.backends.cudnn,
                    "allow_tf32")
        if api == "new":
            return (torch.backends.cuda.matmul if op == "matmul" else torch.backends.cudnn.conv,
                    "fp32_precision")
        raise ValueError(f"api must be 'legacy' or 'new', got {api!r}")

    def set(self, op: str, api: str, on: bool) -> None:
        """Set torch's TF32 switch for ``op`` (``"matmul"``/``"conv"``) through its
        ``"legacy"`` (``allow_tf32``) or ``"new"`` (``fp32_precision``, torch >= 2.9) API."""
        obj, attr = self._target(op, api)
        self._undo.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, on if api == "legacy" else ("tf32" if on else "ieee"))

    def restore(self) -> None:
        while self._undo:
            obj, attr, old = self._undo.pop()
            setattr(obj, attr, old)


class FakeCompiled:
    """Stands in for Triton's compiled kernel: ``run(*a)`` records its arguments."""

    function, packed_metadata = "fn", "meta"

    def __init__(self) -> None:
        self.runs: List[tuple] = []

    def run(self, *a) -> None:
        self.runs.append(a)


class FakeKernel:
    """Stands in for a ``@triton.jit`` kernel with parameters ``arg_names``: ``kernel[grid](...)``
    records ``(grid, args, kwargs)`` in ``plain`` and returns its :class:`FakeCompiled`."""

    def __init__(self, arg_names: List[str]) -> None:
        self.arg_names = arg_names
        self.plain: List[tuple] = []
        self.compiled = FakeCompiled()

    def __getitem__(self, grid):
        def go(*args, **kw):
            self.plain.append((grid, args, kw))
            return self.compiled
        return go


def fake_cuda_cached_launches(monkeypatch, launch_module) -> None:
    """Make :mod:`itop_kernels.triton_launch` replay on the CPU: every tensor claims to be on
    CUDA device 0 (raw stream 7), no interpreter, no launch hook, an empty handle cache and the
    ``"cached"`` mode."""
    L = launch_module
    monkeypatch.setattr(L, "_interpreting", lambda: False)
    monkeypatch.setattr(L, "_hooked", lambda: False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 7, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(L, "_handles", {})
    monkeypatch.setattr(L, "_failed", False)
    monkeypatch.setattr(L, "_mode", "cached")
