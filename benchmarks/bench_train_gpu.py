"""Whole training steps on a GPU, sparse against dense (issue 14).

Three models, each dense and sparse (90 %), bf16 autocast, AdamW (``capturable=True`` on a GPU,
so a step can be captured in a CUDA graph), random data of the issue's shapes:

- ``mlp``: 4 residual blocks ``x + Linear(16384→4096)(GELU(Linear(4096→16384)(LayerNorm(x))))``,
  8192 rows, loss ``mean(out²)``; sparse: every Linear at density 0.1, block 64.
- ``gpt2``: GPT-2-small-sized decoder written here from torch.nn pieces (12 layers, d=768,
  12 heads, seq 1024, batch 8, vocab 50257, tied embedding/head, pre-LN, causal
  ``F.scaled_dot_product_attention``), next-token cross-entropy; sparse: the QKV, attention
  projection and both MLP Linears at density 0.1 (uniform), block 64; embeddings, norms and
  the head stay dense.
- ``resnet50``: torchvision's ResNet-50 (if it imports; else recorded as unavailable), batch 128,
  224², channels_last, cross-entropy on 1000 classes; sparse: ``itop.sparsify`` at 0.1 ERK,
  block 32 (and 16 when the budget allows; the stem conv and the 1000-way head stay dense
  because neither block size divides them).

Per model and variant (cases run in a fixed order of importance; the JSON is rewritten after
every case, and a case whose estimated cost exceeds what is left of ``--budget-s`` is skipped
and listed):

- step time (zero_grad, forward, backward, optimizer step; ``mgr.step()`` for sparse models,
  with no update due) eager, replayed from a CUDA graph (``torch.cuda.graph``) and, with
  ``--compile``, through ``torch.compile(model, mode="reduce-overhead")`` (eager optimizer);
  a failure is recorded with its message, never fatal;
- peak memory of a step and the bytes of parameters, gradients and optimizer state;
- sparse: the cost of one RigL topology update (gradient growth, prune rate 0.3): plain and
  update steps alternate (``update_every=2``), ``extra = median(update) - median(plain)`` and
  ``extra / (100 · eager step)`` is the overhead at ``update_every=100`` (target < 1 %), with
  profiler tables of one update step (by host time and by device time);
- ``mlp`` sparse: 100-step windows with RigL updates every 100 steps included (exactly one
  update per window), eager, and graph-replayed with the armed step before each update eager;
- a ``torch.profiler`` table of 3 sparse eager steps (text in the JSON);
- ``layout_rebuild``: ``BlockLayout`` of a 4096×4096 weight, block 32, density 0.1, from known
  positions (what an update runs) and from a mask with a known nnz; per-call time and whether
  it syncs (under ``torch.cuda.set_sync_debug_mode("error")`` on a GPU).

Dense FLOPs per step come from ``torch.utils.flop_counter.FlopCounterMode`` on one dense step;
``dense_floor_ms`` is those FLOPs at ``--peak-tflops`` (700 by default, about what an H200
reaches in a bf16 GEMM).

    python benchmarks/bench_train_gpu.py                      # GPU, default budget 170 s
    python benchmarks/bench_train_gpu.py --compile all        # also compile gpt2 and resnet50
    python benchmarks/bench_train_gpu.py --tiny               # every code path, CPU, seconds
    python benchmarks/bench_train_gpu.py --quick              # GPU: 60 s, no compile; CPU: --tiny

Without a GPU and without ``--tiny``/``--quick`` it runs the cases that need none (``amdahl``,
``layout_rebuild``) at full size and says so.

``--compile`` is ``mlp`` by default on a GPU (compiling GPT-2 and ResNet-50 costs about a
minute each, beyond the default budget) and ``none`` with ``--tiny`` (``--tiny --compile all``
runs the compile path with the ``eager`` backend, which traces but generates no code).

Writes ``train_gpu_<device>.json`` (``train_gpu_tiny.json`` with ``--tiny``) and a PNG of the
speedups next to it, in ``--out-dir`` (default ``benchmarks/results/``), and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from provenance import ROOT, cpu_model, git_state, package_versions
from results_files import OUT_DIR_HELP, OVERWRITE_HELP, refuse_overwrite, results_path

sys.path.insert(0, str(ROOT))
import itop  # noqa: E402
from itop_kernels import BlockLayout  # noqa: E402

MODELS = ("mlp", "gpt2", "resnet50")


# --------------------------------------------------------------------------- shapes
@dataclass
class Shapes:
    """Model shapes: the issue's, or tiny ones (``--tiny``) that run in seconds on a CPU."""
    mlp_width: int = 4096
    mlp_hidden: int = 16384
    mlp_blocks: int = 4
    mlp_rows: int = 8192
    gpt_layers: int = 12
    gpt_d: int = 768
    gpt_heads: int = 12
    gpt_seq: int = 1024
    gpt_batch: int = 8
    gpt_vocab: int = 50257
    resnet_batch: int = 128
    resnet_hw: int = 224
    block_mlp: int = 64
    block_gpt: int = 64
    resnet_blocks: tuple = (32, 16)
    density: float = 0.1
    layout_side: int = 4096
    layout_block: int = 32
    warmup: int = 3
    timed: int = 10
    update_pairs: int = 4
    rigl_window: int = 100
    profile_steps: int = 3

    @classmethod
    def tiny(cls) -> "Shapes":
        return cls(mlp_width=64, mlp_hidden=128, mlp_blocks=2, mlp_rows=32, gpt_layers=2,
                   gpt_d=64, gpt_heads=2, gpt_seq=16, gpt_batch=2, gpt_vocab=96,
                   resnet_batch=2, resnet_hw=32, block_mlp=16, block_gpt=16,
                   resnet_blocks=(16,), density=0.5, warmup=1, timed=2, update_pairs=1,
                   rigl_window=4, profile_steps=1)


