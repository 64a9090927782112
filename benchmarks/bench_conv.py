"""Block-sparse conv2d (ours) against dense F.conv2d (cuDNN / oneDNN) and a masked-dense conv.

For every layer shape, block size and density it times, on the same random inputs:

- ``dense``: ``F.conv2d(x, W)`` with a dense weight;
- ``masked``: ``F.conv2d(x, layout.scatter(values))``, the mask-on-dense-weights practice of the
  reference DST code (its scatter is part of the time);
- ``ours``: ``block_sparse_conv2d(x, values, layout)``;

each as ``fwd``, ``bwd`` (gradients of x and the weight, from a retained graph) and ``fwd+bwd``.
On the GPU, fwd+bwd is also timed replayed from a CUDA graph (``cuda_graph_s``, column
``graph x``), which removes the host's launch and Python overhead (``--no-graphs`` skips it).

- GPU: bf16, channels-last, ``triton.testing.do_bench`` (median). The layer shapes are the 3×3
  and 1×1 convolutions of ResNet-50 on ImageNet (batch 64) and the convolutions of VGG-16 and
  ResNet-34 on CIFAR (batch 128); block sizes 16/32/64; several densities. The JSON also gives
  each time as a fraction of the roofline floor ``max(FLOPs / peak, bytes / bandwidth)``.
- CPU: fp32, channels-last, median of ``--repeats`` wall-clock runs after a warm-up, the three
  methods interleaved within each repetition (and dense re-timed for every row) so that they
  share the load of a shared machine; a much smaller sweep with reduced batches, including the CPU target of issue 3 (batch 16,
  256→256, 3×3, 32×32, block 16: faster than dense at density 0.10, ≥ 3× at 0.02).

Writes the raw times with the device, versions, git commit and argv to
``benchmarks/results/conv_<cpu|gpu>[_quick].json``, a plot of the fwd+bwd speedup over dense
against density next to it (``.png``), and prints a table::

    python benchmarks/bench_conv.py [--quick] [--device cpu|cuda] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from itop_kernels import BlockLayout, block_sparse_conv2d  # noqa: E402
from budget import Budget  # noqa: E402
from host_route import gpu_route_without_kernels  # noqa: E402
from results_files import (OUT_DIR_HELP, OVERWRITE_HELP, refuse_overwrite,  # noqa: E402
                           results_path)


@dataclass(frozen=True)
class Layer:
    """One convolution: ``x [batch, cin, hw, hw]``, kernel ``k × k``, stride, padding k//2."""

    net: str
    name: str
    batch: int
    cin: int
    cout: int
    hw: int
    k: int
    stride: int = 1

    @property
    def padding(self) -> int:
        return self.k // 2

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.k) // self.stride + 1


def resnet50_imagenet(batch: int = 64) -> list[Layer]:
    """The 3×3 and 1×1 convolutions of ResNet-50 (torchvision v1.5: stride in the 3×3), one
    entry per distinct shape (the 7×7 stem has 3 input channels and stays dense)."""
    out = []
    cin = 64
    for stage, (width, hw, blocks) in enumerate([(64, 56, 3), (128, 28, 4), (256, 14, 6),
                                                 (512, 7, 3)]):
        s = 1 if stage == 0 else 2
        in_hw = hw * s
        out += [Layer("resnet50", f"s{stage + 1}_reduce_first", batch, cin, width, in_hw, 1),
                Layer("resnet50", f"s{stage + 1}_3x3_first", batch, width, width, in_hw, 3, s),
                Layer("resnet50", f"s{stage + 1}_expand", batch, width, 4 * width, hw, 1),
                Layer("resnet50", f"s{stage + 1}_downsample", batch, cin, 4 * width, in_hw, 1, s)]
        if blocks > 1:
            out += [Layer("resnet50", f"s{stage + 1}_reduce", batch, 4 * width, width, hw, 1),
                    Layer("resnet50", f"s{stage + 1}_3x3", batch, width, width, hw, 3)]
        cin = 4 * width
    return _distinct(out)


def vgg16_cifar(batch: int = 128) -> list[Layer]:
    """VGG-16 on 32×32 CIFAR images, distinct 3×3 shapes (the first layer has 3 channels)."""
    cfg = [(64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8),
           (256, 512, 4), (512, 512, 4), (512, 512, 2)]
    return [Layer("vgg16", f"{ci}to{co}_{hw}", batch, ci, co, hw, 3) for ci, co, hw in cfg]


