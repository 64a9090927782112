"""Block-sparse linear vs dense, masked dense and torch BSR: forward, backward and fwd+bwd.

Sweeps density × block size × dtype on random data and writes the raw timings to JSON
(device, versions, git commit) plus a PNG of fwd+bwd speedup over dense against density.

On a GPU it times with ``triton.testing.do_bench`` (median, after warm-up) at the design's
target shape (docs/design.md: M = 16384, K = N = 4096) in bf16 and fp16, and reports each time
as a fraction of the roofline floor max(FLOPs / peak, bytes / bandwidth), with the peaks
measured in the same run.
On the CPU it runs a smaller sweep (M = 512, K = N = 4096, fp32) with interleaved repetitions,
timing the CPU implementation.

    python benchmarks/bench_linear.py            # full sweep on the default device
    python benchmarks/bench_linear.py --quick    # a few points, for a smoke run
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
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from itop_kernels import BlockLayout, block_sparse_linear  # noqa: E402
from provenance import OUT_DIR_HELP, results_path  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------- environment
def git_commit() -> str:
    """HEAD of this checkout; ``ITOP_GIT_COMMIT`` overrides it (a copy without .git)."""
    if os.environ.get("ITOP_GIT_COMMIT"):
        return os.environ["ITOP_GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=Path(__file__).parent, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


# --------------------------------------------------------------------------- timing
def time_cases(cases: dict, device: torch.device, reps: int) -> dict:
    """Median milliseconds of each callable in ``cases`` (strings are passed through).

    GPU: ``triton.testing.do_bench`` (median, with its own warm-up). CPU: one warm-up call
    each, then ``reps`` interleaved rounds, one sample of every method per round, so that
    machine noise hits all methods alike.
    """
    out = {k: fn for k, fn in cases.items() if isinstance(fn, str)}
    live = {k: fn for k, fn in cases.items() if not isinstance(fn, str)}
    if device.type == "cuda":
        import triton.testing
        for k, fn in live.items():
            out[k] = float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        return out
    samples = {k: [] for k in live}
    for fn in live.values():
        fn()
    for _ in range(reps):
        for k, fn in live.items():
            start = time.perf_counter()
            fn()
            samples[k].append((time.perf_counter() - start) * 1e3)
    out.update({k: statistics.median(v) for k, v in samples.items()})
    return out


def measure_peaks(device: torch.device, dtype: torch.dtype) -> dict:
    """Measured GEMM rate (TFLOP/s) and copy bandwidth (TB/s, read + write) on this device."""
    if device.type != "cuda":
        return {}
    import triton.testing
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    src = torch.randn(1 << 28, device=device, dtype=torch.float16)  # 512 MiB
    dst = torch.empty_like(src)
    ms_copy = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return {"tflops": 2 * n ** 3 / ms / 1e9, "tbps": 2 * src.numel() * 2 / ms_copy / 1e9}


def roofline_ms(M: int, K: int, N: int, density: float, elsize: int, peaks: dict,
                phase: str) -> float | None:
    """Floor max(FLOPs/peak, bytes/bandwidth) for the sparse op; None without peaks."""
    if not peaks:
        return None
    gemm = 2 * M * K * N * density
    w = K * N * density * elsize
    fwd_flops, fwd_bytes = gemm, M * K * elsize + w + M * N * elsize
    bwd_flops = 2 * gemm                      # dX and dW
    bwd_bytes = M * N * elsize * 2 + M * K * elsize * 2 + 2 * w  # read dY twice, X, W; write dX, dW
    flops, nbytes = {"fwd": (fwd_flops, fwd_bytes), "bwd": (bwd_flops, bwd_bytes),
                     "fwd+bwd": (fwd_flops + bwd_flops, fwd_bytes + bwd_bytes)}[phase]
    return max(flops / (peaks["tflops"] * 1e12), nbytes / (peaks["tbps"] * 1e12)) * 1e3


# --------------------------------------------------------------------------- methods
def _derive_roofline(row: dict, elsize: int, peaks: dict) -> None:
    """Add ``roofline_ms`` and ``roofline_fraction`` to a timed row. The sparse methods (ours,
    torch BSR) are held to the floor of the sparse work, dense and masked dense to the dense one."""
    sparse = row["method"] in ("ours", "torch_bsr")
    floor = roofline_ms(row["M"], row["K"], row["N"], row["density"] if sparse else 1.0,
                        elsize, peaks, row["phase"])
    row["roofline_ms"] = floor
    row["roofline_fraction"] = floor / row["ms"] if floor else None


def rederive(path: Path) -> dict:
    """Recompute the derived fields (roofline) of a results JSON from its raw times and peaks."""
    result = json.loads(path.read_text())
    for row in result["rows"]:
        if "ms" in row:
            _derive_roofline(row, DTYPES[row["dtype"]].itemsize, result["peaks"].get(row["dtype"], {}))
    return result


def exact_mask(R: int, C: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """A random block mask with exactly round(density·R·C) (at least one) active blocks."""
    nnz = max(1, round(density * R * C))
    mask = torch.zeros(R * C, dtype=torch.bool)
    mask[torch.randperm(R * C, generator=gen)[:nnz]] = True
    return mask.view(R, C)


def build_cases(x, W, mask, bs, layout, values, bias):
    """Callables for each method and phase on the same inputs."""
    dy = torch.randn(x.shape[0], W.shape[0], device=x.device, dtype=x.dtype)
    dense_mask = mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1).to(x.device, x.dtype)
    xg = x.detach().clone().requires_grad_()
    vg = values.detach().clone().requires_grad_()
    Wg = W.detach().clone().requires_grad_()

    def ours_fwd():
        with torch.no_grad():
            block_sparse_linear(x, values, layout, bias)

    y_saved = block_sparse_linear(xg, vg, layout, bias)

    def ours_bwd():
        torch.autograd.grad(y_saved, (xg, vg), dy, retain_graph=True)

    def ours_fwdbwd():
        y = block_sparse_linear(xg, vg, layout, bias)
        torch.autograd.grad(y, (xg, vg), dy)

    def dense_fwd():
        with torch.no_grad():
            F.linear(x, W, bias)

    def dense_fwdbwd():
        y = F.linear(xg, Wg, bias)
        torch.autograd.grad(y, (xg, Wg), dy)

    def masked_fwdbwd():
        y = F.linear(xg, Wg * dense_mask, bias)
        torch.autograd.grad(y, (xg, Wg), dy)

    cases = {("ours", "fwd"): ours_fwd, ("ours", "bwd"): ours_bwd, ("ours", "fwd+bwd"): ours_fwdbwd,
             ("dense", "fwd"): dense_fwd, ("dense", "fwd+bwd"): dense_fwdbwd,
             ("masked_dense", "fwd+bwd"): masked_fwdbwd}
    try:
        w_bsr = (W * dense_mask).to_sparse_bsr((bs, bs))

        def bsr_fwd():
            with torch.no_grad():
                F.linear(x, w_bsr, bias)
        bsr_fwd()
        cases[("torch_bsr", "fwd")] = bsr_fwd
    except Exception as exc:  # not every dtype/device has a BSR kernel: record why
        cases[("torch_bsr", "fwd")] = f"unavailable: {type(exc).__name__}: {str(exc)[:120]}"
    return cases


# --------------------------------------------------------------------------- host overhead
HOST_SHAPE = dict(M=8, K=64, N=64, block=16, density=0.5)


def _per_call_us(fn, device: torch.device, calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean wall µs per call of ``calls`` back-to-back calls
    (no synchronization between calls: at a tiny shape this is the host's cost per call)."""
    fn()
    fn()
    per = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(per)