# --------------------------------------------------------------------------- models
class ResidualMLP(nn.Module):
    """``blocks`` × ``x + fc2(GELU(fc1(LayerNorm(x))))``, ``width → hidden → width``."""

    def __init__(self, width: int, hidden: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln": nn.LayerNorm(width), "fc1": nn.Linear(width, hidden),
            "fc2": nn.Linear(hidden, width)}) for _ in range(blocks))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["fc2"](F.gelu(b["fc1"](b["ln"](x))))
        return x


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2-style decoder: token + position embeddings, pre-LN blocks, final LN, tied head."""

    def __init__(self, vocab: int, seq: int, d: int, heads: int, layers: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


class TinyBottleneckNet(nn.Module):
    """Stand-in for ResNet-50 when torchvision is missing and ``--tiny`` runs the code path:
    a stem, two bottleneck blocks (1×1, 3×3, 1×1, BatchNorm, a strided 1×1 shortcut), a head."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def bottleneck(cin, mid, cout, stride):
            return nn.ModuleDict({
                "body": nn.Sequential(
                    nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                    nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                    nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)),
                "short": nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))})
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU())
        self.layers = nn.ModuleList([bottleneck(32, 16, 64, 1), bottleneck(64, 32, 128, 2)])
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.stem(x)
        for b in self.layers:
            x = F.relu(b["body"](x) + b["short"](x))
        return self.fc(x.mean((2, 3)))


@dataclass
class Workload:
    """A model, its optimizer, static inputs and loss; sparse ones carry their manager."""
    name: str
    variant: str
    model: nn.Module
    opt: torch.optim.Optimizer
    inputs: tuple
    loss_fn: Callable
    mgr: Optional[itop.TopologyManager] = None
    info: dict = field(default_factory=dict)


def _optimizer(model, device):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True,
                             capturable=device.type == "cuda")


def _mlp_loss(out, _):
    return out.float().square().mean()


def _ce_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))


