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

Hugging Face's ``Conv1D`` and ``nn.MultiheadAttention`` are sparsified too (see
:func:`sparsify`). Other layers holding a weight matrix, subclasses of ``nn.Linear`` among
them, are left alone and named in a warning.

A layer that shares a parameter with another module (weight tying: an output layer tied to an
embedding) stays dense and is listed in that warning with the tie; a module registered under
several names is replaced by one sparse layer at every name. A sparse layer takes over the
``requires_grad`` flags and the forward/backward hooks of the layer it replaces. A model that
``sparsify`` already processed is refused (a second call would sparsify the layers the
distribution kept dense; :func:`densify` clears that); sparse layers built by hand are kept
as they are. Layers left with fewer active blocks than block-rows, or a single
block, get a :class:`itop.surgery_guards.StarvedLayerWarning`.

``density`` is the overall density of the weights of the layers that can be sparsified
(excluded and ineligible layers do not count). Per-layer block counts are
``round(dᵢ · blocks)``, so the realized overall density is exact up to that rounding;
:func:`sparsity_summary` reports it. With ``fan_in="constant"`` they are
``live rows × fan-in`` instead (:mod:`itop.fan_in`: every row gets at least one unit, the
budget moves between layers to pay for it, and the fan-ins are rounded to whole units).
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .attention import SparseMultiheadAttention, unsupported_attention_reason
from .density import DISTRIBUTIONS
from .fan_in import FAN_IN_MODES, allocate, constant_fan_in_mask, unit_grid
from .layers import INITS, SparseConv2d, SparseLayer, SparseLinear, check_density
from .surgery_guards import (carry_over, clear_sparsified, mark_sparsified, module_names,
                             refuse_second_sparsify, tied_layers, warn_starved_layers)

__all__ = ["sparsify", "densify", "sparsity_summary", "SparsitySummary"]


class SparsitySummary:
    """A printable per-layer table: ``rows`` is a list of dicts with keys ``name``, ``kind``,
    ``shape``, ``block_size`` (None for dense layers), ``density`` (fraction of weights
    active), ``weights`` (dense weight count) and, from a topology manager, ``itop_rate`` and
    ``frozen`` (the manager leaves the layer alone: its ``values`` do not require a gradient).

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
        if any(r.get("frozen") for r in self.rows):
            cols.append("frozen")

        def fmt(r, c):
            v = r.get(c)
            if isinstance(v, float):
                return f"{v:.4f}"
            if v is None or v is False:
                return "-"
            if v is True:
                return "yes"
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


def _ineligible_reason(m: nn.Module, bs: int, kind: str = "") -> Optional[str]:
    if kind in ("conv1d", "mha", "mha-in"):
        if kind != "conv1d":
            reason = unsupported_attention_reason(m)
            if reason is not None:
                return reason
        out, inp = _weight_shapes(m, kind)[0]
        if out % bs or inp % bs:
            return f"block_size {bs} does not divide [{out}, {inp}]"
        return None
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


def _is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2, GPT): a linear layer with a transposed weight
    ``[in, out]``, ``y = x·W + b``. Recognized without importing transformers."""
    t = type(m)
    return (t.__name__ == "Conv1D" and t.__module__.startswith("transformers")
            and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2)


def _layer_kind(m: nn.Module) -> Optional[str]:
    """``"linear"``, ``"conv2d"``, ``"conv1d"`` (HF Conv1D), ``"mha"`` or ``None`` (not one that
    sparsify replaces)."""
    t = type(m)
    if t is nn.Linear:
        return "linear"
    if t is nn.Conv2d:
        return "conv2d"
    if t is nn.MultiheadAttention:
        return "mha"
    if _is_hf_conv1d(m):
        return "conv1d"
    return None


def _weight_shapes(m: nn.Module, kind: str) -> List[Tuple[int, ...]]:
    """The ``[out, in, ...]`` shapes of the weights sparsify makes sparse in ``m``."""
    if kind == "conv1d":
        return [tuple(m.weight.t().shape)]
    if kind == "mha":
        return [tuple(m.in_proj_weight.shape), tuple(m.out_proj.weight.shape)]
    if kind == "mha-in":   # an excluded out_proj stays dense and out of the distribution
        return [tuple(m.in_proj_weight.shape)]
    return [tuple(m.weight.shape)]


def _weight_names(name: str, kind: str) -> List[str]:
    """Names of the weights of :func:`_weight_shapes`, for messages."""
    if kind == "mha":
        return [f"{name}.in_proj", f"{name}.out_proj"]
    if kind == "mha-in":
        return [f"{name}.in_proj"]
    return [name]