def host_overhead(device: torch.device, dtype: torch.dtype, calls: int = 200,
                  rounds: int = 15) -> dict:
    """Host µs per call of ``block_sparse_linear`` (forward under no_grad, and fwd+bwd through
    autograd) at a tiny shape, next to ``F.linear``, the custom-op path and the eager
    ``autograd.Function`` path (where this checkout has them), and the implementation functions
    called directly (the floor of the Python path)."""
    from itop_kernels import linear as lin
    s = HOST_SHAPE
    gen = torch.Generator().manual_seed(0)
    mask = exact_mask(s["N"] // s["block"], s["K"] // s["block"], s["density"], gen)
    layout = BlockLayout.from_mask(mask.to(device), s["block"])
    W = (torch.randn(s["N"], s["K"], generator=gen) / 8).to(device, dtype)
    values = layout.gather(W)
    x = torch.randn(s["M"], s["K"], generator=gen).to(device, dtype)
    dy = torch.randn(s["M"], s["N"], generator=gen).to(device, dtype)
    bias = torch.zeros(s["N"], device=device, dtype=dtype)
    xg, vg, Wg = (t.detach().clone().requires_grad_() for t in (x, values, W))
    bg = bias.detach().clone().requires_grad_()

    def fwd(f):
        def run():
            with torch.no_grad():
                f(x, values, layout, bias)
        return run

    def fwdbwd(f):
        def run():
            y = f(xg, vg, layout, bg)
            torch.autograd.grad(y, (xg, vg, bg), dy)
        return run

    paths = {"public": block_sparse_linear}
    for name, attr in (("custom_op", "_linear_custom_op"), ("eager", "_linear_eager")):
        if hasattr(lin, attr):
            paths[name] = getattr(lin, attr)
    cases = {}
    for name, f in paths.items():
        cases[f"{name} fwd"] = fwd(f)
        cases[f"{name} fwd+bwd"] = fwdbwd(f)

    def dense_fwd():
        with torch.no_grad():
            F.linear(x, W, bias)

    def dense_fwdbwd():
        y = F.linear(xg, Wg, bg)
        torch.autograd.grad(y, (xg, Wg, bg), dy)
    cases["dense F.linear fwd"] = dense_fwd
    cases["dense F.linear fwd+bwd"] = dense_fwdbwd
    if hasattr(lin, "_forward_impl") and hasattr(lin, "_backward_impl"):
        meta = (layout.row_ptr, layout.col_idx, layout.row_idx, layout.col_ptr, layout.t_row_idx,
                layout.t_block_idx)

        def impl_fwd():
            lin._forward_impl(x, values, layout.row_ptr, layout.col_idx, bias, s["block"], s["N"])

        def impl_fwdbwd():
            impl_fwd()
            lin._backward_impl(dy, x, values, *meta, s["block"], True, True)
            dy.sum(0)
        cases["impl direct fwd"] = impl_fwd
        cases["impl direct fwd+bwd"] = impl_fwdbwd
    us = {k: _per_call_us(fn, device, calls, rounds) for k, fn in cases.items()}
    return {"shape": s, "dtype": str(dtype).replace("torch.", ""), "calls_per_round": calls,
            "rounds": rounds, "us_per_call": us,
            "timer": "median over rounds of the mean perf_counter µs per call"}


def run_host_overhead(args) -> dict:
    """``--host-overhead``: one labelled entry added to the JSON at ``args.out`` (entries from
    earlier runs, e.g. the code before a change, are kept)."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads) if args.threads else None
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    entry = {"label": args.label, "git_commit": git_commit(), "device": device_name(device),
             "versions": versions(), "threads": torch.get_num_threads(),
             "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
             **host_overhead(device, dtype)}
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    entries = [e for e in old.get("entries", []) if e.get("label") != args.label]
    result = {"benchmark": "bench_linear --host-overhead", "entries": entries + [entry]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for e in result["entries"]:
        print(f"\n[{e['label']}] {e['device']} {e['dtype']} (commit {e['git_commit'][:10]})")
        for k, v in e["us_per_call"].items():
            print(f"  {k:28s} {v:9.1f} µs")
    return result


def run(args, checkpoint=None) -> dict:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    M, K, N = args.M, args.K, args.N
    reps = args.reps
    rows, peaks = [], {}
    total = len(args.dtypes) * len(args.blocks) * len(args.densities)
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="bench_linear", file=sys.stderr)
    except ImportError:
        bar = None
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        peaks[dname] = measure_peaks(device, dtype if dtype != torch.float32 else torch.bfloat16)
        x = torch.randn(M, K, device=device, dtype=dtype)
        W = torch.randn(N, K, device=device, dtype=dtype) / math.sqrt(K)
        bias = torch.randn(N, device=device, dtype=dtype)
        for bs in args.blocks:
            for density in args.densities:
                mask = exact_mask(N // bs, K // bs, density, gen)
                layout = BlockLayout.from_mask(mask.to(device), bs)
                values = layout.gather(W)
                cases = build_cases(x, W, mask, bs, layout, values, bias)
                times = time_cases(cases, device, reps)
                dense_t = {ph: t for (m, ph), t in times.items() if m == "dense"}
                for (method, phase), t in times.items():
                    row = {"dtype": dname, "block": bs, "density": density,
                           "nnz": layout.nnz, "method": method, "phase": phase,
                           "M": M, "K": K, "N": N}
                    if isinstance(t, str):
                        row["error"] = t
                    else:
                        row["ms"] = t
                        ref = dense_t.get(phase)
                        row["speedup_vs_dense"] = ref / t if ref else None
                        _derive_roofline(row, x.element_size(), peaks[dname])
                    rows.append(row)
                if bar is not None:
                    bar.update(1)
                if checkpoint is not None:  # partial results survive a killed run
                    checkpoint(_result(device, reps, peaks, rows, complete=False))
    if bar is not None:
        bar.close()
    return _result(device, reps, peaks, rows, complete=True)


def _result(device: torch.device, reps: int, peaks: dict, rows: list, complete: bool) -> dict:
    on_gpu = device.type == "cuda"
    return {"benchmark": "bench_linear", "device": device_name(device), "device_type": device.type,
            "versions": versions(), "git_commit": git_commit(), "argv": sys.argv,
            "threads": torch.get_num_threads(), "peaks": peaks,
            "timer": "triton.testing.do_bench median" if on_gpu else f"median of {reps} perf_counter samples",
            "complete": complete, "rows": rows}


# --------------------------------------------------------------------------- output
def print_table(result: dict) -> None:
    rows = [r for r in result["rows"] if r["method"] == "ours" and r["phase"] == "fwd+bwd"]
    dense = {(r["dtype"], r["block"], r["density"]): r["ms"] for r in result["rows"]
             if r["method"] == "dense" and r["phase"] == "fwd+bwd"}
    masked = {(r["dtype"], r["block"], r["density"]): r.get("ms") for r in result["rows"]
              if r["method"] == "masked_dense" and r["phase"] == "fwd+bwd"}
    bsr = {(r["dtype"], r["block"], r["density"]): r.get("ms") for r in result["rows"]
           if r["method"] == "torch_bsr"}
    fwd = {(r["dtype"], r["block"], r["density"]): r["ms"] for r in result["rows"]
           if r["method"] == "ours" and r["phase"] == "fwd"}
    print(f"\nbench_linear on {result['device']} ({result['timer']})")
    print(f"{'dtype':5} {'block':>5} {'dens':>5} {'ours f+b ms':>12} {'vs dense':>9} "
          f"{'vs masked':>9} {'roofline':>8} {'fwd ms':>8} {'bsr fwd ms':>10}")
    for r in rows:
        key = (r["dtype"], r["block"], r["density"])
        m = masked.get(key)
        b = bsr.get(key)
        frac = r.get("roofline_fraction")
        print(f"{r['dtype']:5} {r['block']:>5} {r['density']:>5.2f} {r['ms']:>12.3f} "
              f"{dense[key] / r['ms']:>8.2f}x {(m / r['ms'] if m else float('nan')):>8.2f}x "
              f"{(f'{frac:.0%}' if frac else '-'):>8} {fwd[key]:>8.3f} "
              f"{(f'{b:.3f}' if b else 'n/a'):>10}")


def markdown_table(result: dict, dtype: str) -> str:
    """fwd+bwd speedup over dense (and roofline fraction) per block size × density, as Markdown."""
    ours = {(r["block"], r["density"]): r for r in result["rows"]
            if r["dtype"] == dtype and r["method"] == "ours" and r["phase"] == "fwd+bwd"}
    fwd = {(r["block"], r["density"]): r["ms"] for r in result["rows"]
           if r["dtype"] == dtype and r["method"] == "ours" and r["phase"] == "fwd"}
    bsr = {(r["block"], r["density"]): r.get("ms") for r in result["rows"]
           if r["dtype"] == dtype and r["method"] == "torch_bsr"}
    blocks = sorted({b for b, _ in ours})
    dens = sorted({d for _, d in ours}, reverse=True)
    head = "| block | " + " | ".join(f"density {d:g}" for d in dens) + " |"
    lines = [head, "|---" * (len(dens) + 1) + "|"]
    for b in blocks:
        cells = []
        for d in dens:
            r = ours[(b, d)]
            frac = r.get("roofline_fraction")
            ratio = bsr.get((b, d))
            cells.append(f"{r['speedup_vs_dense']:.2f}× ({frac:.0%} of floor; fwd {ratio / fwd[(b, d)]:.1f}× BSR)"
                         if frac and ratio else f"{r['speedup_vs_dense']:.2f}×")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dname in zip(axes[0], dtypes):
        rows = [r for r in result["rows"] if r["dtype"] == dname and r["phase"] == "fwd+bwd"
                and "ms" in r]
        for method, style in (("ours", "-o"), ("masked_dense", ":x")):
            for bs in sorted({r["block"] for r in rows}):
                pts = sorted((r["density"], r["speedup_vs_dense"]) for r in rows
                             if r["method"] == method and r["block"] == bs)
                if pts and method == "ours":
                    ax.plot(*zip(*pts), style, label=f"ours, block {bs}")
                elif pts and bs == max(r["block"] for r in rows):
                    ax.plot(*zip(*pts), style, color="gray", label="masked dense")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        dens = sorted({r["density"] for r in rows})
        ax.set_xticks(dens, [f"{d:g}" for d in dens])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("density (fraction of active blocks)")
        ax.set_ylabel("fwd+bwd speedup over dense")
        r0 = rows[0]
        ax.set_title(f"{dname}, M={r0['M']} K={r0['K']} N={r0['N']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"block-sparse linear on {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a few points only (smoke run)")
    p.add_argument("--M", type=int)
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    p.add_argument("--blocks", nargs="+", type=int, default=[16, 32, 64, 128])
    p.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.2, 0.1, 0.05, 0.02])
    p.add_argument("--reps", type=int, default=5, help="CPU samples per point (median)")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/linear_<device>.json)")
    p.add_argument("--out-dir", type=Path, help=OUT_DIR_HELP)
    p.add_argument("--markdown", action="store_true",
                   help="with --replot: also print a Markdown table per dtype (for README)")
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="no timing: recompute derived fields of an existing results JSON from its "
                        "raw times, rewrite it, re-plot it and print its table")
    p.add_argument("--host-overhead", action="store_true",
                   help="host µs per call at a tiny shape (public, custom-op and eager paths, "
                        "F.linear); adds an entry --label to the JSON (default "
                        "benchmarks/results/host_overhead_linear_<device>.json)")
    p.add_argument("--label", default="current", help="with --host-overhead: the entry's name")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.host_overhead:
        if args.out is None:
            dev = "gpu" if args.device.startswith("cuda") else "cpu"
            args.out = results_path(f"host_overhead_linear_{dev}.json", args.out_dir)
        return args
    if args.replot:
        return args
    gpu = args.device.startswith("cuda")
    if args.M is None:
        args.M = 16384 if gpu else 512
    if args.dtypes is None:
        args.dtypes = ["bf16", "fp16"] if gpu else ["fp32"]
    if args.quick:
        args.blocks = [32, 64] if gpu else [32]
        args.densities = [0.1, 0.02]
        args.reps = min(args.reps, 3)
        if not gpu:
            args.K = args.N = min(args.K, 2048)
    for bs in args.blocks:
        if args.K % bs or args.N % bs:
            p.error(f"--blocks {bs} does not divide --K {args.K} / --N {args.N}")
    if args.out is None:
        args.out = results_path(f"linear_{'gpu' if gpu else 'cpu'}{'_quick' if args.quick else ''}.json",
                                args.out_dir)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.host_overhead:
        run_host_overhead(args)
        return 0
    if args.replot:
        result = rederive(args.replot)
        args.replot.write_text(json.dumps(result, indent=1))
        plot(result, args.replot.with_suffix(".png"))
        print_table(result)
        if args.markdown:
            for dname in sorted({r["dtype"] for r in result["rows"]}):
                print(f"\n{dname}:\n" + markdown_table(result, dname))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = run(args, checkpoint=lambda r: args.out.write_text(json.dumps(r, indent=1)))
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print_table(result)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
