"""What a sparse layer keeps, on the steps a topology manager arms it, for gradient growth scores.

RigL's growth score of a unit is the norm of its block of the dense weight gradient
``dW = dYᵀ·X``. On armed steps a sparse layer keeps its input ``X`` and the gradient ``dY`` of
its output; :mod:`itop_kernels.block_norms` reduces them to block norms at the update.

The capture is part of the layer's forward (no hook), as two ``torch.library`` custom ops, so
that ``torch.compile`` traces it like any other op, ``fullgraph=True`` included:

- ``itop::capture_input(y, x, key) -> (y', slot)``: ``y'`` is a copy of ``y`` (so an in-place
  op after the layer, ``nn.ReLU(inplace=True)``, cannot hide ``dY``), and the layer registered
  under ``key`` keeps a copy of ``x`` in its ``_captured`` list; ``slot`` (a fresh int64 scalar
  on the CPU, kept in the entry) names the entry.
- its backward, ``itop::capture_grad(dy, slot, key) -> dy'``, adds a copy of ``dy`` to the entry
  whose ``slot`` is this one (micro-batches of gradient accumulation each get their own entry).
  It finds the entry by the slot tensor's storage, never by reading its value: nothing in the
  capture reads a tensor's data on the host, so an armed step has no host sync either.

Both keep copies, not references: compiled code reuses the memory of buffers it no longer
needs. They cost a copy of ``X``, ``Y`` and ``dY`` on armed steps only; unarmed steps do not
contain them. The ops find the layer through a registry of weak references, keyed by an int
that each layer instance gets anew (a deep copy or an unpickled layer gets its own key and
starts unarmed: see :meth:`itop.SparseLayer.__getstate__`).
"""
from __future__ import annotations

import itertools
import weakref
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["new_capture_key", "register", "unregister", "capture"]

_LAYERS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def new_capture_key() -> int:
    """A key no other layer of this process has."""
    return next(_KEYS)


def register(key: int, layer) -> None:
    """Make ``layer`` (with a ``_captured`` list) the target of the capture ops for ``key``."""
    _LAYERS[key] = layer


def unregister(key: int) -> None:
    """Stop capturing for ``key`` (no-op if it is not registered)."""
    _LAYERS.pop(key, None)


def _armed_layer(key: int):
    layer = _LAYERS.get(key)
    return layer if layer is not None and getattr(layer, "_capture_armed", False) else None


@torch.library.custom_op("itop::capture_input", mutates_args=())
def _capture_input(y: Tensor, x: Tensor, key: int) -> Tuple[Tensor, Tensor]:
    layer = _armed_layer(key)
    slot = torch.full((), -1, dtype=torch.int64)
    if layer is not None:
        slot.fill_(len(layer._captured))
        layer._captured.append([x.detach().clone(), None, slot])
    return y.clone(), slot


@_capture_input.register_fake
def _(y, x, key):
    return torch.empty_like(y), torch.empty((), dtype=torch.int64)


def _entry_of(layer, slot: Tensor):
    """The captured entry that ``slot`` names: matched by storage (the entry keeps its slot
    alive, so no other live tensor shares it), so that no tensor value is read on the host."""
    ptr = slot.data_ptr()
    for entry in reversed(layer._captured):   # the backward usually wants the latest entry
        if entry[2].data_ptr() == ptr:
            return entry
    return None


@torch.library.custom_op("itop::capture_grad", mutates_args=())
def _capture_grad(dy: Tensor, slot: Tensor, key: int) -> Tensor:
    layer = _armed_layer(key)
    entry = _entry_of(layer, slot) if layer is not None else None
    if entry is not None:
        g = dy.detach().clone()
        entry[1] = g if entry[1] is None else entry[1] + g
    return dy.clone()


@_capture_grad.register_fake
def _(dy, slot, key):
    return torch.empty_like(dy)


def _setup_context(ctx, inputs, output):
    ctx.key = inputs[2]
    ctx.save_for_backward(output[1])


def _backward(ctx, dy, _dslot):
    (slot,) = ctx.saved_tensors
    return _capture_grad(dy, slot, ctx.key), None, None


_capture_input.register_autograd(_backward, setup_context=_setup_context)


def capture(y: Tensor, x: Tensor, key: int) -> Tensor:
    """``y`` unchanged in value; keeps ``x`` now and ``dy`` in the backward for the layer
    registered under ``key`` (see the module docstring)."""
    return _capture_input(y, x, key)[0]
