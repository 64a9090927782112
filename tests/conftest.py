"""Test set-up shared by every test module.

Triton decides at *decoration* time whether a kernel is compiled or interpreted. Without a GPU,
we import the kernel modules once with ``TRITON_INTERPRET=1`` so every kernel is an interpreted
function, then set it back to ``0`` so that, by default, CPU tensors take the CPU path. Tests of
the Triton kernels use the ``triton_device`` fixture, which turns the interpreter on for their
duration (``itop_kernels.dispatch.use_triton`` reads the variable at call time). On a machine
with a GPU nothing is interpreted and ``triton_device`` is ``"cuda"``.

The ahead-of-time compile test runs in a subprocess with the interpreter off.

Randomness is seeded per test: torch's (and numpy's) global RNGs are reseeded before every test
from the test's id, so no result depends on which tests ran before it, and the ``gen`` fixture
hands a test its own seeded ``torch.Generator``.
"""
import importlib
import os
import zlib

import numpy as np
import pytest
import torch

from guard_bands import guarded_outputs
from kernel_launches import TF32Switches

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
def guard_bands():
    """Kernel outputs allocated inside NaN guard bands, checked after the test
    (:mod:`guard_bands`); yields the :class:`guard_bands.GuardBands` record."""
    with guarded_outputs() as guards:
        yield guards


@pytest.fixture
def triton_device(monkeypatch, poison, guard_bands):
    """The device on which the Triton kernels run: ``cuda``, or ``cpu`` through the interpreter.
    Their outputs start as NaN inside NaN guard bands (checked after the test)."""
    if HAS_CUDA:
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


@pytest.fixture
def tf32_switch():
    """``tf32_switch(op, api, on)`` sets torch's TF32 switch for ``"matmul"`` or ``"conv"``
    through its ``"legacy"`` or ``"new"`` API; every switch is put back after the test."""
    switches = TF32Switches()
    yield switches.set
    switches.restore()


def _test_seed(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_global_rngs(request):
    """Every test starts from global RNG states that depend only on its own id."""
    seed = _test_seed(request)
    torch.manual_seed(seed)
    np.random.seed(seed)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from the test's id: the test draws from it explicitly."""
    return torch.Generator().manual_seed(_test_seed(request) + 1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-matrix tests (thread pools only add contention);
    the previous count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
