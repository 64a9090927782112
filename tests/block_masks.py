"""Block masks for the kernel tests whose transpose metadata is a real permutation.

The dX kernels walk each block-column through ``t_block_idx``; when that is the identity (one
active block per column, or columns whose blocks come in row order) a kernel that reads
``values[j]`` instead of ``values[t_block_idx[j]]`` still passes. A random 3×2 mask with an
empty block-row is such a mask every time, so the masks here are built to avoid it.
"""
from __future__ import annotations

import torch

from itop_kernels import BlockLayout


def add_transposing_blocks(mask: torch.Tensor, r0: int = 0, r1: int = -1) -> torch.Tensor:
    """Activate blocks ``(r0, 0)``, ``(r1, 0)`` and ``(r0, C-1)`` of an ``[R, C]`` mask (``R, C >= 2``,
    ``r0 < r1``), in place: block-column 0 then holds two blocks, and block ``(r1, 0)`` comes
    before ``(r0, C-1)`` in column-major order but after it in row-major order, so the transpose
    permutation cannot be the identity. Returns ``mask``."""
    R, C = mask.shape
    r1 = r1 % R
    if R < 2 or C < 2 or not 0 <= r0 < r1:
        raise ValueError(f"need R, C >= 2 and 0 <= r0 < r1 < R, got mask {R}x{C}, rows {r0}, {r1}")
    mask[r0, 0] = mask[r1, 0] = mask[r0, C - 1] = True
    return mask


def assert_real_transpose(mask: torch.Tensor) -> None:
    """The layout of ``mask`` has a block-column with two or more blocks and a transpose
    permutation (``t_block_idx``) that is not the identity."""
    lay = BlockLayout.from_mask(mask.cpu(), 1)
    per_column = lay.col_ptr[1:] - lay.col_ptr[:-1]
    assert int(per_column.max()) >= 2, f"no block-column holds two blocks:\n{mask.int()}"
    identity = torch.arange(lay.nnz, dtype=lay.t_block_idx.dtype)
    assert not torch.equal(lay.t_block_idx, identity), f"identity transpose:\n{mask.int()}"


def random_mask(R: int, C: int, density: float, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Block masks for the edge cases, drawn from ``gen``:

    - ``random``: each block active with probability ``density``, plus (when ``R, C >= 2``) the
      blocks of :func:`add_transposing_blocks`, so the transpose is a real permutation;
    - ``empty_rows``: like ``random`` with every odd block-row empty (the transposing blocks sit
      in block-rows 0 and the last even one; ``R >= 3``);
    - ``plain``: each block active with probability ``density``, nothing added (any mask);
    - ``dense``, ``empty``.
    """
    if kind == "dense":
        return torch.ones(R, C, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(R, C, dtype=torch.bool)
    mask = torch.rand(R, C, generator=gen) < density
    if kind == "plain":
        return mask
    if kind == "empty_rows":
        if R < 3 or C < 2:
            raise ValueError(f"empty_rows needs R >= 3 and C >= 2, got {R}x{C}")
        mask[1::2] = False
        add_transposing_blocks(mask, 0, (R - 1) // 2 * 2)
    elif kind == "random":
        if R >= 2 and C >= 2:
            add_transposing_blocks(mask)
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    if R >= 2 and C >= 2:
        assert_real_transpose(mask)
    return mask
