"""Sparse layers: :class:`SparseLinear` and :class:`SparseConv2d`.

A sparse layer keeps the weight of an ``nn.Linear``/``nn.Conv2d`` in one of two storages, chosen
by ``block_size``:

* **block storage** (``block_size >= 2``): the weight plane ``[out, in]`` (for a convolution
  ``[Cout, Cin]``, with every kernel tap of a block) is cut into ``bs × bs`` blocks. Only the
  active blocks are stored, in ``values`` (``[nnz, bs, bs]``, or ``[nnz, kh, kw, bs, bs]`` for a
  convolution), and ``layout`` (a :class:`itop_kernels.BlockLayout`) says where they sit. The
  forward and backward run the block-sparse kernels and never touch inactive blocks.
* **element storage** (``block_size == 1``): the paper's unstructured setting.

  - :class:`SparseLinear`: only the active weights are stored, ``values [nnz, 1, 1]``, with a
    block-size-1 ``layout`` (its CSR). On CPU tensors the forward and backward are real sparse
    products (MKL CSR × dense for ``Y`` and ``dX``, ``dW`` sampled at the nonzeros only); on
    CUDA tensors there is no block-1 kernel, so the forward scatters ``values`` into a dense
    weight and runs ``F.linear`` (masked dense, no speedup) and warns once.
  - :class:`SparseConv2d`: ``values`` is the plain dense weight ``[Cout, Cin/groups, kh, kw]``,
    kept at zero outside an element mask, and the forward multiplies it by the mask (no
    speedup, every device). ``layout`` is ``None``.

Both storages implement one small internal interface (:mod:`itop.storage`); the layers and the
topology manager go only through it, so a true CPU sparse path for block 1 is a new storage
class and touches neither.

In both storages the *topology mask* ``block_mask`` is a bool buffer (``[R, C]`` blocks, or the
weight's shape for element storage) saved in the ``state_dict``. Loading a ``state_dict``
rebuilds the layout and resizes ``values`` when the checkpoint's nnz differs, so a freshly
built model loads a trained checkpoint.

Feature counts the block size does not divide: the constructors raise ``ValueError`` naming the
argument; :func:`itop.sparsify` leaves such layers dense with one warning listing them
(no internal padding: padded blocks would take part of the nnz budget and distort densities).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from itop_kernels import BlockLayout
from itop_kernels.block_norms import (block_grad_norms, block_grad_norms_group,
                                     conv2d_block_grad_norms)

from . import capture
from .storage import install_layout, storage_for

__all__ = ["SparseLinear", "SparseConv2d", "SparseLayer", "check_density", "nnz_for_density",
           "INITS"]

# how from_dense / sparsify pick the active units of a dense weight
INITS = ("random", "magnitude")


def check_density(density, name: str = "density") -> float:
    """Validate a density: a real number in ``(0, 1]``; returns it as a float."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(density).__name__}")
    density = float(density)
    if math.isnan(density) or not 0.0 < density <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {density!r}")
    return density


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


def _check_positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def nnz_for_density(density: float, units: int) -> int:
    """Active units for a density: ``round(density · units)``, clamped to ``[1, units]``."""
    return min(units, max(1, int(round(density * units))))


def _random_mask(shape, nnz: int, device) -> Tensor:
    """A bool mask of ``shape`` with exactly ``nnz`` True entries, uniformly at random (global RNG)."""
    units = math.prod(shape)
    flat = torch.zeros(units, dtype=torch.bool, device=device)
    flat[torch.randperm(units, device="cpu")[:nnz].to(device)] = True
    return flat.view(shape)


