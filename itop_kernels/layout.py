"""Block layouts: which blocks of a weight are active, plus the index metadata the kernels need.

A weight of shape ``[rows, cols]`` (a linear layer's ``[out, in]``, or a convolution's
``[Cout, Cin]`` channel plane) is cut into ``block_size × block_size`` blocks, giving a block
grid of ``R = rows / block_size`` block-rows and ``C = cols / block_size`` block-columns.
A :class:`BlockLayout` records which of those ``R × C`` blocks are active and carries three
views of the same set, each built on the mask's device with torch ops and no Python loop over
blocks:

* row-wise CSR (``row_ptr``, ``col_idx``) for the forward ``Y = X·Wᵀ``: the blocks of block-row
  ``r`` are ``values[row_ptr[r]:row_ptr[r+1]]`` and sit in block-columns ``col_idx[...]``.
  The order of active blocks in ``values`` is row-major (the order of ``block_mask.flatten()``).
* column-wise CSR, the transpose metadata (``col_ptr``, ``t_row_idx``, ``t_block_idx``), for
  ``dX = dY·W``: the ``k``-th active block in column-major order lies in block-column ``c`` with
  ``col_ptr[c] <= k < col_ptr[c+1]``, in block-row ``t_row_idx[k]``, and its values are
  ``values[t_block_idx[k]]``. Kernels read columns through it, so no atomics are needed.
* the active-block list (``row_idx``, ``col_idx``) for the sampled ``dW``: block ``i`` is at
  ``(row_idx[i], col_idx[i])``.

All index tensors are ``int32`` on the mask's device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["BlockLayout"]

# CPU masks find their active positions with nonzero (the device path uses a sort with a known
# nnz, which needs no host sync). Tests switch it off to check that both builds agree.
_CPU_FAST_BUILD = True


def _active_positions(flat_mask: torch.Tensor, nnz: int) -> torch.Tensor:
    """Ascending flat positions of the ``True`` entries of a 1-D bool mask, as int64.

    Uses a stable sort instead of ``nonzero`` so that, when ``nnz`` is already known, nothing
    waits on the device.
    """
    order = torch.sort((~flat_mask).to(torch.uint8), stable=True).indices
    return order[:nnz]


# (G, R, C, device) -> the grid starts of BlockLayout._grid_starts repeated over G layouts,
# contiguous (the batched searchsorted takes one row of boundaries per layout)
_GROUP_STARTS: dict = {}


def _group_starts(layout: "BlockLayout", G: int) -> tuple:
    R, C = layout.grid_shape
    key = (G, R, C, layout.device)
    hit = _GROUP_STARTS.get(key)
    if hit is None:
        rows, cols = layout._grid_starts()
        hit = _GROUP_STARTS[key] = (rows.expand(G, -1).contiguous(),
                                    cols.expand(G, -1).contiguous())
    return hit


class BlockLayout:
    """Active blocks of a block-sparse weight and the index metadata the kernels need.

    Build one with :meth:`from_mask` (or :meth:`from_positions`). Attributes (index tensors are
    int32, on the mask's device):

    - ``block_mask``: bool ``[R, C]``.
    - ``block_size``: int, the side of a square block.
    - ``nnz``: int, the number of active blocks.
    - ``row_ptr`` ``[R+1]``, ``col_idx`` ``[nnz]``: row-wise CSR, in ``values`` order.
    - ``row_idx`` ``[nnz]``: the block-row of each active block (with ``col_idx``, the
      active-block list used by ``dW``).
    - ``col_ptr`` ``[C+1]``, ``t_row_idx`` ``[nnz]``, ``t_block_idx`` ``[nnz]``: column-wise CSR
      (transpose metadata); ``t_block_idx`` points into ``values``.

    ``values`` holds one entry per active block, in row-major block order:
    ``[nnz, bs, bs]`` for a linear weight (``values[i] = W[r*bs:(r+1)*bs, c*bs:(c+1)*bs]``) and
    ``[nnz, kh, kw, bs, bs]`` for a conv weight (``values[i, a, b] = W[r-block, c-block, a, b]``,
    each kernel tap a contiguous ``[out, in]`` tile).
    """

    __slots__ = (
        "block_mask", "block_size", "nnz", "row_ptr", "col_idx", "row_idx",
        "col_ptr", "t_row_idx", "t_block_idx", "_host_cache", "_positions", "version",
        "_starts",
    )

    def __init__(self, *args, **kwargs):  # pragma: no cover - guard against misuse
        raise TypeError("build a BlockLayout with BlockLayout.from_mask(block_mask, block_size)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mask(cls, block_mask: torch.Tensor, block_size: int, *, nnz: Optional[int] = None
                  ) -> "BlockLayout":
        """Build a layout from a bool block mask.

        Args:
            block_mask: bool tensor ``[R, C]``; ``True`` marks an active block. For a conv weight
                ``R`` counts out-channel blocks and ``C`` in-channel blocks.
            block_size: side of a square block, a positive int (the Triton kernels take 16, 32,
                64 or 128; the CPU path takes any).
            nnz: the number of active blocks, if the caller already knows it. Passing it avoids
                the one device-to-host sync (counting the mask) that the build otherwise needs.

        Returns:
            A :class:`BlockLayout` whose index tensors live on ``block_mask.device``.
        """
        if not isinstance(block_mask, torch.Tensor):
            raise TypeError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must have dtype torch.bool, got {block_mask.dtype}")
        if block_mask.dim() != 2:
            raise ValueError(f"block_mask must be 2-D [R, C], got shape {tuple(block_mask.shape)}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        mask = block_mask.contiguous()
        R, C = mask.shape
        if nnz is None:
            nnz = int(mask.sum())  # the one unavoidable sync: the sizes below depend on it
        elif isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= R * C:
            raise ValueError(f"nnz must be an int in [0, {R * C}], got {nnz!r}")

        flat = mask.reshape(-1)
        if mask.device.type == "cpu" and _CPU_FAST_BUILD:
            pos = flat.nonzero().squeeze(1)           # no device to wait for on the CPU
            if pos.numel() != nnz:
                raise ValueError(f"nnz={nnz} but the mask has {pos.numel()} active blocks")
        else:
            pos = _active_positions(flat, nnz)        # no host sync when nnz is known
        return cls._from_positions(pos, mask, block_size)

    @classmethod
    def from_positions(cls, positions: torch.Tensor, grid_shape: Sequence[int], block_size: int,
                       *, block_mask: Optional[torch.Tensor] = None,
                       check: bool = True) -> "BlockLayout":
        """Build a layout from the flat positions ``r*C + c`` of its active blocks.

        This is what a topology update uses: it knows which blocks stay and which arrive, so the
        build costs time proportional to ``nnz`` (a sort of ``nnz`` ints), not to the grid, and
        never waits on the device.

        Args:
            positions: int tensor ``[nnz]``, strictly ascending flat positions in ``[0, R*C)``
                (not checked on a GPU, where checking would wait on the device).
            grid_shape: ``(R, C)``.
            block_size: side of a square block, a positive int.
            block_mask: the bool ``[R, C]`` mask of the same blocks, if the caller has it
                (it is built from ``positions`` otherwise).
            check: verify on the CPU that ``positions`` is strictly ascending and in range
                (one pass; callers that built them sorted and distinct may skip it).
        """
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or \
                positions.dtype not in (torch.int32, torch.int64):
            raise TypeError("positions must be a 1-D int32/int64 tensor")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        R, C = (int(v) for v in grid_shape)
        pos = positions.to(torch.int64, copy=True)  # the layout keeps it: not the caller's
        if check and pos.device.type == "cpu" and pos.numel() and not (
                int(pos[0]) >= 0 and int(pos[-1]) < R * C and bool((pos[1:] > pos[:-1]).all())):
            raise ValueError(f"positions must be strictly ascending in [0, {R * C})")
        if block_mask is None:
            block_mask = torch.zeros(R * C, dtype=torch.bool, device=pos.device)
            block_mask[pos] = True
            block_mask = block_mask.view(R, C)
        elif tuple(block_mask.shape) != (R, C) or block_mask.dtype != torch.bool:
            raise ValueError(f"block_mask must be a bool tensor of shape {(R, C)}")
        return cls._from_positions(pos, block_mask.contiguous(), block_size)

    @classmethod
    def _from_positions(cls, pos: torch.Tensor, mask: torch.Tensor, block_size: int
                        ) -> "BlockLayout":
        """The metadata from the ascending row-major positions ``pos = r*C + c`` (int64), in
        time proportional to ``nnz`` and with no host sync: what keeps element-level layouts
        (``block_size=1``, a grid as large as the weight) cheap to rebuild."""
        R, C = mask.shape
        self = object.__new__(cls)
        self.block_mask = mask
        self.block_size = block_size
        self.nnz = nnz = pos.numel()
        self.version = 0
        self._host_cache = None
        self._starts = None
        self._positions = pos
        dev = pos.device
        self.row_idx = torch.empty(nnz, dtype=torch.int32, device=dev)
        self.col_idx = torch.empty(nnz, dtype=torch.int32, device=dev)
        self.row_ptr = torch.empty(R + 1, dtype=torch.int32, device=dev)
        self.t_block_idx = torch.empty(nnz, dtype=torch.int32, device=dev)
        self.t_row_idx = torch.empty(nnz, dtype=torch.int32, device=dev)
        self.col_ptr = torch.empty(C + 1, dtype=torch.int32, device=dev)
        self._derive_index()
        return self

    def _grid_starts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r·C for r in 0..R, int64 [R+1]; c for c in 0..C, int32 [C+1])``: the first flat
        position of every block-row and the block-columns, what the CSR pointers are binary
        searches of. Fixed for a grid, so built once per layout (an update reuses them)."""
        if self._starts is None:
            R, C = self.block_mask.shape
            dev = self.block_mask.device
            self._starts = (torch.arange(R + 1, dtype=torch.int64, device=dev) * C,
                            torch.arange(C + 1, dtype=torch.int32, device=dev))
        return self._starts

    def _derive_index(self) -> None:
        """Write every index tensor but ``block_mask`` from ``_positions`` (int64, ascending
        row-major ``r*C + c``), into the tensors this layout already holds (``out=``): seven
        device ops, no allocation that outlives the call, no host sync. Time proportional to
        ``nnz`` (a sort of ``nnz`` ints) plus ``R + C`` binary searches."""
        pos = self._positions
        C = self.block_mask.shape[1]
        row_starts, col_starts = self._grid_starts()
        torch.div(pos, C, rounding_mode="floor", out=self.row_idx)
        torch.remainder(pos, C, out=self.col_idx)
        # row r's entries start at the first position >= r*C (R+1 binary searches)
        torch.searchsorted(pos, row_starts, out_int32=True, out=self.row_ptr)
        # Column-major order = the row-major entries stably sorted by column (each column's
        # entries are already in row order); the sort permutation is t_block_idx itself.
        t_col, perm = torch.sort(self.col_idx, stable=True)
        self.t_block_idx.copy_(perm)
        torch.index_select(self.row_idx, 0, perm, out=self.t_row_idx)
        torch.searchsorted(t_col, col_starts, out_int32=True, out=self.col_ptr)

    def rewrite_sorted_positions_(self) -> "BlockLayout":
        """Rebuild the layout in place after ``flat_positions()`` was overwritten with the new
        active blocks (ascending, same ``nnz``; a topology update sorts straight into it with
        ``torch.sort(..., out=)``), and ``block_mask`` with the matching mask. Every index tensor
        keeps its identity and address (a CUDA graph captured before stays valid), ``version``
        goes up by one, and nothing waits on the device. The positions are not checked.

        Returns:
            ``self``.
        """
        self._derive_index()
        self._host_cache = None
        self.version += 1
        return self

    @staticmethod
    def rewrite_sorted_positions_group_(layouts: Sequence["BlockLayout"],
                                        positions: torch.Tensor) -> None:
        """:meth:`rewrite_sorted_positions_` for several layouts of one grid and nnz at once:
        the index metadata of all of them is computed by one chain of batched ops over
        ``positions`` and written into each layout's own tensors with one ``_foreach_copy_`` per
        dtype (one fused launch per list on a GPU), so the op count does not grow with the
        number of layouts. Each layout's result is the one :meth:`rewrite_sorted_positions_`
        gives (the same integer ops row by row; stable sorts of distinct keys).

        Args:
            layouts: layouts with the same grid, block size, nnz and device; their
                ``block_mask`` must already hold the new masks.
            positions: int64 ``[len(layouts), nnz]``, row ``g`` the new ascending flat
                positions of ``layouts[g]`` (written into its ``flat_positions()`` here).
        """
        G, nnz = positions.shape
        first = layouts[0]
        R, C = first.grid_shape
        dev = positions.device
        row_starts, col_starts = _group_starts(first, G)
        i32 = dict(dtype=torch.int32, device=dev)
        row_idx = torch.empty((G, nnz), **i32)
        col_idx = torch.empty((G, nnz), **i32)
        torch.div(positions, C, rounding_mode="floor", out=row_idx)
        torch.remainder(positions, C, out=col_idx)
        row_ptr = torch.searchsorted(positions, row_starts, out_int32=True)
        t_col, perm = torch.sort(col_idx, dim=1, stable=True)
        t_row_idx = row_idx.gather(1, perm)
        col_ptr = torch.searchsorted(t_col, col_starts, out_int32=True)
        t_block_idx = perm.to(torch.int32)
        dst, src = [], []
        for name, stacked in (("row_idx", row_idx), ("col_idx", col_idx), ("row_ptr", row_ptr),
                              ("t_block_idx", t_block_idx), ("t_row_idx", t_row_idx),
                              ("col_ptr", col_ptr)):
            dst += [getattr(lay, name) for lay in layouts]
            src += stacked.unbind(0)
        torch._foreach_copy_(dst, src)
        torch._foreach_copy_([lay._positions for lay in layouts], positions.unbind(0))
        for lay in layouts:
            lay._host_cache = None
            lay.version += 1

    def flat_positions(self) -> torch.Tensor:
        """int64 ``[nnz]``: the flat grid position ``r*C + c`` of each active block, in
        ``values`` order (ascending). The layout's own tensor: do not modify it."""
        return self._positions

    # the tensors copy_ rewrites, in place
    _INDEX_TENSORS = ("block_mask", "row_ptr", "col_idx", "row_idx", "col_ptr", "t_row_idx",
                      "t_block_idx", "_positions")

    def copy_(self, other: "BlockLayout") -> "BlockLayout":
        """Take ``other``'s blocks, writing them into this layout's own tensors in place.

        A topology update changes which blocks are active but not how many, so every index
        tensor keeps its shape: rewriting them in place keeps their identities (and device
        addresses), so a CUDA graph or a ``torch.compile(mode="reduce-overhead")`` step
        captured before the update reads the new topology when replayed. Device-side copies
        only, no host sync. ``version`` goes up by one (code that caches anything derived from a
        layout must key it on ``(layout, layout.version)``).

        Args:
            other: a layout with the same grid, block size, nnz and device.

        Returns:
            ``self``.
        """
        if not isinstance(other, BlockLayout):
            raise TypeError(f"other must be a BlockLayout, got {type(other).__name__}")
        if (other.grid_shape != self.grid_shape or other.block_size != self.block_size
                or other.nnz != self.nnz or other.device != self.device):
            raise ValueError(f"copy_ needs the same grid, block size, nnz and device: {self!r} "
                             f"vs {other!r}")
        if other is not self:
            for name in self._INDEX_TENSORS:
                getattr(self, name).copy_(getattr(other, name))
            self._host_cache = None
            self.version += 1
        return self

    @staticmethod
    def grid_for(weight_shape: Sequence[int], block_size: int) -> tuple[int, int]:
        """Block grid ``(R, C)`` of a weight ``[rows, cols, ...]`` cut into ``block_size`` blocks.

        Raises ``ValueError`` naming the dimension that ``block_size`` does not divide.
        """
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if len(weight_shape) < 2:
            raise ValueError(f"weight_shape must have at least 2 dims, got {tuple(weight_shape)}")
        rows, cols = int(weight_shape[0]), int(weight_shape[1])
        for name, n in (("rows (out features / out channels)", rows),
                        ("cols (in features / in channels)", cols)):
            if n % block_size:
                raise ValueError(f"block_size {block_size} does not divide the weight's {name} = "
                                 f"{n}; pad the weight or pick a block size that divides it")
        return rows // block_size, cols // block_size

    # ------------------------------------------------------------------ properties
    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(R, C)``: block-rows and block-columns."""
        return tuple(self.block_mask.shape)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the dense weight plane: ``(R * block_size, C * block_size)``."""
        R, C = self.block_mask.shape
        return (R * self.block_size, C * self.block_size)

    @property
    def device(self) -> torch.device:
        return self.block_mask.device

    @property
    def density(self) -> float:
        """Fraction of active blocks (``nnz / (R*C)``); 0.0 for an empty grid."""
        R, C = self.block_mask.shape
        return self.nnz / (R * C) if R * C else 0.0

    def host_pointers(self) -> tuple[list[int], list[int]]:
        """``(row_ptr, col_ptr)`` as Python lists, cached; used by the CPU implementation."""
        if self._host_cache is None:
            self._host_cache = (self.row_ptr.tolist(), self.col_ptr.tolist())
        return self._host_cache

    def to(self, device) -> "BlockLayout":
        """A copy of this layout on ``device`` (``self`` if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        out = object.__new__(BlockLayout)
        for name in self.__slots__:
            val = getattr(self, name)
            setattr(out, name, val.to(device) if isinstance(val, torch.Tensor) else val)
        out._host_cache = self._host_cache
        out._starts = None
        return out

    def values_shape(self, kernel_size: Sequence[int] = ()) -> tuple[int, ...]:
        """Shape of ``values`` for this layout: ``[nnz, *kernel_size, bs, bs]``."""
        bs = self.block_size
        return (self.nnz, *tuple(kernel_size), bs, bs)

    def __repr__(self) -> str:
        R, C = self.block_mask.shape
        return (f"BlockLayout(grid={R}x{C}, block_size={self.block_size}, nnz={self.nnz}, "
                f"density={self.density:.4f}, device={self.device})")

    # ------------------------------------------------------------------ gather / scatter
    def _check_dense(self, dense: torch.Tensor) -> None:
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"dense_weight must be a torch.Tensor, got {type(dense).__name__}")
        if dense.dim() not in (2, 4):
            raise ValueError("dense_weight must be 2-D [out, in] or 4-D [Cout, Cin, kh, kw], "
                             f"got shape {tuple(dense.shape)}")
        self.grid_for(dense.shape, self.block_size)  # names a dimension bs does not divide
        if tuple(dense.shape[:2]) != self.shape:
            raise ValueError(f"dense_weight has shape {tuple(dense.shape)}, but the layout covers "
                             f"[{self.shape[0]}, {self.shape[1]}] (block grid "
                             f"{self.grid_shape} of block_size {self.block_size})")
        if dense.device != self.device:
            raise ValueError(f"dense_weight is on {dense.device}, the layout on {self.device}")

    def gather(self, dense_weight: torch.Tensor) -> torch.Tensor:
        """Pick the active blocks out of a dense weight.

        ``[out, in] -> [nnz, bs, bs]`` and ``[Cout, Cin, kh, kw] -> [nnz, kh, kw, bs, bs]``.
        Differentiable; returns a new contiguous tensor.
        """
        self._check_dense(dense_weight)
        R, C = self.grid_shape
        bs = self.block_size
        rows, cols = self.row_idx.long(), self.col_idx.long()
        if dense_weight.dim() == 2:
            blocks = dense_weight.reshape(R, bs, C, bs).permute(0, 2, 1, 3)  # [R, C, bs, bs]
        else:
            kh, kw = dense_weight.shape[2:]
            # [R, bs, C, bs, kh, kw] -> [R, C, kh, kw, bs_out, bs_in]
            blocks = dense_weight.reshape(R, bs, C, bs, kh, kw).permute(0, 2, 4, 5, 1, 3)
        return blocks[rows, cols].contiguous()

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`gather`: a dense weight with zeros outside the active blocks.

        ``[nnz, bs, bs] -> [out, in]`` and ``[nnz, kh, kw, bs, bs] -> [Cout, Cin, kh, kw]``.
        Differentiable with respect to ``values``.
        """
        bs = self.block_size
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.dim() not in (3, 5) or values.shape[0] != self.nnz or tuple(values.shape[-2:]) != (bs, bs):
            raise ValueError(f"values must have shape [nnz={self.nnz}, bs, bs] or "
                             f"[nnz={self.nnz}, kh, kw, bs, bs] with bs={bs}, got {tuple(values.shape)}")
        if values.device != self.device:
            raise ValueError(f"values is on {values.device}, the layout on {self.device}")
        R, C = self.grid_shape
        taps = tuple(values.shape[1:-2])
        grid = values.new_zeros((R, C, *taps, bs, bs))
        grid = grid.index_put((self.row_idx.long(), self.col_idx.long()), values)
        if not taps:
            return grid.permute(0, 2, 1, 3).reshape(R * bs, C * bs)
        kh, kw = taps
        # [R, C, kh, kw, bs_out, bs_in] -> [R, bs_out, C, bs_in, kh, kw]
        return grid.permute(0, 4, 1, 5, 2, 3).reshape(R * bs, C * bs, kh, kw)