def build_dense(name: str, s: Shapes, device) -> Optional[Workload]:
    """The dense workload (``None`` when ResNet-50 is unavailable and not ``--tiny``)."""
    torch.manual_seed(0)
    if name == "mlp":
        model = ResidualMLP(s.mlp_width, s.mlp_hidden, s.mlp_blocks).to(device)
        inputs = (torch.randn(s.mlp_rows, s.mlp_width, device=device), None)
        loss = _mlp_loss
        info = {"width": s.mlp_width, "hidden": s.mlp_hidden, "blocks": s.mlp_blocks,
                "rows": s.mlp_rows}
    elif name == "gpt2":
        model = GPT(s.gpt_vocab, s.gpt_seq, s.gpt_d, s.gpt_heads, s.gpt_layers).to(device)
        idx = torch.randint(0, s.gpt_vocab, (s.gpt_batch, s.gpt_seq + 1), device=device)
        inputs = (idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
        loss = _ce_loss
        info = {"layers": s.gpt_layers, "d": s.gpt_d, "heads": s.gpt_heads, "seq": s.gpt_seq,
                "batch": s.gpt_batch, "vocab": s.gpt_vocab}
    else:
        try:
            import torchvision
            model = torchvision.models.resnet50()
            arch = "torchvision resnet50"
        except Exception as exc:  # torchvision missing or not importable with this torch
            if s.mlp_width > 1024:   # not --tiny
                return None
            model, arch = TinyBottleneckNet(), f"tiny stand-in (torchvision: {exc!r})"
        model = model.to(device).to(memory_format=torch.channels_last)
        classes = model.fc.out_features
        x = torch.randn(s.resnet_batch, 3, s.resnet_hw, s.resnet_hw, device=device)
        inputs = (x.contiguous(memory_format=torch.channels_last),
                  torch.randint(0, classes, (s.resnet_batch,), device=device))
        loss = _ce_loss
        info = {"arch": arch, "batch": s.resnet_batch, "hw": s.resnet_hw,
                "channels_last": True}
    return Workload(name, "dense", model, _optimizer(model, device), inputs, loss, info=info)


def build_sparse(dense: Workload, s: Shapes, device, block_size: int) -> Workload:
    """``dense``'s model deep-copied and sparsified (90 %), with a manager that never updates
    (its steps between updates are what the step times measure)."""
    model = copy.deepcopy(dense.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if dense.name == "resnet50":
            itop.sparsify(model, s.density, distribution="erk", block_size=block_size)
        else:
            exclude = ["head"] if dense.name == "gpt2" else None
            itop.sparsify(model, s.density, distribution="uniform", block_size=block_size,
                          exclude=exclude)
    model = model.to(memory_format=torch.channels_last) if dense.name == "resnet50" else model
    opt = _optimizer(model, device)
    mgr = itop.TopologyManager(model, opt, update_every=10 ** 8, total_steps=10 ** 9)
    layers = [m for _, m in mgr.layers]
    sparse_w = sum(m.nnz * m.unit_numel for m in layers)
    dense_w = sum(math.prod(m.dense_weight_shape) for m in layers)
    info = dict(dense.info, block_size=block_size, target_density=s.density,
                sparse_layers=len(layers), sparse_layer_density=sparse_w / dense_w,
                left_dense=[str(w.message)[:300] for w in caught
                            if "leaves these layers dense" in str(w.message)])
    return Workload(dense.name, f"sparse_b{block_size}", model, opt, dense.inputs,
                    dense.loss_fn, mgr, info)


# --------------------------------------------------------------------------- steps and timing
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(w: Workload, device, model=None, set_to_none: bool = False
              ) -> Callable[[], torch.Tensor]:
    """One training step without ``mgr.step()``: zero_grad, forward and backward under bf16
    autocast (weight-cast cache off, as CUDA graph capture wants), optimizer step.

    Gradients are zeroed in place (a CUDA graph needs them at fixed addresses), or set to None
    with ``set_to_none`` (what ``torch.compile(mode="reduce-overhead")`` wants: gradients that
    are outputs of its graphs must not be read after the next replay)."""
    model = model if model is not None else w.model
    x, y = w.inputs

    def step():
        w.opt.zero_grad(set_to_none=set_to_none)
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            loss = w.loss_fn(model(x), y)
        loss.backward()
        w.opt.step()
        return loss.detach()
    return step


def time_calls(fn: Callable[[], object], n: int, device) -> List[float]:
    """Seconds per call of ``fn`` (``n`` calls, each timed; CUDA events on a GPU)."""
    out = []
    if device.type == "cuda":
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def _med(xs: List[float]) -> float:
    return statistics.median(xs)


def _with_mgr(step, w: Workload):
    if w.mgr is None:
        return step

    def run():
        out = step()
        w.mgr.step()
        return out
    return run


def capture_graph(step: Callable[[], torch.Tensor], device, warmup: int):
    """``step`` captured in a CUDA graph after ``warmup`` calls on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return g


def state_bytes(w: Workload) -> int:
    """Bytes of parameters, gradients and optimizer state."""
    seen, total = set(), 0
    tensors = []
    for p in w.model.parameters():
        tensors += [p, p.grad] + [v for v in w.opt.state.get(p, {}).values()
                                  if isinstance(v, torch.Tensor)]
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def peak_memory(step, device) -> Dict[str, Optional[int]]:
    if device.type != "cuda":
        return {"peak_bytes": None, "before_step_bytes": None}
    _sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync(device)
    return {"peak_bytes": torch.cuda.max_memory_allocated(), "before_step_bytes": before}


# --------------------------------------------------------------------------- cases
def case_step_times(w: Workload, device, s: Shapes) -> dict:
    """Eager and CUDA-graph step times, memory; dense FLOPs for dense models."""
    step = make_step(w, device)
    full = _with_mgr(step, w)
    for _ in range(s.warmup):
        full()
    _sync(device)
    out = {"model": w.name, "variant": w.variant, "info": w.info}
    if w.variant == "dense":
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            step()
        out["flops_per_step"] = fc.get_total_flops()
    out["eager_s"] = time_calls(full, s.timed, device)
    out["eager_median_s"] = _med(out["eager_s"])
    out.update(peak_memory(full, device))
    out["state_bytes"] = state_bytes(w)
    out["param_count"] = sum(p.numel() for p in w.model.parameters())
    if device.type == "cuda":
        try:
            g = capture_graph(step, device, s.warmup)
            replay = _with_mgr(g.replay, w)
            out["graph_s"] = time_calls(replay, s.timed, device)
            out["graph_median_s"] = _med(out["graph_s"])
            del g
        except Exception as exc:
            out["graph_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    else:
        out["graph_error"] = "no CUDA device (CUDA graphs need one)"
    return out


def case_compile(w: Workload, device, s: Shapes, tiny: bool) -> dict:
    """Step time through ``torch.compile(model, mode="reduce-overhead")`` (eager optimizer)."""
    out = {"model": w.name, "variant": w.variant, "mode": "reduce-overhead"}
    torch._dynamo.reset()
    kw = {"backend": "eager"} if device.type != "cuda" else {"mode": "reduce-overhead"}
    out["compile_kwargs"] = {k: str(v) for k, v in kw.items()}
    cmodel = torch.compile(w.model, **kw)
    step = make_step(w, device, cmodel, set_to_none=True)

    def full():
        torch.compiler.cudagraph_mark_step_begin()
        r = step()
        if w.mgr is not None:
            w.mgr.step()
        return r
    t0 = time.perf_counter()
    for _ in range(max(3, s.warmup)):     # compiles, then records the CUDA graphs
        full()
    _sync(device)
    out["compile_and_warmup_s"] = time.perf_counter() - t0
    out["compiled_s"] = time_calls(full, s.timed, device)
    out["compiled_median_s"] = _med(out["compiled_s"])
    return out


#: Update paths ``case_update_cost(compare_paths=True)`` times side by side: name -> the module
#: switches it sets (``itop.topology._BATCH_LAYERS``/``_BATCH_SCORES``,
#: ``itop_kernels.block_norms._GROUP_GEMM``); "batched" is the default.
UPDATE_PATHS = {
    "batched": {},
    "batched_bmm_scores": {"gemm": "bmm"},
    "per_layer_scores": {"scores": False},
    "per_layer": {"layers": False, "scores": False},
}


def _set_update_path(layers: bool = True, scores: bool = True, gemm: str = "auto") -> None:
    from itop import topology
    from itop_kernels import block_norms
    topology._BATCH_LAYERS, topology._BATCH_SCORES = layers, scores
    block_norms._GROUP_GEMM = gemm


def _update_pairs(step, mgr, device, pairs: int):
    """``(plain step times, update step times)``: ``pairs`` plain/update step pairs, after one
    warm-up pair."""
    def timed_step():
        _sync(device)
        t0 = time.perf_counter()
        step()
        changed = mgr.step()
        _sync(device)
        return time.perf_counter() - t0, changed
    for _ in range(2):                     # warm-up: one plain step and one update
        timed_step()
    plain, upd = [], []
    for _ in range(pairs):
        plain.append(timed_step()[0])
        dt, changed = timed_step()
        assert changed, "the update step changed nothing"
        upd.append(dt)
    return plain, upd, timed_step


def case_update_cost(w: Workload, device, s: Shapes, plain_step_s: Optional[float],
                     compare_paths: bool = False) -> dict:
    """One RigL update (gradient growth, rate 0.3) against plain steps, alternating; with
    ``compare_paths`` also each of :data:`UPDATE_PATHS` (batched across same-shape layers or
    not, grouped scores by bmm or mm), a few pairs each."""
    w.mgr.close()
    mgr = itop.TopologyManager(w.model, w.opt, update_every=2, total_steps=10 ** 9,
                               prune_rate=0.3, schedule="constant", growth="gradient")
    step = make_step(w, device)
    paths = {}
    if compare_paths:
        try:
            for name, switches in UPDATE_PATHS.items():
                _set_update_path(**switches)
                p_plain, p_upd, _ = _update_pairs(step, mgr, device, max(2, s.update_pairs // 2))
                paths[name] = {"plain_step_s": p_plain, "update_step_s": p_upd,
                               "update_extra_s": _med(p_upd) - _med(p_plain)}
        finally:
            _set_update_path()
    plain, upd, timed_step = _update_pairs(step, mgr, device, s.update_pairs)
    # where an update's time goes: one plain step, then one update step (armed step + update)
    from torch.profiler import ProfilerActivity, profile
    timed_step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        timed_step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30,
                                      max_name_column_width=60)
    table_dev = prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60)
    mgr.close()
    w.mgr = itop.TopologyManager(w.model, w.opt, update_every=10 ** 8, total_steps=10 ** 9)
    extra = _med(upd) - _med(plain)
    base = plain_step_s if plain_step_s is not None else _med(plain)
    return {"model": w.name, "variant": w.variant, "kind": "update_cost",
            "plain_step_s": plain, "update_step_s": upd, "update_extra_s": extra,
            "overhead_at_update_every_100": extra / (100 * base), "base_step_s": base,
            "target": 0.01, "update_paths": paths, "update_step_profile_by_cpu_time": table,
            "update_step_profile_by_device_time": table_dev}


def case_rigl_window(w: Workload, device, s: Shapes) -> dict:
    """Steps of a run with RigL updates every ``rigl_window`` steps, one update per window:
    eager, and graph-replayed (the armed step before an update and the update run eagerly)."""
    n = s.rigl_window
    out = {"model": w.name, "variant": w.variant, "kind": "rigl_window", "update_every": n}
    step = make_step(w, device)
    for mode in ("eager", "graph"):
        if mode == "graph" and device.type != "cuda":
            out["graph_error"] = "no CUDA device"
            continue
        w.mgr.close()
        mgr = itop.TopologyManager(w.model, w.opt, update_every=n, total_steps=10 ** 9,
                                   prune_rate=0.3, schedule="constant", growth="gradient")
        try:
            g = capture_graph(step, device, s.warmup) if mode == "graph" else None
            _sync(device)
            t0 = time.perf_counter()
            updates = eager_steps = 0
            for _ in range(n):
                if g is None or any(m._capturing for _, m in mgr.layers):
                    step()
                    eager_steps += 1
                else:
                    g.replay()
                updates += bool(mgr.step())
            _sync(device)
            dt = time.perf_counter() - t0
            out[f"{mode}_window_s"] = dt
            out[f"{mode}_per_step_s"] = dt / n
            out[f"{mode}_updates"] = updates
            out[f"{mode}_eager_steps"] = eager_steps
            del g
        except Exception as exc:
            out[f"{mode}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
        mgr.close()
    w.mgr = itop.TopologyManager(w.model, w.opt, update_every=10 ** 8, total_steps=10 ** 9)
    return out


def case_profile(w: Workload, device, s: Shapes) -> dict:
    from torch.profiler import ProfilerActivity, profile
    step = _with_mgr(make_step(w, device), w)
    step()
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(s.profile_steps):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {"model": w.name, "variant": w.variant, "kind": "profile", "steps": s.profile_steps,
            "sort_by": key,
            "table": prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)}


def case_layout_rebuild(device, s: Shapes) -> dict:
    """``BlockLayout`` builds at ``layout_side``², block ``layout_block``, density 0.1."""
    R = C = s.layout_side // s.layout_block
    nnz = round(0.1 * R * C)
    g = torch.Generator().manual_seed(0)
    pos = torch.randperm(R * C, generator=g)[:nnz].sort().values.to(device)
    mask = torch.zeros(R * C, dtype=torch.bool, device=device)
    mask[pos] = True
    mask = mask.view(R, C)
    target = BlockLayout.from_positions(pos, (R, C), s.layout_block)
    other = BlockLayout.from_positions(pos, (R, C), s.layout_block)
    import itop_kernels.layout as layout_mod
    calls = {
        "from_positions": lambda: BlockLayout.from_positions(pos, (R, C), s.layout_block,
                                                             check=False),
        "from_positions_with_mask": lambda: BlockLayout.from_positions(
            pos, (R, C), s.layout_block, block_mask=mask, check=False),
        "from_mask_known_nnz": lambda: BlockLayout.from_mask(mask, s.layout_block, nnz=nnz),
        "copy_in_place": lambda: target.copy_(other),
    }
    out = {"kind": "layout_rebuild", "grid": [R, C], "block_size": s.layout_block, "nnz": nnz,
           "target_s": 1e-3, "cases": {}}
    fast = layout_mod._CPU_FAST_BUILD
    layout_mod._CPU_FAST_BUILD = False   # the device path (a sort with known nnz) on the CPU too
    try:
        for name, fn in calls.items():
            for _ in range(5):
                fn()
            reps = 50
            t = time_calls(lambda: [fn() for _ in range(reps)], 3, device)
            res = {"per_call_s": min(t) / reps}
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    fn()
                    res["host_sync"] = False
                except RuntimeError as exc:
                    res["host_sync"] = True
                    res["sync_error"] = str(exc)[:500]
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            else:
                res["host_sync"] = None   # tests/test_step_syncs.py checks the CPU build
            out["cases"][name] = res
    finally:
        layout_mod._CPU_FAST_BUILD = fast
    return out


# --------------------------------------------------------------------------- analytic bounds
def _resnet50_layers() -> List[tuple]:
    """``(cin, cout, k, out_hw)`` of every conv of torchvision's ResNet-50 (v1.5: the stride
    sits in the 3×3 conv) at 224², then ``(2048, 1000, 1, 1)`` for the head."""
    layers = [(3, 64, 7, 112)]
    cin = 64
    for mid, n, stride, hw in ((64, 3, 1, 56), (128, 4, 2, 28), (256, 6, 2, 14),
                               (512, 3, 2, 7)):
        for i in range(n):
            st = stride if i == 0 else 1
            layers += [(cin, mid, 1, hw * st), (mid, mid, 3, hw), (mid, 4 * mid, 1, hw)]
            if i == 0:
                layers.append((cin, 4 * mid, 1, hw))
            cin = 4 * mid
    return layers + [(2048, 1000, 1, 1)]


def _densities(modules: List[nn.Module], density: float, distribution: str, bs: int
               ) -> List[float]:
    """The density ``itop.sparsify`` gives each module (1.0 where it leaves one dense)."""
    holder = nn.ModuleList(modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        itop.sparsify(holder, density, distribution=distribution, block_size=bs)
    return [m.density if isinstance(m, itop.SparseLayer) else 1.0 for m in holder]


def case_amdahl(s: Shapes, peak_tflops: float, bandwidth_tbs: float = 4.8) -> dict:
    """FLOPs of a fwd+bwd step (3× the forward's multiply-adds ×2) of each model, dense and at
    the benchmark's densities, and the Amdahl bound ``dense / sparse`` on the speedup if every
    FLOP ran at the same rate and nothing else took time. GPT-2's causal attention counts half
    of ``QKᵀ`` and ``AV`` (what flash attention computes) and its backward 2.5× its forward.
    ``logits_bytes`` estimates the memory traffic of the loss on GPT-2's ``[tokens, vocab]``
    logits (bf16 logits, float32 log-softmax and its gradient: ~30 bytes per logit), a dense
    cost at ``bandwidth_tbs`` that no sparsity removes."""
    out = {"kind": "amdahl", "peak_tflops": peak_tflops, "bandwidth_tbs": bandwidth_tbs,
           "models": {}}
    M, w, h = s.mlp_rows, s.mlp_width, s.mlp_hidden
    d_mlp = _densities([nn.Linear(w, h), nn.Linear(h, w)], s.density, "uniform", s.block_mlp)
    lin = 6 * M * w * h
    out["models"]["mlp"] = {"dense_flops": s.mlp_blocks * 2 * lin,
                            "sparse_flops": s.mlp_blocks * lin * sum(d_mlp),
                            "sparseable_fraction": 1.0}
    N, d, L, V, T, B = (s.gpt_batch * s.gpt_seq, s.gpt_d, s.gpt_layers, s.gpt_vocab, s.gpt_seq,
                        s.gpt_batch)
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
    d_gpt = _densities([nn.Linear(i, o) for o, i in shapes], s.density, "uniform", s.block_gpt)
    proj = [6 * N * o * i for o, i in shapes]
    head = 6 * N * d * V
    attn = L * (2 * B * T * T * d) * 3.5           # causal half of 4·B·T²·d, fwd + 2.5× bwd
    dense = L * sum(proj) + head + attn
    sparse = L * sum(p * dd for p, dd in zip(proj, d_gpt)) + head + attn
    logits_bytes = 30 * N * V
    out["models"]["gpt2"] = {"dense_flops": dense, "sparse_flops": sparse,
                             "sparseable_fraction": L * sum(proj) / dense,
                             "head_flops": head, "attention_flops": attn,
                             "logits_bytes": logits_bytes,
                             "logits_s": logits_bytes / (bandwidth_tbs * 1e12)}
    layers = _resnet50_layers()
    mods = [nn.Conv2d(ci, co, k, bias=False) if hw > 1 else nn.Linear(ci, co)
            for ci, co, k, hw in layers]
    out["models"]["resnet50"] = {}
    for bs in s.resnet_blocks:
        dens = _densities(mods, s.density, "erk", bs)
        macs = [ci * co * k * k * hw * hw * s.resnet_batch for ci, co, k, hw in layers]
        dense_r = 6 * sum(macs)
        sparse_r = 6 * sum(m * dd for m, dd in zip(macs, dens))
        out["models"]["resnet50"][f"b{bs}"] = {
            "dense_flops": dense_r, "sparse_flops": sparse_r,
            "sparseable_fraction": 6 * sum(m for m, dd in zip(macs, dens) if dd < 1) / dense_r,
            "param_density": sum(ci * co * k * k * dd for (ci, co, k, _), dd in
                                 zip(layers, dens)) / sum(ci * co * k * k
                                                          for ci, co, k, _ in layers)}
    for m in out["models"].values():
        for r in ([m] if "dense_flops" in m else m.values()):
            r["amdahl_bound"] = r["dense_flops"] / r["sparse_flops"]
            r["dense_floor_s"] = r["dense_flops"] / (peak_tflops * 1e12)
            r["sparse_floor_s"] = r["sparse_flops"] / (peak_tflops * 1e12)
            if "logits_s" in r:
                r["amdahl_bound_with_logits"] = (r["dense_floor_s"] + r["logits_s"]) / (
                    r["sparse_floor_s"] + r["logits_s"])
    return out


# --------------------------------------------------------------------------- driver
@dataclass
class Plan:
    name: str
    est_s: float
    run: Callable[[], Optional[dict]]


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    ap.add_argument("--quick", action="store_true",
                    help="on a GPU: budget 60 s and no torch.compile; without one: --tiny")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-time budget; cases that would not fit are skipped "
                         "(default 170 on a GPU, 60 with --tiny)")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--only", nargs="+", default=None, metavar="CASE",
                    help="run only the cases whose names start with these (e.g. "
                         "layout_rebuild, mlp, gpt2_update_cost); layout_rebuild and amdahl "
                         "(analytic FLOPs) also run on a CPU at full size")
    ap.add_argument("--compile", choices=("none", "mlp", "all"), default=None,
                    help="which models also run through torch.compile(mode='reduce-overhead') "
                         "(default mlp on a GPU, none with --tiny)")
    ap.add_argument("--peak-tflops", type=float, default=700.0,
                    help="bf16 dense peak for the FLOP floor of the dense step")
    ap.add_argument("--out-dir", default=None, help=OUT_DIR_HELP)
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    ap.add_argument("--no-plot", action="store_true")
    return ap


class Runner:
    """Runs planned cases under the budget, rewriting the JSON after each."""

    def __init__(self, result: dict, path: Path, budget_s: float):
        self.result, self.path, self.budget_s = result, path, budget_s
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def write(self) -> None:
        self.result["elapsed_s"] = time.perf_counter() - self.t0
        self.result["summary"] = summarize(self.result)   # also in a run stopped at its cap
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        os.replace(tmp, self.path)

    def run(self, plan: Plan) -> Optional[dict]:
        if self.left() < plan.est_s:
            self.result["skipped"].append({"case": plan.name, "reason": "budget",
                                           "est_s": plan.est_s, "left_s": self.left()})
            print(f"skip {plan.name}: {self.left():.0f} s left, needs ~{plan.est_s:.0f} s",
                  flush=True)
            self.write()
            return None
        t0 = time.perf_counter()
        try:
            res = plan.run()
        except Exception as exc:
            res = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}
        if res is None:
            return None
        res["case"] = plan.name
        res["case_wall_s"] = time.perf_counter() - t0
        self.result["cases"].append(res)
        print(f"done {plan.name} in {res['case_wall_s']:.1f} s"
              + (f" ERROR {res['error']}" if "error" in res else ""), flush=True)
        self.write()
        return res


def plan_cases(a, s: Shapes, device, tiny: bool) -> List[Plan]:
    """The cases in order of importance, each with a conservative cost estimate (seconds on an
    H200, kernel compilation included; ``--tiny``: 1 s each)."""
    dense: Dict[str, Optional[Workload]] = {}
    sparse: Dict[str, Workload] = {}
    steps: Dict[str, float] = {}
    compile_models = {"none": (), "mlp": ("mlp",), "all": MODELS}[a.compile]

    def get_dense(m):
        if m not in dense:
            dense[m] = build_dense(m, s, device)
        return dense[m]

    def get_sparse(m, bs):
        key = f"{m}_b{bs}"
        if key not in sparse:
            d = get_dense(m)
            if d is None:
                return None
            sparse[key] = build_sparse(d, s, device, bs)
        return sparse[key]

    def step_case(m, bs=None):
        def run():
            w = get_dense(m) if bs is None else get_sparse(m, bs)
            if w is None:
                return {"model": m, "variant": "dense" if bs is None else f"sparse_b{bs}",
                        "unavailable": "torchvision does not import"}
            r = case_step_times(w, device, s)
            steps[f"{m}_{w.variant}"] = r["eager_median_s"]
            return r
        return run

    def needs(m, bs, fn):
        def run():
            w = get_sparse(m, bs)
            return None if w is None else fn(w)
        return run

    blocks = {"mlp": s.block_mlp, "gpt2": s.block_gpt, "resnet50": s.resnet_blocks[0]}
    est = (lambda x: 1.0) if tiny else (lambda x: x)
    plans = [Plan("amdahl", est(1), lambda: case_amdahl(s, a.peak_tflops)),
             Plan("layout_rebuild", est(3), lambda: case_layout_rebuild(device, s))]
    for m, (e_dense, e_sparse) in (("mlp", (10, 20)), ("gpt2", (8, 20)),
                                   ("resnet50", (10, 30))):
        if m not in a.models:
            continue
        bs = blocks[m]
        plans.append(Plan(f"{m}_dense", est(e_dense), step_case(m)))
        plans.append(Plan(f"{m}_sparse_b{bs}", est(e_sparse), step_case(m, bs)))
        if m == "mlp":
            plans.append(Plan("mlp_rigl_window", est(6), needs(m, bs, lambda w: case_rigl_window(
                w, device, s))))
        if m == "gpt2":
            plans.append(Plan("gpt2_update_cost", est(6), needs(m, bs, lambda w: case_update_cost(
                w, device, s, steps.get(f"gpt2_{w.variant}"), compare_paths=True))))
    for m in a.models:
        bs = blocks[m]
        plans.append(Plan(f"{m}_profile", est(5), needs(m, bs, lambda w: case_profile(
            w, device, s))))
    for m in ("mlp", "resnet50"):
        if m in a.models:
            bs = blocks[m]
            plans.append(Plan(f"{m}_update_cost", est(5), needs(
                m, bs, lambda w, m=m: case_update_cost(w, device, s,
                                                       steps.get(f"{m}_{w.variant}")))))
    if "resnet50" in a.models:
        for bs in s.resnet_blocks[1:]:
            plans.append(Plan(f"resnet50_sparse_b{bs}", est(25), step_case("resnet50", bs)))
    for m in compile_models:
        if m not in a.models:
            continue
        e = {"mlp": 45, "gpt2": 80, "resnet50": 100}[m]
        plans.append(Plan(f"{m}_dense_compile", est(e), lambda m=m: (
            None if get_dense(m) is None else case_compile(get_dense(m), device, s, tiny))))
        plans.append(Plan(f"{m}_sparse_compile", est(e), needs(
            m, blocks[m], lambda w: case_compile(w, device, s, tiny))))
    return plans


def summarize(result: dict) -> List[dict]:
    """Rows ``{model, variant, eager, graph, compiled, speedup_*, *_vs_dense, dense_floor_s}``
    from the cases (rewritten with the JSON after every case)."""
    by = {}
    for c in result["cases"]:
        if "variant" not in c or "model" not in c:
            continue
        row = by.setdefault((c["model"], c["variant"]), {"model": c["model"],
                                                          "variant": c["variant"]})
        for k in ("eager_median_s", "graph_median_s", "compiled_median_s", "peak_bytes",
                  "state_bytes", "param_count", "flops_per_step"):
            if k in c:
                row[k] = c[k]
        if c.get("kind") == "update_cost":
            row["update_overhead_at_100"] = c["overhead_at_update_every_100"]
        if c.get("kind") == "rigl_window":
            for mode in ("eager", "graph"):
                if f"{mode}_per_step_s" in c:
                    row[f"rigl_{mode}_per_step_s"] = c[f"{mode}_per_step_s"]
    rows = list(by.values())
    for r in rows:
        d = by.get((r["model"], "dense"), {})
        for k in ("eager", "graph", "compiled"):
            if r.get(f"{k}_median_s") and d.get(f"{k}_median_s"):
                r[f"speedup_{k}"] = d[f"{k}_median_s"] / r[f"{k}_median_s"]
        for mode, base in (("eager", "eager"), ("graph", "graph")):
            if r.get(f"rigl_{mode}_per_step_s") and d.get(f"{base}_median_s"):
                r[f"speedup_rigl_{mode}"] = d[f"{base}_median_s"] / r[f"rigl_{mode}_per_step_s"]
        if r.get("peak_bytes") and d.get("peak_bytes"):
            r["peak_vs_dense"] = r["peak_bytes"] / d["peak_bytes"]
        if r.get("state_bytes") and d.get("state_bytes"):
            r["state_vs_dense"] = r["state_bytes"] / d["state_bytes"]
        if r.get("param_count") and d.get("param_count"):
            r["params_vs_dense"] = r["param_count"] / d["param_count"]
        if r.get("flops_per_step") and result.get("peak_tflops"):
            r["dense_floor_s"] = r["flops_per_step"] / (result["peak_tflops"] * 1e12)
    return rows


def print_table(rows: List[dict], result: dict) -> None:
    def ms(v):
        return f"{v * 1e3:9.2f}" if isinstance(v, (int, float)) else f"{'-':>9}"

    def x(v):
        return f"{v:6.2f}x" if isinstance(v, (int, float)) else f"{'-':>7}"
    print(f"\n{result['device_name']}: step times (ms) and speedups against dense")
    print(f"{'model':9} {'variant':10} {'eager':>9} {'graph':>9} {'compiled':>9} "
          f"{'sp.eager':>8} {'sp.graph':>8} {'sp.comp':>8} {'+RigL':>8} {'mem':>7}")
    for r in rows:
        print(f"{r['model']:9} {r['variant']:10} {ms(r.get('eager_median_s'))} "
              f"{ms(r.get('graph_median_s'))} {ms(r.get('compiled_median_s'))} "
              f"{x(r.get('speedup_eager')):>8} {x(r.get('speedup_graph')):>8} "
              f"{x(r.get('speedup_compiled')):>8} {x(r.get('speedup_rigl_graph', r.get('speedup_rigl_eager'))):>8} "
              f"{x(r.get('peak_vs_dense')):>7}")
    for c in result["cases"]:
        if c.get("kind") == "update_cost":
            print(f"RigL update, {c['model']}: +{c['update_extra_s'] * 1e3:.2f} ms = "
                  f"{100 * c['overhead_at_update_every_100']:.2f} % of 100 steps")
            for name, p in c.get("update_paths", {}).items():
                print(f"  update path {name:20s} +{p['update_extra_s'] * 1e3:.2f} ms")
        if c.get("kind") == "amdahl":
            for m, r in c["models"].items():
                for k, v in ([(m, r)] if "dense_flops" in r else
                             [(f"{m} {b}", x) for b, x in r.items()]):
                    print(f"Amdahl {k}: {v['dense_flops'] / 1e12:.2f} -> "
                          f"{v['sparse_flops'] / 1e12:.2f} TFLOP/step, bound "
                          f"{v['amdahl_bound']:.2f}x"
                          + (f" ({v['amdahl_bound_with_logits']:.2f}x with the logits' "
                             "memory traffic)" if "amdahl_bound_with_logits" in v else ""))
        if c.get("kind") == "layout_rebuild":
            for n, v in c["cases"].items():
                print(f"layout {c['grid']} bs {c['block_size']} {n}: "
                      f"{v['per_call_s'] * 1e6:.0f} us, host sync: {v['host_sync']}")
    for sk in result["skipped"]:
        print(f"skipped {sk['case']} ({sk['reason']})")


def plot(rows: List[dict], path: Path, device_name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r["variant"] != "dense"]
    modes = [("speedup_eager", "eager"), ("speedup_graph", "CUDA graph"),
             ("speedup_compiled", "compiled"), ("speedup_rigl_graph", "graph + RigL/100")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(modes)
    for i, (k, label) in enumerate(modes):
        ax.bar([j + i * width for j in range(len(rows))], [r.get(k) or 0 for r in rows],
               width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['model']}\n{r['variant']}" for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("dense step time / sparse step time")
    ax.set_title(f"Training step at 90 % sparsity, bf16 ({device_name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    has_cuda = torch.cuda.is_available()
    tiny = a.tiny or (a.quick and not has_cuda)
    device = torch.device("cpu" if tiny or not has_cuda else "cuda")
    cpu_cases = ("layout_rebuild", "amdahl")
    if not tiny and device.type != "cuda" and not (
            a.only is not None and all(c in cpu_cases for c in a.only)):
        print(f"no CUDA device: running only {', '.join(cpu_cases)} at full size (--tiny runs "
              "every case at tiny shapes)", flush=True)
        a.only = list(cpu_cases)
    a.compile = a.compile or ("none" if tiny or a.quick else "mlp")
    budget = a.budget_s if a.budget_s is not None else (60.0 if tiny or a.quick else 170.0)
    s = Shapes.tiny() if tiny else Shapes()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name()
    else:
        name = f"{cpu_model()} ({os.cpu_count()} cores)"
    if tiny:
        tag = "tiny"
    elif device.type == "cpu":
        tag = "cpu_" + "_".join(sorted(a.only))
    else:
        tag = name.split()[1].lower() if name.startswith("NVIDIA") else "gpu"
    path = results_path(f"train_gpu_{tag}.json", a.out_dir)
    refuse_overwrite(ap, a.overwrite, path, None if a.no_plot else path.with_suffix(".png"))
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "train_gpu", "device": device.type, "device_name": name,
        "versions": package_versions("torch", "triton", "torchvision", "numpy"),
        "git": git_state("itop", "itop_kernels", "benchmarks/bench_train_gpu.py"),
        "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_s": budget, "shapes": s.__dict__, "peak_tflops": a.peak_tflops,
        "autocast": "bf16", "optimizer": "AdamW",
        "compile_models": a.compile, "cases": [], "skipped": [],
    }
    runner = Runner(result, path, budget)
    for plan in plan_cases(a, s, device, tiny):
        if a.only is None or plan.name.startswith(tuple(a.only)):
            runner.run(plan)
    rows = summarize(result)
    result["summary"] = rows
    runner.write()
    print_table(rows, result)
    if not a.no_plot:
        try:
            plot(rows, path.with_suffix(".png"), name)
        except Exception as exc:  # a plot failure must not lose the JSON
            print(f"plot failed: {exc!r}", file=sys.stderr)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
