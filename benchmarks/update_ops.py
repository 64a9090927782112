"""Count the aten ops one topology update runs, per sparse layer, and attribute them to the code
that issues them (issue 14: on a GPU an update is a chain of small kernels launched from
Python, so its cost is roughly ops × the host time of one op).

:func:`count_update_ops` builds ``layers`` identical sparse layers (linear 256→256 at block 32,
or conv 3×3 64→64 at block 16; density 0.25), trains two steps, and records every aten op
dispatched inside ``mgr.step()`` on the update step (a ``TorchDispatchMode``). The gradient
score ops (``itop_kernels::block_grad_norms``, ``block_grad_norms_group``,
``conv2d_block_grad_norms``: :data:`EXPANDED`) count as the aten ops their implementation runs
(casts, GEMMs, square, block sum, sqrt: what they launch on a GPU), not as one op; every other
custom op counts as one. Each op is attributed to the innermost frame of this repository's code
and from there to a category (:data:`CATEGORIES`).

    python benchmarks/update_ops.py   # per-layer table (batching off) + GPT-2 toy per update

``tests/test_update_op_budget.py`` holds the counts under a ceiling, and
``bench_topology_update.py`` writes them into its JSON.
"""
from __future__ import annotations

import collections
import contextlib
import sys
import traceback
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import itop  # noqa: E402
from itop import topology  # noqa: E402
from itop_kernels import block_norms  # noqa: E402

# ops that launch no kernel on a GPU (metadata, aliases, host-side scalars and allocations)
HOST_ONLY = ("aten.view", "aten._unsafe_view", "aten.detach", "aten.alias", "aten.unbind",
             "aten.lift_fresh", "aten.empty", "aten.scalar_tensor", "aten.select", "aten.slice",
             "aten.reshape", "aten.squeeze", "aten.unsqueeze", "aten.expand", "aten.t.",
             "aten.transpose", "aten.as_strided")

# custom ops counted as the aten ops inside them (plain torch ops in Python: their kernels are
# what a GPU launches); the op itself is counted under "<name> calls" in ``custom_calls``
EXPANDED = ("itop_kernels::block_grad_norms", "itop_kernels::block_grad_norms_group",
            "itop_kernels::conv2d_block_grad_norms")

CATEGORIES = ("prune scores", "finite keys", "top-k (prune + growth)", "growth scores",
              "new order + masks", "move values/grad/optimizer state", "layout rebuild",
              "fired mask", "other")

# (file, function) -> category; functions not listed are attributed by their caller's line
_BY_FUNCTION = {
    ("storage.py", "active_units"): "prune scores",
    ("topology.py", "_finite"): "finite keys",
    ("unit_selection.py", "topk_indices"): "top-k (prune + growth)",
    ("unit_selection.py", "random_inactive"): "growth scores",
    ("unit_selection.py", "_first_distinct_inactive"): "growth scores",
    ("layers.py", "_grad_scores"): "growth scores",
    ("layers.py", "<listcomp>"): "growth scores",
    ("block_norms.py", None): "growth scores",
    ("topology.py", "_grad_scores"): "growth scores",
    ("topology.py", "_random_scores"): "growth scores",
    ("storage.py", "_move_rows"): "move values/grad/optimizer state",
    ("storage.py", "_move_rows_group"): "move values/grad/optimizer state",
    ("topology.py", "_drawn_rows"): "growth scores",
    ("topology.py", "_rows_of_one"): "growth scores",
    ("storage.py", "_state_tensors"): "move values/grad/optimizer state",
    ("layout.py", None): "layout rebuild",
}


def _category(stack) -> str:
    for fr in reversed(stack):
        fname = fr.filename.rsplit("/", 1)[-1]
        if "/itop" not in fr.filename or fname == "update_ops.py":
            continue
        cat = _BY_FUNCTION.get((fname, fr.name)) or _BY_FUNCTION.get((fname, None))
        if cat:
            return cat
        line = fr.line or ""
        if fname == "topology.py" and fr.name == "_group_choices":   # the batched choices
            if "topk" in line:
                return "top-k (prune + growth)"
            if "mag" in line or "values" in line:
                return "prune scores"
            return "new order + masks" if "flat_positions" in line else "growth scores"
        if fname == "topology.py" and "fired" in line:
            return "fired mask"
        if fname == "topology.py" and "key" in line:
            return "growth scores"
        if fname == "storage.py" and fr.name in ("apply_topology", "apply_topology_group"):
            return "layout rebuild" if "layout" in line else "new order + masks"
        if fname == "layers.py" and fr.name in ("_apply_topology", "_apply_topology_group"):
            return "new order + masks"
        return f"other ({fname}:{fr.lineno} {fr.name})"
    return "other"