def resnet34_cifar(batch: int = 128) -> list[Layer]:
    """ResNet-34 on CIFAR (basic blocks, 32×32 input, no stem pooling): distinct shapes."""
    out = [Layer("resnet34", "l1_3x3", batch, 64, 64, 32, 3)]
    for ci, co, hw in [(64, 128, 32), (128, 256, 16), (256, 512, 8)]:
        out += [Layer("resnet34", f"{co}_3x3_s2", batch, ci, co, hw, 3, 2),
                Layer("resnet34", f"{co}_3x3", batch, co, co, hw // 2, 3),
                Layer("resnet34", f"{co}_downsample", batch, ci, co, hw, 1, 2)]
    return out


def _distinct(layers: list[Layer]) -> list[Layer]:
    seen, out = set(), []
    for layer in layers:
        key = (layer.batch, layer.cin, layer.cout, layer.hw, layer.k, layer.stride)
        if key not in seen:
            seen.add(key)
            out.append(layer)
    return out


def cpu_plan(quick: bool) -> list:
    """The CPU sweep, ``[(layer, {block_size: densities})]``: the issue's target shape first
    (all block sizes), then a few reduced-batch layer shapes at two densities."""
    target = Layer("issue3", "cpu_target", 16, 256, 256, 32, 3)
    if quick:
        return [(target, {16: [0.02, 0.1]})]
    plan = [(target, {16: [0.02, 0.05, 0.1, 0.2, 0.5], 32: [0.02, 0.1, 0.5],
                      64: [0.02, 0.1, 0.5]})]
    for layer in (Layer("resnet50", "s3_3x3", 8, 256, 256, 14, 3),
                  Layer("resnet50", "s2_expand", 4, 128, 512, 28, 1),
                  Layer("vgg16", "128to128_16", 16, 128, 128, 16, 3),
                  Layer("resnet34", "128_3x3_s2", 16, 64, 128, 32, 3, 2)):
        plan.append((layer, {16: [0.05, 0.2], 32: [0.05, 0.2]}))
    return plan


def gpu_layers(quick: bool) -> list[Layer]:
    layers = resnet50_imagenet() + vgg16_cifar() + resnet34_cifar()
    if quick:
        keep = {("resnet50", "s1_3x3_first"), ("resnet50", "s3_3x3"),
                ("resnet50", "s2_expand"), ("vgg16", "256to256_8"), ("resnet34", "256_3x3_s2")}
        layers = [layer for layer in layers if (layer.net, layer.name) in keep]
    return layers


# --------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: torch.device, repeats: int, grads: list) -> tuple[float, list]:
    """``(median seconds, raw samples)`` of ``fn()``. GPU: ``triton.testing.do_bench`` (median;
    the samples are its 20/50/80 % quantiles); CPU: wall clock after one warm-up run.
    ``grads`` are reset to None before each run."""
    if device.type == "cuda":
        import triton.testing
        q = triton.testing.do_bench(fn, warmup=10, rep=max(20, 10 * repeats),
                                    grad_to_none=grads, quantiles=[0.2, 0.5, 0.8])
        return q[1] * 1e-3, [v * 1e-3 for v in q]
    times = []
    for i in range(repeats + 1):
        for g in grads:
            g.grad = None
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def time_three(make_output, leaves: list, device: torch.device, repeats: int) -> tuple:
    """fwd, bwd (from a retained graph) and fwd+bwd of ``make_output()``: a dict of median
    seconds and a dict of the raw samples."""
    with torch.no_grad():
        fwd = time_fn(make_output, device, repeats, [])
    y = make_output()
    dy = torch.randn_like(y)
    bwd = time_fn(lambda: y.backward(dy, retain_graph=True), device, repeats, leaves)
    fb = time_fn(lambda: make_output().backward(dy), device, repeats, leaves)
    res = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fb}
    return {k: v[0] for k, v in res.items()}, {k: v[1] for k, v in res.items()}


def time_graphed(make_output, leaves: list) -> dict:
    """GPU: fwd+bwd replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``, median),
    which takes the host's launch and Python overhead out: at these layer sizes the eager
    timings of a custom op with autograd are bound by the host, not the kernels. Returns
    ``{"fwd+bwd": s}`` or ``{"error": text}`` if the capture fails."""
    import triton.testing
    y = make_output()
    dy = torch.randn_like(y)
    del y
    try:
        ms = triton.testing.do_bench_cudagraph(lambda: make_output().backward(dy), rep=20,
                                               grad_to_none=leaves, return_mode="median")
        return {"fwd+bwd": ms * 1e-3}
    except Exception as exc:  # report, don't stop the sweep
        torch.cuda.synchronize()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def time_interleaved(methods: dict, repeats: int) -> tuple:
    """CPU: fwd, bwd and fwd+bwd of several methods ``{name: (make_output, leaves)}``, run in
    turn within each repetition so that they share the machine's conditions (the development
    machine is shared). Returns ``({name: {mode: median s}}, {name: {mode: [samples]}})``."""
    state = {}
    for name, (make, leaves) in methods.items():
        y = make()
        state[name] = (make, leaves, y, torch.randn_like(y))

    def run(mode, make, y, dy):
        if mode == "fwd":
            with torch.no_grad():
                make()
        elif mode == "bwd":
            y.backward(dy, retain_graph=True)
        else:
            make().backward(dy)

    raw = {name: {} for name in methods}
    for mode in ("fwd", "bwd", "fwd+bwd"):
        for name in methods:
            raw[name][mode] = []
        for i in range(repeats + 1):
            for name, (make, leaves, y, dy) in state.items():
                for g in leaves:
                    g.grad = None
                t0 = time.perf_counter()
                run(mode, make, y, dy)
                if i:  # the first round warms up
                    raw[name][mode].append(time.perf_counter() - t0)
    med = {name: {mode: statistics.median(v) for mode, v in r.items()} for name, r in raw.items()}
    return med, raw


def _nnz_for(R: int, C: int, density: float) -> int:
    return max(1, min(R * C, round(density * R * C)))


