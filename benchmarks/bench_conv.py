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
from provenance import OUT_DIR_HELP, results_path  # noqa: E402


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
    p.add_argument("--no-graphs", action="store_true",
                   help="GPU: skip the CUDA-graph fwd+bwd timings (host overhead removed)")
    args = p.parse_args(argv)

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
    out = args.out or str(results_path(
        f"conv_{'gpu' if gpu else 'cpu'}{'_quick' if args.quick else ''}.json", args.out_dir))
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
