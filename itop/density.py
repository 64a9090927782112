"""Per-layer density distributions: uniform, Erdős–Rényi (ER) and Erdős–Rényi-Kernel (ERK).

Each function takes the dense weight shapes of the layers to sparsify (``(out, in)`` for a linear
layer, ``(Cout, Cin, kh, kw)`` for a convolution) and the overall target density, and returns one
density per layer, in ``(0, 1]``, such that ``Σ dᵢ·nᵢ = density · Σ nᵢ`` exactly (in real
arithmetic; ``nᵢ`` is the layer's weight count).

ER and ERK follow RigL (Evci et al., 2020): layer ``i`` gets ``dᵢ = ε·pᵢ`` with the raw
probability ``pᵢ = Σ shapeᵢ / Π shapeᵢ`` (ERK: all dims, kernel included; ER: only
``(out, in)``), raised to ``power_scale``. When ``ε·pᵢ`` would exceed 1 for the largest ``pᵢ``,
those layers are made dense and ``ε`` is solved again over the rest, whose budget shrinks by the
weights the dense layers now hold, so the overall density stays exact.
"""
from __future__ import annotations

import math
from typing import List, Sequence

__all__ = ["erk_densities", "er_densities", "uniform_densities", "floor_densities",
           "DISTRIBUTIONS"]


def _check(shapes: Sequence[Sequence[int]], density: float) -> List[tuple]:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in (0, 1], got {type(density).__name__}")
    if not (0.0 < float(density) <= 1.0) or math.isnan(density):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    out = []
    for s in shapes:
        s = tuple(int(d) for d in s)
        if len(s) < 2 or any(d < 1 for d in s):
            raise ValueError(f"each shape must have >= 2 positive dims, got {s}")
        out.append(s)
    return out


def uniform_densities(shapes: Sequence[Sequence[int]], density: float) -> List[float]:
    """Every layer gets ``density``.

    Args:
        shapes: dense weight shapes, e.g. ``[(300, 784), (64, 32, 3, 3)]``.
        density: overall density in ``(0, 1]``.

    Returns:
        ``[density] * len(shapes)`` (floats).
    """
    shapes = _check(shapes, density)
    return [float(density)] * len(shapes)


def _erdos_renyi(shapes: List[tuple], density: float, include_kernel: bool,
                 power_scale: float) -> List[float]:
    if not shapes:
        return []
    n = [math.prod(s) for s in shapes]
    raw = []
    for s in shapes:
        dims = s if include_kernel else s[:2]
        raw.append((sum(dims) / math.prod(dims)) ** power_scale)
    dense: set = set()
    while True:
        # eps * Σ_{i sparse} p_i n_i = density * Σ_{all} n_i - Σ_{i dense} n_i
        rhs = 0.0
        divisor = 0.0
        for i, ni in enumerate(n):
            if i in dense:
                rhs -= ni * (1.0 - density)
            else:
                rhs += ni * density
                divisor += raw[i] * ni
        if len(dense) == len(n):
            break
        eps = rhs / divisor
        sparse_raw = [raw[i] for i in range(len(n)) if i not in dense]
        pmax = max(sparse_raw)
        if pmax * eps > 1.0:
            for i in range(len(n)):
                if i not in dense and raw[i] == pmax:
                    dense.add(i)
        else:
            break
    return [1.0 if i in dense else min(1.0, eps * raw[i]) for i in range(len(n))]


def erk_densities(shapes: Sequence[Sequence[int]], density: float, *,
                  power_scale: float = 1.0) -> List[float]:
    """Erdős–Rényi-Kernel densities (RigL's ``erdos_renyi_kernel``), the ITOP/RigL default.

    Args:
        shapes: dense weight shapes; all dims (including kernel taps) enter ``pᵢ = Σ s / Π s``.
        density: overall density in ``(0, 1]``.
        power_scale: exponent applied to ``pᵢ`` (1.0 in RigL/ITOP; < 1 flattens the profile).

    Returns:
        One density per layer in ``(0, 1]``; layers whose density would exceed 1 get exactly 1.0.
    """
    shapes = _check(shapes, density)
    return _erdos_renyi(shapes, float(density), True, power_scale)


def er_densities(shapes: Sequence[Sequence[int]], density: float, *,
                 power_scale: float = 1.0) -> List[float]:
    """Erdős–Rényi densities: like :func:`erk_densities` but ``pᵢ`` uses only ``(out, in)``.

    Args:
        shapes: dense weight shapes; kernel dims are ignored in ``pᵢ`` but count in ``nᵢ``.
        density: overall density in ``(0, 1]``.
        power_scale: exponent applied to ``pᵢ``.

    Returns:
        One density per layer in ``(0, 1]``.
    """
    shapes = _check(shapes, density)
    return _erdos_renyi(shapes, float(density), False, power_scale)


DISTRIBUTIONS = {"erk": erk_densities, "er": er_densities, "uniform": uniform_densities}


def floor_densities(densities: Sequence[float], sizes: Sequence[int],
                    floors: Sequence[float]) -> List[float]:
    """Raise every density to its floor and scale the others down by one common factor so that
    the weight count ``Σ dᵢ·nᵢ`` stays the same (water-filling).

    Args:
        densities: per-layer densities in ``(0, 1]`` (from a distribution).
        sizes: weights per layer ``nᵢ``.
        floors: the least density of each layer, in ``(0, 1]``.

    Returns:
        The new densities: ``max(floorᵢ, s·dᵢ)`` with one ``s <= 1``.

    Raises:
        ValueError: when the floors alone hold more weights than the densities.
    """
    if not (len(densities) == len(sizes) == len(floors)):
        raise ValueError("densities, sizes and floors must have the same length")
    budget = sum(d * n for d, n in zip(densities, sizes))
    need = sum(f * n for f, n in zip(floors, sizes))
    if need > budget * (1 + 1e-12):
        raise ValueError(f"the floors hold {need:.0f} weights, more than the budget of "
                         f"{budget:.0f}")
    at_floor = [d <= f for d, f in zip(densities, floors)]
    while True:
        fixed = sum(f * n for f, n, a in zip(floors, sizes, at_floor) if a)
        free = sum(d * n for d, n, a in zip(densities, sizes, at_floor) if not a)
        s = (budget - fixed) / free if free > 0 else 1.0
        newly = [not a and s * d < f for d, f, a in zip(densities, floors, at_floor)]
        if not any(newly):
            break
        at_floor = [a or b for a, b in zip(at_floor, newly)]
    return [f if a else min(1.0, s * d) for d, f, a in zip(densities, floors, at_floor)]
