"""Test set-up shared by every test module.

Triton decides at *decoration* time whether a kernel is compiled or interpreted. Without a GPU,
we import the kernel modules once with ``TRITON_INTERPRET=1`` so every kernel is an interpreted
function, then set it back to ``0`` so that, by default, CPU tensors take the CPU path. Tests of
the Triton kernels use the ``triton_device`` fixture, which turns the interpreter on for their
duration (``itop_kernels.dispatch.use_triton`` reads the variable at call time). On a machine
with a GPU nothing is interpreted and ``triton_device`` is ``"cuda"``.

The ahead-of-time compile test runs in a subprocess with the interpreter off.
"""
import importlib
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("itop_kernels.triton_linear", "itop_kernels.triton_conv"):
        try:
            importlib.import_module(_name)
        except ModuleNotFoundError as exc:  # a kernel module not written yet
            if exc.name != _name:
                raise
    os.environ["TRITON_INTERPRET"] = "0"


@pytest.fixture
def poison(monkeypatch):
    """Kernel outputs start as NaN, so unwritten elements fail the comparison."""
    monkeypatch.setenv("ITOP_POISON_OUTPUTS", "1")


@pytest.fixture
def triton_device(monkeypatch, poison):
    """The device on which the Triton kernels run: ``cuda``, or ``cpu`` through the interpreter."""
    if HAS_CUDA:
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-matrix tests (thread pools only add contention);
    the previous count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