def random_mask(R: int, C: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly ``max(1, round(density·R·C))`` active blocks, uniformly at random."""
    k = _nnz_for(R, C, density)
    mask = torch.zeros(R * C, dtype=torch.bool)
    mask[torch.randperm(R * C, generator=gen)[:k]] = True
    return mask.view(R, C)


def conv_flops(layer: Layer, weight_fraction: float) -> float:
    """FLOPs of fwd+bwd (3 GEMM-sized passes) at the given fraction of the weight."""
    one = 2.0 * layer.batch * layer.out_hw ** 2 * layer.cin * layer.cout * layer.k ** 2
    return 3 * one * weight_fraction


def conv_bytes(layer: Layer, weight_fraction: float, elem: int) -> float:
    """Minimum bytes moved by fwd+bwd: x, y, dy, dx read or written once (twice for x, dy)
    plus the active weights and their gradient."""
    act_in = layer.batch * layer.cin * layer.hw ** 2
    act_out = layer.batch * layer.cout * layer.out_hw ** 2
    weights = layer.cin * layer.cout * layer.k ** 2 * weight_fraction
    return elem * (2 * act_in + act_out + 2 * act_out + act_in + 3 * weights)


def bench_layer(layer: Layer, sweep: dict, device, dtype, repeats, memory_format,
                peak_flops, peak_bw, bar, graphs: bool = False) -> list[dict]:
    """Rows for one layer shape; ``sweep`` maps block size -> densities."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    x = torch.randn(layer.batch, layer.cin, layer.hw, layer.hw, generator=gen).to(
        device=device, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()
    w_dense = (torch.randn(layer.cout, layer.cin, layer.k, layer.k, generator=gen)
               / math.sqrt(layer.cin * layer.k ** 2)).to(device=device, dtype=dtype)
    w_param = w_dense.clone().contiguous(memory_format=memory_format).requires_grad_()
    conv = dict(stride=layer.stride, padding=layer.padding)
    dense_fn = (lambda: F.conv2d(x, w_param, **conv), [x, w_param])
    if device.type == "cuda":  # the GPU is ours alone: time dense once per layer
        dense, dense_raw = time_three(*dense_fn, device, repeats)
        dense_graph = time_graphed(*dense_fn) if graphs else None
    elem = torch.finfo(dtype).bits // 8
    for bs, densities in sweep.items():
        if layer.cin % bs or layer.cout % bs:
            bar.update(len(densities))
            continue
        R, C = layer.cout // bs, layer.cin // bs
        seen = set()
        for density in densities:
            nnz = _nnz_for(R, C, density)
            if nnz in seen:  # a small block grid: this density repeats an earlier layout size
                bar.update(1)
                continue
            seen.add(nnz)
            mask = random_mask(R, C, density, gen).to(device)
            layout = BlockLayout.from_mask(mask, bs)
            values = layout.gather(w_dense).requires_grad_()
            masked_fn = (lambda: F.conv2d(x, layout.scatter(values), **conv), [x, values])
            ours_fn = (lambda: block_sparse_conv2d(x, values, layout, **conv), [x, values])
            graphed = None
            if device.type == "cuda":
                masked, masked_raw = time_three(*masked_fn, device, repeats)
                ours, ours_raw = time_three(*ours_fn, device, repeats)
                if graphs:
                    graphed = {"dense": dense_graph, "masked": time_graphed(*masked_fn),
                               "ours": time_graphed(*ours_fn)}
            else:  # CPU: all three interleaved, dense again for every row
                med, raw = time_interleaved({"dense": dense_fn, "masked": masked_fn,
                                             "ours": ours_fn}, repeats)
                dense, masked, ours = med["dense"], med["masked"], med["ours"]
                dense_raw, masked_raw, ours_raw = raw["dense"], raw["masked"], raw["ours"]
            row = {**asdict(layer), "padding": layer.padding, "out_hw": layer.out_hw,
                   "block_size": bs, "density": layout.density, "density_nominal": density,
                   "nnz": layout.nnz,
                   "dense_s": dense, "masked_s": masked, "ours_s": ours,
                   "speedup_vs_dense": {k: dense[k] / ours[k] for k in ours},
                   "speedup_vs_masked": {k: masked[k] / ours[k] for k in ours},
                   "flops_fwd_bwd": conv_flops(layer, layout.density),
                   "raw_s": {"dense": dense_raw, "masked": masked_raw, "ours": ours_raw}}
            if graphed is not None:
                row["cuda_graph_s"] = graphed
                if "fwd+bwd" in graphed["dense"] and "fwd+bwd" in graphed["ours"]:
                    row["speedup_vs_dense_cuda_graph"] = (graphed["dense"]["fwd+bwd"]
                                                          / graphed["ours"]["fwd+bwd"])
            if peak_flops and peak_bw:
                floor = max(conv_flops(layer, layout.density) / peak_flops,
                            conv_bytes(layer, layout.density, elem) / peak_bw)
                dense_floor = max(conv_flops(layer, 1.0) / peak_flops,
                                  conv_bytes(layer, 1.0, elem) / peak_bw)
                row["roofline_floor_fwd_bwd_s"] = floor
                row["ours_fraction_of_roofline"] = floor / ours["fwd+bwd"]
                row["dense_fraction_of_roofline"] = dense_floor / dense["fwd+bwd"]
            rows.append(row)
            bar.update(1)
    return rows


# --------------------------------------------------------------------------- output
def _cpu_name() -> str:
    """``model name`` from /proc/cpuinfo (else the platform) and the number of CPUs."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs)"


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, cwd=ROOT).strip()
    except Exception:  # pragma: no cover - not a checkout
        return "unknown"


def print_table(rows: list[dict]) -> None:
    head = (f"{'net':9s} {'layer':18s} {'N':>4s} {'cin':>5s} {'cout':>5s} {'hw':>4s} {'k':>2s} "
            f"{'s':>2s} {'bs':>3s} {'dens':>5s} {'dense ms':>9s} {'masked ms':>9s} {'ours ms':>9s}"
            f" {'x dense':>8s} {'fwd x':>6s} {'bwd x':>6s} {'graph x':>8s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['net']:9s} {r['name']:18s} {r['batch']:4d} {r['cin']:5d} {r['cout']:5d} "
              f"{r['hw']:4d} {r['k']:2d} {r['stride']:2d} {r['block_size']:3d} "
              f"{r['density']:5.3f} {1e3 * r['dense_s']['fwd+bwd']:9.2f} "
              f"{1e3 * r['masked_s']['fwd+bwd']:9.2f} {1e3 * r['ours_s']['fwd+bwd']:9.2f} "
              f"{r['speedup_vs_dense']['fwd+bwd']:8.2f} {r['speedup_vs_dense']['fwd']:6.2f} "
              f"{r['speedup_vs_dense']['bwd']:6.2f} "
              f"{r.get('speedup_vs_dense_cuda_graph', float('nan')):8.2f}")


def plot(rows: list[dict], path: str, title: str) -> None:
    """fwd+bwd speedup over dense against density. Left: the first layer shape of the sweep
    (on the CPU the issue's target) per block size, ours (solid) and masked dense (dashed).
    Right: every row of every layer shape (points) and, per block size, the geometric mean over
    the layer shapes measured at each density (line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def gmean(vals):
        return math.exp(sum(math.log(v) for v in vals) / len(vals))

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    first = (rows[0]["net"], rows[0]["name"]) if rows else None
    colors = {}
    for bs in sorted({r["block_size"] for r in rows}):
        mine = [r for r in rows if r["block_size"] == bs]
        firsts = sorted((r["density"], r["speedup_vs_dense"]["fwd+bwd"],
                         r["dense_s"]["fwd+bwd"] / r["masked_s"]["fwd+bwd"])
                        for r in mine if (r["net"], r["name"]) == first)
        line = None
        if firsts:
            d, ours, masked = zip(*firsts)
            line, = left.plot(d, ours, "o-", label=f"ours, block {bs}")
            left.plot(d, masked, "x--", color=line.get_color(), alpha=0.6,
                      label=f"masked dense, block {bs}")
        colors[bs] = line.get_color() if line else None
        by_d: dict = {}
        for r in mine:  # grouped by the requested density (the achieved one varies by grid)
            by_d.setdefault(r["density_nominal"], []).append(r["speedup_vs_dense"]["fwd+bwd"])
        ds = sorted(by_d)
        pts = right.scatter([r["density_nominal"] for r in mine],
                            [r["speedup_vs_dense"]["fwd+bwd"] for r in mine], s=12, alpha=0.5,
                            color=colors[bs])
        right.plot(ds, [gmean(by_d[d]) for d in ds], "-", color=pts.get_facecolor()[0],
                   label=f"block {bs}: geomean over layer shapes")
    for ax, name in ((left, f"{first[0]}/{first[1]}" if first else ""),
                     (right, "all layer shapes")):
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (fraction of active blocks)" if ax is left
                      else "requested density")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(sorted({r["density_nominal"] for r in rows}))
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("fwd+bwd speedup over dense conv2d")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- GPU run (and smoke)
PLAN_DENSITIES = (0.5, 0.2, 0.1, 0.05)
PLAN_BLOCKS = (16, 32)
QUICK_DENSITIES = (0.5, 0.1)
# per-measurement cost model for the plan estimate (H200; see benchmarks/NOTES.md ## Conv)
EST_S = {"eager": 0.02, "graph": 0.05, "compile": 0.8, "startup": 12.0}


def _is_gemm_1x1(layer: Layer) -> bool:
    return layer.k == 1 and layer.stride == 1


def run_plan(quick: bool, smoke: bool) -> dict:
    """What one GPU invocation measures, in order: ``{"sweep": [(layer, blocks, densities)],
    "candidates": [(layer, blocks, densities)], "profile": layer}``. Smoke: tiny stand-ins of the
    same kinds of layers (3×3, strided 3×3, 1×1, strided 1×1) for the CPU interpreter."""
    if smoke:
        tiny = [Layer("smoke", "3x3", 1, 32, 32, 6, 3), Layer("smoke", "3x3_s2", 1, 32, 32, 6, 3, 2),
                Layer("smoke", "1x1", 1, 32, 32, 5, 1), Layer("smoke", "1x1_s2", 1, 32, 32, 5, 1, 2)]
        return {"sweep": [(layer, (16,), (0.5,)) for layer in tiny],
                "candidates": [(tiny[0], (16,), (0.5,))], "profile": tiny[0]}
    r50 = resnet50_imagenet()
    if quick:
        sweep = [(layer, PLAN_BLOCKS, QUICK_DENSITIES) for layer in r50]
    else:
        sweep = [(layer, PLAN_BLOCKS, PLAN_DENSITIES)
                 for layer in r50 + vgg16_cifar() + resnet34_cifar()]
    by_name = {layer.name: layer for layer in r50}
    cand_layers = [by_name["s2_3x3"], by_name["s3_3x3"]]
    return {"sweep": sweep,
            "candidates": [(layer, PLAN_BLOCKS, (0.1, 0.5)) for layer in cand_layers],
            "profile": by_name["s3_3x3"]}


def estimate_plan(plan: dict) -> dict:
    """Seconds the plan should take on an H200, from counts of measurements: an eager
    ``do_bench`` about 20 ms (rep 5 ms plus warm-up and cache flushes), a CUDA-graph one about
    50 ms (5 eager calls to size it, the capture, 10 replays of a 3 ms graph), a Triton compile
    about 0.8 s."""
    from itop_kernels import triton_conv
    eager = graph = 0
    for layer, blocks, dens in plan["sweep"]:
        rows = len(blocks) * len(dens)
        eager += 3 + rows * 4          # dense fwd, fwd+bwd, +graph; ours fwd, fb x2, masked fb
        graph += 1 + rows              # dense once, ours per row
        if _is_gemm_1x1(layer):
            eager += rows * 2          # the two GEMM routes
            graph += rows * 2
    ncand = sum(len(triton_conv.CANDIDATES[b]) + 1 for b in PLAN_BLOCKS)
    cand_graph = 0
    for _, blocks, dens in plan["candidates"]:   # 3 kernels per config, plus the variants
        cand_graph += sum((3 * (len(triton_conv.CANDIDATES.get(b, {})) + 1)
                           + len(shipped_variants(b))) * len(dens) for b in blocks)
    variant_kernels = sum(len(shipped_variants(b)) - 1 for b in PLAN_BLOCKS)
    # conv + linear kernels, candidates, stacked-taps variants, reduce
    compiles = 3 * 2 + 3 * 2 + 3 * ncand + variant_kernels + 2
    total = (EST_S["startup"] + eager * EST_S["eager"] + (graph + cand_graph) * EST_S["graph"]
             + compiles * EST_S["compile"] + 5.0)   # + host-overhead section and profile
    return {"eager_measurements": eager, "graph_measurements": graph + cand_graph,
            "compiles": compiles, "estimated_s": round(total, 1), "cost_model_s": EST_S}


class Timer:
    """Times on the plan's device: ``do_bench`` / ``do_bench_cudagraph`` medians on a GPU,
    the median of a few wall-clock runs on the CPU (smoke: the code paths, not the numbers)."""

    def __init__(self, device: torch.device):
        self.device = device

    def eager(self, fn, grads=()) -> float:
        if self.device.type == "cuda":
            import triton.testing
            return 1e-3 * triton.testing.do_bench(fn, warmup=2, rep=5, grad_to_none=list(grads),
                                                  return_mode="median")
        return time_fn(fn, self.device, 2, list(grads))[0]

    def graph(self, fn, grads=()) -> dict:
        """``{"s": median}`` replayed from a CUDA graph, or ``{"error": ...}``; on the CPU
        ``{"skipped": "cpu"}`` (graphs are CUDA-only)."""
        if self.device.type != "cuda":
            return {"skipped": "cpu"}
        import triton.testing
        try:
            fn()
            ms = triton.testing.do_bench_cudagraph(fn, rep=3, grad_to_none=list(grads),
                                                   return_mode="median")
            return {"s": ms * 1e-3}
        except Exception as exc:  # report, don't stop the run
            torch.cuda.synchronize()
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def _operands(layer: Layer, bs: int, density: float, device, dtype, gen):
    x = torch.randn(layer.batch, layer.cin, layer.hw, layer.hw, generator=gen).to(
        device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(layer.cout, layer.cin, layer.k, layer.k, generator=gen)
         / math.sqrt(layer.cin * layer.k ** 2)).to(device=device, dtype=dtype)
    mask = random_mask(layer.cout // bs, layer.cin // bs, density, gen).to(device)
    layout = BlockLayout.from_mask(mask, bs)
    return x, w, layout


def _fwd_bwd(make, dy):
    return lambda: make().backward(dy)


def measure_row(layer: Layer, bs: int, density: float, timer: Timer, device, dtype, gen,
                dense: dict, peaks) -> dict:
    """One (layer, block, density): ours eager (plain and cached launches) and from a CUDA graph,
    the 1×1 GEMM routes where they apply, masked dense eager."""
    from itop_kernels import triton_conv, triton_launch
    x, w, layout = _operands(layer, bs, density, device, dtype, gen)
    x.requires_grad_()
    values = layout.gather(w).requires_grad_()
    conv = dict(stride=layer.stride, padding=layer.padding)
    ours = lambda: block_sparse_conv2d(x, values, layout, **conv)  # noqa: E731
    dy = torch.randn_like(ours().detach())
    leaves = [x, values]
    row = {**asdict(layer), "padding": layer.padding, "out_hw": layer.out_hw, "block_size": bs,
           "density": layout.density, "density_nominal": density, "nnz": layout.nnz}
    with torch.no_grad():
        fwd = timer.eager(ours)
    eager = {}
    for launch in ("plain", "cached"):
        with triton_launch.launching(launch):
            eager[launch] = timer.eager(_fwd_bwd(ours, dy), leaves)
    graph = timer.graph(_fwd_bwd(ours, dy), leaves)
    masked = timer.eager(_fwd_bwd(lambda: F.conv2d(x, layout.scatter(values), **conv), dy),
                         leaves)
    row.update({"ours_fwd_s": fwd, "ours_eager_fwd_bwd_s": eager, "ours_graph_fwd_bwd": graph,
                "masked_eager_fwd_bwd_s": masked})
    if _is_gemm_1x1(layer):
        routes = {}
        for route in ("gemm", "gemm_fwd_dx"):
            with triton_conv.options(route_1x1=route), triton_launch.launching("cached"):
                routes[route] = {"eager_fwd_bwd_s": timer.eager(_fwd_bwd(ours, dy), leaves),
                                 "graph_fwd_bwd": timer.graph(_fwd_bwd(ours, dy), leaves)}
        row["routes_1x1"] = routes
    best_eager = min(eager.values())
    row["speedup_eager_vs_dense_eager"] = dense["eager_fwd_bwd_s"] / best_eager
    if "s" in graph and "s" in dense["graph_fwd_bwd"]:
        row["speedup_graph_vs_dense_graph"] = dense["graph_fwd_bwd"]["s"] / graph["s"]
        row["eager_over_graph"] = best_eager / graph["s"]
    if peaks:
        elem = torch.finfo(dtype).bits // 8
        row["roofline_floor_fwd_bwd_s"] = max(conv_flops(layer, layout.density) / peaks[0],
                                              conv_bytes(layer, layout.density, elem) / peaks[1])
    return row


def measure_dense(layer: Layer, timer: Timer, device, dtype, gen) -> dict:
    x = torch.randn(layer.batch, layer.cin, layer.hw, layer.hw, generator=gen).to(
        device=device, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(layer.cout, layer.cin, layer.k, layer.k, generator=gen)
         / math.sqrt(layer.cin * layer.k ** 2)).to(device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    conv = dict(stride=layer.stride, padding=layer.padding)
    make = lambda: F.conv2d(x, w, **conv)  # noqa: E731
    dy = torch.randn_like(make().detach())
    with torch.no_grad():
        fwd = timer.eager(make)
    return {"fwd_s": fwd, "eager_fwd_bwd_s": timer.eager(_fwd_bwd(make, dy), [x, w]),
            "graph_fwd_bwd": timer.graph(_fwd_bwd(make, dy), [x, w])}


def shipped_variants(bs: int) -> dict:
    """``{name: (kernel, conv options)}`` timed beside the shipped config's kernels: the wgrad's
    split sums reduced by torch (sum, cast), and the stacked-taps wgrad, forward and dgrad at
    every group size block ``bs`` allows (``taps·bs <= 128``), the largest also with one
    pipeline stage (``_s1``: plain loads, cached in L1)."""
    variants = {"wgrad_torch_reduce": ("wgrad", {"wgrad_reduce": "torch"})}
    groups = [t for t in (2, 4, 8) if t * bs <= 128]
    for kname in ("wgrad", "fwd", "dgrad"):
        for tg in groups:
            variants[f"{kname}_taps{tg}"] = (kname, {f"{kname}_kernel": "taps",
                                                     f"{kname}_taps": tg})
        if groups:   # the largest group again with one stage: L1-cached loads (taps_stages)
            variants[f"{kname}_taps{groups[-1]}_s1"] = (kname, {
                f"{kname}_kernel": "taps", f"{kname}_taps": groups[-1], "taps_stages": 1})
    return variants


def measure_candidates(layer: Layer, bs: int, density: float, timer: Timer, device, dtype,
                       gen) -> list[dict]:
    """Each kernel (forward, dgrad, wgrad) of the shipped config and of every candidate, timed
    alone (CUDA graph on a GPU) on the per-tap kernels, and the shipped config's variants
    (:func:`shipped_variants`), so that each kernel's config can be chosen offline."""
    from itop_kernels import triton_conv, triton_launch
    x, w, layout = _operands(layer, bs, density, device, dtype, gen)
    values = layout.gather(w)
    s, p, d = [layer.stride] * 2, [layer.padding] * 2, [1, 1]
    y = triton_conv.conv_forward(x, values, layout.row_ptr, layout.col_idx, None, bs,
                                 layer.cout, s, p, d, torch.channels_last)
    dy = torch.randn_like(y)
    kernels = {
        "fwd": lambda: triton_conv.conv_forward(x, values, layout.row_ptr, layout.col_idx, None,
                                                bs, layer.cout, s, p, d, torch.channels_last),
        "dgrad": lambda: triton_conv.conv_grad_input(dy, values, layout.col_ptr,
                                                     layout.t_row_idx, layout.t_block_idx, bs,
                                                     list(x.shape), s, p, d,
                                                     torch.channels_last),
        "wgrad": lambda: triton_conv.conv_grad_weight(dy, x, layout.row_idx, layout.col_idx, bs,
                                                      [layer.k] * 2, s, p, d),
    }
    arch = triton_conv._arch(device)
    configs = {"shipped": triton_conv.CONFIGS[arch][bs], **triton_conv.CANDIDATES.get(bs, {})}
    rows = []
    for name, cfg in configs.items():
        times = {}
        per_tap = dict(fwd_kernel="per_tap", dgrad_kernel="per_tap", wgrad_kernel="per_tap")
        with triton_conv.options(config=cfg, **per_tap), triton_launch.launching("cached"):
            for kname, fn in kernels.items():
                res = timer.graph(fn)
                times[kname] = res if device.type == "cuda" else {"s": timer.eager(fn)}
            if name == "shipped":
                for vname, (kname, opts) in shipped_variants(bs).items():
                    with triton_conv.options(**opts):
                        fn = kernels[kname]
                        times[vname] = (timer.graph(fn) if device.type == "cuda"
                                        else {"s": timer.eager(fn)})
        rows.append({"net": layer.net, "name": layer.name, "block_size": bs,
                     "density_nominal": density, "density": layout.density, "candidate": name,
                     "config": asdict(cfg), "kernels": times})
    return rows


def profile_table(layer: Layer, bs: int, density: float, device, dtype, gen) -> str:
    """A torch.profiler table (by self time) of five eager fwd+bwd calls at ``layer``."""
    from torch.profiler import ProfilerActivity, profile
    x, w, layout = _operands(layer, bs, density, device, dtype, gen)
    x.requires_grad_()
    values = layout.gather(w).requires_grad_()
    make = lambda: block_sparse_conv2d(x, values, layout, stride=layer.stride,  # noqa: E731
                                       padding=layer.padding)
    dy = torch.randn_like(make().detach())
    for _ in range(3):
        make().backward(dy)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            x.grad = values.grad = None
            make().backward(dy)
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25)


def run_device_plan(args, device: torch.device, dtype, out: str, result: dict) -> None:
    """The GPU invocation (or its CPU smoke): host overhead, the profile, the sweep, then the
    candidates, with the JSON written after every case and a hard ``--budget-s``."""
    budget = Budget(args.budget_s)
    plan = run_plan(args.quick, args.smoke)
    result["plan"] = {"estimate": estimate_plan(plan), "budget_s": args.budget_s,
                      "layers": len(plan["sweep"])}
    result["rows"], result["candidates"], result["skipped"] = [], [], []
    timer = Timer(device)
    gen = torch.Generator().manual_seed(0)
    peaks = (args.peak_tflops * 1e12, args.peak_tbs * 1e12) if device.type == "cuda" else None

    def save() -> None:
        result["elapsed_s"] = budget.elapsed()
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

    result["errors"] = []

    def guarded(what: str, fn):
        """``fn()``, or None with the error recorded (one failing case must not end the run)."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON and printed
            if device.type == "cuda":
                torch.cuda.synchronize()
            msg = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print("ERROR", msg, file=sys.stderr)
            result["errors"].append(msg)
            return None

    result["host_overhead"] = guarded("host overhead", lambda: host_overhead_rows(
        device, dtype, fake=args.smoke, calls=20))
    save()
    result["profile_table"] = guarded("profile", lambda: profile_table(
        plan["profile"], 32 if not args.smoke else 16, 0.1, device, dtype, gen))
    save()
    print(result["profile_table"])
    total = sum(len(b) * len(d) for _, b, d in plan["sweep"])

    def sweep(entries, bar) -> None:
        for layer, blocks, densities in entries:
            if budget.spent():
                result["skipped"].append(f"{layer.net}/{layer.name}: budget spent")
                continue
            bar.set_postfix_str(f"{layer.net}/{layer.name}")
            dense = guarded(f"dense {layer.net}/{layer.name}",
                            lambda: measure_dense(layer, timer, device, dtype, gen))
            if dense is None:
                continue
            for bs in blocks:
                if layer.cin % bs or layer.cout % bs:
                    continue
                for density in densities:
                    if budget.spent():
                        result["skipped"].append(f"{layer.net}/{layer.name} bs{bs} d{density}")
                        continue
                    row = guarded(f"{layer.net}/{layer.name} bs{bs} d{density}",
                                  lambda: measure_row(layer, bs, density, timer, device, dtype,
                                                      gen, dense, peaks))
                    if row is not None:
                        row["dense"] = dense
                        result["rows"].append(row)
                    bar.update(1)
                    save()

    def candidates() -> None:
        for layer, blocks, densities in plan["candidates"]:
            for bs in blocks:
                for density in densities:
                    if budget.spent():
                        result["skipped"].append(f"candidates {layer.name} bs{bs} d{density}")
                        continue
                    result["candidates"] += guarded(
                        f"candidates {layer.name} bs{bs} d{density}",
                        lambda: measure_candidates(layer, bs, density, timer, device, dtype,
                                                   gen)) or []
                    save()

    # ResNet-50 (the targets), then the per-kernel candidates (they choose the configs), then
    # the other networks: a budget that binds cuts the least needed part.
    first = [e for e in plan["sweep"] if e[0].net == plan["sweep"][0][0].net]
    rest = [e for e in plan["sweep"] if e[0].net != plan["sweep"][0][0].net]
    with tqdm(total=total, desc="bench_conv", file=sys.stderr) as bar:
        sweep(first, bar)
        candidates()
        sweep(rest, bar)
    result["complete"] = not result["skipped"] and not result["errors"]
    save()


# --------------------------------------------------------------------------- host overhead
class AutogradFloor(torch.autograd.Function):
    """The least host work an autograd op shaped like ``block_sparse_conv2d`` can do: the
    forward allocates ``y`` (channels-last) and saves ``x`` and ``values``, the backward
    allocates ``dx`` and ``dvalues``; no argument checks, no kernels. The host overhead section
    times it beside ours, so that an eager-vs-graph ratio can be read against the host time
    that no wrapper can remove."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, y_shape: torch.Size) -> torch.Tensor:
        ctx.save_for_backward(x, values)
        return torch.empty(y_shape, dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, values = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(values), None


def host_overhead_rows(device: torch.device, dtype, fake: bool, calls: int = 200) -> list[dict]:
    """Host µs per eager call of ``block_sparse_conv2d``: forward (inputs requiring grad) and
    fwd+bwd, through the custom ops (``EAGER_FAST_PATH`` off: the code before the fast path)
    and through the eager Function, with plain and cached Triton launches, at a tiny 3×3 and a
    1×1 shape, next to ``F.conv2d`` and :class:`AutogradFloor` (``"autograd floor"``).
    ``fake`` (on the CPU): the GPU route with every kernel a stand-in that launches nothing
    (:func:`host_route.gpu_route_without_kernels`), so only our host work is timed, the cached
    launch's key and replay included; on a GPU the kernels run and ``calls`` calls are issued
    without a sync in between (host time per call, as long as the host is slower than the
    device)."""
    from itop_kernels import conv as conv_mod
    from itop_kernels import triton_launch
    rows = []
    try:
        gen = torch.Generator().manual_seed(0)
        shapes = [Layer("host", "3x3", 2, 64, 64, 8, 3), Layer("host", "1x1", 2, 64, 64, 8, 1)]
        if device.type == "cuda":
            shapes.append(Layer("resnet50", "s3_3x3", 64, 256, 256, 14, 3))
        for layer in shapes:
            x, w, layout = _operands(layer, 16, 0.25, device, dtype, gen)
            x.requires_grad_()
            values = layout.gather(w).requires_grad_()
            conv = dict(stride=layer.stride, padding=layer.padding)
            dense_w = w.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
            variants = {"dense F.conv2d": (lambda: F.conv2d(x, dense_w, **conv), None),
                        "autograd floor": (lambda: AutogradFloor.apply(x, values, dy.shape),
                                           None)}
            for path in ("custom_ops", "eager"):
                for launch in ("plain", "cached"):
                    variants[f"{path}, {launch} launch"] = (
                        lambda: block_sparse_conv2d(x, values, layout, **conv), (path, launch))
            dy = torch.randn_like(variants["dense F.conv2d"][0]().detach())
            samples = {(name, mode): [] for name in variants for mode in ("fwd", "fwd+bwd")}
            for rep in range(6):   # the variants interleaved in each round (a shared machine)
                for name, (make, setting) in variants.items():
                    conv_mod.EAGER_FAST_PATH = setting is None or setting[0] == "eager"
                    launch = setting[1] if setting else "plain"
                    with (gpu_route_without_kernels(launch) if fake and setting
                          else triton_launch.launching(launch)):
                        for mode in ("fwd", "fwd+bwd"):
                            fn = make if mode == "fwd" else _fwd_bwd(make, dy)
                            for _ in range(3 if rep else 10):   # warm-up
                                fn()
                            _sync(device)
                            t0 = time.perf_counter()
                            for _ in range(calls):
                                fn()
                            elapsed = (time.perf_counter() - t0) / calls * 1e6
                            _sync(device)
                            if rep:   # the first round warms up
                                samples[(name, mode)].append(elapsed)
            for name in variants:
                res = {}
                for mode in ("fwd", "fwd+bwd"):
                    res[mode] = statistics.median(samples[(name, mode)])
                    res[mode + "_samples"] = samples[(name, mode)]
                rows.append({"layer": asdict(layer), "variant": name, "host_us": res})
                print(f"host overhead {layer.name:7s} {name:28s} fwd {res['fwd']:8.1f} µs   "
                      f"fwd+bwd {res['fwd+bwd']:8.1f} µs")
    finally:
        conv_mod.EAGER_FAST_PATH = True
    return rows


def plot_device_run(result: dict, path: str) -> None:
    """fwd+bwd speedup over dense per row: eager and from CUDA graphs, per block size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key, title in ((axes[0], "speedup_eager_vs_dense_eager", "eager"),
                           (axes[1], "speedup_graph_vs_dense_graph", "CUDA graphs")):
        for bs in sorted({r["block_size"] for r in rows}):
            pts = [(r["density_nominal"], r[key]) for r in rows
                   if r["block_size"] == bs and key in r]
            if pts:
                ax.scatter(*zip(*pts), s=12, alpha=0.6, label=f"block {bs}")
            else:
                ax.text(0.5, 0.5, "no rows", transform=ax.transAxes, ha="center")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("requested density")
        ax.set_title(f"fwd+bwd speedup over cuDNN, {title}", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"block_sparse_conv2d, {result['device_name']}, {result['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a few shapes and densities")
    p.add_argument("--densities", type=float, nargs="+")
    p.add_argument("--block-sizes", type=int, nargs="+")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (CPU median)")
    p.add_argument("--peak-tflops", type=float, default=800.0,
                   help="GPU bf16 dense peak for the roofline floor (measured H100: ~800)")
    p.add_argument("--peak-tbs", type=float, default=3.0,
                   help="GPU memory bandwidth for the roofline floor, TB/s (measured H100: ~3)")
    p.add_argument("--out", help="JSON path (the plot goes next to it as .png)")
    p.add_argument("--out-dir", help=OUT_DIR_HELP)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--no-graphs", action="store_true",
                   help="CPU sweep only (the GPU run always times CUDA graphs)")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="GPU run / smoke: hard wall-clock budget; the clock is checked between "
                        "cases and the JSON written after every case (default 150)")
    p.add_argument("--smoke", action="store_true",
                   help="the GPU run's code paths on the CPU through Triton's interpreter at "
                        "tiny shapes (no timings worth reading)")
    p.add_argument("--host-overhead", action="store_true",
                   help="only the host µs per eager call (on the CPU: the GPU route in bf16 "
                        "with kernels that launch nothing) -> host_overhead_conv_<cpu|gpu>.json")
    p.add_argument("--plan", action="store_true",
                   help="print the GPU run's plan and its time estimate, and exit")
    args = p.parse_args(argv)
    if args.plan:
        print(json.dumps(estimate_plan(run_plan(args.quick, False)), indent=1))
        return 0
    if args.smoke and args.device == "cuda":
        p.error("--smoke runs on the CPU")

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        dtype = torch.bfloat16
        densities = args.densities or ([0.05, 0.2] if args.quick
                                       else [0.02, 0.05, 0.1, 0.2, 0.5])
        block_sizes = args.block_sizes or [16, 32, 64]
        plan = [(layer, {bs: densities for bs in block_sizes}) for layer in gpu_layers(args.quick)]
        repeats = args.repeats or (5 if args.quick else 10)
        device_name = torch.cuda.get_device_name(device)
    else:
        dtype = torch.float32
        plan = cpu_plan(args.quick)
        if args.densities or args.block_sizes:  # an explicit sweep for every CPU layer shape
            plan = [(layer, {bs: args.densities or sorted({d for ds in sw.values() for d in ds})
                             for bs in (args.block_sizes or list(sw))}) for layer, sw in plan]
        repeats = args.repeats or 3
        device_name = _cpu_name()
    if args.host_overhead:
        out = args.out or str(results_path(
            f"host_overhead_conv_{'gpu' if gpu else 'cpu'}.json", args.out_dir))
    elif args.smoke:
        out = args.out or str(results_path("conv_smoke.json", args.out_dir))
    else:
        out = args.out or str(results_path(
            f"conv_{'gpu' if gpu else 'cpu'}{'_quick' if args.quick else ''}.json", args.out_dir))
    refuse_overwrite(p, args.overwrite, out,   # the host-overhead run writes no plot
                     None if args.host_overhead else os.path.splitext(out)[0] + ".png")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"   # before the Triton kernels are first imported
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    rows = []
    result = {
        "benchmark": "bench_conv", "device": device.type, "device_name": device_name,
        "dtype": str(dtype), "memory_format": "channels_last",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "triton": triton_version,
        "python": platform.python_version(), "git_commit": _git_commit(), "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "timer": "triton.testing.do_bench median" if gpu else f"median of {repeats} wall-clock runs",
        "roofline": ({"peak_tflops": args.peak_tflops, "peak_tbs": args.peak_tbs} if gpu else None),
        "complete": False, "rows": rows,
    }

    if args.host_overhead:
        dtype = torch.bfloat16   # the GPU run's dtype; on the CPU no kernel computes anything
        result.update(benchmark="bench_conv --host-overhead", dtype=str(dtype),
                      timer=("host wall clock per call, no sync between calls" if gpu else
                             "host wall clock per call, median of 5 rounds; the GPU route on CPU "
                             "tensors with every kernel a stand-in that launches nothing "
                             "(benchmarks/host_route.py)"),
                      rows=host_overhead_rows(device, dtype, fake=not gpu))
        result["complete"] = True
        result["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
        return 0
    if gpu or args.smoke:
        if args.smoke:   # fp16: the interpreter's bf16 is wrong, and fp16 takes the 1×1 GEMM route
            dtype = torch.float16
            result.update(dtype=str(dtype),
                          timer="smoke: CPU interpreter, tiny shapes (code paths only)")
        run_device_plan(args, device, dtype, out, result)
        png = os.path.splitext(out)[0] + ".png"
        plot_device_run(result, png)
        print(f"\nwrote {out} and {png}; skipped: {result['skipped'] or 'nothing'}")
        return 0

    def save() -> None:  # after every layer shape, so a run cut short still leaves its rows
        result["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

    total = sum(len(ds) for _, sw in plan for ds in sw.values())
    with tqdm(total=total, desc="bench_conv", file=sys.stderr) as bar:
        for layer, sweep in plan:
            bar.set_postfix_str(f"{layer.net}/{layer.name}")
            rows += bench_layer(layer, sweep, device, dtype, repeats, torch.channels_last,
                                args.peak_tflops * 1e12 if gpu else None,
                                args.peak_tbs * 1e12 if gpu else None, bar,
                                graphs=gpu and not args.no_graphs)
            save()
    result["complete"] = True
    save()
    png = os.path.splitext(out)[0] + ".png"
    plot(rows, png, f"block_sparse_conv2d fwd+bwd, {device_name}, {str(dtype)[6:]}, "
                    f"channels_last ({'quick' if args.quick else 'full'} sweep)")
    print_table(rows)
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
