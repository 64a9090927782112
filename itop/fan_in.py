"""Constant fan-in topologies (``fan_in="constant"``): every live row of a sparse layer holds the
same number of active units, at initialization and after every topology update.

After SRigL (Lasby et al., "Dynamic Sparse Training with Structured Sparsity", ICLR 2024), at
the granularity of our units. A layer's topology mask is read as a grid ``[R, C]``:

- block storage (``block_size >= 2``): ``R = out/bs`` block-rows, ``C = in/bs`` blocks per row;
- ``block_size == 1``: ``R`` = output units (channels), ``C`` = the weights feeding one output
  (``in`` for a linear layer, ``Cin/groups · kh · kw`` for a convolution).

A row is *live* when it holds active units; its output features (a block-row's ``bs`` outputs)
then compute something. A layer in this mode has ``L`` live rows of exactly ``f`` units each,
so ``nnz = L · f`` and it never changes. Without ablation ``L = R``: no row is ever empty. The
block kernels also get the same work on every live block-row.

**Budget** (:func:`allocate`). The distribution (ERK, ER, uniform) gives per-layer densities
``dᵢ``. One unit per row is a *floor* of ``1/C`` on a layer's density: layers under it are
raised to it and the others scaled down by one common factor, until the overall budget is met
(water-filling, :func:`itop.density.floor_densities`). The fan-in is ``fᵢ = round(dᵢ·C)`` (at
least 1), then fan-ins move by one, greedily, while that brings the total weight count closer
to the budget; :func:`itop.sparsify` reports the realized density.

When the budget cannot give every row of every layer one unit (MNIST-1D's cnn1d at 98 %
sparsity and block 16 holds 18 blocks' worth of weights for 32 block-rows) there are two
answers: refuse with the reason (``ablation=False``, the default), or *ablate* rows, as SRigL
does (``ablation=True``): layer ``i`` keeps ``Nᵢ = round(dᵢ·R·C)`` units (at least one) on
``L = min(R, Nᵢ)`` live rows. Which rows are live then follows training (see below); the others
are explicitly empty and are reported by :func:`row_counts`.

**Update** (:func:`plan_update`), for one layer, with a prune count ``k`` (:func:`prune_count`):

1. Prune: the ``k`` active units of smallest magnitude leave, but never a row's strongest one
   (magnitude pruning alone never resets a live row). With a growth gradient, an active
   unit whose score is exactly zero carries no signal on this batch (it reads only dead inputs,
   or nothing reads its outputs): it leaves too, with probability ½ (so that two disconnected
   neighbours do not swap places forever), as long as the update replaces at most half of the
   layer (and at least one unit).
2. Live rows (ablation only): a row that keeps a unit stays live. Rows that lost all their
   units and empty rows are ranked by their *saliency*, the units they hold among the layer's
   best growth candidates (SRigL's count), ties going to rows that were live, then at random;
   the best of them fill the ``L`` live rows.
3. Grow: every live row regrows, from its own units that were inactive before the update, up to
   ``f`` units, best growth score first. Units without gradient signal (score exactly zero)
   rank after every unit with signal, in random order, so a layer whose gradient is all zero
   (cut off from the loss) still explores. Units pruned in this update come back only when a
   row has nothing else left.

The result is a new mask with exactly ``L · f`` units: the topology manager applies it through
the layers' usual ``_apply_topology`` (new units start at zero with zero optimizer state).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .density import floor_densities
from .unit_selection import topk_indices

__all__ = ["FAN_IN_MODES", "unit_grid", "allocate", "constant_fan_in_mask", "row_counts",
           "fan_in_of", "prune_count", "plan_update"]

FAN_IN_MODES = ("any", "constant")


def unit_grid(weight_shape: Sequence[int], block_size: int) -> Tuple[int, int, int]:
    """``(R, C, unit_numel)`` of a weight ``[out, in, *kernel]`` at ``block_size``: rows, units
    per row, and dense weights per unit (see the module docstring)."""
    out, cin, *kernel = (int(s) for s in weight_shape)
    taps = math.prod(kernel)
    if block_size == 1:
        return out, cin * taps, 1
    return out // block_size, cin // block_size, block_size * block_size * taps


def allocate(grids: Sequence[Tuple[int, int, int]], densities: Sequence[float], *,
             ablation: bool, names: Optional[Sequence[str]] = None
             ) -> List[Optional[Tuple[int, int]]]:
    """Live rows and fan-in of every layer for a constant fan-in budget.

    Args:
        grids: ``(R, C, unit_numel)`` per layer (:func:`unit_grid`).
        densities: the distribution's per-layer densities (``Σ dᵢ·nᵢ`` is the budget).
        ablation: allow layers with fewer live rows than rows when the budget cannot give
            every row one unit (else ``ValueError``).
        names: layer names for the error message.

    Returns:
        ``(live_rows, fan_in)`` per layer, or ``None`` for a layer that stays dense: the
        distribution made it dense (``dᵢ >= 1``, as ERK does to its smallest layers; those keep
        their weights out of the budget), or its fan-in reached ``C``.
    """
    names = list(names) if names is not None else [f"layer {i}" for i in range(len(grids))]
    sparse = [i for i, d in enumerate(densities) if d < 1.0]
    out: List[Optional[Tuple[int, int]]] = [None] * len(grids)
    if sparse:
        part = _allocate_sparse([grids[i] for i in sparse], [densities[i] for i in sparse],
                                ablation, [names[i] for i in sparse])
        for i, p in zip(sparse, part):
            out[i] = p
    return out


def _allocate_sparse(grids: Sequence[Tuple[int, int, int]], densities: Sequence[float],
                     ablation: bool, names: Sequence[str]) -> List[Optional[Tuple[int, int]]]:
    """:func:`allocate` for layers whose densities are all below 1."""
    sizes = [R * C * u for R, C, u in grids]
    budget = sum(d * n for d, n in zip(densities, sizes))
    floors = [1.0 / C for _, C, _ in grids]
    need = sum(f * n for f, n in zip(floors, sizes))
    if budget + 1e-9 * max(1.0, budget) < need:
        if not ablation:
            units = ", ".join(f"{n!r}: {R}" for n, (R, _, _) in zip(names, grids))
            raise ValueError(
                f"constant fan-in: the weight budget ({budget:.0f} weights) cannot give every "
                f"row one unit ({need:.0f} weights; rows per layer: {units}). Pass "
                "ablation=True (itop train --ablation) to keep fewer live rows, or use a higher "
                "density or a smaller block size")
        out: List[Optional[Tuple[int, int]]] = []
        for (R, C, _), d in zip(grids, densities):
            n = min(R * C, max(1, int(round(d * R * C))))
            live = min(R, n)
            out.append((live, min(C, max(1, int(round(n / live))))))
        return out
    dens = floor_densities(densities, sizes, floors)
    fan = [min(C, max(1, int(round(d * C)))) for d, (_, C, _) in zip(dens, grids)]
    # greedy ±1 moves of a layer's fan-in while they bring the total closer to the budget
    row_w = [R * u for R, _, u in grids]
    total = sum(f * w for f, w in zip(fan, row_w))
    while True:
        best, best_gap = None, abs(total - budget)
        for i, (f, w, (_, C, _)) in enumerate(zip(fan, row_w, grids)):
            for step in (-1, 1):
                if 1 <= f + step <= C and abs(total + step * w - budget) < best_gap - 1e-9:
                    best, best_gap = (i, step), abs(total + step * w - budget)
        if best is None:
            break
        fan[best[0]] += best[1]
        total += best[1] * row_w[best[0]]
    return [None if f >= C else (R, f) for f, (R, C, _) in zip(fan, grids)]


def constant_fan_in_mask(rows: int, cols: int, live_rows: int, fan_in: int,
                         generator: Optional[torch.Generator] = None,
                         device=None) -> Tensor:
    """A bool ``[rows, cols]`` mask: ``live_rows`` rows (uniformly random) with ``fan_in``
    uniformly random units each, the other rows empty."""
    if not (1 <= live_rows <= rows and 1 <= fan_in <= cols):
        raise ValueError(f"need 1 <= live_rows <= {rows} and 1 <= fan_in <= {cols}, got "
                         f"live_rows={live_rows}, fan_in={fan_in}")
    keys = torch.rand(rows, cols, generator=generator)
    cols_idx = keys.argsort(dim=1)[:, :fan_in]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask.scatter_(1, cols_idx, True)
    live = torch.randperm(rows, generator=generator)[:live_rows]
    alive = torch.zeros(rows, dtype=torch.bool)
    alive[live] = True
    mask &= alive[:, None]
    return mask.to(device) if device is not None else mask


def row_counts(mask: Tensor) -> Tensor:
    """Active units per row of a topology mask (rows = its first dimension): int64 ``[R]``."""
    return mask.reshape(mask.shape[0], -1).sum(1)


def fan_in_of(mask: Tensor) -> Tuple[int, int]:
    """``(live_rows, fan_in)`` of a constant fan-in mask (host sync).

    Raises:
        ValueError: when live rows hold different numbers of units.
    """
    counts = row_counts(mask)
    live = counts[counts > 0]
    if live.numel() == 0:
        raise ValueError("the mask has no active unit")
    lo, hi = int(live.min()), int(live.max())
    if lo != hi:
        raise ValueError(f"live rows hold between {lo} and {hi} units (not a constant fan-in)")
    return int(live.numel()), lo


def prune_count(rate: float, nnz: int, live_rows: int = 0) -> int:
    """Units one update prunes by magnitude in a layer of ``nnz`` active units on ``live_rows``
    rows, in the constant fan-in mode:
    ``min(ceil(rate · nnz), floor((nnz - 1) / 2), nnz - live_rows)``.

    The schedule's count (ITOP/RigL) for large layers, but an update always keeps a strict
    majority of the layer (a 4-unit layer moves at most one, a layer of 1 or 2 units none),
    and every live row keeps its strongest unit (:func:`plan_update` never prunes it), so a
    layer with one unit per row moves only units without gradient signal."""
    if nnz < 1:
        return 0
    return max(0, min(math.ceil(rate * nnz), (nnz - 1) // 2, nnz - live_rows))


@torch.no_grad()
def plan_update(mask: Tensor, active: Tensor, magnitude: Tensor, grow: Optional[Tensor], k: int,
                fan_in: int, live_rows: int, generator: torch.Generator) -> Tensor:
    """The new topology mask of one constant fan-in layer (see the module docstring).

    Args:
        mask: the layer's bool topology mask (rows = first dimension); it has ``live_rows``
            rows of ``fan_in`` units.
        active: int64 ascending flat positions of the active units (``[nnz]``).
        magnitude: their float32 prune scores (finite), ``[nnz]``.
        grow: float32 finite growth scores over the whole grid (``mask.numel()`` entries, any
            shape), or ``None`` for uniformly random growth.
        k: units to prune by magnitude (:func:`prune_count`; each row's strongest unit is
            kept whatever ``k`` says).
        fan_in, live_rows: the layer's constant fan-in and live-row count.
        generator: random tie-breaks and the dead-unit coin (on ``mask``'s device).

    Returns:
        A bool mask shaped like ``mask`` with exactly ``live_rows · fan_in`` units, each live
        row holding ``fan_in``.
    """
    R = mask.shape[0]
    C = mask.numel() // R
    dev = mask.device
    old = mask.reshape(-1)
    keep = old.clone()
    if k > 0:
        # every live row keeps its strongest unit: magnitude pruning never resets a row
        rows = torch.div(active, C, rounding_mode="floor")
        order = torch.argsort(magnitude, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        first = torch.full((R,), order.numel(), dtype=rank.dtype, device=dev).scatter_reduce(
            0, rows, rank, "amin")
        guarded = rank == first.index_select(0, rows)
        key_prune = magnitude.masked_fill(guarded, float("inf"))
        k = min(k, active.numel() - int(guarded.sum()))
        if k > 0:
            keep[active.index_select(0, topk_indices(key_prune, k, largest=False))] = False
    if grow is not None:
        grow = grow.reshape(-1)
        coin = torch.rand(active.numel(), generator=generator, device=generator.device).to(dev)
        dead = (grow.index_select(0, active) == 0) & keep.index_select(0, active) & (coin < 0.5)
        extra = min(int(dead.sum()), max(1, active.numel() // 2) - k)
        if extra > 0:
            pick = topk_indices(coin.masked_fill(~dead, 2.0), extra, largest=False)
            keep[active.index_select(0, pick)] = False
        noise = torch.rand(old.numel(), generator=generator, device=generator.device).to(dev)
        key = torch.where(grow > 0, grow, -noise)          # no signal: after all, at random
    else:
        key = torch.rand(old.numel(), generator=generator, device=generator.device).to(dev)
    key = key.masked_fill(old, -2.0).masked_fill(keep, float("-inf"))
    keep2 = keep.view(R, C)
    if live_rows < R:
        dropped = int(old.sum()) - int(keep.sum())
        kept = keep2.sum(1)
        sal = kept.to(torch.float32) + (kept > 0).to(torch.float32) * (C + 1)  # stay live
        if dropped:
            hits = torch.zeros(old.numel(), dtype=torch.float32, device=dev)
            hits[topk_indices(key, dropped)] = 1.0
            sal += hits.view(R, C).sum(1)
        tie = torch.rand(R, generator=generator, device=generator.device).to(dev)
        sal += 0.5 * old.view(R, C).any(1).to(torch.float32) + 0.25 * tie
        live = torch.zeros(R, dtype=torch.bool, device=dev)
        live[torch.topk(sal, live_rows).indices] = True
        keep2 &= live[:, None]
    else:
        live = torch.ones(R, dtype=torch.bool, device=dev)
    need = (fan_in - keep2.sum(1)).clamp(min=0) * live
    order = key.view(R, C).argsort(dim=1, descending=True)
    take = torch.arange(C, device=dev)[None, :] < need[:, None]
    grown = torch.zeros(R, C, dtype=torch.bool, device=dev).scatter_(1, order, take)
    return (keep2 | grown).view(mask.shape)


def check_layers(layers: Sequence[Tuple[str, nn.Module]], ablation: bool
                 ) -> List[Tuple[int, int]]:
    """``(live_rows, fan_in)`` of every ``(name, sparse layer)``.

    Raises:
        ValueError: naming the first layer whose live rows differ in size, or (without
            ``ablation``) that has an empty row.
    """
    out = []
    for name, m in layers:
        try:
            live, f = fan_in_of(m.block_mask)
        except ValueError as exc:
            raise ValueError(f"fan_in='constant': sparse layer {name!r}: {exc}; build the "
                             "model with itop.sparsify(..., fan_in='constant')") from None
        R = m.block_mask.shape[0]
        if live < R and not ablation:
            raise ValueError(f"fan_in='constant': sparse layer {name!r} has {R - live} empty "
                             f"rows of {R}; pass ablation=True to train with ablated rows")
        out.append((live, f))
    return out
