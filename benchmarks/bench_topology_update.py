"""Cost of one topology update against one training step (issue 4, "Overhead").

For an MLP-heavy model of sparse layers (``depth`` × SparseLinear width→width at ``density``,
ReLU, then a dense head width→10; uniform density, SGD with momentum, cross-entropy on one fixed
random batch) it alternates
- plain training steps (forward, ``zero_grad``, backward, ``opt.step()``, ``mgr.step()`` with
  nothing to do), and
- update steps: the same, with the growth-score hooks armed in the backward and the topology
  update inside ``mgr.step()`` (``update_every=2``, constant prune rate 0.3),

and reports the medians, ``extra = update_step - plain_step`` (hooks included) and the overhead
at ``update_every=100``: ``extra / (100 · plain_step)``. The target is < 1 %. The time inside
``mgr.step()`` on update steps is recorded separately (``mgr_update_s``).

Cases: block 32 and block 1 × growth ``random`` / ``gradient`` (``score_precision="auto"``,
which is bf16 on devices with native bf16 matmul) / ``gradient`` with ``score_precision=
"exact"``, for every ``--threads`` value. Every case runs in a fresh model; cases take turns
in rounds (``--rounds``) so that machine noise hits all of them.

    python benchmarks/bench_topology_update.py [--device cpu|cuda] [--threads 1 2] [--out PATH]
    python benchmarks/bench_topology_update.py --quick   # width 512 (CPU), 1 thread, 2 rounds
    python benchmarks/bench_topology_update.py --tiny    # host-bound: 12 × 256², batch 32

``--per-layer`` switches off the batching of same-shape layers (``itop.topology._BATCH_LAYERS``:
one chain of ops per group of layers of one shape instead of per layer), to compare both paths;
the JSON records ``batch_layers``, and the default file name gets ``_per_layer``.
``--per-layer-scores`` keeps the update batched but computes each layer's gradient scores alone
(``itop.topology._BATCH_SCORES``: the update before same-shape layers were scored together;
``_per_layer_scores`` in the file name). ``--group-gemm bmm|mm`` picks how a group's scores
multiply (``itop_kernels.block_norms._GROUP_GEMM``; default ``auto``: one ``bmm`` per chunk on
CUDA, one ``mm`` per layer on the CPU, bit for bit the per-layer scores; ``_gemm_<g>`` in the
file name), so one GPU run can time both.

``--tiny`` is the host-bound case: 12 small layers (256², density 0.1, block 32: 6 blocks of 64
per layer move), one thread, where an update costs what its ops cost on the host, as on a GPU
(where each op is a kernel launch). Its ``mgr_update_per_layer_s`` is the figure to compare
before/after a change of the update path. Every run also records the aten ops per layer of
one update (``update_ops``, from ``benchmarks/update_ops.py``).

On the CPU every run also times one update of the GPT-2-like toy of ``update_ops`` (48 tiny
layers in 4 shape groups), batched, batched with scores per layer (gradient growth) and per
layer (``gpt2_toy_update_time``).

Writes raw timings with the device, versions and git commit to
``benchmarks/results/topology_update_<device>[_quick].json`` (or ``--out-dir``) and a bar chart
next to it (``.png``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from provenance import ROOT, cpu_model, git_state, package_versions
from results_files import OUT_DIR_HELP, OVERWRITE_HELP, refuse_overwrite, results_path

sys.path.insert(0, str(ROOT))
import itop  # noqa: E402
from itop_kernels.block_norms import resolve_precision  # noqa: E402

CASES = [(32, "random", "auto"), (32, "gradient", "auto"), (32, "gradient", "exact"),
         (1, "random", "auto"), (1, "gradient", "auto"), (1, "gradient", "exact")]
TARGET = 0.01


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Case:
    """One model + optimizer + manager, stepped in windows of plain/update step pairs."""

    def __init__(self, device, dtype, width, depth, batch, density, block_size, growth,
                 precision):
        torch.manual_seed(0)
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.model = nn.Sequential(*layers, nn.Linear(width, 10)).to(device=device, dtype=dtype)
        itop.sparsify(self.model, density, block_size=block_size, distribution="uniform",
                      exclude=[str(2 * depth)])
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        # update_every=2: odd steps are plain steps, even steps are update steps
        self.mgr = itop.TopologyManager(self.model, self.opt, update_every=2,
                                        total_steps=10 ** 9, prune_rate=0.3,
                                        schedule="constant", growth=growth,
                                        score_precision=precision)
        self.x = torch.randn(batch, width, device=device, dtype=dtype)
        self.y = torch.randint(0, 10, (batch,), device=device)
        self.device = device
        self.info = {"width": width, "depth": depth, "batch": batch, "density": density,
                     "block_size": block_size, "growth": growth, "score_precision": precision,
                     "score_precision_resolved": (resolve_precision(precision, dtype, device)
                                                  if growth == "gradient" else None),
                     "dtype": str(dtype)}
        self.depth = depth
        self.plain, self.update, self.mgr_update = [], [], []

    def step(self, record: bool) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        _sync(self.device)
        t1 = time.perf_counter()
        changed = self.mgr.step()
        _sync(self.device)
        t2 = time.perf_counter()
        if record:
            (self.update if changed else self.plain).append(t2 - t0)
            if changed:
                self.mgr_update.append(t2 - t1)

    def result(self) -> dict:
        p, u = statistics.median(self.plain), statistics.median(self.update)
        return {**self.info, "plain_step_s": self.plain, "update_step_s": self.update,
                "mgr_update_s": self.mgr_update, "plain_step_median_s": p,
                "mgr_update_per_layer_s": statistics.median(self.mgr_update) / self.depth,
                "update_step_median_s": u, "mgr_update_median_s": statistics.median(
                    self.mgr_update), "update_extra_s": u - p,
                "overhead_at_update_every_100": (u - p) / (100 * p)}


def run(device, dtype, threads, args) -> list:
    torch.set_num_threads(threads)
    cases = [Case(device, dtype, args.width, args.depth, args.batch, args.density, bs, growth,
                  precision) for bs, growth, precision in CASES]
    for c in cases:  # warm-up: two plain/update pairs each
        for _ in range(4):
            c.step(record=False)
    for r in range(args.rounds):
        order = cases[r % len(cases):] + cases[:r % len(cases)]  # rotate who goes first
        for c in order:
            for _ in range(2 * args.pairs):
                c.step(record=True)
    out = []
    for c in cases:
        res = {**c.result(), "threads": threads}
        out.append(res)
        print(f"{threads} thr  block {res['block_size']:2d} {res['growth']:8s} "
              f"{(res['score_precision_resolved'] or '-'):5s}: step "
              f"{res['plain_step_median_s'] * 1e3:7.2f} ms, update step "
              f"{res['update_step_median_s'] * 1e3:7.2f} ms (mgr.step "
              f"{res['mgr_update_median_s'] * 1e3:6.2f} ms, "
              f"{res['mgr_update_per_layer_s'] * 1e6:6.0f} µs per layer), overhead at update_every=100: "
              f"{100 * res['overhead_at_update_every_100']:.2f} %", flush=True)
    return out


def _update_ops() -> list:
    """aten ops per layer of one update of the per-layer path (CPU tensors; the same ops a GPU
    launches)."""
    import update_ops
    torch.set_num_threads(1)
    return [{k: v for k, v in r.items() if k != "by_op"} for r in update_ops.all_counts()]


def _gpt2_toy_ops(blocks: int = 12) -> list:
    """aten ops per UPDATE of the GPT-2-like toy (12 blocks × GPT-2's 4 sparse layer shapes:
    48 layers in 4 groups), batched and per layer."""
    import update_ops
    torch.set_num_threads(1)
    return update_ops.gpt2_toy_counts(blocks)


def _gpt2_toy_update_time(blocks: int = 12, updates: int = 30) -> list:
    """Host time of one update of the GPT-2-like toy of ``update_ops`` (``blocks`` × GPT-2's 4
    sparse layer shapes at d = 32, block 8: tensors so small that an update costs what its ops
    and Python cost on the host, as on a GPU), batched, batched with each layer's gradient
    scores alone (gradient growth) and per layer, random and gradient growth, AdamW, 1 thread:
    median ``mgr.step()`` on update steps."""
    import update_ops
    from itop import topology
    torch.set_num_threads(1)
    out = []
    was = topology._BATCH_LAYERS, topology._BATCH_SCORES
    try:
        for growth in ("random", "gradient"):
            paths = [(True, True), (True, False), (False, False)] if growth == "gradient" \
                else [(True, True), (False, False)]
            for on, scores in paths:
                topology._BATCH_LAYERS, topology._BATCH_SCORES = on, scores
                model, x = update_ops._gpt2_toy(blocks)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=10 ** 9,
                                           prune_rate=0.3, schedule="constant", growth=growth)
                times = []
                for step in range(2 * (updates + 2)):
                    opt.zero_grad()
                    model(x).square().mean().backward()
                    opt.step()
                    t0 = time.perf_counter()
                    changed = mgr.step()
                    if changed and step >= 4:
                        times.append(time.perf_counter() - t0)
                med = statistics.median(times)
                label = ("batched" if scores else "batched, scores per layer") if on \
                    else "per layer"
                out.append({"blocks": blocks, "layers": 4 * blocks, "growth": growth,
                            "batched": on, "batch_scores": scores, "path": label,
                            "mgr_update_s": times, "mgr_update_median_s": med})
                print(f"GPT-2 toy ({4 * blocks} layers) {growth:8s} {label:25s}: update "
                      f"{med * 1e3:6.2f} ms", flush=True)
    finally:
        topology._BATCH_LAYERS, topology._BATCH_SCORES = was
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = result["cases"]
    threads = sorted({c["threads"] for c in cases})
    resolved = {(c["block_size"], c["growth"], c["score_precision"]):
                c["score_precision_resolved"] for c in cases}

    def label(bs, growth, precision):
        text = f"block {bs}\n{growth}"
        if growth == "gradient":
            text += f"\n({precision}" + (f" = {resolved[bs, growth, precision]})"
                                          if precision == "auto" else ")")
        return text

    labels = [label(*c) for c in CASES]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(threads)
    for i, t in enumerate(threads):
        vals = [100 * next(c["overhead_at_update_every_100"] for c in cases
                           if c["threads"] == t and c["block_size"] == bs
                           and c["growth"] == g and c["score_precision"] == p)
                for bs, g, p in CASES]
        xs = [j + (i - (len(threads) - 1) / 2) * width for j in range(len(CASES))]
        bars = ax.bar(xs, vals, width, label=f"{t} thread{'s' if t > 1 else ''}")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(100 * TARGET, color="red", ls="--", lw=1, label="target (1 %)")
    ax.set_xticks(range(len(CASES)), labels, fontsize=8)
    ax.set_ylabel("update cost, % of training time\nat update_every=100")
    c0 = cases[0]
    ax.set_title(f"Topology update overhead ({result['device_name']}; {c0['depth']}×"
                 f"{c0['width']}² at density {c0['density']}, batch {c0['batch']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=None, help="default: 1024 (CPU), 4096 (GPU)")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="default: 256 (CPU), 4096 (GPU)")
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--pairs", type=int, default=3, help="plain/update step pairs per window")
    ap.add_argument("--rounds", type=int, default=6, help="windows per case")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch intra-op thread counts (default: 1 and all cores on the CPU)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--out-dir", default=None, help=OUT_DIR_HELP)
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: half the width, 2 pairs, 2 rounds, one thread count")
    ap.add_argument("--tiny", action="store_true",
                    help="host-bound: depth 12, width 256, batch 32, density 0.1, 1 thread")
    ap.add_argument("--per-layer", action="store_true",
                    help="update layer by layer (no batching across same-shape layers)")
    ap.add_argument("--per-layer-scores", action="store_true",
                    help="batched update, but each layer's gradient scores computed alone")
    ap.add_argument("--group-gemm", choices=["auto", "bmm", "mm"], default="auto",
                    help="how a group's gradient scores multiply (auto: bmm on CUDA, mm on CPU)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    suffix = "_tiny" if args.tiny else "_quick" if args.quick else ""
    suffix += "_per_layer" if args.per_layer else "_per_layer_scores" \
        if args.per_layer_scores else ""
    suffix += f"_gemm_{args.group_gemm}" if args.group_gemm != "auto" else ""
    out = Path(args.out or results_path(f"topology_update_{device.type}{suffix}.json",
                                        args.out_dir))
    refuse_overwrite(ap, args.overwrite, out, out.with_suffix(".png"))
    from itop import topology
    from itop_kernels import block_norms
    topology._BATCH_LAYERS = not args.per_layer
    topology._BATCH_SCORES = not args.per_layer_scores
    block_norms._GROUP_GEMM = args.group_gemm
    if args.tiny:
        args.width, args.depth, args.batch, args.density = 256, 12, 32, 0.1
        args.threads = args.threads or [1]
    if args.quick:
        args.width = args.width or (2048 if gpu else 512)
        args.pairs, args.rounds = 2, 2
        args.threads = args.threads or [1 if not gpu else torch.get_num_threads()]
    args.width = args.width or (4096 if gpu else 1024)
    args.batch = args.batch or (4096 if gpu else 256)
    dtype = torch.bfloat16 if gpu else torch.float32
    threads = args.threads or ([torch.get_num_threads()] if gpu else
                               sorted({1, os.cpu_count() or 1}))
    cases = []
    for t in threads:
        cases += run(device, dtype, t, args)
    result = {
        "benchmark": "topology_update", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if gpu else cpu_model(),
        "cores": os.cpu_count(), "platform": platform.platform(),
        "versions": package_versions("torch", "triton", "numpy"),
        "git": git_state("itop", "itop_kernels", "benchmarks/bench_topology_update.py"),
        "argv": sys.argv[1:], "load_avg": list(os.getloadavg()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "target": TARGET,
        "batch_layers": not args.per_layer,
        "batch_scores": not (args.per_layer or args.per_layer_scores),
        "group_gemm": args.group_gemm, "cases": cases, "update_ops": _update_ops(),
        "gpt2_toy_update_ops": _gpt2_toy_ops(4 if args.quick else 12),
        "gpt2_toy_update_time": (_gpt2_toy_update_time(4 if args.quick else 12,
                                                       5 if args.quick else 30)
                                 if device.type == "cpu" else None),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
