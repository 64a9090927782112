"""Block-sparse linear vs dense, masked dense, torch BSR and stk: kernels, fwd+bwd, host cost.

Three modes:

- ``--sweep`` (the default on CUDA): the one-call GPU run of issue 13, under a hard
  ``--budget-s`` (default 130 s, so that a 150 s timeout leaves room to start and plot; the
  JSON is rewritten after every case, sections that do not fit are skipped and listed).
  bf16, M = 16384, K = N = 4096, blocks 16/32/64/128 × densities 0.5/0.2/0.1/0.05/0.02:
  the peaks (bf16 8192³ GEMM, device copy) measured in the run; every kernel alone per
  candidate config (the shipped ``CONFIGS`` entry and the ``SWEEP`` list);
  fwd+bwd through autograd eagerly and replayed from a CUDA graph, with the shipped and the
  best configs; the sum of the best kernels; dense cuBLAS and masked dense (once), torch BSR
  forward, stk at block 128; the roofline floor and fraction; speedup × density; fp16/bf16
  correctness; host µs per call with plain and cached Triton launches; a ``torch.profiler``
  table at block 64, density 0.02; fp32 (tf32) at block 64; a PNG. Kernels are compiled first
  in ``--compile-workers`` processes. ``--device cpu --smoke`` runs the same code at a tiny
  shape through Triton's interpreter (set ``TRITON_INTERPRET=1``).
  ``benchmarks/pick_linear_configs.py`` turns its JSON into ``CONFIGS`` entries.
- ``--host-overhead``: host µs per call at a tiny shape (public, custom-op and eager paths,
  the implementations called directly, ``F.linear``), one labelled entry per run in
  ``results/host_overhead_linear_<device>.json``.
- otherwise (``--legacy`` on CUDA; the default on the CPU): density × block × dtype sweep of
  fwd, bwd and fwd+bwd against dense, masked dense and torch BSR. On the CPU: M = 512,
  K = N = 4096, fp32, interleaved repetitions.

    python benchmarks/bench_linear.py --out $OUT/linear_sweep_gpu.json  # the GPU run
    TRITON_INTERPRET=1 python benchmarks/bench_linear.py --device cpu --sweep --smoke
    python benchmarks/bench_linear.py --host-overhead --threads 1 --label after
    python benchmarks/bench_linear.py            # CPU sweep
    python benchmarks/bench_linear.py --quick    # a few points
"""
from __future__ import annotations

import argparse
import dataclasses
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
from budget import Budget  # noqa: E402
from host_route import gpu_route_without_kernels  # noqa: E402
from results_files import (OUT_DIR_HELP, OVERWRITE_HELP, refuse_overwrite,  # noqa: E402
                           results_path)

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
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        us.update(_gpu_route_without_kernels(fwd(lin._linear_eager), fwdbwd(lin._linear_eager),
                                             device, calls, rounds))
    return {"shape": s, "dtype": str(dtype).replace("torch.", ""), "calls_per_round": calls,
            "rounds": rounds, "us_per_call": us,
            "timer": "median over rounds of the mean perf_counter µs per call"}


def _gpu_route_without_kernels(fwd, fwdbwd, device, calls: int, rounds: int) -> dict:
    """On a CPU: the eager path on its GPU route with every kernel a stand-in that launches
    nothing (:func:`host_route.gpu_route_without_kernels`), cached launches: our own Python per
    call on the way to a GPU, the launch's specialization key and replay included, without
    Triton's C launcher."""
    with gpu_route_without_kernels("cached"):
        return {"gpu route, cached launches, no kernels fwd": _per_call_us(fwd, device, calls,
                                                                          rounds),
                "gpu route, cached launches, no kernels fwd+bwd": _per_call_us(fwdbwd, device,
                                                                              calls, rounds)}


def host_overhead_labels(path: Path) -> list[str]:
    """The labels of the ``--host-overhead`` entries in the JSON at ``path`` (none if absent)."""
    if not path.exists():
        return []
    return [e.get("label") for e in json.loads(path.read_text()).get("entries", [])]


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