class OpCounter(TorchDispatchMode):
    """Counts aten ops by ``(category, op)``; the custom ops in :data:`EXPANDED` are run through
    their Python implementation with this mode on, so the ops inside them are counted in their
    place (``expand=False``: counted as one op each, as before)."""

    def __init__(self, expand: bool = True):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.custom_calls: collections.Counter = collections.Counter()
        self.expand = expand

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if self.expand and name in EXPANDED:
            self.custom_calls[name] += 1
            impl = torch._library.custom_ops.OPDEFS[name]._init_fn
            with self:   # the mode is off inside __torch_dispatch__: count the inner ops
                return impl(*args, **(kwargs or {}))
        self.counts[(_category(traceback.extract_stack()[:-1]), str(func))] += 1
        return func(*args, **(kwargs or {}))


def _model(kind: str, layers: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(layers)])
        x = torch.randn(32, 256)
        bs = 32
    elif kind == "conv":
        model = nn.Sequential(*[nn.Conv2d(64, 64, 3, padding=1) for _ in range(layers)])
        x = torch.randn(2, 64, 6, 6)
        bs = 16
    else:
        raise ValueError(f"kind must be 'linear' or 'conv', got {kind!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return itop.sparsify(model, 0.25, block_size=bs, distribution="uniform"), x


class GPT2Toy(nn.Module):
    """GPT-2's four sparse layer shapes at a tiny width: ``blocks`` × (QKV d→3d, projection
    d→d, MLP d→4d and 4d→d), interleaved in that order as in GPT-2 (12 blocks, d = 768 there),
    on ``[B, d]`` rows (no attention: only the layers' shapes matter to an update)."""

    def __init__(self, blocks: int = 4, d: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d), "fc": nn.Linear(d, 4 * d),
            "fc2": nn.Linear(4 * d, d)}) for _ in range(blocks))
        self.d = d

    def forward(self, x):
        for b in self.blocks:
            q, k, v = b["qkv"](x).split(self.d, dim=-1)
            x = x + b["proj"](torch.tanh(q * k) * v)
            x = x + b["fc2"](torch.relu(b["fc"](x)))
        return x


def _gpt2_toy(blocks: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = itop.sparsify(GPT2Toy(blocks), 0.25, block_size=8, distribution="uniform")
    return model, torch.randn(16, 32)


def count_update_ops(kind: str = "linear", growth: str = "random", optimizer: str = "adamw",
                     layers: int = 3, expand: bool = True) -> dict:
    """Ops of one update (``mgr.step()`` on the second update step, gradients present, as in a
    loop of ``zero_grad, forward, backward, opt.step(), mgr.step()``; the first update also
    builds per-group caches once).

    ``kind="gpt2_toy"``: :class:`GPT2Toy` with ``layers`` blocks (4 sparse layers each, block
    8, density 0.25) in place of ``layers`` identical layers.

    ``expand=False`` counts each gradient score op as one op (what this script counted before
    the ops inside them were counted, :data:`EXPANDED`).

    Returns:
        ``{"total", "per_layer", "launching_per_layer", "by_category": {category: per-layer
        count}, "by_op": {op: per-layer count}, "score_op_calls": {custom op: calls}}``;
        ``launching`` leaves out the ops in :data:`HOST_ONLY`.
    """
    model, x = _gpt2_toy(layers) if kind == "gpt2_toy" else _model(kind, layers)
    if kind == "gpt2_toy":
        layers = sum(isinstance(m, itop.SparseLayer) for m in model.modules())
    opt = (torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))
    mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=100, growth=growth,
                               prune_rate=0.3)
    counter = OpCounter(expand)
    for step in (1, 2, 3, 4):   # the second update (what every later one runs: caches built)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if step == 4:
            with counter:
                changed = mgr.step()
            assert changed, "no update happened"
        else:
            mgr.step()
    total = sum(counter.counts.values())
    by_cat: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    launching = 0
    for (cat, op), n in counter.counts.items():
        by_cat[cat] += n
        by_op[op] += n
        if not op.startswith(HOST_ONLY):
            launching += n
    return {"kind": kind, "growth": growth, "optimizer": optimizer, "layers": layers,
            "total": total, "per_layer": total / layers, "launching_per_layer": launching / layers,
            "by_category": {c: n / layers for c, n in sorted(by_cat.items())},
            "by_op": {o: n / layers for o, n in by_op.most_common()},
            "expanded": expand, "score_op_calls": dict(counter.custom_calls)}


