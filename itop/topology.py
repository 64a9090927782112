"""The :class:`TopologyManager`: prune and regrow blocks every ``update_every`` steps (SET/RigL
with In-Time Over-Parameterization).

Call ``mgr.step()`` after every ``optimizer.step()``. On update steps, for each sparse layer
(docs/topology.md, "What one update does", has every rule and the departures from the
ITOP and RigL reference code):

1. **Prune** ``k = ceil(prune_rate_t · nnz)`` active units (blocks, or weights for block 1)
   with the smallest magnitude (L1 norm of the unit's values; ``prune="magnitude_l2"`` for L2).
2. **Grow** exactly ``k`` units that were inactive before the update (so nothing pruned in this
   update comes straight back and nnz stays exact), by the growth score:

   - ``"random"`` (SET): uniform scores from the manager's own seeded generator.
   - ``"gradient"`` (RigL): the L2 norm of each unit's block of the *dense* weight gradient of
     the current batch. The manager arms the capture of the sparse layers for the step
     before an update step only: the layer's forward then keeps a copy of its input ``X``
     and of its output's gradient ``dY`` (through two custom ops, :mod:`itop.capture`, which
     ``torch.compile`` traces). At the update, an op from
     :mod:`itop_kernels.block_norms` reduces ``dYᵀ·X`` to block norms block-row chunk by
     chunk, never holding the dense ``dW``. All other steps capture nothing. By
     default (``score_precision="auto"``) that GEMM multiplies bfloat16 copies where the
     device does so natively: updates about 1.7× cheaper on the development CPU
     (``benchmarks/bench_topology_update.py``), for the same growth choices up to near-ties.
     A layer with nothing captured (no backward through it on the update step) grows at
     random, with a warning.
   - ``"momentum"`` (SNFS-like): an exponential moving average of those block-gradient norms,
     with the optimizer's momentum (SGD ``momentum`` or Adam ``betas[0]``, else 0.9). It needs
     the capture on *every* step, so each step pays one block-norm reduction per layer.
   - ``"random_unfired"``: random among units never active so far, then random among the rest.

   Frozen layers (``values.requires_grad`` False) are left alone: their topology never
   changes while they are frozen, and :meth:`TopologyManager.summary` marks them ``frozen``.

   NaN/Inf scores are mapped to finite values, so the choice always has exactly ``k`` units.
   The choices go through :mod:`itop.unit_selection`, whose cost follows ``k`` and ``nnz``
   rather than the grid where it can (element-level grids have millions of units).
3. New units start at zero and their gradient and optimizer state (every state tensor shaped
   like ``values``: SGD momentum, Adam/AdamW moments, ...) are zeroed; surviving units keep
   values and state. Everything is rewritten in place in the same Parameter; the layout is
   rebuilt on the device with a known nnz, so no host sync is needed.
4. ``fired |= active``; :attr:`TopologyManager.itop_rate` is the explored fraction of the
   weights of all sparse layers.

Constant fan-in (``fan_in="constant"``, for layers built by ``itop.sparsify(...,
fan_in="constant")``): every live row of a layer keeps the same number of active units, the
prune count is ``min(ceil(prune_rate_t · nnz), floor((nnz - 1) / 2), nnz - live rows)``
(an update keeps a strict majority of every layer, and every row its strongest unit), units
without gradient signal are replaced as well, regrowth goes row by row, and with
``ablation=True`` empty rows are allowed and which rows are live follows the scores. See
:mod:`itop.fan_in` and ``docs/block-size.md``.

Layers that share a grid, block size, nnz, ``k``, values shape, dtype, device and block
storage (GPT-2 small: 48 sparse layers in 4 such groups) are updated as one group: one chain of
batched ops over their stacked magnitudes, keys, positions, masks and states, written back into
each layer's own tensors in place with ``torch._foreach_copy_`` (one launch per list on a GPU),
so an update runs ~35 device ops per group instead of per layer (``_BATCH_LAYERS``). The
choices are the per-layer ones, bit for bit on the CPU, except for the order of random draws:
the grouped layers draw their uniform scores with one ``torch.rand`` in layer order, before
the layers updated one by one (block size 1, constant fan-in, a shape without a twin) draw
theirs; on a GPU the numbers differ from the per-layer path's (Philox offsets per call), as
uniform and as seeded, the same on every DDP rank.
Gradient growth scores are computed together for linear layers with the same features, block
size and captured rows (``_BATCH_SCORES``): one stacked GEMM per chunk of block-rows on a GPU
(:func:`~itop_kernels.block_norms.block_grad_norms_group`), bit for bit the per-layer scores on
the CPU; conv layers and layers without a twin are scored alone.

``prune_rate_t`` follows the schedule from ``prune_rate`` at step 0 to 0 at the horizon
``H = stop_step or total_steps`` (``cosine``: ``prune_rate·(1+cos(πt/H))/2``; ``linear``:
``prune_rate·(1-t/H)``; ``constant``); updates happen at steps ``t = update_every, 2·update_every,
... < H`` (RigL's end step when ``stop_step`` is given).

Distributed (a ``DistributedDataParallel`` model, or ``distributed=True``): growth scores are
all-reduced (sum), random growth uses the same seed on every rank, and the new masks are
broadcast from rank 0, so every rank applies the same topology. At construction every rank
takes rank 0's masks and values.

Host syncs. ``mgr.step()`` on a step without an update, the layers' forward and backward
(the capture ops on armed steps included) and the bookkeeping between updates read no tensor
on the host, so they make no host sync (``tests/test_step_syncs.py`` checks it on the CPU by the
ops they run, and on a GPU under ``torch.cuda.set_sync_debug_mode("error")``). An update itself
(scores, prune and grow choices, moving values, gradients and optimizer state, the layout
rebuild, the fired masks) makes none either, except:

- with a ``grad_scaler``: reading its scale (``float(scaler.get_scale())``) on update steps
  and the steps before them (to notice a skipped step and to unscale gradient scores), and on
  every step with ``"momentum"`` growth;
- with ``fan_in="constant"``: the number of units each layer moves depends on the scores
  (``nonzero`` of the changed mask entries), and the layer's nnz stays constant;
- a ``block_size=1`` convolution (masked dense): finding its active weights (``nonzero``);
- under DDP: the collectives (all-reduce of scores, broadcast of the choices);
- a layout rebuilt because ``block_mask`` was overwritten from outside (counting its blocks);
- on CPU tensors, large grids take host-side shortcuts (:mod:`itop.unit_selection`): there
  is no device to wait for.

:attr:`TopologyManager.itop_rate` reads the fired masks on the host: read it at logging time.

AMP: pass the ``torch.amp.GradScaler`` as ``grad_scaler``. When it skipped the update step's
optimizer step (its scale went down), the update is postponed to the next step that was not
skipped and scores come from that step's gradients. Gradient scores are divided by the scale.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from itop_kernels.block_norms import PRECISIONS

from .fan_in import FAN_IN_MODES, check_layers, plan_update
from .fan_in import prune_count as constant_fan_in_prune_count
from . import storage as _storage
from .layers import SparseLayer, SparseLinear
from .sparsify import SparsitySummary, _unwrap
from .unit_selection import _SELECT_MIN, random_inactive, topk_indices

__all__ = ["TopologyManager", "GROWTH_MODES", "SCHEDULES", "PRUNE_MODES"]

GROWTH_MODES = ("random", "gradient", "momentum", "random_unfired")
SCHEDULES = ("cosine", "linear", "constant")
PRUNE_MODES = ("magnitude", "magnitude_l2")


# Update the layers that share a grid, block size, nnz, k, values shape, dtype, device and
# storage (GPT-2 small: 48 sparse layers in 4 such groups) as one chain of batched ops per
# group, so the ops of an update grow with the number of groups rather than of layers
# (TopologyManager._batch_plan; benchmarks/NOTES.md, "Update cost"). Tests switch it off to
# compare with the per-layer path.
_BATCH_LAYERS = True
# Gradient growth scores ("gradient", "momentum") of linear layers with the same shapes and
# captured rows computed together (TopologyManager._score_groups,
# itop_kernels.block_norms.block_grad_norms_group), when _BATCH_LAYERS is on too. Off: each
# layer scored alone (benchmarks compare the two).
_BATCH_SCORES = True


def _check_int(v, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


class _Collectives:
    """The process group the manager keeps topologies consistent over (DDP's, by default)."""

    def __init__(self, group):
        dist = torch.distributed
        self.group = group
        self.src = 0 if group is None else dist.get_global_rank(group, 0)

    def all_reduce(self, t: Tensor) -> None:
        torch.distributed.all_reduce(t, group=self.group)

    def broadcast(self, t: Tensor) -> None:
        torch.distributed.broadcast(t, src=self.src, group=self.group)


def _collectives(model: nn.Module, distributed: Optional[bool]) -> Optional[_Collectives]:
    """``_Collectives`` when the topology must be synchronized across processes, else None.

    ``distributed=None`` means: synchronize iff ``model`` is wrapped in
    ``DistributedDataParallel`` (over its process group) and that group has > 1 process.
    """
    from torch.nn.parallel import DistributedDataParallel
    dist = torch.distributed
    is_ddp = isinstance(model, DistributedDataParallel)
    if distributed is None:
        distributed = is_ddp
    if not distributed:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialized torch.distributed process group")
    group = getattr(model, "process_group", None) if is_ddp else None
    if group is not None and group == dist.group.WORLD:
        group = None
    if dist.get_world_size(group) <= 1:
        return None
    return _Collectives(group)


def _frozen(layer: SparseLayer) -> bool:
    """A layer whose ``values`` do not require a gradient: the manager leaves its topology
    alone (no prune, no growth, no capture) until it is unfrozen."""
    return not layer.values.requires_grad


def _finite(scores: Tensor, *, inplace: bool = False) -> Tensor:
    """float32 with NaN -> lowest, ±Inf -> largest/lowest finite values: a copy, or ``scores``
    itself rewritten when ``inplace`` and it is float32 already (element-level score grids are
    as large as the weight, so a copy is a pass over memory the update does not need)."""
    lo, hi = torch.finfo(torch.float32).min, torch.finfo(torch.float32).max
    if inplace and scores.dtype == torch.float32:
        return scores.nan_to_num_(nan=lo, posinf=hi, neginf=lo)
    return torch.nan_to_num(scores.float(), nan=lo, posinf=hi, neginf=lo)


def _rows_of_one(scores: List[Tensor]) -> Optional[Tensor]:
    """``[G, n]``, a view of the one float32 tensor whose consecutive rows ``scores`` are
    (``scores[j]`` the ``j``-th, contiguous, of ``n`` elements each), or None."""
    s0 = scores[0]
    base, n, o0 = s0._base, s0.numel(), s0.storage_offset()
    if base is None or s0.dtype != torch.float32:
        return None
    for j, s in enumerate(scores):
        if s._base is not base or s.numel() != n or not s.is_contiguous() or \
                s.storage_offset() != o0 + j * n:
            return None
    return base.as_strided((len(scores), n), (n, 1), o0)


class TopologyManager:
    """Dynamic sparse training schedule for the sparse layers of a model.

    Args:
        model: a model holding :class:`~itop.SparseLinear`/:class:`~itop.SparseConv2d` layers,
            possibly wrapped in ``DistributedDataParallel`` (layers are found in
            ``model.module``).
        optimizer: the ``torch.optim.Optimizer`` that trains the layers' ``values``.
        update_every: ``ΔT``, steps between topology updates (int >= 1).
        prune_rate: initial fraction of each layer's active units replaced per update, [0, 1].
        schedule: ``"cosine"`` (default), ``"linear"`` or ``"constant"`` decay of the rate.
        total_steps: training length in optimizer steps (int >= 1).
        stop_step: optional last step (exclusive) with updates, and the decay horizon (RigL).
        prune: ``"magnitude"`` (L1 norm of a unit) or ``"magnitude_l2"``.
        growth: ``"gradient"`` (default, RigL), ``"random"`` (SET), ``"momentum"`` or
            ``"random_unfired"``.
        seed: seed of the manager's generator (random growth, tie-free fallbacks).
        grad_scaler: optional ``torch.amp.GradScaler`` used with the optimizer.
        distributed: keep topologies identical across processes (all-reduced scores, rank 0's
            masks broadcast). ``None`` (default): iff ``model`` is a ``DistributedDataParallel``
            (over its process group); ``True`` forces it over the default group.
        score_precision: arithmetic of the dense-gradient block norms (``"gradient"`` and
            ``"momentum"`` growth): ``"auto"`` (default) multiplies bfloat16 copies of ``X`` and
            ``dY`` (float32 accumulation) when the layers are float32/float16/bfloat16 on a
            device with native bf16 matmul, and uses the layers' dtype otherwise; ``"exact"``
            always uses the layers' dtype (float16/bfloat16 in float32); ``"bf16"`` always
            bfloat16. See :mod:`itop_kernels.block_norms` for what it costs and changes.
        fan_in: ``"any"`` (default) or ``"constant"``: every update keeps each layer's
            constant fan-in (every live row the same number of active units, see
            :mod:`itop.fan_in`), prunes ``min(ceil(rate·nnz), floor((nnz-1)/2), nnz - live
            rows)`` units by magnitude (a strict majority of a layer and each row's strongest
            unit always stay) plus units without gradient signal, and regrows row by row. The
            layers must already have a constant fan-in (``itop.sparsify(...,
            fan_in="constant")``), else ``ValueError``.
        ablation: with ``fan_in="constant"``, allow layers with empty rows (their number stays
            the same, which rows are live follows the growth scores). Without it an empty row
            is a ``ValueError``.

    A manager owns the gradient capture of its layers: constructing one switches off whatever
    capture was armed on them before (by an earlier manager, say), and :meth:`close` switches
    its own off. A copy of the model (``deepcopy``, pickle) starts with no capture.

    Attributes:
        layers: list of ``(name, layer)`` for the sparse layers, names relative to the
            unwrapped model.
        step_count: optimizer steps seen so far.
        fired: ``{name: bool tensor}`` units ever active (mask-shaped).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, update_every: int,
                 prune_rate: float = 0.5, schedule: str = "cosine", total_steps: int,
                 stop_step: Optional[int] = None, prune: str = "magnitude",
                 growth: str = "gradient", seed: int = 0, grad_scaler=None,
                 distributed: Optional[bool] = None, score_precision: str = "auto",
                 fan_in: str = "any", ablation: bool = False):
        self._token = object()  # marks the captures this manager armed
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.update_every = _check_int(update_every, "update_every", 1)
        self.total_steps = _check_int(total_steps, "total_steps", 1)
        if stop_step is not None:
            _check_int(stop_step, "stop_step", 1)
            if stop_step > total_steps:
                raise ValueError(f"stop_step ({stop_step}) must be <= total_steps ({total_steps})")
        self.stop_step = stop_step
        if isinstance(prune_rate, bool) or not isinstance(prune_rate, (int, float)) or \
                not 0.0 <= float(prune_rate) <= 1.0:
            raise ValueError(f"prune_rate must be a float in [0, 1], got {prune_rate!r}")
        self.prune_rate = float(prune_rate)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if prune not in PRUNE_MODES:
            raise ValueError(f"prune must be one of {PRUNE_MODES}, got {prune!r}")
        if growth not in GROWTH_MODES:
            raise ValueError(f"growth must be one of {GROWTH_MODES}, got {growth!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if score_precision not in PRECISIONS:
            raise ValueError(f"score_precision must be one of {PRECISIONS}, got "
                             f"{score_precision!r}")
        self.score_precision = score_precision
        if fan_in not in FAN_IN_MODES:
            raise ValueError(f"fan_in must be one of {FAN_IN_MODES}, got {fan_in!r}")
        if not isinstance(ablation, bool):
            raise TypeError(f"ablation must be a bool, got {ablation!r}")
        self.fan_in, self.ablation = fan_in, ablation
        self.schedule, self.prune, self.growth, self.seed = schedule, prune, growth, seed
        self.model = model
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        root = _unwrap(model)
        self.layers: List[Tuple[str, SparseLayer]] = [
            (n, m) for n, m in root.named_modules() if isinstance(m, SparseLayer)]
        if not self.layers:
            raise ValueError("model has no sparse layers (itop.SparseLinear/SparseConv2d); "
                             "call itop.sparsify(model, ...) first")
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, m in self.layers
                   if id(m.values) not in in_opt and not _frozen(m)]
        if missing:
            raise ValueError(f"the optimizer does not train the values of sparse layers {missing}")
        self._comm = _collectives(model, distributed)
        if self._comm is not None:
            self._broadcast_layers()
        # (live rows, fan-in) per layer in the constant fan-in mode (fixed for the whole run)
        self._rows = check_layers(self.layers, ablation) if fan_in == "constant" else None
        # Random growth draws on the layers' device: drawing millions of element scores on the
        # host and copying them over (block size 1) would cost more than the training step.
        device = self.layers[0][1].block_mask.device if self.layers else torch.device("cpu")
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self.step_count = 0
        self._pending = False
        self._scale_prev: Optional[float] = None
        self.fired: Dict[str, Tensor] = {n: m.block_mask.clone() for n, m in self.layers}
        self._ema: Dict[str, Tensor] = {}
        self._warned_no_scores = False
        self._take_index: Dict[tuple, Tensor] = {}   # _drawn_rows' gather indices
        self._beta = self._momentum_beta()
        for _, m in self.layers:   # the manager owns the capture of its layers from now on
            m._stop_capture()
        self._arm()

    @torch.no_grad()
    def _broadcast_layers(self) -> None:
        """Give every rank rank 0's masks and values (the layouts follow on their next use)."""
        for _, m in self.layers:
            flat = m.block_mask.to(torch.uint8)
            self._comm.broadcast(flat)
            m.block_mask.copy_(flat.bool())
            self._comm.broadcast(m.values.data)
            m._sync_layout()

    # ------------------------------------------------------------------ schedule
    @property
    def horizon(self) -> int:
        """Step at which the prune rate reaches 0 and updates stop: ``stop_step or total_steps``."""
        return self.stop_step if self.stop_step is not None else self.total_steps

    def prune_rate_at(self, step: int) -> float:
        """The prune rate ``prune_rate_t`` of the schedule at ``step`` (0 from the horizon on)."""
        H = self.horizon
        if step >= H:
            return 0.0
        if self.schedule == "constant":
            return self.prune_rate
        if self.schedule == "linear":
            return self.prune_rate * (1.0 - step / H)
        return self.prune_rate * 0.5 * (1.0 + math.cos(math.pi * step / H))

    def is_update_step(self, step: int) -> bool:
        """True if a topology update is scheduled after optimizer step ``step`` (1-based)."""
        return step > 0 and step % self.update_every == 0 and step < self.horizon

    # ------------------------------------------------------------------ capture
    def _needs_capture(self, step: int) -> bool:
        if self.growth == "momentum":
            return step < self.horizon
        if self.growth != "gradient":
            return False
        return self._pending or self.is_update_step(step)

    def _arm(self) -> None:
        """Arm or disarm the capture for the next step (``step_count + 1``)."""
        want = self._needs_capture(self.step_count + 1)
        for _, m in self.layers:
            m._stop_capture(self._token)
            if want and not _frozen(m):
                m._start_capture(self._token)
        self._scale_prev = (float(self.grad_scaler.get_scale())
                            if want and self.grad_scaler is not None else None)

    def _scaler_skipped(self) -> bool:
        """True when the GradScaler skipped this step's optimizer step (its scale went down)."""
        if self.grad_scaler is None or self._scale_prev is None:
            return False
        return float(self.grad_scaler.get_scale()) < self._scale_prev

    def _momentum_beta(self) -> float:
        g = self.optimizer.param_groups[0]
        if "betas" in g:
            return float(g["betas"][0])
        if float(g.get("momentum", 0.0) or 0.0) > 0.0:
            return float(g["momentum"])
        return 0.9

    def _grad_scores(self) -> List[Optional[Tensor]]:
        inv_scale = 1.0
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            inv_scale = 1.0 / float(self.grad_scaler.get_scale())
        out: List[Optional[Tensor]] = [None] * len(self.layers)
        for idxs in self._score_groups():
            if len(idxs) > 1:
                # one chain of ops for the group; each layer's scores a row of one tensor
                s = SparseLinear._grad_scores_group([self.layers[i][1] for i in idxs],
                                                    self.score_precision)
                if inv_scale != 1.0:
                    s.mul_(inv_scale)
                for j, i in enumerate(idxs):
                    out[i] = s[j]
                continue
            i = idxs[0]
            s = self.layers[i][1]._grad_scores(self.score_precision)  # fresh float32 (or None)
            if s is not None and inv_scale != 1.0:
                s.mul_(inv_scale)
            out[i] = s
        return out

    def _score_groups(self) -> List[List[int]]:
        """Indices into :attr:`layers`, in groups whose gradient scores are computed together
        (linear layers with one :meth:`SparseLinear._grad_score_key`, ordered by their first
        layer) or alone (every other layer; all of them alone without ``_BATCH_LAYERS`` and
        ``_BATCH_SCORES``)."""
        if not (_BATCH_LAYERS and _BATCH_SCORES):
            return [[i] for i in range(len(self.layers))]
        buckets: Dict[tuple, List[int]] = {}
        out: List[List[int]] = []
        for i, (_, m) in enumerate(self.layers):
            key = m._grad_score_key() if isinstance(m, SparseLinear) else None
            if key is None:
                out.append([i])
            elif key in buckets:
                buckets[key].append(i)
            else:
                buckets[key] = [i]
                out.append(buckets[key])
        return out

    # ------------------------------------------------------------------ step
    def step(self) -> bool:
        """Advance one optimizer step; update the topology on update steps.

        Returns:
            True if the topology changed at this step.
        """
        self.step_count += 1
        t = self.step_count
        for _, m in self.layers:
            # what the forward checks in eager mode only (see SparseLayer._sync_layout)
            m._sync_layout()
        due = self._pending or self.is_update_step(t)
        skipped = (due or self.growth == "momentum") and self._scaler_skipped()
        changed = False
        if self.growth == "momentum" and not skipped:
            self._update_ema()
        if due:
            if skipped:
                self._pending = True
            else:
                self._pending = False
                changed = self._update(t)
        self._arm()
        return changed

    @torch.no_grad()
    def _update_ema(self) -> None:
        """``ema = β·ema + (1-β)·finite(scores)`` of every layer with scores (``(1-β)·scores``
        the first time): the non-finite entries fixed once per score tensor (a group's scores
        are rows of one, :meth:`_grad_scores`), the running averages of all layers updated by
        two ``torch._foreach_*`` ops (per tensor, as ``mul_``/``add_`` do, on the CPU)."""
        beta = self._beta
        fixed = set()
        prevs, adds = [], []
        for (name, _), s in zip(self.layers, self._grad_scores()):
            if s is None:
                continue
            if s.dtype != torch.float32:
                s = _finite(s)
            else:
                whole = s if s._base is None else s._base  # fresh: this step's own scores
                if id(whole) not in fixed:
                    fixed.add(id(whole))
                    _finite(whole, inplace=True)
            prev = self._ema.get(name)
            if prev is None:
                self._ema[name] = (1.0 - beta) * s
            else:
                prevs.append(prev)
                adds.append(s)
        if prevs:
            torch._foreach_mul_(prevs, beta)
            torch._foreach_add_(prevs, adds, alpha=1.0 - beta)

    def _random_scores(self, m: SparseLayer) -> Tensor:
        g = self._generator
        return torch.rand(m.block_mask.shape, generator=g, device=g.device).to(m.block_mask.device)

    def _growth_scores(self) -> List[Optional[Tensor]]:
        """Mask-shaped growth scores per layer; ``None`` where growth is uniformly random (drawn
        by :func:`~itop.unit_selection.random_inactive` without a score per unit)."""
        if self.growth == "gradient":
            scores = self._grad_scores()  # None (random growth) where nothing was captured
            missing = [n for (n, m), sc in zip(self.layers, scores)
                       if sc is None and not _frozen(m)]
            if missing and not self._warned_no_scores:
                self._warned_no_scores = True
                warnings.warn(f"gradient growth: no gradient was captured for sparse layers "
                              f"{missing} on update step {self.step_count} (no backward "
                              "through them before mgr.step()?); they grow at random",
                              stacklevel=3)
            return scores
        if self.growth == "momentum":
            return [self._ema[n] if n in self._ema else None for n, _ in self.layers]
        if self.growth == "random_unfired":
            return [self._random_scores(m) + (~self.fired[n]).to(torch.float32) * 2.0
                    for n, m in self.layers]
        return [None] * len(self.layers)

    @torch.no_grad()
    def _update(self, t: int) -> bool:
        rate = self.prune_rate_at(t)
        if self._rows is not None:
            ks = [0 if _frozen(m) else constant_fan_in_prune_count(rate, m.nnz, live)
                  for (_, m), (live, _) in zip(self.layers, self._rows)]
            if not any(ks) and (rate == 0.0 or self.growth not in ("gradient", "momentum")):
                return False   # (gradient scores may still find units without signal)
        else:
            ks = [0 if _frozen(m) else min(math.ceil(rate * m.nnz), m.num_units - m.nnz)
                  for _, m in self.layers]
            if not any(ks):
                return False
        scores = self._growth_scores()
        comm = self._comm
        if comm is not None and self.growth in ("gradient", "momentum"):
            # every rank must see the same scores; where there are none (nothing captured, no
            # momentum yet) random scores from the generator every rank seeds alike
            flat = torch.cat([_finite(s if s is not None else self._random_scores(m)).reshape(-1)
                              for s, (_, m) in zip(scores, self.layers)])
            comm.all_reduce(flat)
            scores, off = [], 0
            for _, m in self.layers:
                n = m.num_units
                scores.append(flat[off:off + n].view(m.block_mask.shape))
                off += n
        if self._rows is not None:
            return self._update_constant_fan_in(ks, scores)
        # ---- which units leave and which arrive: flat mask positions, k of each per layer
        p = 2 if self.prune == "magnitude_l2" else 1
        owned = self.growth != "momentum" or comm is not None  # scores nobody else holds
        groups, singles = self._batch_plan(ks, scores)
        # layers of one group: (layer indices, positions [G, nnz], drop [G, k], add [G, k])
        batched = self._group_choices(groups, ks, scores, p, owned) if groups else []
        moves: List[Optional[Tuple[Tensor, Tensor]]] = []  # (dropped slots, added positions)
        single = set(singles)
        for i, ((name, m), k, grow) in enumerate(zip(self.layers, ks, scores)):
            if i not in single:
                moves.append(None)
                continue
            # prune: the k active units of smallest magnitude (a top-k over the nnz active
            # units only: at block size 1 the grid has millions of entries)
            active, mag = self._prune_scores(name, m, p)
            drop = topk_indices(_finite(mag, inplace=True), k, largest=False)  # slots in `active`
            # grow: the k best units that were inactive before this update (so nothing pruned
            # now comes straight back and nnz stays exact)
            if grow is None:
                add = random_inactive(m.block_mask.reshape(-1), k, self._generator,
                                      num_active=m.nnz)
            else:
                key = _finite(grow, inplace=owned).reshape(-1).to(active.device)
                key.index_fill_(0, active, float("-inf"))
                add = topk_indices(key, k)
            moves.append((drop, add))
        if comm is not None:
            # rank 0's choice wins (identical anyway when scores and seeds agree)
            flat = torch.cat([t.reshape(-1) for _, _, drop, add in batched for t in (drop, add)]
                             + [torch.cat(mv) for mv in moves if mv is not None])
            comm.broadcast(flat)
            off = 0
            for j, (idxs, pos, drop, add) in enumerate(batched):
                n = drop.numel()
                batched[j] = (idxs, pos, flat[off:off + n].view(drop.shape),
                              flat[off + n:off + 2 * n].view(add.shape))
                off += 2 * n
            for i, mv in enumerate(moves):
                if mv is not None:
                    k = ks[i]
                    moves[i] = (flat[off:off + k], flat[off + k:off + 2 * k])
                    off += 2 * k
        # ---- apply
        for idxs, pos, drop, add in batched:
            SparseLayer._apply_topology_group([self.layers[i][1] for i in idxs], pos, drop, add,
                                              self.optimizer)
            fired = [self.fired[self.layers[i][0]] for i in idxs]
            fired_rows = torch.stack(fired)
            fired_rows.view(len(idxs), -1).scatter_(1, add, True)
            torch._foreach_copy_(fired, fired_rows.unbind(0))
        for (name, m), mv in zip(self.layers, moves):
            if mv is None:
                continue
            m._apply_topology(mv[0], mv[1], self.optimizer)
            self.fired[name].view(-1).index_fill_(0, mv[1], True)
        return True

    # ------------------------------------------------------------------ batched update
    def _batch_plan(self, ks: List[int], scores: List[Optional[Tensor]]
                    ) -> Tuple[List[List[int]], List[int]]:
        """``(groups, singles)``: indices into :attr:`layers` of the layers updated together
        (two or more with the same :meth:`_group_key`) and of those updated one by one (every
        other layer with ``k > 0``), each in layer order."""
        todo = [i for i, k in enumerate(ks) if k]
        if not _BATCH_LAYERS or not _storage._INPLACE_LAYOUT or \
                type(self)._prune_scores is not TopologyManager._prune_scores:
            return [], todo
        buckets: Dict[tuple, List[int]] = {}
        singles: List[int] = []
        for i in todo:
            key = self._group_key(self.layers[i][1], ks[i], scores[i])
            if key is None:
                singles.append(i)
            else:
                buckets.setdefault(key, []).append(i)
        groups = [idxs for idxs in buckets.values() if len(idxs) > 1]
        singles += [idxs[0] for idxs in buckets.values() if len(idxs) == 1]
        return groups, sorted(singles)

    def _group_key(self, m: SparseLayer, k: int, score: Optional[Tensor]) -> Optional[tuple]:
        """What layers must share to be updated as one group, or None for a layer that takes
        the per-layer path: a storage other than active blocks (block size 1, masked dense),
        non-contiguous values, or, on CPU tensors, a grid where :mod:`itop.unit_selection`
        takes its host-side shortcuts (:data:`~itop.unit_selection._SELECT_MIN` units)."""
        if m._storage is not _storage.BlockStorage or m.layout is None:
            return None
        mask, v = m.block_mask, m.values        # (module attribute lookups are slow: once each)
        if mask._version != m._mask_version:    # overwritten from outside: the per-layer path
            return None                         # rebuilds its layout first
        dev = mask.device
        if not v.is_contiguous() or (dev.type == "cpu" and mask.numel() >= _SELECT_MIN):
            return None
        if score is None and self._generator.device != dev:
            return None
        how = None if score is None else (score.dtype, score.device, tuple(score.shape))
        return (tuple(mask.shape), m.block_size, m._nnz, k, tuple(v.shape), v.dtype, dev, how)

    def _group_choices(self, groups: List[List[int]], ks: List[int],
                       scores: List[Optional[Tensor]], p: int, owned: bool = False
                       ) -> List[Tuple[List[int], Tensor, Tensor, Tensor]]:
        """Prune and grow choices of every group, each by batched ops over the group's stacked
        magnitudes and growth keys: the same choices as the per-layer loop of :meth:`_update`
        (a batched ``topk`` over rows selects per row as the 1-D one does; checked on the CPU by
        ``tests/test_batched_update.py``).

        Random growth: the uniform scores of all grouped layers are drawn by one ``torch.rand``
        in layer order, before the layers updated one by one draw theirs. On CPU tensors that is
        the per-layer path's stream exactly when no per-layer random draw comes before a grouped
        layer's; on a GPU (Philox offsets per call) the numbers differ from the per-layer path
        either way, as uniform and as seeded (every DDP rank draws the same).

        ``owned``: the growth scores are this update's own (not momentum kept for later steps),
        so, like the per-layer path, the keys may be rewritten in place; the scores of a group
        that are the rows of one tensor (gradient scores computed together,
        :meth:`_score_groups`) are then used as they are, with no stacked copy."""
        need = sorted(i for idxs in groups for i in idxs if scores[i] is None)
        offsets: Dict[int, int] = {}
        drawn = None
        if need:
            sizes = [self.layers[i][1].num_units for i in need]
            g = self._generator
            drawn = torch.rand(sum(sizes), generator=g, device=g.device)
            off = 0
            for i, n in zip(need, sizes):
                offsets[i] = off
                off += n
        out = []
        for idxs in groups:
            ms = [self.layers[i][1] for i in idxs]
            G, k, nnz, n = len(idxs), ks[idxs[0]], ms[0].nnz, ms[0].num_units
            pos = torch.stack([m.layout.flat_positions() for m in ms])      # [G, nnz]
            # prune: magnitudes as BlockStorage.active_units computes them, all rows at once
            flat = torch.stack([m.values for m in ms]).view(G * nnz, -1).float()
            mag = (flat.abs().sum(1) if p == 1 else flat.square().sum(1).sqrt()).view(G, nnz)
            mag = _finite(mag, inplace=True)
            drop = torch.topk(mag, k, dim=1, largest=False, sorted=False).indices
            # grow: the best k units inactive before the update
            if scores[idxs[0]] is None:
                key, fill = self._drawn_rows(drawn, [offsets[i] for i in idxs], n), -1.0
            else:
                rows = _rows_of_one([scores[i] for i in idxs]) if owned else None
                if rows is None:
                    rows = torch.stack([scores[i].reshape(-1) for i in idxs])
                key = _finite(rows, inplace=True).to(pos.device)
                fill = float("-inf")
            key.scatter_(1, pos, fill)
            add = torch.topk(key, k, dim=1, sorted=False).indices
            out.append((idxs, pos, drop, add))
        return out

    def _drawn_rows(self, drawn: Tensor, offsets: List[int], n: int) -> Tensor:
        """``[G, n]``: the ``n`` draws at each offset of ``drawn`` (a view when they lie back to
        back, else one ``take`` through a cached index)."""
        G, o0 = len(offsets), offsets[0]
        if offsets == [o0 + j * n for j in range(G)]:
            return drawn[o0:o0 + G * n].view(G, n)
        key = (tuple(offsets), n, drawn.device)
        idx = self._take_index.get(key)
        if idx is None:
            # built on the device (no host-to-device copy), once per grouping
            idx = self._take_index[key] = torch.stack([
                torch.arange(o, o + n, dtype=torch.int64, device=drawn.device)
                for o in offsets])
        return drawn.take(idx)

    def _prune_scores(self, name: str, m: SparseLayer, p: int) -> Tuple[Tensor, Tensor]:
        """``(active positions, prune scores)`` of sparse layer ``name``: the Lp magnitudes of
        its active units (:meth:`SparseLayer._active_units`). One place to change the prune
        score (``benchmarks/bn_aware_prune.py`` tries a batch-norm-aware one there)."""
        return m._active_units(p)

    @torch.no_grad()
    def _update_constant_fan_in(self, ks: List[int], scores: List[Optional[Tensor]]) -> bool:
        """The constant fan-in update (:func:`itop.fan_in.plan_update`) of every layer; under
        DDP rank 0's new masks are broadcast (the number of moves is not known in advance)."""
        p = 2 if self.prune == "magnitude_l2" else 1
        news: List[Tensor] = []
        actives: List[Tensor] = []
        for (name, m), k, grow, (live, f) in zip(self.layers, ks, scores, self._rows):
            active, mag = self._prune_scores(name, m, p)
            if _frozen(m):   # a frozen layer keeps its topology
                news.append(m.block_mask.clone())
                actives.append(active)
                continue
            g = None if grow is None else _finite(grow).to(active.device)
            news.append(plan_update(m.block_mask, active, _finite(mag, inplace=True), g, k, f,
                                    live, self._generator))
            actives.append(active)
        if self._comm is not None:
            flat = torch.cat([n.reshape(-1).to(torch.uint8) for n in news])
            self._comm.broadcast(flat)
            off = 0
            for i, (_, m) in enumerate(self.layers):
                n = m.num_units
                news[i] = flat[off:off + n].bool().view(m.block_mask.shape)
                off += n
        changed = False
        for (name, m), new, active in zip(self.layers, news, actives):
            old = m.block_mask.reshape(-1)
            new = new.reshape(-1)
            gone = (old & ~new).nonzero().squeeze(1)
            if gone.numel() == 0:
                continue
            drop = torch.searchsorted(active, gone)
            add = (new & ~old).nonzero().squeeze(1)
            m._apply_topology(drop, add, self.optimizer)
            self.fired[name].view(-1)[add] = True
            changed = True
        return changed

    def close(self) -> None:
        """Switch the layers' capture off and drop what it kept (the manager stops; call this
        before dropping a manager whose model keeps training without it). A capture armed by
        another manager since (a successor on the same model) stays."""
        for _, m in self.layers:
            m._stop_capture(self._token)

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # ------------------------------------------------------------------ ITOP rate / summary
    @property
    def itop_rate(self) -> float:
        """Fraction of all sparse-layer weights that have ever been active (host sync)."""
        fired = total = 0
        for name, m in self.layers:
            fired += int(self.fired[name].sum()) * m.unit_numel
            total += m.num_units * m.unit_numel
        return fired / total

    def layer_itop_rates(self) -> Dict[str, float]:
        """``{layer name: fraction of its weights ever active}``."""
        return {n: float(self.fired[n].float().mean()) for n, _ in self.layers}

    def summary(self) -> SparsitySummary:
        """Per-layer table: shape, block size, density, weights and ITOP rate (printable)."""
        rates = self.layer_itop_rates()
        rows = []
        for name, m in self.layers:
            shape = m.dense_weight_shape
            rows.append({"name": name, "kind": type(m).__name__, "shape": shape,
                         "block_size": m.block_size, "density": m.density,
                         "weights": math.prod(shape), "itop_rate": rates[name],
                         "frozen": _frozen(m)})
        return SparsitySummary(rows)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Step, fired masks, generator state, momentum scores and the AMP bookkeeping."""
        return {
            "step_count": self.step_count,
            "pending": self._pending,
            "scale_prev": self._scale_prev,
            "fired": {n: f.clone() for n, f in self.fired.items()},
            "rng_state": self._generator.get_state(),
            "rng_device": self._generator.device.type,
            "ema": {n: e.clone() for n, e in self._ema.items()},
            "config": {"update_every": self.update_every, "growth": self.growth,
                       "total_steps": self.total_steps, "fan_in": self.fan_in,
                       "ablation": self.ablation},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; load the model's and optimizer's state dicts as well."""
        names = [n for n, _ in self.layers]
        if set(state["fired"]) != set(names):
            raise ValueError(f"state has layers {sorted(state['fired'])}, the model "
                             f"{sorted(names)}")
        self.step_count = int(state["step_count"])
        self._pending = bool(state.get("pending", False))
        self._scale_prev = state.get("scale_prev")
        for n, m in self.layers:
            f = state["fired"][n]
            if tuple(f.shape) != tuple(m.block_mask.shape):
                raise ValueError(f"fired mask of {n} has shape {tuple(f.shape)}, the layer "
                                 f"{tuple(m.block_mask.shape)}")
            self.fired[n] = f.to(device=m.block_mask.device, dtype=torch.bool).clone()
        if state.get("rng_device", "cpu") == self._generator.device.type:
            self._generator.set_state(state["rng_state"])
        else:  # a checkpoint from another device type: derive a seed from its generator state
            saved = torch.Generator()
            if state.get("rng_device", "cpu") == "cpu":
                saved.set_state(state["rng_state"])
            else:
                saved.manual_seed(int(state["rng_state"].to(torch.int64).sum()))
            self._generator.manual_seed(int(torch.randint(2 ** 62, (1,), generator=saved)))
            warnings.warn(f"TopologyManager state came from a {state.get('rng_device', 'cpu')} "
                          f"generator; random growth on {self._generator.device.type} is reseeded "
                          "from it (reproducible, but not the same draws)")
        self._ema = {n: e.to(dict(self.layers)[n].block_mask.device).clone()
                     for n, e in state.get("ema", {}).items()}
        self._arm()