# =========================================================================== GPU sweep run
# One invocation on the GPU (``--sweep``, the default on CUDA): kernels per candidate config,
# fwd+bwd eager and CUDA-graph, baselines (dense, masked dense, torch BSR, stk), roofline, a
# profiler table, fp16/bf16 correctness and fp32 timing, with a hard wall-clock budget; the JSON
# is rewritten after every case. ``--device cpu --smoke`` runs the same code at a tiny shape
# through Triton's interpreter (timings meaningless; every branch that needs no CUDA runs).
def _bench_ms(fn, device: torch.device, rep_ms: int) -> float:
    """Median ms of ``fn``: ``do_bench`` on a GPU; on the CPU one warm-up and one timed call."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms,
                                             return_mode="median"))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _graph_ms(step, device: torch.device, rep_ms: int):
    """``step`` captured once in a CUDA graph and timed as replays; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return _bench_ms(g.replay, device, rep_ms)


def _floor_ms(M: int, K: int, N: int, density: float, elsize: int, peaks: dict, phase: str):
    """``roofline_ms`` with the same-run peaks (None without them)."""
    return roofline_ms(M, K, N, density, elsize, peaks, phase) if peaks else None


def _kernel_call(kernel: str, cfg, ops: dict):
    """A callable running one kernel of the linear with ``cfg`` on the operands in ``ops``."""
    from itop_kernels import triton_linear as T
    lay, bs = ops["layout"], ops["bs"]
    if kernel == "fwd":
        return lambda: T.linear_forward(ops["x"], ops["values"], lay.row_ptr, lay.col_idx, None,
                                        bs, lay.shape[0], config=cfg)
    if kernel == "dx":
        return lambda: T.linear_grad_input(ops["dy"], ops["values"], lay.col_ptr, lay.t_row_idx,
                                           lay.t_block_idx, bs, lay.shape[1], config=cfg)
    return lambda: T.linear_grad_weight(ops["dy"], ops["x"], lay.row_idx, lay.col_idx, bs,
                                        config=cfg)


def _candidates(arch: int, kernel: str, bs: int, dtype: torch.dtype) -> list:
    """The shipped config first, then the sweep candidates (16-bit dtypes only)."""
    from itop_kernels import triton_linear as T
    kind = "16bit" if dtype in (torch.float16, torch.bfloat16) else T._precision(dtype)
    shipped = T.CONFIGS[arch][kernel][(bs, kind)]
    sweep = T.SWEEP[arch][kernel].get(bs, []) if kind == "16bit" else []
    return [("shipped", shipped)] + [("sweep", c) for c in sweep]


class _Table:
    """Temporarily ship other configs (``best``) in ``CONFIGS`` for the autograd path."""

    def __init__(self, arch: int, bs: int, kind: str, chosen: dict) -> None:
        from itop_kernels import triton_linear as T
        self.T, self.arch, self.key, self.chosen = T, arch, (bs, kind), chosen
        self.old = {}

    def __enter__(self):
        for k, cfg in self.chosen.items():
            table = dict(self.T.CONFIGS[self.arch][k])
            self.old[k] = self.T.CONFIGS[self.arch][k]
            table[self.key] = cfg
            self.T.CONFIGS[self.arch] = dict(self.T.CONFIGS[self.arch], **{k: table})
        return self

    def __exit__(self, *exc):
        for k, table in self.old.items():
            self.T.CONFIGS[self.arch] = dict(self.T.CONFIGS[self.arch], **{k: table})


def _stk_case(x, w_masked, dy, bs: int):
    """stk's weight-sparse linear fwd+bwd (``stk.ops.dds(x, W.t())``), or the reason it fails."""
    try:
        import stk
        W = stk.ops.to_sparse(w_masked.detach(), blocking=bs)
        W.requires_grad_(True)
        xs = x.detach().clone().requires_grad_()

        def step():
            y = stk.ops.dds(xs, W.t())
            y.backward(dy)
        step()
        return step
    except Exception as exc:  # record, never crash the run
        return f"unavailable: {type(exc).__name__}: {str(exc)[:160]}"


