"""How a sparse layer stores its active units: the one internal interface between the sparse
layers (and through them the topology manager) and the weight storage.

* :class:`BlockStorage` (``block_size >= 2``): only the active ``bs × bs`` blocks are stored
  (``values [nnz, bs, bs]`` or ``[nnz, kh, kw, bs, bs]``), with a
  :class:`itop_kernels.BlockLayout`; the forward runs the block-sparse kernels.
* :class:`CsrStorage` (``block_size == 1``, linear layers): only the active weights are
  stored, as ``values [nnz, 1, 1]`` with a :class:`itop_kernels.BlockLayout` of block size 1
  (its row/column CSR). On CPU tensors the forward and backward run the CSR path of
  :func:`itop_kernels.block_sparse_linear` (MKL sparse × dense products, ``dW`` sampled at the
  nonzeros only). The Triton kernels have no block size 1: on CUDA tensors (and under
  ``TRITON_INTERPRET=1``) the forward scatters the values into a dense weight and runs
  ``F.linear`` (masked dense, no speedup) and warns once.
* :class:`MaskedDenseStorage` (``block_size == 1``, convolutions): the dense weight, kept at
  zero outside an element mask, selected by the mask in the forward (no speedup). It selects
  (``torch.where``, ``masked_fill``) and never multiplies by the mask: ``NaN × 0`` is NaN, so a
  pruned NaN/Inf weight would otherwise stay in the weight and poison every output.

A storage object is stateless; it reads and writes the layer's ``values``, ``block_mask``,
``layout`` and ``_nnz``. :func:`storage_for` picks one.
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from itop_kernels import BlockLayout, block_sparse_linear
from itop_kernels.dispatch import use_triton

__all__ = ["BlockStorage", "CsrStorage", "MaskedDenseStorage", "storage_for", "install_layout"]


def _state_tensors(layer, optimizer) -> Iterator[Tensor]:
    """``values``, its gradient, and every optimizer state tensor shaped like ``values``."""
    p = layer.values
    yield p            # (callers run under no_grad: no alias needed)
    if p.grad is not None:
        yield p.grad
    if optimizer is not None:
        for v in optimizer.state.get(p, {}).values():
            if isinstance(v, Tensor) and v.shape == p.shape:
                yield v


# Topology changes rewrite a layer's layout in place (BlockLayout.copy_) when the new one has
# the same nnz, so captured CUDA graphs stay valid. Tests switch it off to compare with
# installing a new layout object.
_INPLACE_LAYOUT = True


# How apply_topology moves the rows of values, its gradient and optimizer state: "stacked"
# (all tensors of one dtype in one gather: about half the device ops, plus a copy of them) or
# "per_tensor" (two ops per tensor, no extra copy: less memory traffic, what a large layer on the
# CPU wants); "auto" stacks on accelerators and, on the CPU, for small layers (at most
# _STACK_MAX_CPU elements per tensor), where the update is bound by per-op host cost.
_STATE_MOVE = "auto"
_STACK_MAX_CPU = 1 << 16
# the zero of the new rows, one 0-dim tensor per device, made once (torch.where does not take a
# Python scalar with out=, and a CPU scalar beside CUDA tensors is not accepted by every torch
# build's torch.where)
_ZEROS: Dict[torch.device, Tensor] = {}


def _zero(device: torch.device) -> Tensor:
    """A cached float32 0-dim zero on ``device`` (it promotes to the other operand's dtype)."""
    z = _ZEROS.get(device)
    if z is None:
        z = _ZEROS[device] = torch.zeros((), device=device)
    return z


def _move_rows(tensors: List[Tensor], order: Tensor, keep: Tensor) -> None:
    """``t[i] = t[order[i]] if keep[i] else 0`` for every tensor (``[nnz, ...]``), in place.

    Args:
        tensors: same first dimension ``nnz``; values, its gradient, optimizer state.
        order: int64 ``[nnz]``, the old row each new row comes from.
        keep: bool ``[nnz]``, False where the new row starts at zero.
    """
    nnz = order.numel()
    mode = _STATE_MOVE
    if mode == "auto":
        small = tensors[0].numel() <= _STACK_MAX_CPU
        mode = "stacked" if order.device.type != "cpu" or small else "per_tensor"
    t0 = tensors[0]
    if mode == "stacked" and len(tensors) > 1 and all(
            t.is_contiguous() and t.dtype == t0.dtype and t.shape == t0.shape for t in tensors):
        moved = torch.stack(tensors).index_select(1, order)
        torch.where(keep.view(-1, *([1] * (t0.dim() - 1))), moved, _zero(t0.device),
                    out=moved)
        torch._foreach_copy_(tensors, moved.unbind(0))
        return
    keep2 = keep.view(-1, 1)
    for t in tensors:
        if not t.is_contiguous():
            rows, k = t, keep.view(-1, *([1] * (t.dim() - 1)))
        elif t.numel() == nnz:   # one weight per row (block size 1): index_select on [nnz, 1, 1]
            rows, k = t.view(-1), keep   # is several times slower than on [nnz]
        else:
            rows, k = t.view(nnz, -1), keep2
        torch.where(k, rows.index_select(0, order), _zero(t.device), out=rows)


# (G, T, nnz, device) -> int64 [G, T, 1]: the first row of each of the G·T stacked tensors in
# the flat [G·T·nnz, ...] view _move_rows_group gathers from
_ROW_BASES: Dict[tuple, Tensor] = {}


def _move_rows_group(groups: List[List[Tensor]], order: Tensor, keep: Tensor) -> None:
    """:func:`_move_rows` for the tensors of several layers at once: ``groups[g]`` are layer
    ``g``'s tensors (values, its gradient, optimizer state), moved by row ``g`` of ``order``
    and ``keep`` (``[G, nnz]``). When every layer has the same number of tensors, all of one
    shape, dtype and contiguous, and the stacked move applies (:data:`_STATE_MOVE`), it is
    one ``stack``, one ``index_select``, one ``where`` and one ``_foreach_copy_`` for all of
    them; otherwise each layer moves on its own. Copies only: the result is the same either
    way."""
    G, nnz = order.shape
    T = len(groups[0])
    flat = [t for ts in groups for t in ts]
    t0 = flat[0]
    mode = _STATE_MOVE
    if mode == "auto":
        mode = ("stacked" if order.device.type != "cpu" or t0.numel() <= _STACK_MAX_CPU
                else "per_tensor")
    if mode != "stacked" or any(len(ts) != T for ts in groups) or not all(
            t.is_contiguous() and t.dtype == t0.dtype and t.shape == t0.shape for t in flat):
        for g, ts in enumerate(groups):
            _move_rows(ts, order[g], keep[g])
        return
    key = (G, T, nnz, order.device)
    base = _ROW_BASES.get(key)
    if base is None:
        base = _ROW_BASES[key] = (torch.arange(G * T, dtype=torch.int64, device=order.device)
                                  * nnz).view(G, T, 1)
    rows = (order.view(G, 1, nnz) + base).view(-1)
    moved = torch.stack(flat).view(G * T * nnz, -1).index_select(0, rows)
    m4 = moved.view(G, T, nnz, -1)
    torch.where(keep.view(G, 1, nnz, 1), m4, _zero(t0.device), out=m4)
    torch._foreach_copy_(flat, moved.view(G * T, *t0.shape).unbind(0))


def install_layout(layer, layout: Optional[BlockLayout]) -> None:
    """Make ``layout`` the layer's: written into the layer's current layout in place when both
    have the same grid, block size, nnz and device (the tensors the kernels read keep their
    identities and addresses), else installed as a new object (nnz changed: a captured graph
    must be captured again)."""
    old = getattr(layer, "layout", None)
    if (_INPLACE_LAYOUT and old is not None and layout is not None and old is not layout
            and old.grid_shape == layout.grid_shape and old.block_size == layout.block_size
            and old.nnz == layout.nnz and old.device == layout.device):
        old.copy_(layout)
    else:
        layer.layout = layout


class BlockStorage:
    """Active blocks only, with a :class:`~itop_kernels.BlockLayout`."""

    units_include_taps = False  # one unit = one (out-block, in-block) pair, all kernel taps

    @staticmethod
    def mask_shape(dense_shape: Tuple[int, ...], bs: int) -> Tuple[int, int]:
        return (dense_shape[0] // bs, dense_shape[1] // bs)

    @staticmethod
    def unit_numel(dense_shape: Tuple[int, ...], bs: int) -> int:
        taps = 1
        for k in dense_shape[2:]:
            taps *= k
        return bs * bs * taps

    @staticmethod
    def init_values(mask: Tensor, nnz: int, dense_shape, bs: int, bound: float,
                    factory: dict) -> Tensor:
        """``U(-bound, bound)`` values for the ``nnz`` active blocks."""
        return torch.empty(nnz, *dense_shape[2:], bs, bs, **factory).uniform_(-bound, bound)

    @staticmethod
    def build_layout(mask: Tensor, bs: int, nnz: int) -> Optional[BlockLayout]:
        return BlockLayout.from_mask(mask.clone(), bs, nnz=nnz)

    @staticmethod
    def values_shape(layer, nnz: int) -> Tuple[int, ...]:
        return (nnz, *layer.values.shape[1:])

    @staticmethod
    def values_from_dense(layer, w: Tensor) -> Tensor:
        return layer.layout.gather(w)

    @staticmethod
    def dense_weight(layer) -> Tensor:
        return layer.layout.scatter(layer.values)

    @staticmethod
    def dense_unit_norms(layer, w: Tensor) -> Tensor:
        """L2 norm of every block of a dense weight: ``[R, C]``."""
        R, C = layer.block_mask.shape
        bs = layer.block_size
        sq = w.reshape(R, bs, C, bs, *w.shape[2:]).float().square()
        return sq.sum(dim=tuple(d for d in range(sq.dim()) if d not in (0, 2))).sqrt()

    @staticmethod
    def active_units(layer, p: int) -> Tuple[Tensor, Tensor]:
        """``(positions, norms)`` of the active blocks, in ``values`` order: int64 ascending
        flat grid positions ``r*C + c`` and the float32 Lp norm of each block's values."""
        with torch.no_grad():
            v = layer.values
            flat = v.reshape(v.shape[0], -1).float()
            s = flat.abs().sum(1) if p == 1 else flat.square().sum(1).sqrt()
        return layer.layout.flat_positions(), s

    @staticmethod
    def apply_topology(layer, drop: Tensor, add: Tensor, optimizer) -> None:
        """Drop the active blocks in slots ``drop`` (rows of ``values``, the order of
        :meth:`active_units`) and activate the blocks at flat positions ``add`` (``[k]``
        each): rows of ``values``, its gradient and its optimizer state move to the new layout's
        order in place, rows of new blocks become zero, and ``layer.block_mask`` and the layout
        are rewritten in place. Time proportional to ``nnz``, no host sync, about 20 device ops
        (``benchmarks/NOTES.md``, "Update cost")."""
        layout = layer.layout
        pos = layout.flat_positions()
        mask = layer.block_mask.view(-1)
        # The arriving blocks take over the dropped blocks' slots, so sorting the positions
        # gives the new row-major order and, through `order`, where each new row comes from.
        new_pos = pos.clone()
        new_pos.index_copy_(0, drop, add)
        gone = pos.index_select(0, drop)
        inplace = _INPLACE_LAYOUT
        if inplace:    # sorted straight into the layout's own positions
            order = torch.empty(pos.shape, dtype=torch.int64, device=pos.device)
            sorted_pos = torch.sort(new_pos, stable=True, out=(pos, order))[0]
        else:
            sorted_pos, order = torch.sort(new_pos, stable=True)
        keep = mask.index_select(0, sorted_pos)       # False: a new block (the old mask)
        mask.index_fill_(0, gone, False).index_fill_(0, add, True)
        _move_rows(list(_state_tensors(layer, optimizer)), order, keep)
        if inplace:
            layout.block_mask.copy_(layer.block_mask)
            layout.rewrite_sorted_positions_()
        else:
            install_layout(layer, BlockLayout.from_positions(
                sorted_pos, layer.block_mask.shape, layer.block_size,
                block_mask=layer.block_mask.clone(), check=False))

    @staticmethod
    def apply_topology_group(layers, positions: Tensor, drop: Tensor, add: Tensor,
                             optimizer) -> Tensor:
        """:meth:`apply_topology` of ``G`` layers with the same grid, block size, nnz, ``k``,
        values shape, dtype and device, as one chain of batched ops (issue 14: the op count of
        an update grows with the number of such groups, not of layers). Row ``g`` of every
        argument belongs to ``layers[g]``; each layer ends exactly as :meth:`apply_topology`
        leaves it, and every tensor is rewritten in place (same addresses).

        Args:
            layers: the sparse layers, layouts rewritten in place (``_INPLACE_LAYOUT``).
            positions: int64 ``[G, nnz]``, each layer's ``layout.flat_positions()`` (stacked).
            drop: int64 ``[G, k]``, slots (rows of ``values``) to deactivate.
            add: int64 ``[G, k]``, flat positions of inactive units to activate.
            optimizer: whose state of each layer's ``values`` moves with the rows.

        Returns:
            bool ``[G, R·C]``: the new masks (a fresh tensor).
        """
        new_pos = positions.scatter(1, drop, add)
        gone = positions.gather(1, drop)
        sorted_pos, order = torch.sort(new_pos, dim=1, stable=True)
        masks2d = torch.stack([m.block_mask for m in layers])   # [G, R, C]
        masks = masks2d.view(len(layers), -1)
        keep = masks.gather(1, sorted_pos)              # False: a new block (the old mask)
        masks.scatter_(1, gone, False).scatter_(1, add, True)
        _move_rows_group([list(_state_tensors(m, optimizer)) for m in layers], order, keep)
        rows = list(masks2d.unbind(0))
        torch._foreach_copy_([m.block_mask for m in layers] + [m.layout.block_mask for m in layers],
                             rows + rows)
        BlockLayout.rewrite_sorted_positions_group_([m.layout for m in layers], sorted_pos)
        return masks

    @staticmethod
    def linear(layer, x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        return block_sparse_linear(x, values, layer.layout, bias)

    @staticmethod
    def conv2d(layer, x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        try:
            from itop_kernels import block_sparse_conv2d
        except ImportError as exc:  # the conv kernels are not in this build
            raise RuntimeError("SparseConv2d with block_size > 1 needs "
                               "itop_kernels.block_sparse_conv2d, which is missing") from exc
        return block_sparse_conv2d(x, values, layer.layout, bias, stride=layer.stride,
                                   padding=layer.padding, dilation=layer.dilation)


class CsrStorage(BlockStorage):
    """Element-level sparsity of a linear weight (``block_size == 1``): the active weights only,
    ``values [nnz, 1, 1]``, with a block-size-1 :class:`~itop_kernels.BlockLayout`. Everything
    but the forward is :class:`BlockStorage`'s, so topology updates, optimizer state, magnitude
    and gradient scores behave exactly as at other block sizes."""

    warned_masked_dense = False

    @staticmethod
    def linear(layer, x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        if not use_triton(x):   # CPU tensors: the real CSR path
            return block_sparse_linear(x, values, layer.layout, bias)
        if not CsrStorage.warned_masked_dense:
            CsrStorage.warned_masked_dense = True
            warnings.warn("block_size=1 has no GPU kernel: on CUDA tensors SparseLinear runs it "
                          "as a dense weight with zeros outside the mask (masked dense, no "
                          "speedup); use block_size >= 16 for the block-sparse kernels",
                          stacklevel=3)
        return F.linear(x, layer.layout.scatter(values), bias)


class MaskedDenseStorage:
    """Element-level masks on a dense weight (``block_size == 1`` convolutions); ``layout`` is
    ``None``."""

    units_include_taps = True  # one unit = one weight, kernel taps included

    @staticmethod
    def mask_shape(dense_shape: Tuple[int, ...], bs: int) -> Tuple[int, ...]:
        return tuple(dense_shape)

    @staticmethod
    def unit_numel(dense_shape: Tuple[int, ...], bs: int) -> int:
        return 1

    @staticmethod
    def init_values(mask: Tensor, nnz: int, dense_shape, bs: int, bound: float,
                    factory: dict) -> Tensor:
        """The dense ``U(-bound, bound)`` weight, zero outside ``mask``."""
        return torch.empty(dense_shape, **factory).uniform_(-bound, bound).masked_fill_(~mask, 0)

    @staticmethod
    def build_layout(mask: Tensor, bs: int, nnz: int) -> Optional[BlockLayout]:
        return None

    @staticmethod
    def values_shape(layer, nnz: int) -> Tuple[int, ...]:
        return tuple(layer.values.shape)

    @staticmethod
    def values_from_dense(layer, w: Tensor) -> Tensor:
        return w.masked_fill(~layer.block_mask, 0)

    @staticmethod
    def dense_weight(layer) -> Tensor:
        return _select(layer.values, layer.block_mask)

    @staticmethod
    def dense_unit_norms(layer, w: Tensor) -> Tensor:
        return w.abs().float()

    @staticmethod
    def active_units(layer, p: int) -> Tuple[Tensor, Tensor]:
        """``(positions, |w|)`` of the active weights: int64 ascending flat positions in the
        weight and their float32 magnitudes (for one weight every Lp norm is ``|w|``)."""
        pos = layer.block_mask.reshape(-1).nonzero().squeeze(1)
        return pos, layer.values.detach().reshape(-1)[pos].abs().float()

    @staticmethod
    def apply_topology(layer, drop: Tensor, add: Tensor, optimizer) -> None:
        """Zero the weights, gradient and optimizer state of the dropped weights (slots ``drop``
        in the order of :meth:`active_units`) and of the new ones (``add``, flat positions), and
        write the new mask into ``layer.block_mask``."""
        mask = layer.block_mask.clone()
        flat = mask.view(-1)
        flat[flat.nonzero().squeeze(1)[drop]] = False
        flat[add] = True
        gone = ~(layer.block_mask & mask)
        for t in _state_tensors(layer, optimizer):
            t.masked_fill_(gone, 0)
        layer.block_mask.copy_(mask)

    @staticmethod
    def linear(layer, x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.linear(x, _select(values, layer.block_mask), bias)

    @staticmethod
    def conv2d(layer, x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.conv2d(x, _select(values, layer.block_mask), bias, layer.stride,
                        layer.padding, layer.dilation, layer.groups)


def _select(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` where ``mask``, exact zeros elsewhere (whatever is stored there, NaN and Inf
    included); differentiable, its gradient is zero outside ``mask``."""
    return torch.where(mask, values, values.new_zeros(()))


def storage_for(block_size: int, conv: bool = False):
    """The storage class: active blocks for ``block_size >= 2``; at block size 1 the CSR storage
    for linear layers and element masks on a dense weight for convolutions (``conv=True``)."""
    if block_size != 1:
        return BlockStorage
    return MaskedDenseStorage if conv else CsrStorage
