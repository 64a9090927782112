"""What :func:`itop.sparsify` must keep, refuse or point out when it replaces layers.

- **Ties**: a weight shared by two modules (an embedding tied to the output layer) would be
  split into two independent tensors by a replacement; :func:`tied_layers` finds such layers
  (``sparsify`` leaves them dense and says so). A module registered under several names is one
  layer: :func:`module_names` lists every name, so the sparse layer replaces it at all of them.
- **Frozen parameters and hooks**: :func:`carry_over` gives the new layer the old one's
  ``requires_grad`` flags and its forward/backward hooks (the hook dictionaries themselves, so
  the handles the user holds still remove them).
- **A second call**: :func:`mark_sparsified` records on the model what ``sparsify`` did, and
  :func:`refuse_second_sparsify` raises on a model (or a model containing a module) so marked:
  a second call would sparsify the layers the distribution kept dense. Sparse layers built by
  hand carry no mark, so ``sparsify`` still fills in the rest of such a model.
  :func:`clear_sparsified` (``densify``) removes the marks.
- **Starved layers**: :func:`starved_layers` lists the sparse layers with fewer active units
  than rows of their mask (at any time some outputs are zero, whatever the topology), or a
  single active unit; training such a model can stay at chance.
  :func:`warn_starved_layers` warns with :class:`StarvedLayerWarning`.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Tuple

from torch import Tensor, nn

from .attention import SparseMultiheadAttention
from .layers import SparseLayer

__all__ = ["StarvedLayerWarning", "tied_layers", "module_names", "carry_over",
           "mark_sparsified", "refuse_second_sparsify", "clear_sparsified", "starved_layers",
           "warn_starved_layers"]

#: The attribute ``sparsify`` sets on the model it processed: a dict of its settings.
MARK = "_itop_sparsified"

# The hook dictionaries of an ``nn.Module`` that belong to its forward and backward passes.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks")


class StarvedLayerWarning(UserWarning):
    """A sparse layer has fewer active units than rows of its mask (or a single one), so part
    of it is dead at every step; training may stay near chance."""


def module_names(model: nn.Module) -> Dict[int, List[str]]:
    """``{id(module): every qualified name it is registered under}`` (registration order)."""
    names: Dict[int, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), [])
        if name not in names[id(m)]:
            names[id(m)].append(name)
    return names


def tied_layers(model: nn.Module) -> Dict[int, str]:
    """``{id(module): reason}`` for the modules that share a parameter with another module
    (the same ``nn.Parameter`` object held by two different modules)."""
    names = module_names(model)
    holders: Dict[int, List[nn.Module]] = {}
    for m in {id(m): m for _, m in model.named_modules(remove_duplicate=False)}.values():
        for p in m._parameters.values():
            if p is not None and m not in holders.setdefault(id(p), []):
                holders[id(p)].append(m)
    tied: Dict[int, str] = {}
    for mods in holders.values():
        if len(mods) < 2:
            continue
        for m in mods:
            others = [names[id(o)][0] or "<model>" for o in mods if o is not m]
            tied[id(m)] = f"shares a parameter with {', '.join(others)}"
    return tied


def _param_pairs(old: nn.Module, new: nn.Module) -> List[Tuple[Tensor, Tensor]]:
    """``(old parameter, the new parameter holding its weights)`` for a replaced layer: the
    weight and bias of a linear/conv layer (weight -> ``values``), or the in- and
    out-projection weights and biases of a multi-head attention module."""
    def weight(layer: nn.Module) -> Tensor:
        return layer.values if isinstance(layer, SparseLayer) else layer.weight

    if isinstance(new, SparseMultiheadAttention):
        pairs = [(old.in_proj_weight, weight(new.in_proj)),
                 (old.out_proj.weight, weight(new.out_proj)),
                 (old.in_proj_bias, new.in_proj.bias), (old.out_proj.bias, new.out_proj.bias)]
    else:
        pairs = [(old.weight, weight(new)),
                 (getattr(old, "bias", None), getattr(new, "bias", None))]
    return [(a, b) for a, b in pairs if a is not None and b is not None]


def carry_over(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (the sparse module replacing ``old``) ``old``'s ``requires_grad`` flags
    (weight -> ``values``, bias -> bias; both projections of an attention module) and its
    forward/backward hooks."""
    for a, b in _param_pairs(old, new):
        b.requires_grad_(a.requires_grad)
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if hooks:
            setattr(new, attr, hooks)
    if old._backward_hooks:  # full (register_full_backward_hook) or the old kind
        new._is_full_backward_hook = old._is_full_backward_hook


def mark_sparsified(model: nn.Module, settings: Dict[str, object]) -> None:
    """Record on ``model`` that ``sparsify`` processed it, with ``settings`` (plain values)."""
    if not isinstance(model, SparseLayer):
        setattr(model, MARK, dict(settings))


def refuse_second_sparsify(model: nn.Module) -> None:
    """Raise ``ValueError`` when ``sparsify`` already processed ``model`` or a module in it."""
    for name, m in model.named_modules():
        done = getattr(m, MARK, None)
        if isinstance(done, dict):
            what = ", ".join(f"{k}={v!r}" for k, v in done.items())
            where = f"its submodule {name!r}" if name else "it"
            raise ValueError(f"itop.sparsify already sparsified {where} ({what}): sparsify a "
                             "model once (a second call would sparsify the layers the "
                             "distribution kept dense); call itop.densify(model) first to "
                             "start over")


def clear_sparsified(model: nn.Module) -> None:
    """Remove the marks of :func:`mark_sparsified` from ``model`` and its modules."""
    for m in model.modules():
        if MARK in m.__dict__:
            delattr(m, MARK)


def starved_layers(model: nn.Module) -> List[str]:
    """One line per sparse layer of ``model`` with fewer active units than rows of its mask (or
    a single one): how many of its outputs are zero, and inputs unread, at any time."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, SparseLayer):
            continue
        rows = m.block_mask.shape[0]
        cols = m.num_units // rows
        nnz, bs = m.nnz, m.block_size
        if nnz >= rows and not (nnz == 1 < m.num_units):
            continue
        unit = "block" if bs > 1 else "weight"
        parts = []
        if nnz < rows:
            parts.append(f"at least {(rows - nnz) * bs} of its {rows * bs} outputs are zero")
        else:
            parts.append(f"one {unit} carries all of it")
        if nnz < cols:
            what = "input block-columns" if bs > 1 else "inputs (taps included)"
            parts.append(f"at least {cols - nnz} of its {cols} {what} are unread")
        out.append(f"{name or '<model>'} has {nnz} active {unit}{'s' if nnz > 1 else ''} for a "
                   f"{rows}x{cols} mask: " + " and ".join(parts))
    return out


def warn_starved_layers(model: nn.Module, stacklevel: int = 3) -> None:
    """Warn (:class:`StarvedLayerWarning`) when :func:`starved_layers` finds any."""
    lines = starved_layers(model)
    if lines:
        warnings.warn("itop.sparsify: these layers get fewer active blocks (weights at block "
                      "size 1) than rows of their mask, or a single one, so part of each is dead "
                      "at every step whatever the topology (a model with much of a layer dead "
                      "can train at chance): " +
                      "; ".join(lines) +
                      ". Use a smaller block size or a higher density.",
                      StarvedLayerWarning, stacklevel=stacklevel)
