"""Model surgery: :func:`sparsify` turns ``nn.Linear``/``nn.Conv2d`` layers into sparse layers,
:func:`densify` turns them back, :func:`sparsity_summary` reports per-layer densities.

Which layers are sparsified by default: every module whose type is exactly ``nn.Linear`` or
``nn.Conv2d`` (the ITOP paper sparsifies every conv and linear weight; biases and norm layers
stay dense), except

* layers named or typed in ``exclude``, and the first such layer when ``dense_first=True``
  (RigL's convention of a dense first layer; off by default, as in ITOP),
* layers the block size does not divide, grouped convolutions with ``block_size > 1`` and
  convolutions with a non-zero ``padding_mode``: they stay dense, with one ``UserWarning``
  listing them (the first convolution of an image model, with 3 input channels, is such a
  layer, so it stays dense as in RigL),
* layers whose distribution density is 1.0 (ERK's over-full layers): they stay plain dense
  modules, counted in the budget as RigL does.

Subclasses of ``nn.Linear`` (e.g. the ``out_proj`` of ``nn.MultiheadAttention``, whose weight
is read directly by its parent) are left alone. ``density`` is the overall density of the
weights of the layers that can be sparsified (excluded and ineligible layers do not count).
Per-layer block counts are ``round(dᵢ · blocks)``, so the realized overall density is exact up
to that rounding; :func:`sparsity_summary` reports it. With ``fan_in="constant"`` they are
``live rows × fan-in`` instead (:mod:`itop.fan_in`: every row gets at least one unit, the
budget moves between layers to pay for it, and the fan-ins are rounded to whole units).
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from .density import DISTRIBUTIONS
from .fan_in import FAN_IN_MODES, allocate, constant_fan_in_mask, unit_grid
from .layers import SparseConv2d, SparseLayer, SparseLinear, check_density

__all__ = ["sparsify", "densify", "sparsity_summary", "SparsitySummary"]


class SparsitySummary:
    """A printable per-layer table: ``rows`` is a list of dicts with keys ``name``, ``kind``,
    ``shape``, ``block_size`` (None for dense layers), ``density`` (fraction of weights
    active), ``weights`` (dense weight count) and, from a topology manager, ``itop_rate``.

    ``overall_density`` is the active fraction of the weights of all listed layers;
    ``sparse_density`` of the sparse layers only. ``str(summary)`` is an aligned table.
    """

    def __init__(self, rows: List[dict]):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(name)

    @staticmethod
    def _density(rows) -> float:
        w = sum(r["weights"] for r in rows)
        return sum(r["density"] * r["weights"] for r in rows) / w if w else 0.0

    @property
    def overall_density(self) -> float:
        """Active fraction of the weights of every listed layer (dense layers count as 1)."""
        return self._density(self.rows)

    @property
    def sparse_density(self) -> float:
        """Active fraction of the weights of the sparse layers only."""
        return self._density([r for r in self.rows if r["block_size"] is not None])

    def __str__(self) -> str:
        cols = ["name", "kind", "shape", "block_size", "density", "weights"]
        if any("itop_rate" in r for r in self.rows):
            cols.append("itop_rate")

        def fmt(r, c):
            v = r.get(c)
            if isinstance(v, float):
                return f"{v:.4f}"
            if v is None:
                return "-"
            return str(tuple(v)) if c == "shape" else str(v)

        table = [cols] + [[fmt(r, c) for c in cols] for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in table]
        lines.append(f"overall density {self.overall_density:.4f} "
                     f"(sparse layers {self.sparse_density:.4f})")
        return "\n".join(lines)

    __repr__ = __str__


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        return model.module
    return model


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _match_exclude(name: str, module: nn.Module, names: Sequence[str], types: tuple) -> bool:
    if types and isinstance(module, types):
        return True
    return any(name == n or name.startswith(n + ".") for n in names)


def _ineligible_reason(m: nn.Module, bs: int) -> Optional[str]:
    if isinstance(m, nn.Linear):
        if m.in_features % bs or m.out_features % bs:
            return f"block_size {bs} does not divide [{m.out_features}, {m.in_features}]"
        return None
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r}"
    if m.groups != 1 and bs != 1:
        return f"groups={m.groups} needs block_size 1"
    if m.in_channels % bs or m.out_channels % bs:
        return f"block_size {bs} does not divide channels [{m.out_channels}, {m.in_channels}]"
    if isinstance(m.padding, str) and m.padding == "same" and any(
            d * (k - 1) % 2 for d, k in zip(m.dilation, m.kernel_size)):
        return "asymmetric 'same' padding"
    return None


def sparsify(model: nn.Module, density: float, *, distribution: str = "erk",
             block_size: int = 32, exclude: Optional[Iterable[Union[str, type]]] = None,
             dense_first: bool = False, verbose: bool = False, fan_in: str = "any",
             ablation: bool = False) -> nn.Module:
    """Replace the ``nn.Linear``/``nn.Conv2d`` layers of ``model`` by sparse layers, in place.

    Args:
        model: the model (not yet wrapped in DDP). If ``model`` itself is a layer, the
            returned module replaces it.
        density: overall target density in ``(0, 1]`` of the sparsifiable weights.
        distribution: ``"erk"`` (default, RigL/ITOP), ``"er"`` or ``"uniform"``.
        block_size: block side (1 = element-level masks), used for every layer.
        exclude: module names (qualified, as in ``named_modules``; a name also covers its
            children) and/or module types to keep dense.
        dense_first: also keep the first ``nn.Linear``/``nn.Conv2d`` (registration order)
            dense, as RigL does.
        verbose: print :func:`sparsity_summary` of the result.
        fan_in: ``"any"`` (default: each layer's active units anywhere) or ``"constant"``:
            every row of a layer (block-row, or output unit at block size 1) gets the same
            number of active units, with the budget moved between layers so that each row
            gets at least one (see :mod:`itop.fan_in`; train it with
            ``TopologyManager(..., fan_in="constant")``).
        ablation: with ``fan_in="constant"``, when the budget cannot give every row one unit,
            keep fewer live rows (the others empty) instead of raising ``ValueError``.

    Returns:
        The model (the new sparse layer if ``model`` was itself a layer). Each sparse layer
        starts from the dense layer's weights at uniformly random active blocks, with exactly
        ``round(dᵢ·blocks)`` blocks (at least 1).

    Raises:
        ValueError/TypeError: on a density outside ``(0, 1]``, an unknown distribution, a bad
        block size, or an ``exclude`` name that matches no module.
    """
    density = check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {sorted(DISTRIBUTIONS)}, "
                         f"got {distribution!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if _unwrap(model) is not model:
        raise TypeError("sparsify the model before wrapping it in DistributedDataParallel/"
                        "DataParallel")
    names: List[str] = []
    types: List[type] = []
    for e in (exclude or ()):
        if isinstance(e, str):
            names.append(e)
        elif isinstance(e, type) and issubclass(e, nn.Module):
            types.append(e)
        else:
            raise TypeError(f"exclude entries must be module names or nn.Module types, got {e!r}")
    all_names = {n for n, _ in model.named_modules()}
    for n in names:
        if n not in all_names:
            raise ValueError(f"exclude names {n!r}, which is not a module of the model")

    candidates: List[Tuple[str, nn.Module]] = []
    skipped: List[str] = []
    first = True
    for name, m in model.named_modules():
        if type(m) not in (nn.Linear, nn.Conv2d):
            continue
        is_first, first = first, False
        if (dense_first and is_first) or _match_exclude(name, m, names, tuple(types)):
            continue
        reason = _ineligible_reason(m, block_size)
        if reason is not None:
            skipped.append(f"{name or '<model>'} ({reason})")
            continue
        candidates.append((name, m))
    if skipped:
        warnings.warn("itop.sparsify leaves these layers dense: " + "; ".join(skipped),
                      UserWarning, stacklevel=2)
    if fan_in not in FAN_IN_MODES:
        raise ValueError(f"fan_in must be one of {FAN_IN_MODES}, got {fan_in!r}")
    if not isinstance(ablation, bool):
        raise TypeError(f"ablation must be a bool, got {ablation!r}")
    densities = DISTRIBUTIONS[distribution]([tuple(m.weight.shape) for _, m in candidates],
                                            density)
    masks = [None] * len(candidates)
    if fan_in == "constant":
        masks = _constant_fan_in_masks(candidates, densities, block_size, ablation)
    result = model
    for (name, m), d, mask in zip(candidates, densities, masks):
        if d >= 1.0 if fan_in == "any" else mask is None:
            continue
        cls = SparseLinear if isinstance(m, nn.Linear) else SparseConv2d
        new = cls.from_dense(m, density=min(d, 1.0), block_size=block_size, mask=mask)
        new.train(m.training)
        if name == "":
            result = new
        else:
            _set_submodule(model, name, new)
    if verbose:
        print(sparsity_summary(result))
    return result


def _constant_fan_in_masks(candidates: List[Tuple[str, nn.Module]], densities: List[float],
                           block_size: int, ablation: bool) -> List[Optional[Tensor]]:
    """Constant fan-in topology masks (layer-shaped) per candidate, ``None`` = stays dense."""
    grids = [unit_grid(tuple(m.weight.shape), block_size) for _, m in candidates]
    plan = allocate(grids, densities, ablation=ablation, names=[n for n, _ in candidates])
    masks: List[Optional[Tensor]] = []
    for (_, m), (R, C, _), p in zip(candidates, grids, plan):
        if p is None:
            masks.append(None)
            continue
        mask = constant_fan_in_mask(R, C, p[0], p[1], device=m.weight.device)
        shape = tuple(m.weight.shape) if block_size == 1 else (R, C)
        masks.append(mask.view(shape))
    return masks


def densify(model: nn.Module) -> nn.Module:
    """Replace every sparse layer of ``model`` by its dense equivalent (``to_dense()``), in place.

    Returns the model (the dense layer if ``model`` was itself a sparse layer).
    """
    root = _unwrap(model)
    if isinstance(root, SparseLayer):
        dense = root.to_dense()
        dense.train(root.training)
        if root is model:
            return dense
        model.module = dense
        return model
    for name, m in list(root.named_modules()):
        if isinstance(m, SparseLayer):
            dense = m.to_dense()
            dense.train(m.training)
            _set_submodule(root, name, dense)
    return model


def sparsity_summary(model: nn.Module) -> SparsitySummary:
    """Per-layer densities of the sparse layers and the dense ``nn.Linear``/``nn.Conv2d`` layers
    of ``model`` (or of ``model.module`` under DDP), as a printable :class:`SparsitySummary`.

    A sparse layer's density is ``nnz / units`` (exact; read from host-side counts).
    """
    rows = []
    for name, m in _unwrap(model).named_modules():
        if isinstance(m, SparseLayer):
            shape = m.dense_weight_shape
            rows.append({"name": name, "kind": type(m).__name__, "shape": shape,
                         "block_size": m.block_size, "density": m.density,
                         "weights": math.prod(shape)})
        elif type(m) in (nn.Linear, nn.Conv2d):
            rows.append({"name": name, "kind": type(m).__name__, "shape": tuple(m.weight.shape),
                         "block_size": None, "density": 1.0, "weights": m.weight.numel()})
    return SparsitySummary(rows)