def all_counts() -> list:
    """Per-layer counts of the per-layer path (batching across layers off), every layer kind,
    growth and optimizer."""
    with switched(topology, "_BATCH_LAYERS", False):
        return [count_update_ops(k, g, o) for k in ("linear", "conv")
                for g in ("random", "gradient") for o in ("sgd", "adamw")]


@contextlib.contextmanager
def switched(module, name: str, value) -> Iterator[None]:
    """Within the block, ``module.<name>`` is ``value`` (restored afterwards): the update-path
    switches ``itop.topology._BATCH_LAYERS`` (updates batched across same-shape layers),
    ``_BATCH_SCORES`` (gradient scores of a group computed together) and
    ``itop_kernels.block_norms._GROUP_GEMM`` ("bmm": a batched GEMM, what CUDA runs)."""
    was = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, was)


# (label, batched update, batched scores, group GEMM) of gpt2_toy_counts
TOY_PATHS = (("batched", True, True, "auto"), ("batched, bmm scores", True, True, "bmm"),
             ("batched, scores per layer", True, False, "auto"), ("per layer", False, False, "auto"))


def gpt2_toy_counts(blocks: int = 4) -> list:
    """Ops per UPDATE of :class:`GPT2Toy` (``blocks`` × 4 sparse layers in 4 shape groups),
    AdamW, random and gradient growth, along :data:`TOY_PATHS`: batched (scores of same-shape
    layers together: one ``mm`` per layer on the CPU, ``"auto"``), the same with the batched GEMM
    a GPU runs (``"bmm"``), batched with each layer's scores alone (the update before the scores
    were batched), and per layer. Gradient score ops count as the ops inside them."""
    out = []
    for label, on, scores, gemm in TOY_PATHS:
        for g in ("random", "gradient"):
            if g == "random" and label in ("batched, bmm scores", "batched, scores per layer"):
                continue   # no gradient scores: the same as "batched"
            with switched(topology, "_BATCH_LAYERS", on), \
                    switched(topology, "_BATCH_SCORES", scores), \
                    switched(block_norms, "_GROUP_GEMM", gemm):
                r = count_update_ops("gpt2_toy", g, "adamw", blocks)
            out.append({"path": label, "batched": on, "batch_scores": on and scores,
                        "group_gemm": gemm, "growth": g, "blocks": blocks,
                        "layers": r["layers"], "total": r["total"],
                        "launching": round(r["launching_per_layer"] * r["layers"]),
                        "score_op_calls": r["score_op_calls"],
                        "by_category": {c: round(n * r["layers"])
                                        for c, n in r["by_category"].items()}})
    return out


def main() -> None:
    print("Per-layer path, ops per layer of one update:\n")
    rows = all_counts()
    cats = [c for c in CATEGORIES if any(c in r["by_category"] for r in rows)]
    cats += sorted({c for r in rows for c in r["by_category"]} - set(cats))
    print("| category | " + " | ".join(f"{r['kind']} {r['growth']} {r['optimizer']}"
                                       for r in rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for c in cats:
        print(f"| {c} | " + " | ".join(f"{r['by_category'].get(c, 0):g}" for r in rows) + " |")
    print("| **all ops** | " + " | ".join(f"**{r['per_layer']:g}**" for r in rows) + " |")
    print("| launching a kernel | " + " | ".join(f"{r['launching_per_layer']:g}" for r in rows)
          + " |")
    for blocks in (4, 12):
        toy = gpt2_toy_counts(blocks)
        print(f"\nGPT-2-like toy, {blocks} blocks × 4 linear shapes ({4 * blocks} layers, AdamW), "
              "ops per UPDATE:\n")
        cols = [f"{r['path']} {r['growth']}" for r in toy]
        print("| category | " + " | ".join(cols) + " |")
        print("|---" * (len(toy) + 1) + "|")
        cats = [c for c in CATEGORIES if any(c in r["by_category"] for r in toy)]
        cats += sorted({c for r in toy for c in r["by_category"]} - set(cats))
        for c in cats:
            print(f"| {c} | " + " | ".join(str(r["by_category"].get(c, 0)) for r in toy) + " |")
        print("| **all ops** | " + " | ".join(f"**{r['total']}**" for r in toy) + " |")
        print("| launching a kernel | " + " | ".join(str(r["launching"]) for r in toy) + " |")


if __name__ == "__main__":
    main()