def _precompile(items: list, workers: int) -> dict:
    """Compile every (kernel config) the run will launch, in ``workers`` processes, into Triton's
    on-disk cache, so the timed loop loads instead of compiling. Best effort: failures only
    cost time later, and are reported."""
    import concurrent.futures as cf
    import multiprocessing as mp
    t0 = time.perf_counter()
    if workers <= 1 or not items:
        return {"workers": 0, "items": len(items), "s": 0.0}
    chunks = [items[i::workers] for i in range(workers)]
    errors = []
    try:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            for errs in ex.map(_warm_chunk, chunks):
                errors += errs
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}"[:300])
    return {"workers": workers, "items": len(items), "s": time.perf_counter() - t0,
            "errors": errors[:20]}


def _warm_chunk(chunk: list) -> list:
    """Worker: run each item's kernel once at its real shape (compiles into the disk cache)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    errs = []
    for item in chunk:
        try:
            kernel, cfg, bs, density, dname, M, K, N = item
            ops = _operands(torch.device("cuda"), DTYPES[dname], M, K, N, bs, density)
            _kernel_call(kernel, cfg, ops)()
        except Exception as exc:
            errs.append(f"{item[0]} bs={item[2]} {item[1]}: {type(exc).__name__}: {exc}"[:300])
    torch.cuda.synchronize()
    return errs


def _operands(device, dtype, M, K, N, bs, density, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = exact_mask(N // bs, K // bs, density, gen)
    layout = BlockLayout.from_mask(mask.to(device), bs)
    W = (torch.randn(N, K, generator=gen) / math.sqrt(K * density)).to(device, dtype)
    return {"layout": layout, "bs": bs, "mask": mask, "W": W, "values": layout.gather(W),
            "x": torch.randn(M, K, generator=gen).to(device, dtype),
            "dy": torch.randn(M, N, generator=gen).to(device, dtype)}


def _check_fwdbwd(device, dtype, M, K, N, bs, density) -> dict:
    """Relative errors of y, dx, dv (autograd, shipped configs) against float64 on the device."""
    ops = _operands(device, dtype, M, K, N, bs, density, seed=1)
    x = ops["x"].clone().requires_grad_()
    v = ops["values"].clone().requires_grad_()
    y = block_sparse_linear(x, v, ops["layout"])
    y.backward(ops["dy"])
    lay = ops["layout"]
    dense = lay.scatter(v.detach().double())
    xr, dyr = ops["x"].double(), ops["dy"].double()
    ref = {"y": xr @ dense.t(), "dx": dyr @ dense, "dv": lay.gather(dyr.t() @ xr)}
    got = {"y": y, "dx": x.grad, "dv": v.grad}
    out = {}
    for k in ref:
        g = got[k].detach().double()
        out[k] = float("inf") if not torch.isfinite(g).all() else \
            float((g - ref[k]).norm() / ref[k].norm())
    return out


def sweep_run(args, write) -> dict:
    """The GPU run (see the module docstring); ``write(result)`` after every case."""
    from itop_kernels import triton_launch
    from itop_kernels import triton_linear as T
    device = torch.device(args.device)
    budget = Budget(args.budget_s)
    M, K, N = args.M, args.K, args.N
    dname = args.dtypes[0]
    dtype = DTYPES[dname]
    el = dtype.itemsize
    arch = T._arch(device)
    res = {"benchmark": "bench_linear --sweep", "device": device_name(device),
           "device_type": device.type, "versions": versions(), "git_commit": git_commit(),
           "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "budget_s": args.budget_s, "shape": {"M": M, "K": K, "N": N},
           "dtype": dname, "arch": arch, "launch_mode": triton_launch.launch_mode(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
           "timer": ("triton.testing.do_bench median" if device.type == "cuda"
                     else "one perf_counter call (smoke run: timings meaningless)"),
           "sections_skipped": [], "complete": False}
    rows = res["rows"] = []
    rep = args.rep_ms

    def save():
        res["elapsed_s"] = budget.elapsed()
        write(res)

    def section(name: str, need_s: float) -> bool:
        if budget.left() < need_s:
            res["sections_skipped"].append({"section": name, "left_s": budget.left()})
            save()
            return False
        return True

    # 1. peaks measured in this run
    res["peaks"] = measure_peaks(device, torch.bfloat16) if device.type == "cuda" else {}
    peaks = res["peaks"]
    save()
    # 2. compile everything in parallel into Triton's cache
    # block 64 first (the targets), then 128 (stk), then the rest: a run cut short by
    # its budget loses the least important cells
    order = sorted(args.blocks, key=lambda b: (b != 64, b != 128, -b))
    cells = [(bs, d) for bs in order for d in args.densities]
    # one density per block: nothing a kernel is specialized on depends on the density
    items = [(k, cfg, bs, args.densities[-1], dname, M, K, N) for bs in args.blocks
             for k in ("fwd", "dx", "dw") for _, cfg in _candidates(arch, k, bs, dtype)]
    if device.type == "cuda" and args.compile_workers > 1:
        res["precompile"] = _precompile(items, args.compile_workers)
        save()
    # 3. correctness (fp16 and the run dtype) at block 64, a smaller M, shipped configs
    if section("correctness", 5):
        cm = min(M, 2048)
        res["correctness"] = {}
        for cd in dict.fromkeys(["fp16", dname]):
            if cd == "bf16" and device.type != "cuda":
                continue  # bf16 is wrong in the interpreter
            cbs = 64 if 64 in args.blocks else args.blocks[0]
            errs = _check_fwdbwd(device, DTYPES[cd], cm, K, N, cbs, 0.1)
            res["correctness"][cd] = {"block": cbs, "density": 0.1, "M": cm, "rel_err": errs,
                                      "ok": all(e <= 1e-2 for e in errs.values())}
        save()
    # 4. dense baselines (independent of block and density): measured once
    x = torch.randn(M, K, device=device, dtype=dtype)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    Wd = (torch.randn(N, K, device=device, dtype=dtype) / math.sqrt(K))
    xg, Wg = x.clone().requires_grad_(), Wd.clone().requires_grad_()
    dense = {}
    if section("dense", 2):
        dense["fwd"] = _bench_ms(lambda: F.linear(x, Wd), device, rep)

        def dense_step():
            torch.autograd.grad(F.linear(xg, Wg), (xg, Wg), dy)
        dense["fwd+bwd"] = _bench_ms(dense_step, device, rep)
        dense["fwd+bwd graph"] = _graph_ms(dense_step, device, rep)
        mask_full = torch.ones_like(Wd)

        def masked_step():
            torch.autograd.grad(F.linear(xg, Wg * mask_full), (xg, Wg), dy)
        dense["masked fwd+bwd"] = _bench_ms(masked_step, device, rep)
        res["dense"] = dense
        save()
    # 5. per block and density
    for bs, density in cells:
        if not section(f"cell bs={bs} d={density}", 3):
            continue
        ops = _operands(device, dtype, M, K, N, bs, density)
        lay = ops["layout"]
        row = {"block": bs, "density": density, "nnz": lay.nnz, "kernels": {}}
        best = {}
        for k in ("fwd", "dx", "dw"):
            timings = []
            for origin, cfg in _candidates(arch, k, bs, dtype):
                try:
                    ms = _bench_ms(_kernel_call(k, cfg, ops), device, max(5, rep // 4))
                    timings.append({"config": dataclasses.asdict(cfg), "tag": cfg.tag(),
                                    "origin": origin, "ms": ms})
                except Exception as exc:
                    timings.append({"config": dataclasses.asdict(cfg), "tag": cfg.tag(),
                                    "origin": origin, "error": f"{type(exc).__name__}: {exc}"[:300]})
            ok = [t for t in timings if "ms" in t]
            best[k] = min(ok, key=lambda t: t["ms"]) if ok else None
            row["kernels"][k] = {"timings": timings,
                                 "best": best[k]["tag"] if best[k] else None,
                                 "shipped_ms": timings[0].get("ms"),
                                 "best_ms": best[k]["ms"] if best[k] else None}
        if all(best.values()):
            row["sum_kernels_best_ms"] = sum(best[k]["ms"] for k in best)
        row["sum_kernels_shipped_ms"] = sum(row["kernels"][k]["shipped_ms"] or 0 for k in best)
        xs, vs = ops["x"].clone().requires_grad_(), ops["values"].clone().requires_grad_()

        def ours_step():
            torch.autograd.grad(block_sparse_linear(xs, vs, lay), (xs, vs), ops["dy"])

        def ours_fwd():
            with torch.no_grad():
                block_sparse_linear(ops["x"], ops["values"], lay)
        t = {"eager fwd+bwd shipped": _bench_ms(ours_step, device, rep),
             "graph fwd+bwd shipped": _graph_ms(ours_step, device, rep),
             "eager fwd shipped": _bench_ms(ours_fwd, device, rep)}
        if all(best.values()):
            kind = "16bit" if el == 2 else T._precision(dtype)
            chosen = {k: T._Cfg(**best[k]["config"]) for k in best}
            with _Table(arch, bs, kind, chosen):
                t["eager fwd+bwd best"] = _bench_ms(ours_step, device, rep)
                t["graph fwd+bwd best"] = _graph_ms(ours_step, device, rep)
        row["ours"] = t
        try:
            w_masked = ops["W"] * ops["mask"].to(device).repeat_interleave(bs, 0) \
                .repeat_interleave(bs, 1).to(dtype)
            w_bsr = w_masked.to_sparse_bsr((bs, bs))
            row["torch_bsr_fwd_ms"] = _bench_ms(lambda: F.linear(ops["x"], w_bsr), device, rep)
        except Exception as exc:
            row["torch_bsr_fwd_ms"] = None
            row["torch_bsr_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if bs == 128 and device.type == "cuda":
            step = _stk_case(ops["x"], w_masked, ops["dy"], bs)
            if isinstance(step, str):
                row["stk_error"] = step
            else:
                try:
                    row["stk_fwd+bwd_ms"] = _bench_ms(step, device, rep)
                except Exception as exc:
                    row["stk_error"] = f"{type(exc).__name__}: {exc}"[:300]
        floor = _floor_ms(M, K, N, density, el, peaks, "fwd+bwd")
        row["roofline_fwd+bwd_ms"] = floor
        ours_best = min(v for k, v in t.items() if "fwd+bwd" in k and v)
        row["ours_best_fwd+bwd_ms"] = ours_best
        if floor:
            row["roofline_fraction"] = floor / ours_best
        if dense.get("fwd+bwd"):
            row["speedup_vs_dense"] = dense["fwd+bwd"] / ours_best
            row["speedup_eager_vs_dense"] = dense["fwd+bwd"] / t["eager fwd+bwd shipped"]
            row["per_flop_efficiency"] = row["speedup_vs_dense"] * density
        if row.get("sum_kernels_best_ms") and t.get("eager fwd+bwd best"):
            row["eager_over_kernel_sum"] = t["eager fwd+bwd best"] / row["sum_kernels_best_ms"]
        rows.append(row)
        save()
    # 6. host overhead, plain vs cached launches
    if section("host_overhead", 6):
        res["host_overhead"] = {}
        for mode in triton_launch.LAUNCH_MODES:
            triton_launch.set_launch_mode(mode)
            small = device.type != "cuda"   # the interpreter: each call takes milliseconds
            res["host_overhead"][mode] = host_overhead(device, dtype, calls=2 if small else 100,
                                                       rounds=1 if small else 7)
        triton_launch.set_launch_mode(res["launch_mode"])
        save()
    # 7. profiler table of an eager step at block 64, density 0.02
    if section("profile", 5):
        pbs = 64 if 64 in args.blocks else args.blocks[0]
        ops = _operands(device, dtype, M, K, N, pbs, 0.02)
        xs, vs = ops["x"].clone().requires_grad_(), ops["values"].clone().requires_grad_()

        def step():
            torch.autograd.grad(block_sparse_linear(xs, vs, ops["layout"]), (xs, vs), ops["dy"])
        for _ in range(3):
            step()
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(5):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        res["profile"] = {"block": pbs, "density": 0.02, "steps": 5,
                          "table": prof.key_averages().table(sort_by=sort, row_limit=25)}
        save()
    # 8. fp32 (tf32 where torch allows it) at block 64
    if section("fp32", 5) and args.fp32:
        res["fp32"] = []
        fbs = 64 if 64 in args.blocks else args.blocks[0]
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            xf, dyf = x.float().requires_grad_(), dy.float()
            Wf = Wd.float().requires_grad_()
            dense32 = _bench_ms(lambda: torch.autograd.grad(F.linear(xf, Wf), (xf, Wf), dyf),
                                device, rep)
            for density in args.densities:
                if budget.left() < 2:
                    res["sections_skipped"].append({"section": f"fp32 d={density}"})
                    break
                ops = _operands(device, torch.float32, M, K, N, fbs, density)
                xs, vs = ops["x"].clone().requires_grad_(), ops["values"].clone().requires_grad_()
                ms = _bench_ms(lambda: torch.autograd.grad(
                    block_sparse_linear(xs, vs, ops["layout"]), (xs, vs), ops["dy"]), device, rep)
                res["fp32"].append({"block": fbs, "density": density, "precision":
                                    T._precision(torch.float32), "ms": ms, "dense_ms": dense32,
                                    "speedup_vs_dense": dense32 / ms})
                save()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    res["complete"] = not res["sections_skipped"]
    save()
    return res


def plot_sweep(res: dict, path: Path) -> None:
    """Speedup over dense cuBLAS (fwd+bwd) vs density per block, with stk and torch BSR (fwd)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not res["rows"]:
        return  # nothing timed (budget spent): the JSON says why
    fig, ax = plt.subplots(figsize=(7, 4.8))
    dense = res.get("dense", {})
    for bs in sorted({r["block"] for r in res["rows"]}):
        rows = sorted((r for r in res["rows"] if r["block"] == bs), key=lambda r: r["density"])
        pts = [(r["density"], r["speedup_vs_dense"]) for r in rows if r.get("speedup_vs_dense")]
        if pts:
            ax.plot(*zip(*pts), "-o", label=f"ours fwd+bwd, block {bs}")
        bsr = [(r["density"], dense["fwd"] / r["torch_bsr_fwd_ms"]) for r in rows
               if r.get("torch_bsr_fwd_ms") and dense.get("fwd")]
        if bsr:
            ax.plot(*zip(*bsr), ":x", alpha=0.6, label=f"torch BSR fwd, block {bs}")
        stk = [(r["density"], dense["fwd+bwd"] / r["stk_fwd+bwd_ms"]) for r in rows
               if r.get("stk_fwd+bwd_ms") and dense.get("fwd+bwd")]
        if stk:
            ax.plot(*zip(*stk), "--s", label=f"stk fwd+bwd, block {bs}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density (fraction of active blocks)")
    ax.set_ylabel("speedup over dense (same run)")
    s = res["shape"]
    ax.set_title(f"{res['dtype']}, M={s['M']} K={s['K']} N={s['N']} on {res['device']}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_sweep(res: dict) -> None:
    print(f"\nbench_linear --sweep on {res['device']} ({res['timer']}), "
          f"{res.get('elapsed_s', 0):.0f} s, complete={res['complete']}")
    print(f"{'block':>5} {'dens':>5} {'best f+b':>9} {'eager':>8} {'graph':>8} {'k-sum':>8} "
          f"{'vs dense':>8} {'floor%':>6} {'best fwd/dx/dw configs'}")
    for r in res["rows"]:
        t = r["ours"]
        fmt = lambda v: f"{v:8.3f}" if v else "       -"  # noqa: E731
        print(f"{r['block']:>5} {r['density']:>5.2f} {fmt(r['ours_best_fwd+bwd_ms'])} "
              f"{fmt(t.get('eager fwd+bwd best'))} {fmt(t.get('graph fwd+bwd best'))} "
              f"{fmt(r.get('sum_kernels_best_ms'))} {r.get('speedup_vs_dense', 0):7.2f}x "
              f"{r.get('roofline_fraction', 0):6.0%} "
              + " | ".join(str(r['kernels'][k]['best']) for k in ('fwd', 'dx', 'dw')))


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
    p.add_argument("--overwrite", action="store_true",
                   help=OVERWRITE_HELP + "; with --host-overhead: replace the entry --label")
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
    p.add_argument("--sweep", action="store_true",
                   help="the GPU run (default on CUDA): candidates, eager and CUDA-graph, stk, "
                        "BSR, roofline, profiler, under --budget-s; JSON after every case")
    p.add_argument("--legacy", action="store_true", help="on CUDA: the older dtype sweep")
    p.add_argument("--smoke", action="store_true",
                   help="with --sweep on the CPU: a tiny shape through Triton's interpreter")
    p.add_argument("--budget-s", type=float, default=130.0,
                   help="--sweep: wall-clock budget; sections that do not fit are skipped")
    p.add_argument("--rep-ms", type=int, default=40, help="--sweep: do_bench rep (ms)")
    p.add_argument("--compile-workers", type=int, default=12,
                   help="--sweep: processes that compile the kernels first (0: none)")
    p.add_argument("--no-fp32", dest="fp32", action="store_false",
                   help="--sweep: skip the fp32 (tf32) timing")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not (args.legacy or args.replot or args.host_overhead):
        args.sweep = True
    if args.sweep:
        gpu = args.device.startswith("cuda")
        if args.quick:
            args.blocks, args.densities = [64, 128], [0.1, 0.02]
        if args.smoke or not gpu:
            args.M = args.M or 64
            args.K, args.N = (128, 128) if args.K == 4096 else (args.K, args.N)
            if args.blocks == [16, 32, 64, 128]:
                args.blocks = [16, 32, 64]
            if args.densities == [0.5, 0.2, 0.1, 0.05, 0.02]:
                args.densities = [0.5, 0.2]
            args.compile_workers = 0
            args.rep_ms = 1
        args.M = args.M or 16384
        args.dtypes = args.dtypes or (["bf16"] if gpu else ["fp16"])
        for bs in args.blocks:
            if args.K % bs or args.N % bs:
                p.error(f"--blocks {bs} does not divide --K {args.K} / --N {args.N}")
        if args.out is None:
            args.out = results_path(f"linear_sweep_{'gpu' if gpu else 'cpu_smoke'}.json",
                                    args.out_dir)
        refuse_overwrite(p, args.overwrite, args.out, args.out.with_suffix(".png"))
        return args
    if args.host_overhead:
        if args.out is None:
            dev = "gpu" if args.device.startswith("cuda") else "cpu"
            args.out = results_path(f"host_overhead_linear_{dev}.json", args.out_dir)
        if not args.overwrite and args.label in host_overhead_labels(args.out):
            p.error(f"{args.out} already holds an entry --label {args.label!r}: pass "
                    "--overwrite to replace it, or choose a new --label")
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
    refuse_overwrite(p, args.overwrite, args.out, args.out.with_suffix(".png"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.host_overhead:
        run_host_overhead(args)
        return 0
    if args.sweep:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        res = sweep_run(args, lambda r: args.out.write_text(json.dumps(r, indent=1)))
        try:
            plot_sweep(res, args.out.with_suffix(".png"))
        except Exception as exc:  # the JSON is the result; a plot failure must not hide it
            print(f"plot failed: {type(exc).__name__}: {exc}")
        print_sweep(res)
        print(f"\nwrote {args.out}")
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