def _magnitude_mask(scores: Tensor, nnz: int) -> Tensor:
    """The ``nnz`` largest entries of ``scores`` (any shape), as a bool mask."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[torch.topk(scores.reshape(-1).float(), nnz).indices] = True
    return flat.view(scores.shape)


def _memory_format_blind(fn):
    """``fn`` (what ``nn.Module._apply`` maps over parameters and buffers), made to accept the
    5-D block ``values`` of a :class:`SparseConv2d` under ``model.to(memory_format=...)``.

    ``Module.to(memory_format=torch.channels_last)`` converts every 4-D and 5-D tensor, and a
    5-D tensor has no channels-last format (torch raises "required rank 4 tensor to use
    channels_last format"). Block values are not an activation: the kernels read them in their
    own block order, whatever the model's memory format. For such a tensor ``fn`` is applied to
    a 4-D view ``[nnz·kh, kw, bs, bs]``, which carries out the device and dtype conversion, and
    the result is laid out contiguously again (same values, same shape).
    """
    def apply(t: Tensor) -> Tensor:
        if t.dim() != 5:
            return fn(t)
        try:
            return fn(t)
        except RuntimeError as exc:
            if "channels_last" not in str(exc):
                raise
        return fn(t.reshape(-1, *t.shape[2:])).contiguous().view(t.shape)
    return apply


class SparseLayer(nn.Module):
    """Base class of the sparse layers; holds what :class:`itop.TopologyManager` relies on.

    Attributes:
        values: ``nn.Parameter``, the stored weights (see the module docstring for the shapes).
        block_mask: bool buffer, the topology mask (``[R, C]`` blocks, or element-level).
        layout: :class:`itop_kernels.BlockLayout`, or ``None`` for a ``block_size=1``
            :class:`SparseConv2d` (element masks on a dense weight).
        block_size: int.
        bias: ``nn.Parameter`` ``[out]`` or ``None``.
    """

    values: nn.Parameter
    block_mask: Tensor
    layout: Optional[BlockLayout]
    block_size: int

    def _setup_sparse(self, dense_shape: Tuple[int, ...], density: float, bound: float,
                      factory: dict) -> None:
        """Pick the storage, a random mask with exact nnz, and ``U(-bound, bound)`` values."""
        self._storage = st = storage_for(self.block_size, conv=len(dense_shape) == 4)
        shape = st.mask_shape(dense_shape, self.block_size)
        nnz = nnz_for_density(density, math.prod(shape))
        mask = _random_mask(shape, nnz, factory["device"])
        self.values = nn.Parameter(st.init_values(mask, nnz, dense_shape, self.block_size,
                                                  bound, factory))
        self.register_buffer("block_mask", mask)
        self._nnz = nnz
        self._reset_capture()
        self._rebuild_layout()

    def _sync_layout(self) -> None:
        """Rebuild the layout if ``block_mask`` was overwritten in place from outside (DDP
        broadcasting rank 0's buffers into a model built with other masks, say). Costs an int
        comparison when nothing changed.

        The forward calls it in eager mode only: under ``torch.compile``/``torch.export`` the
        version counter is data the graph cannot branch on, so there the
        :class:`~itop.TopologyManager` calls it on every step (and every topology change,
        ``load_state_dict`` and device move rebuilds the layout itself)."""
        if self.block_mask._version == self._mask_version:
            return
        nnz = int(self.block_mask.sum())
        if tuple(self._storage.values_shape(self, nnz)) != tuple(self.values.shape):
            raise RuntimeError(f"block_mask was overwritten with {nnz} active blocks, but values "
                               f"holds {self.values.shape[0]}; load masks with load_state_dict")
        self._nnz = nnz
        self._rebuild_layout()

    # ------------------------------------------------------------------ facts
    @property
    def nnz(self) -> int:
        """Active units: blocks (block storage) or weights (``block_size=1``)."""
        return self._nnz

    @property
    def num_units(self) -> int:
        """All units (active or not) of the topology mask."""
        return self.block_mask.numel()

    @property
    def unit_numel(self) -> int:
        """Weights per unit of the mask (``bs²``, ``bs²·kh·kw`` for a conv, 1 for element storage)."""
        return self._storage.unit_numel(self.dense_weight_shape, self.block_size)

    @property
    def density(self) -> float:
        """Current fraction of active weights, ``nnz / num_units``."""
        return self._nnz / self.num_units

    @property
    def dense_weight_shape(self) -> Tuple[int, ...]:
        """Shape of the equivalent dense weight."""
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """The dense weight, zeros outside the active units (differentiable w.r.t. ``values``)."""
        self._sync_layout()
        return self._storage.dense_weight(self)

    # ------------------------------------------------------------------ topology interface
    def _active_units(self, p: int = 1) -> Tuple[Tensor, Tensor]:
        """``(positions, norms)``: int64 ascending flat mask positions of the active units and the
        float32 Lp norm of each one's values (the magnitude prune score)."""
        self._sync_layout()
        return self._storage.active_units(self, p)

    def _reset_capture(self) -> None:
        """Unarmed, nothing kept, and a capture key of this instance's own."""
        self._captured: list = []
        self._capture_armed = False
        self._capture_owner: object = None
        self._capture_key = capture.new_capture_key()

    def _start_capture(self, owner: object = None) -> None:
        """Keep this step's input and output gradient (for growth scores) from now on;
        ``owner`` (a topology manager's token) is remembered for :meth:`_stop_capture`."""
        if not self._capture_armed:
            self._captured = []
            self._capture_armed = True
            capture.register(self._capture_key, self)
        self._capture_owner = owner

    def _stop_capture(self, owner: object = None) -> None:
        """Stop capturing and drop whatever was kept. With an ``owner``, only if that owner
        armed the capture: a manager being dropped must not disarm its successor's."""
        if owner is not None and self._capture_owner is not owner:
            return
        capture.unregister(self._capture_key)
        self._capture_armed = False
        self._captured = []
        self._capture_owner = None

    @property
    def _capturing(self) -> bool:
        return self._capture_armed

    def _captured_output(self, x: Tensor, y: Tensor) -> Tensor:
        """``y``, through the capture ops when armed and autograd records this forward."""
        if self._capture_armed and torch.is_grad_enabled() and y.requires_grad:
            return capture.capture(y, x, self._capture_key)
        return y

    def __getstate__(self):
        """Capture state is per instance and per manager: a deep copy or a pickle (``torch.save``
        of the whole model) carries none of it: the copy starts unarmed, with nothing kept."""
        state = self.__dict__.copy()
        state["_captured"] = []
        state["_capture_armed"] = False
        state["_capture_owner"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._reset_capture()

    def _captured_pairs(self) -> List[Tuple[Tensor, Tensor]]:
        return [(e[0], e[1]) for e in self._captured if e[1] is not None]

    def _grad_scores(self, precision: str = "exact") -> Optional[Tensor]:
        """float32 mask-shaped norms of the dense weight gradient of the captured batch(es),
        or ``None`` when nothing was captured. Never materializes the dense gradient (block
        storage). ``precision``: see :mod:`itop_kernels.block_norms`."""
        raise NotImplementedError

    @torch.no_grad()
    def _apply_topology(self, drop: Tensor, add: Tensor, optimizer=None) -> None:
        """Deactivate the active units in slots ``drop`` (indices into the order of
        :meth:`_active_units`) and activate the inactive units at flat mask positions ``add``,
        ``[k]`` int64 each, in place.

        Surviving units keep their values, gradient and optimizer state; new units start at zero
        with zero state. ``values`` stays the same Parameter with the same shape. No host sync.
        """
        self._sync_layout()
        self._storage.apply_topology(self, drop, add, optimizer)   # block_mask too, in place
        self._mask_version = self.block_mask._version

    @staticmethod
    @torch.no_grad()
    def _apply_topology_group(layers: List["SparseLayer"], positions: Tensor, drop: Tensor,
                              add: Tensor, optimizer=None) -> Tensor:
        """:meth:`_apply_topology` of several layers of one storage, grid, nnz, ``k``, values
        shape, dtype and device in one batched chain of ops (row ``g`` of ``positions``
        (their ``_active_units`` positions, ``[G, nnz]``), ``drop`` and ``add`` (``[G, k]``)
        belongs to ``layers[g]``); the result is the same, layer by layer. Returns the new masks,
        bool ``[G, num_units]``. No host sync."""
        masks = layers[0]._storage.apply_topology_group(layers, positions, drop, add, optimizer)
        for m in layers:
            m._mask_version = m.block_mask._version
        return masks

    def _copy_dense(self, w: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                    init: str) -> None:
        if mask is None:
            if init == "magnitude":
                mask = _magnitude_mask(self._storage.dense_unit_norms(self, w), self._nnz)
            elif init == "random":
                mask = self.block_mask
            else:
                raise ValueError(f"init must be 'random' or 'magnitude', got {init!r}")
        else:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or \
                    tuple(mask.shape) != tuple(self.block_mask.shape):
                raise ValueError(f"mask must be a bool tensor of shape "
                                 f"{tuple(self.block_mask.shape)}")
            mask = mask.to(self.block_mask.device)
        nnz = int(mask.sum())
        if nnz < 1:
            raise ValueError("mask must have at least one active unit")
        with torch.no_grad():
            self.block_mask.copy_(mask)
            self._nnz = nnz
            self._rebuild_layout()
            self.values.data = self._storage.values_from_dense(self, w.to(self.values.dtype))
            if bias is not None:
                self.bias.data.copy_(bias.detach())

    # ------------------------------------------------------------------ state dict / device
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "block_mask"
        if key in state_dict:
            mask = state_dict[key]
            if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(self.block_mask.shape):
                error_msgs.append(
                    f"size mismatch for {key}: copying a mask of shape "
                    f"{tuple(getattr(mask, 'shape', ()))}, the layer's is "
                    f"{tuple(self.block_mask.shape)}")
                return
            nnz = int(mask.bool().sum())
            if nnz < 1:
                error_msgs.append(f"{key} has no active unit")
                return
            shape = tuple(self._storage.values_shape(self, nnz))
            if shape != tuple(self.values.shape):
                self.values.data = self.values.data.new_zeros(shape)
                if self.values.grad is not None:
                    self.values.grad = None
            self._nnz = nnz
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._rebuild_layout()

    def _rebuild_layout(self) -> None:
        """The layout of ``block_mask``, written into the current one in place when nnz is the
        same (:func:`itop.storage.install_layout`)."""
        install_layout(self, self._storage.build_layout(self.block_mask, self.block_size,
                                                         self._nnz))
        self._mask_version = self.block_mask._version

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(_memory_format_blind(fn), *args, **kwargs)
        if self.layout is not None and self.layout.device != self.block_mask.device:
            self.layout = self.layout.to(self.block_mask.device)
        self._mask_version = self.block_mask._version
        return out

    def _operands(self, x: Tensor):
        """``(x, values, bias)`` cast to the autocast dtype when autocast is on for x's device
        (as ``nn.Linear``/``nn.Conv2d`` would be); the casts are differentiable."""
        values, bias = self.values, self.bias
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            ct = torch.get_autocast_dtype(dev)
            x, values = x.to(ct), values.to(ct)
            bias = bias.to(ct) if bias is not None else None
        return x, values, bias

    def _density_repr(self) -> str:
        return f"density={self.density:.4f}, nnz={self._nnz}/{self.num_units}, " \
               f"block_size={self.block_size}"


class SparseLinear(SparseLayer):
    """A linear layer ``y = x·Wᵀ + b`` whose weight ``W [out_features, in_features]`` is sparse.

    Args:
        in_features, out_features: as ``nn.Linear``; ``block_size`` must divide both
            (``ValueError`` otherwise).
        bias: learn an additive bias ``[out_features]`` (dense).
        density: fraction of active blocks in ``(0, 1]``; the layer gets exactly
            ``nnz = round(density · R · C)`` blocks (at least 1), placed uniformly at random
            (torch's global RNG).
        block_size: side of a square block; 1 means unstructured (element-level) sparsity: a
            real CSR path on CPU tensors, masked dense (with a one-time warning) on CUDA.
        device, dtype: of the parameters.

    Attributes:
        values: ``nn.Parameter`` ``[nnz, bs, bs]`` (``[nnz, 1, 1]`` for ``block_size=1``),
            initialized like ``nn.Linear``: ``U(-1/√in, 1/√in)``.
        layout: :class:`~itop_kernels.BlockLayout` (at block size 1 too).
        block_mask: bool buffer ``[out/bs, in/bs]`` (``[out, in]`` for ``block_size=1``).

    Input ``[..., in_features]`` -> output ``[..., out_features]``, in the parameters' dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 density: float = 0.1, block_size: int = 32, device=None, dtype=None):
        super().__init__()
        self.in_features = _check_positive_int(in_features, "in_features")
        self.out_features = _check_positive_int(out_features, "out_features")
        density = check_density(density)
        self.block_size = bs = _check_block_size(block_size)
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if n % bs:
                raise ValueError(f"block_size={bs} does not divide {name}={n}; use a block size "
                                 "that divides it (itop.sparsify leaves such layers dense)")
        factory = {"device": device, "dtype": dtype}
        bound = 1.0 / math.sqrt(in_features)
        self._setup_sparse((out_features, in_features), density, bound, factory)
        self.bias = (nn.Parameter(torch.empty(out_features, **factory).uniform_(-bound, bound))
                     if bias else None)

    @property
    def dense_weight_shape(self) -> Tuple[int, int]:
        return (self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in_features] -> [..., out_features]``."""
        if not torch.compiler.is_compiling():
            self._sync_layout()
        x0 = x
        x, values, bias = self._operands(x)
        return self._captured_output(x0, self._storage.linear(self, x, values, bias))

    def _grad_scores(self, precision: str = "exact") -> Optional[Tensor]:
        pairs = self._captured_pairs()
        if not pairs:
            return None
        xs = [a.reshape(-1, self.in_features) for a, _ in pairs]
        dys = [g.reshape(-1, self.out_features) for _, g in pairs]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        dy = (dys[0] if len(dys) == 1 else torch.cat(dys)).to(x.dtype)
        return block_grad_norms(x, dy, self.block_size, precision=precision)

    def _grad_score_key(self) -> Optional[tuple]:
        """What layers scored together by :meth:`_grad_scores_group` share (features, block
        size, the rows of each captured micro-batch, dtypes, device), or None where this layer
        is scored alone: nothing captured, a subclass with its own :meth:`_grad_scores`, or a
        captured tensor that is not contiguous (so each layer's GEMM sees the operand layout
        :meth:`_grad_scores` gives it)."""
        if type(self)._grad_scores is not SparseLinear._grad_scores:
            return None
        pairs = self._captured_pairs()
        if not pairs:
            return None
        K, N = self.in_features, self.out_features
        rows = []
        for a, g in pairs:
            if not (a.is_contiguous() and g.is_contiguous()) or a.dtype != pairs[0][0].dtype or \
                    g.dtype != pairs[0][1].dtype:
                return None
            rows.append(a.numel() // K)
        a, g = pairs[0]
        return (K, N, self.block_size, tuple(rows), a.dtype, g.dtype, a.device)

    @staticmethod
    def _grad_scores_group(layers: List["SparseLinear"], precision: str = "exact") -> Tensor:
        """float32 ``[G, out/bs, in/bs]``: :meth:`_grad_scores` of ``G`` layers with one
        :meth:`_grad_score_key` at once (:func:`~itop_kernels.block_norms.block_grad_norms_group`:
        bit for bit the per-layer scores on the CPU, one batched GEMM per chunk on a GPU)."""
        m0 = layers[0]
        xs, dys = [], []
        for m in layers:
            pairs = m._captured_pairs()
            xs.append([a.reshape(-1, m0.in_features) for a, _ in pairs])
            dys.append([g.reshape(-1, m0.out_features) for _, g in pairs])
        return block_grad_norms_group(xs, dys, m0.block_size, precision=precision)

    @classmethod
    def from_dense(cls, module: nn.Linear, *, density: float = 0.1, block_size: int = 32,
                   mask: Optional[Tensor] = None, init: str = "random") -> "SparseLinear":
        """A :class:`SparseLinear` holding ``module``'s weights at the active blocks.

        Args:
            module: an ``nn.Linear``.
            density: fraction of active blocks (ignored when ``mask`` is given).
            block_size: must divide both feature counts.
            mask: optional bool topology mask ``[out/bs, in/bs]`` (``[out, in]`` for block 1).
            init: how to pick the blocks when ``mask`` is None: ``"random"`` (uniform, exact
                nnz) or ``"magnitude"`` (the blocks of largest L2 norm).
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module must be an nn.Linear, got {type(module).__name__}")
        return cls.from_weight(module.weight, module.bias, density=density,
                               block_size=block_size, mask=mask, init=init)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Optional[Tensor] = None, *, density: float = 0.1,
                    block_size: int = 32, mask: Optional[Tensor] = None,
                    init: str = "random") -> "SparseLinear":
        """A :class:`SparseLinear` computing ``x·weightᵀ + bias`` from a dense weight tensor.

        For linear layers that are not ``nn.Linear`` modules: the packed q/k/v projection of
        ``nn.MultiheadAttention`` (``in_proj_weight``), or Hugging Face's ``Conv1D``
        (pass its weight transposed: ``Conv1D`` computes ``x·W + b`` with ``W [in, out]``).

        Args:
            weight: ``[out_features, in_features]`` float tensor (values are copied).
            bias: ``[out_features]`` or ``None``.
            density, block_size, mask, init: as :meth:`from_dense`.
        """
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor [out, in], got "
                             f"{tuple(getattr(weight, 'shape', ()))}")
        out_f, in_f = weight.shape
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (out_f,)):
            raise ValueError(f"bias must be None or a tensor of shape [{out_f}], got "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        layer = cls(in_f, out_f, bias is not None, density=density, block_size=block_size,
                    device=weight.device, dtype=weight.dtype)
        layer._copy_dense(weight.detach(), bias, mask, init)
        return layer

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the dense weight (zeros outside the active blocks) and bias."""
        w = self.values
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._density_repr()}")


def _pair(v, name: str) -> Tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(a, int) and not isinstance(a, bool) for a in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


class SparseConv2d(SparseLayer):
    """A 2-D convolution whose weight ``[Cout, Cin, kh, kw]`` is block-sparse over channels.

    A block covers ``bs`` output × ``bs`` input channels and every kernel tap; the weight has
    ``R × C = (Cout/bs) × (Cin/bs)`` blocks.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
            ``nn.Conv2d`` (zero padding only; ``padding`` may be ints, a pair, ``"valid"`` or
            ``"same"`` for stride 1). ``groups`` must be 1 unless ``block_size == 1``.
        density: fraction of active blocks in ``(0, 1]``; exactly ``round(density·R·C)``
            blocks (at least 1), placed uniformly at random.
        block_size: side of a channel block (must divide ``in_channels`` and ``out_channels``);
            1 means element-level masks (every weight, tap by tap) on a dense weight.
        device, dtype: of the parameters.

    Attributes:
        values: ``nn.Parameter`` ``[nnz, kh, kw, bs, bs]`` (block storage) or
            ``[Cout, Cin/groups, kh, kw]`` (``block_size=1``), initialized like ``nn.Conv2d``:
            ``U(-1/√fan_in, 1/√fan_in)`` with ``fan_in = Cin/groups·kh·kw``.
        layout: :class:`~itop_kernels.BlockLayout` or ``None`` for ``block_size=1``.
        block_mask: bool buffer ``[Cout/bs, Cin/bs]`` (the weight's shape for ``block_size=1``).

    Input ``[B, Cin, H, W]`` -> output ``[B, Cout, Ho, Wo]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, *, density: float = 0.1,
                 block_size: int = 16, device=None, dtype=None):
        super().__init__()
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        self.out_channels = _check_positive_int(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        self.groups = _check_positive_int(groups, "groups")
        if isinstance(padding, str):
            if padding == "valid":
                padding = 0
            elif padding == "same":
                if self.stride != (1, 1):
                    raise ValueError("padding='same' needs stride 1")
                tot = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
                if any(t % 2 for t in tot):
                    raise ValueError("padding='same' needs an even dilation·(kernel_size-1)")
                padding = (tot[0] // 2, tot[1] // 2)
            else:
                raise ValueError(f"padding must be ints, a pair, 'valid' or 'same', got {padding!r}")
        self.padding = _pair(padding, "padding")
        density = check_density(density)
        self.block_size = bs = _check_block_size(block_size)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        if groups != 1 and bs != 1:
            raise ValueError(f"groups={groups} needs block_size=1 (block-sparse convolutions "
                             "are not grouped)")
        for name, n in (("in_channels", in_channels), ("out_channels", out_channels)):
            if n % bs:
                raise ValueError(f"block_size={bs} does not divide {name}={n}; use a block size "
                                 "that divides it (itop.sparsify leaves such layers dense)")
        factory = {"device": device, "dtype": dtype}
        kh, kw = self.kernel_size
        cin_g = in_channels // groups
        bound = 1.0 / math.sqrt(cin_g * kh * kw)
        self._setup_sparse((out_channels, cin_g, kh, kw), density, bound, factory)
        self.bias = (nn.Parameter(torch.empty(out_channels, **factory).uniform_(-bound, bound))
                     if bias else None)

    @property
    def dense_weight_shape(self) -> Tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, Cin, H, W] -> [B, Cout, Ho, Wo]``."""
        if not torch.compiler.is_compiling():
            self._sync_layout()
        x0 = x
        x, values, bias = self._operands(x)
        return self._captured_output(x0, self._storage.conv2d(self, x, values, bias))

    def _grad_scores(self, precision: str = "exact") -> Optional[Tensor]:
        pairs = self._captured_pairs()
        if not pairs:
            return None
        args = dict(weight_shape=self.dense_weight_shape, block_size=self.block_size,
                    stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups,
                    reduce_taps=not self._storage.units_include_taps, precision=precision)
        # micro-batches (gradient accumulation, any spatial sizes): their gradients add up
        return conv2d_block_grad_norms([a for a, _ in pairs],
                                       [g.to(a.dtype) for a, g in pairs], **args)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, *, density: float = 0.1, block_size: int = 16,
                   mask: Optional[Tensor] = None, init: str = "random") -> "SparseConv2d":
        """A :class:`SparseConv2d` holding ``module``'s weights at the active blocks.

        Args:
            module: an ``nn.Conv2d`` with ``padding_mode='zeros'``.
            density, block_size, mask, init: as :meth:`SparseLinear.from_dense`.
        """
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"module must be an nn.Conv2d, got {type(module).__name__}")
        if module.padding_mode != "zeros":
            raise ValueError(f"only padding_mode='zeros' is supported, got {module.padding_mode!r}")
        w = module.weight
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                    module.padding, module.dilation, module.groups, module.bias is not None,
                    density=density, block_size=block_size, device=w.device, dtype=w.dtype)
        layer._copy_dense(w.detach(), module.bias, mask, init)
        return layer

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the dense weight (zeros outside the active blocks) and bias."""
        w = self.values
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, self.bias is not None,
                         device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}, {self._density_repr()}"