def _sparse_module(m: nn.Module, kind: str, densities: Sequence[float],
                   masks: Sequence[Optional[Tensor]], block_size: int, init: str) -> nn.Module:
    """The sparse replacement of ``m`` (a kind from :func:`_layer_kind`): one density and one
    optional topology mask per weight of :func:`_weight_shapes` (a density of 1.0 keeps that
    projection of an attention module dense)."""
    opts = dict(block_size=block_size, init=init)
    if kind in ("mha", "mha-in"):
        d_out, m_out = (densities[1], masks[1]) if kind == "mha" else (1.0, None)
        new = SparseMultiheadAttention.from_dense(m, density=(densities[0], d_out),
                                                  masks=(masks[0], m_out), **opts)
    elif kind == "conv1d":
        # Conv1D computes x·W + b with W [in, out]: a linear layer with weight Wᵀ
        new = SparseLinear.from_weight(m.weight.t(), m.bias, density=densities[0],
                                       mask=masks[0], **opts)
        new._densify_as = type(m)
    elif kind == "linear":
        new = SparseLinear.from_dense(m, density=densities[0], mask=masks[0], **opts)
    else:
        new = SparseConv2d.from_dense(m, density=densities[0], mask=masks[0], **opts)
    new.train(m.training)
    return new


def _weight_layers_left_alone(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Layers holding a weight matrix (a ``weight`` of 2 or more dims, or a recurrent layer)
    that sparsify does not replace: other ``nn.Linear``/``nn.Conv2d`` subclasses, other
    convolutions, ... Embeddings are not listed (ITOP keeps them dense), nor the ``out_proj``
    of an ``nn.MultiheadAttention`` (handled with its parent)."""
    out = []
    for name, m in model.named_modules():
        if _layer_kind(m) is not None or isinstance(m, (SparseLayer, SparseMultiheadAttention,
                                                        nn.Embedding, nn.EmbeddingBag)):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if name and isinstance(parent, (nn.MultiheadAttention, SparseMultiheadAttention)):
            continue
        w = getattr(m, "weight", None)
        if (isinstance(w, Tensor) and w.dim() >= 2) or isinstance(m, nn.RNNBase):
            out.append((name, m))
    return out


def _switch_off_fused_transformer_paths(model: nn.Module) -> None:
    """PyTorch's fused inference fast paths of ``nn.TransformerEncoder``/``EncoderLayer`` read
    the dense ``.weight`` of every projection. Switch them off (with the flags they read) where
    a sparse layer now sits, so that the modules' ordinary forward runs."""
    for m in model.modules():
        if isinstance(m, (nn.TransformerEncoder, nn.TransformerEncoderLayer)) and any(
                isinstance(c, (SparseLayer, SparseMultiheadAttention)) for c in m.modules()):
            if isinstance(m, nn.TransformerEncoder):
                m.use_nested_tensor = False
            else:
                m.activation_relu_or_gelu = 0   # read by the fast path only


def sparsify(model: nn.Module, density: float, *, distribution: str = "erk",
             block_size: int = 32, exclude: Optional[Iterable[Union[str, type]]] = None,
             dense_first: bool = False, verbose: bool = False, init: str = "random",
             fan_in: str = "any", ablation: bool = False) -> nn.Module:
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
        init: which blocks each sparse layer keeps of the dense weights: ``"random"`` (default:
            uniformly random, for training from scratch) or ``"magnitude"`` (the blocks of
            largest L2 norm: for a pretrained checkpoint).
        fan_in: ``"any"`` (default: each layer's active units anywhere) or ``"constant"``:
            every row of a layer (block-row, or output unit at block size 1) gets the same
            number of active units, with the budget moved between layers so that each row
            gets at least one (see :mod:`itop.fan_in`; train it with
            ``TopologyManager(..., fan_in="constant")``).
        ablation: with ``fan_in="constant"``, when the budget cannot give every row one unit,
            keep fewer live rows (the others empty) instead of raising ``ValueError``.

    Returns:
        The model (the new sparse layer if ``model`` was itself a layer). Each sparse layer
        starts from the dense layer's weights at the active blocks (chosen by ``init``), with
        exactly ``round(dᵢ·blocks)`` blocks (at least 1).

    Besides ``nn.Linear`` and ``nn.Conv2d``, two kinds of layers are sparsified:

    * Hugging Face's ``Conv1D`` (GPT-2's attention and MLP; transformers is not imported):
      it becomes a :class:`~itop.SparseLinear` with the transposed weight, and
      :func:`densify` gives a ``Conv1D`` back.
    * ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoder`` and torchvision's ViT):
      it becomes a :class:`~itop.SparseMultiheadAttention` whose packed q/k/v projection
      (``in_proj``, one ``[3E, E]`` layer in the distribution, as the dense module stores it)
      and ``out_proj`` are sparse layers. ``kdim``/``vdim`` other than ``embed_dim``,
      ``add_bias_kv`` and ``add_zero_attn`` leave it dense (with the warning below).

    Other layers holding a weight matrix (subclasses of ``nn.Linear``/``nn.Conv2d``, other
    convolutions, recurrent layers; embeddings aside) stay dense, named in one
    ``UserWarning``, and :func:`sparsity_summary` lists them as dense.

    Raises:
        ValueError: on a density outside ``(0, 1]``, an unknown distribution, a bad block
            size, an unknown ``init``, an ``exclude`` name that matches no module, or a model
            that ``sparsify`` already processed.
        TypeError: on a density that is not a number, a model that is not an ``nn.Module`` (or
            is already wrapped in DDP), or an ``exclude`` entry that is neither a name nor a type.
    """
    density = check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {sorted(DISTRIBUTIONS)}, "
                         f"got {distribution!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if fan_in not in FAN_IN_MODES:
        raise ValueError(f"fan_in must be one of {FAN_IN_MODES}, got {fan_in!r}")
    if not isinstance(ablation, bool):
        raise TypeError(f"ablation must be a bool, got {ablation!r}")
    if fan_in == "constant" and init != "random":
        raise ValueError(f"init={init!r} cannot be combined with fan_in='constant' (the "
                         "constant fan-in topology is drawn, not chosen by magnitude)")
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
    refuse_second_sparsify(model)
    tied = tied_layers(model)

    candidates: List[Tuple[str, nn.Module, str]] = []
    skipped: List[str] = []
    first = True
    for name, m in model.named_modules():
        kind = _layer_kind(m)
        if kind is None:
            continue
        is_first, first = first, False
        if (dense_first and is_first) or _match_exclude(name, m, names, tuple(types)):
            continue
        reason = tied.get(id(m)) or _ineligible_reason(m, block_size, kind)
        if reason is not None:
            skipped.append(f"{name or '<model>'} ({reason})")
            continue
        if kind == "mha" and _match_exclude(f"{name}.out_proj" if name else "out_proj",
                                            m.out_proj, names, tuple(types)):
            kind = "mha-in"
        candidates.append((name, m, kind))
    skipped += [f"{n} ({type(m).__name__}: not a layer type sparsify replaces)"
                for n, m in _weight_layers_left_alone(model)
                if not _match_exclude(n, m, names, tuple(types))]
    if skipped:
        warnings.warn("itop.sparsify leaves these layers dense: " + "; ".join(skipped),
                      UserWarning, stacklevel=2)
    shapes = [_weight_shapes(m, kind) for _, m, kind in candidates]
    flat_shapes = [sh for group in shapes for sh in group]
    flat_d = DISTRIBUTIONS[distribution](flat_shapes, density)
    flat_masks: List[Optional[Tensor]] = [None] * len(flat_shapes)
    if fan_in == "constant":
        flat_names = [n for name, _, kind in candidates for n in _weight_names(name, kind)]
        device = next(iter(m.parameters())).device if candidates else None
        flat_masks = _constant_fan_in_masks(flat_shapes, flat_d, block_size, ablation,
                                            flat_names, device)
    result = model
    aliases = module_names(model)
    i = 0
    for (name, m, kind), group in zip(candidates, shapes):
        ds, masks = flat_d[i:i + len(group)], flat_masks[i:i + len(group)]
        i += len(group)
        # a weight stays dense where its density is 1 (any fan-in) or it got no mask (constant)
        dense = [d >= 1.0 if fan_in == "any" else mk is None for d, mk in zip(ds, masks)]
        if all(dense):
            continue
        ds = [1.0 if dn else min(d, 1.0) for d, dn in zip(ds, dense)]
        new = _sparse_module(m, kind, ds, masks, block_size, init)
        carry_over(m, new)
        if name == "":
            result = new
        else:
            for alias in aliases[id(m)]:  # a module registered twice stays one module
                _set_submodule(model, alias, new)
    _switch_off_fused_transformer_paths(result)
    mark_sparsified(result, {"density": density, "distribution": distribution,
                             "block_size": block_size, "fan_in": fan_in})
    warn_starved_layers(result)
    if verbose:
        print(sparsity_summary(result))
    return result


def _constant_fan_in_masks(shapes: List[Tuple[int, ...]], densities: List[float],
                           block_size: int, ablation: bool, names: List[str],
                           device: Optional[torch.device]) -> List[Optional[Tensor]]:
    """Constant fan-in topology masks, one per weight shape (``[R, C]`` unit grids, the weight's
    shape at block size 1); ``None`` = that weight stays dense."""
    grids = [unit_grid(shape, block_size) for shape in shapes]
    plan = allocate(grids, densities, ablation=ablation, names=names)
    masks: List[Optional[Tensor]] = []
    for shape, (R, C, _), p in zip(shapes, grids, plan):
        if p is None:
            masks.append(None)
            continue
        mask = constant_fan_in_mask(R, C, p[0], p[1], device=device)
        masks.append(mask.view(shape if block_size == 1 else (R, C)))
    return masks


def densify(model: nn.Module) -> nn.Module:
    """Replace every sparse layer of ``model`` by its dense equivalent (``to_dense()``), in place.

    Returns the model (the dense layer if ``model`` was itself a sparse layer).
    """
    root = _unwrap(model)
    clear_sparsified(root)
    if isinstance(root, (SparseLayer, SparseMultiheadAttention)):
        dense = _dense_module(root)
        if root is model:
            return dense
        model.module = dense
        return model
    # attention modules first, whole (their projections are sparse layers too)
    for kinds in ((SparseMultiheadAttention,), (SparseLayer,)):
        for name, m in list(root.named_modules()):
            if isinstance(m, kinds):
                _set_submodule(root, name, _dense_module(m))
    return model


def _dense_module(m: nn.Module) -> nn.Module:
    """The dense module a sparse one came from: ``nn.Linear``/``nn.Conv2d``,
    ``nn.MultiheadAttention``, or a Hugging Face ``Conv1D`` for a layer sparsify made from
    one."""
    conv1d = getattr(m, "_densify_as", None)
    if conv1d is not None:
        w = m.dense_weight().detach()
        dense = conv1d(w.shape[0], w.shape[1]).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w.t())
            dense.bias.copy_(m.bias)
    else:
        dense = m.to_dense()
    dense.train(m.training)
    return dense


def sparsity_summary(model: nn.Module) -> SparsitySummary:
    """Per-layer densities of the sparse layers and the dense layers with a weight matrix of
    ``model`` (or of ``model.module`` under DDP), as a printable :class:`SparsitySummary`:
    ``nn.Linear``/``nn.Conv2d``, Hugging Face ``Conv1D`` (shape ``[out, in]``),
    ``nn.MultiheadAttention`` (rows ``<name>.in_proj`` and ``<name>.out_proj``), and the layers
    :func:`sparsify` leaves alone (embeddings are not listed).

    A sparse layer's density is ``nnz / units`` (exact; read from host-side counts).
    """
    rows = []
    root = _unwrap(model)
    left_alone = {n for n, _ in _weight_layers_left_alone(root)}
    for name, m in root.named_modules():
        if isinstance(m, SparseLayer):
            shape = m.dense_weight_shape
            rows.append({"name": name, "kind": type(m).__name__, "shape": shape,
                         "block_size": m.block_size, "density": m.density,
                         "weights": math.prod(shape)})
            continue
        kind = _layer_kind(m)
        if kind == "mha":  # dense: its (packed) q/k/v projection(s) and its out_proj
            prefix = f"{name}." if name else ""
            if m._qkv_same_embed_dim:
                rows.append(_dense_row(prefix + "in_proj", "MultiheadAttention.in_proj",
                                       m.in_proj_weight))
            else:
                rows += [_dense_row(prefix + p, f"MultiheadAttention.{p}", getattr(m, p))
                         for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
            rows.append(_dense_row(f"{name}.out_proj" if name else "out_proj",
                                   type(m.out_proj).__name__, m.out_proj.weight))
        elif kind is not None or name in left_alone:
            w = getattr(m, "weight", None)
            if isinstance(w, Tensor):
                rows.append(_dense_row(name, type(m).__name__,
                                       w.t() if kind == "conv1d" else w))
            else:  # a recurrent layer: all of its weight matrices
                ws = [p for n, p in m.named_parameters(recurse=False) if p.dim() >= 2]
                rows.append({"name": name, "kind": type(m).__name__, "shape": None,
                             "block_size": None, "density": 1.0,
                             "weights": sum(p.numel() for p in ws)})
    return SparsitySummary(rows)


def _dense_row(name: str, kind: str, w: Tensor) -> dict:
    return {"name": name, "kind": kind, "shape": tuple(w.shape), "block_size": None,
            "density": 1.0, "weights": w.numel()}
