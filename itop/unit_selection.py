"""Which units a topology update drops and grows: exact top-k and uniform random choices whose
cost follows the number of units chosen, not the size of the grid, where that is possible.

At block size 1 a layer's "grid" is its whole weight (a million units for a 1024² layer) while
an update moves a few percent of the ~5 % that are active. ``torch.topk`` over the grid and a
random score per unit cost more on the CPU than the training step itself; the two functions
here avoid that:

- :func:`topk_indices`: the exact top-k of a 1-D key. On the CPU, for a large key and ``k`` up
  to half of it, a strided sample of the key gives a threshold that at least ``k`` entries
  pass; one vectorized comparison keeps those candidates and ``torch.topk`` runs on them only.
  If the threshold lets fewer than ``k`` through (adversarial keys), it falls back to
  ``torch.topk`` over everything, so the result is always exact. On a GPU ``torch.topk`` is
  already a radix select and runs as is.
- :func:`random_inactive`: ``k`` distinct units drawn uniformly from the inactive ones, by
  drawing units uniformly, throwing away the active ones and keeping the first ``k`` distinct
  draws (a uniform ``k``-subset): time proportional to ``k``. Small grids, crowded grids and
  GPUs (where the number of draws kept would need a host sync) score every unit with
  ``torch.rand`` instead.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["topk_indices", "random_inactive"]

# Keys shorter than this take torch.topk / per-unit random scores directly (cheap enough: on
# the CPU, torch.topk gets several times slower per entry beyond ~32k entries).
_SELECT_MIN = 1 << 15
# Entries of the strided sample that sets the threshold of topk_indices.
_SAMPLE = 4096


def topk_indices(key: Tensor, k: int, *, largest: bool = True) -> Tensor:
    """Positions of the ``k`` largest (or smallest) entries of a 1-D key, unsorted.

    Args:
        key: 1-D float tensor without NaN (map NaN first, as the topology manager does).
        k: how many, ``0 <= k <= key.numel()``.
        largest: ``False`` for the ``k`` smallest.

    Returns:
        int64 ``[k]``. The same set as ``torch.topk(key, k, largest=largest)`` (up to the choice
        among entries tied with the k-th value).
    """
    n = key.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=key.device)
    if key.device.type != "cpu" or n < _SELECT_MIN or 2 * k > n:
        return torch.topk(key, k, largest=largest, sorted=False).indices
    sample = key[::max(1, n // _SAMPLE)]
    s = sample.numel()
    # The sample's r-th extreme value: about r·n/s entries of the key pass it, 1.5·k plus a
    # margin of 16 sample ranks (several standard deviations of that count).
    r = min(s, (3 * k * s) // (2 * n) + 16)
    thresh = torch.topk(sample, r, largest=largest, sorted=True).values[-1]
    passing = key >= thresh if largest else key <= thresh
    cand = passing.nonzero().squeeze(1)
    if cand.numel() < k:  # the sample misjudged the key: fall back to the exact full top-k
        return torch.topk(key, k, largest=largest, sorted=False).indices
    top = torch.topk(key.index_select(0, cand), k, largest=largest, sorted=False).indices
    return cand.index_select(0, top)


def random_inactive(mask: Tensor, k: int, generator: torch.Generator, *,
                    num_active: Optional[int] = None) -> Tensor:
    """``k`` distinct units drawn uniformly at random among the inactive ones.

    Args:
        mask: 1-D bool tensor over all units, ``True`` where a unit is active.
        k: how many to draw, ``0 <= k <=`` the number of inactive units (not checked on a GPU,
            where counting would wait on the device).
        generator: the source of randomness (on ``mask``'s device).
        num_active: the number of ``True`` entries of ``mask``, if the caller knows it.

    Returns:
        int64 ``[k]`` flat positions of inactive units, in no particular order.
    """
    n = mask.numel()
    if mask.device.type == "cpu":
        free = n - (int(torch.count_nonzero(mask)) if num_active is None else num_active)
        if not 0 <= k <= free:
            raise ValueError(f"k must be in [0, {free}] (the inactive units), got {k}")
        if n >= _SELECT_MIN and 4 * k <= free:   # large and not crowded: draw, don't score
            return _first_distinct_inactive(mask, k, free, generator)
    key = torch.rand(n, generator=generator, device=generator.device).to(mask.device)
    key.masked_fill_(mask, -1.0)                 # below every inactive unit's score (>= 0)
    return topk_indices(key, k)


def _first_distinct_inactive(mask: Tensor, k: int, free: int, generator: torch.Generator
                             ) -> Tensor:
    """Uniform draws over all units, the active ones thrown away, are uniform draws over the
    inactive ones; the first ``k`` distinct of those are a uniform ``k``-subset (CPU)."""
    n = mask.numel()
    # enough draws for k distinct with room to spare (twice as many if a round falls short)
    draws = (k + k // 8 + 64 + (k * k) // free) * n // free
    while True:
        cand = torch.randint(n, (draws,), generator=generator)
        cand = cand[~mask.index_select(0, cand)]
        # first occurrence of each value: the smallest draw index that wrote it
        order = torch.arange(cand.numel(), dtype=torch.int32)
        first = torch.empty(n, dtype=torch.int32).scatter_reduce_(
            0, cand, order, reduce="amin", include_self=False)
        distinct = cand[first.index_select(0, cand) == order]  # in draw order
        if distinct.numel() >= k:
            return distinct[:k]
        draws *= 2
