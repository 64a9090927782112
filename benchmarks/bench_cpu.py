"""CPU training-step benchmark of a sparse linear layer: ours against dense and the CPU peers.

One interleaved run: within every repetition each method runs once, in an order that rotates
from repetition to repetition, so machine noise hits all methods alike. Every method gets the
same inputs ``x [M, K]`` and ``dY [M, N]`` and the same density, and is timed over a full
forward + backward (``Y``, ``dX`` and ``dW``; fp32):

- ``dense``        ``F.linear`` with a dense weight (autograd).
- ``ours_b{bs}``   ``itop_kernels.block_sparse_linear`` at block sizes 1, 16, 32, 64 (autograd).
                   Block 1 is the unstructured (CSR) path.
- ``sparseprop``   SparseProp's ``SparseLinear`` (unstructured; ``pip install pybind11 scipy
                   setuptools`` then ``pip install --no-build-isolation sparseprop==0.1.14``).
                   Skipped with a message when it does not import.
- ``torch_csr``    torch's own CSR ops as a user would write them: ``torch.sparse.mm`` for ``Y``
                   and ``dX``, ``torch.sparse.sampled_addmm`` for ``dW`` at the nonzeros, with
                   ``Wᵀ``'s values re-gathered every step (``W`` changes every step).
- ``torch_bsr_fwd`` forward only, ``F.linear`` with ``W.to_sparse_bsr(32)`` (block-32 weight),
                   for reference (its backward is not usable); it is not a training step, so
                   its speedup is over ``dense_fwd`` (dense ``F.linear``, forward only).

Unstructured methods use a weight with exactly ``round(density * N * K)`` random nonzeros; block
methods exactly ``round(density * R * C)`` random blocks. Each thread count runs in its own
subprocess with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set before torch loads (SparseProp's
OpenMP reads them) and ``torch.set_num_threads``.

Writes raw times to JSON (``benchmarks/results/cpu_linear.json`` by default) with the CPU model,
core count, versions, git commit, argv and load averages, a PNG of speedup over dense against
density, and prints a table.

    python benchmarks/bench_cpu.py            # 4096x4096, batch 512, all densities, 1 and all cores
    python benchmarks/bench_cpu.py --quick    # small shapes, two densities, for a smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from provenance import ROOT, cpu_model, git_state, package_versions
from results_files import OUT_DIR_HELP, OVERWRITE_HELP, refuse_overwrite, results_path

METHODS_ALL = ["dense", "ours_b1", "ours_b16", "ours_b32", "ours_b64", "sparseprop", "torch_csr",
               "torch_bsr_fwd", "dense_fwd"]
FWD_ONLY = ("torch_bsr_fwd", "dense_fwd")   # forward-only references, compared with dense_fwd
PEERS = ("sparseprop", "torch_csr")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", "-m", type=int, default=512, help="batch rows M (default 512)")
    p.add_argument("--in-features", "-k", type=int, default=4096)
    p.add_argument("--out-features", "-n", type=int, default=4096)
    p.add_argument("--densities", default="0.01,0.02,0.05,0.10,0.20")
    p.add_argument("--threads", default=None,
                   help="comma list of thread counts (default: 1 and all cores)")
    p.add_argument("--block-sizes", default="1,16,32,64")
    p.add_argument("--methods", default=",".join(METHODS_ALL),
                   help="comma list, any of " + ",".join(METHODS_ALL))
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per method")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="M=128, K=N=1024, densities 0.02,0.10, 3 reps (smoke test)")
    p.add_argument("--out", default=None,
                   help="JSON path (default cpu_linear[_quick].json in --out-dir)")
    p.add_argument("--out-dir", default=None, help=OUT_DIR_HELP)
    p.add_argument("--png", default=None, help="plot path (default: --out with .png)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the tables (text and markdown) of an earlier run's JSON and exit")
    p.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.in_features, a.out_features = 128, 1024, 1024
        a.densities, a.reps = "0.02,0.10", 3
    if a.out is None:
        a.out = str(results_path(f"cpu_linear{'_quick' if a.quick else ''}.json", a.out_dir))
    if a.report is None and a._child is None:   # the parent writes; a child only reports
        refuse_overwrite(p, a.overwrite, a.out, a.png or Path(a.out).with_suffix(".png"))
    return a


# --------------------------------------------------------------------------- child (one thread count)
def _child(a) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from itop_kernels import BlockLayout, block_sparse_linear

    nt = a._child
    torch.set_num_threads(nt)
    M, K, N = a.batch, a.in_features, a.out_features
    densities = [float(d) for d in a.densities.split(",")]
    bss = [int(b) for b in a.block_sizes.split(",") if b]
    wanted = [m for m in a.methods.split(",") if m]
    methods = [m for m in wanted if not m.startswith("ours_b")]
    if "ours" in wanted or any(m.startswith("ours_b") for m in wanted):
        methods[1:1] = [f"ours_b{bs}" for bs in bss
                        if f"ours_b{bs}" in wanted or "ours" in wanted or bs not in (1, 16, 32, 64)]
    notes = {}
    SparseLinearSP = None
    if "sparseprop" in methods:
        try:
            from sparseprop.modules import SparseLinear as SparseLinearSP  # noqa: N806
        except Exception as exc:  # noqa: BLE001 - any import failure skips the column
            msg = (f"SparseProp column skipped: `import sparseprop` failed ({exc!r}). Install it "
                   "with `pip install pybind11 scipy setuptools` then `pip install "
                   "--no-build-isolation sparseprop==0.1.14`.")
            print(msg, file=sys.stderr)
            notes["sparseprop"] = msg
            methods.remove("sparseprop")
    for bs in [int(m[6:]) for m in methods if m.startswith("ours_b")]:
        if K % bs or N % bs:
            notes[f"ours_b{bs}"] = f"block size {bs} does not divide {N}x{K}: skipped"
            methods.remove(f"ours_b{bs}")
    if "torch_bsr_fwd" in methods and (K % 32 or N % 32):
        methods.remove("torch_bsr_fwd")

    gen = torch.Generator().manual_seed(a.seed)
    x0 = torch.randn(M, K, generator=gen)
    dy = torch.randn(M, N, generator=gen)

    def exact_mask(rows, cols, density):
        nnz = max(1, round(density * rows * cols))
        idx = torch.randperm(rows * cols, generator=gen)[:nnz]
        m = torch.zeros(rows * cols, dtype=torch.bool)
        m[idx] = True
        return m.view(rows, cols)

    def make_runners(d):
        run, nnz = {}, {}
        if "dense" in methods:
            W = torch.randn(N, K, generator=gen).mul_(K ** -0.5).requires_grad_()
            x = x0.clone().requires_grad_()

            def dense():
                y = F.linear(x, W)
                y.backward(dy)
                x.grad = None
                W.grad = None
            run["dense"], nnz["dense"] = dense, N * K
        for m in methods:
            if not m.startswith("ours_b"):
                continue
            bs = int(m[6:])
            lay = BlockLayout.from_mask(exact_mask(N // bs, K // bs, d), bs)
            v = torch.randn(lay.nnz, bs, bs, generator=gen).requires_grad_()
            x = x0.clone().requires_grad_()

            def ours(lay=lay, v=v, x=x):
                y = block_sparse_linear(x, v, lay)
                y.backward(dy)
                x.grad = None
                v.grad = None
            run[m], nnz[m] = ours, lay.nnz * bs * bs
        need_unstructured = any(m in methods for m in PEERS)
        if need_unstructured:
            mask = exact_mask(N, K, d)
            Wd = torch.randn(N, K, generator=gen) * mask
        if "sparseprop" in methods:
            sl = SparseLinearSP(Wd.clone())
            x = x0.clone().requires_grad_()

            def sparseprop():
                y = sl(x)
                y.backward(dy)
                x.grad = None
                sl.W_val.grad = None
            run["sparseprop"], nnz["sparseprop"] = sparseprop, int(mask.sum())
        if "torch_csr" in methods:
            Wc = Wd.to_sparse_csr()
            crow, col, vals = Wc.crow_indices(), Wc.col_indices(), Wc.values().clone()
            WTc = Wd.t().contiguous().to_sparse_csr()
            # position in W's values of each entry of Wᵀ's values (fixed while the mask is)
            pos = torch.sparse_csr_tensor(crow, col, torch.arange(1, vals.numel() + 1,
                                                                  dtype=torch.float64), (N, K))
            perm = pos.to_dense().t().contiguous().to_sparse_csr().values().long() - 1
            t_crow, t_col = WTc.crow_indices(), WTc.col_indices()
            x = x0.clone()

            def torch_csr():
                W_ = torch.sparse_csr_tensor(crow, col, vals, (N, K))
                y = torch.sparse.mm(W_, x.t()).t()                        # Y = X Wᵀ
                WT_ = torch.sparse_csr_tensor(t_crow, t_col, vals[perm], (K, N))
                dx = torch.sparse.mm(WT_, dy.t()).t()                      # dX = dY W
                dw = torch.sparse.sampled_addmm(W_, dy.t(), x, beta=0.0)  # dW at nonzeros
                return y, dx, dw
            run["torch_csr"], nnz["torch_csr"] = torch_csr, int(mask.sum())
        if "dense_fwd" in methods:
            Wf = torch.randn(N, K, generator=gen).mul_(K ** -0.5)
            x = x0.clone()

            def dense_fwd():
                with torch.no_grad():
                    return F.linear(x, Wf)
            run["dense_fwd"], nnz["dense_fwd"] = dense_fwd, N * K
        if "torch_bsr_fwd" in methods:
            lay = BlockLayout.from_mask(exact_mask(N // 32, K // 32, d), 32)
            Wb = lay.scatter(torch.randn(lay.nnz, 32, 32, generator=gen)).to_sparse_bsr(32)
            x = x0.clone()

            def torch_bsr_fwd():
                with torch.no_grad():
                    return F.linear(x, Wb)
            run["torch_bsr_fwd"], nnz["torch_bsr_fwd"] = torch_bsr_fwd, lay.nnz * 1024
        return run, nnz

    import warnings
    warnings.filterwarnings("ignore", message=".*Sparse.*")
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    total = len(densities) * (a.warmup + a.reps) * len(methods)
    bar = (tqdm(total=total, desc=f"{nt} thread(s)", file=sys.stderr, leave=True)
           if tqdm and not a.no_progress else None)
    for d in densities:
        run, nnz = make_runners(d)
        names = list(run)
        times = {m: [] for m in names}
        load_before = os.getloadavg()
        for rep in range(a.warmup + a.reps):
            k = rep % len(names)
            for m in names[k:] + names[:k]:          # rotate the order every repetition
                t0 = time.perf_counter()
                run[m]()
                t = time.perf_counter() - t0
                if rep >= a.warmup:
                    times[m].append(t)
                if bar:
                    bar.update(1)
        load_after = os.getloadavg()
        for m in names:
            ts = times[m]
            rows.append({"threads": nt, "density": d, "method": m, "nnz_weights": nnz[m],
                         "times_s": ts, "median_s": float(np.median(ts)), "min_s": min(ts),
                         "fwd_only": m in FWD_ONLY,
                         "loadavg_before": load_before, "loadavg_after": load_after})
    if bar:
        bar.close()
    return {"rows": rows, "notes": notes, "threads": nt,
            "torch_num_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- parent
def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6.5 * len(threads), 4.8), squeeze=False)
    for ax, nt in zip(axes[0], threads):
        sub = [r for r in rows if r["threads"] == nt]
        dense = {r["density"]: r["median_s"] for r in sub if r["method"] == "dense"}
        dfwd = {r["density"]: r["median_s"] for r in sub if r["method"] == "dense_fwd"}
        for m in [m for m in METHODS_ALL if m not in ("dense", "dense_fwd")]:
            base = dfwd if m in FWD_ONLY else dense
            pts = sorted((r["density"], base[r["density"]] / r["median_s"]) for r in sub
                         if r["method"] == m and r["density"] in base)
            if not pts:
                continue
            style = "--" if m in PEERS else (":" if m == "torch_bsr_fwd" else "-")
            label = m + (" (forward only, vs dense forward)" if m in FWD_ONLY else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (fraction of weights kept)")
        ax.set_ylabel("speedup over dense F.linear (fwd+bwd, median)")
        ax.set_title(f"{nt} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    m = result["meta"]
    fig.suptitle(f"{m['shape']['N']}x{m['shape']['K']} linear, batch {m['shape']['M']}, fp32 — "
                 f"{m['device']} ({m['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(result: dict) -> str:
    rows = result["rows"]
    methods = [m for m in METHODS_ALL if any(r["method"] == m for r in rows)]
    lines = []
    for nt in sorted({r["threads"] for r in rows}):
        lines.append(f"\n== {nt} thread(s): median ms (speedup over dense; forward-only "
                     f"columns over dense_fwd)  [ours_b32 / faster peer, ours_b1 / faster peer]")
        lines.append("density  " + "".join(f"{m:>20s}" for m in methods) + "   b32/peer  b1/peer")
        for d in sorted({r["density"] for r in rows}):
            cell = {r["method"]: r["median_s"] for r in rows
                    if r["threads"] == nt and r["density"] == d}
            dn = cell.get("dense")
            s = f"{d:<9.3f}"
            for m in methods:
                t = cell.get(m)
                dn = cell.get("dense_fwd" if m in FWD_ONLY else "dense")
                s += (f"{t * 1e3:11.1f} ({dn / t:5.1f}x)" if t and dn
                      else f"{t * 1e3:11.1f}{'':9s}" if t else f"{'-':>20s}")
            peers = [cell[p] for p in PEERS if p in cell]
            for ours in ("ours_b32", "ours_b1"):
                s += (f"{min(peers) / cell[ours]:9.2f}x" if peers and ours in cell
                      else f"{'-':>10s}")
            lines.append(s)
    return "\n".join(lines)


def _markdown(result: dict) -> str:
    """Speedup over dense (median fwd+bwd) per method, and ours over the faster peer."""
    rows = result["rows"]
    methods = [m for m in METHODS_ALL if m not in ("dense", "dense_fwd")
               and any(r["method"] == m for r in rows)]
    out = []
    for nt in sorted({r["threads"] for r in rows}):
        out.append(f"\n{nt} thread(s): speedup over dense `F.linear` forward+backward (median; "
                   f"`torch_bsr_fwd` over the dense forward alone):\n")
        out.append("| density | dense ms | " + " | ".join(methods) +
                   " | b32 / faster peer | b1 / faster peer |")
        out.append("|---" * (len(methods) + 4) + "|")
        for d in sorted({r["density"] for r in rows}):
            cell = {r["method"]: r["median_s"] for r in rows
                    if r["threads"] == nt and r["density"] == d}
            dn = cell.get("dense")
            line = f"| {d:g} | {dn * 1e3:.0f} |" if dn else f"| {d:g} | - |"
            for m in methods:
                base = cell.get("dense_fwd" if m in FWD_ONLY else "dense")
                line += f" {base / cell[m]:.1f}× |" if base and m in cell else " - |"
            peers = [cell[p] for p in PEERS if p in cell]
            for ours in ("ours_b32", "ours_b1"):
                line += (f" {min(peers) / cell[ours]:.2f}× |" if peers and ours in cell
                         else " - |")
            out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.report:
        result = json.loads(Path(a.report).read_text())
        print(_table(result))
        print(_markdown(result))
        return 0
    if a._child is not None:
        print("@@RESULT@@" + json.dumps(_child(a)))
        return 0
    threads = ([int(t) for t in a.threads.split(",")] if a.threads
               else sorted({1, os.cpu_count() or 1}))
    argv_list = sys.argv[1:] if argv is None else list(argv)
    children = []
    for nt in threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(nt), MKL_NUM_THREADS=str(nt))
        cmd = [sys.executable, __file__, *argv_list, "--_child", str(nt)]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(f"child for {nt} thread(s) failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        payload = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")][-1]
        children.append(json.loads(payload[len("@@RESULT@@"):]))
    result = {
        "meta": {
            "benchmark": "bench_cpu.py: sparse linear layer, forward+backward, fp32",
            "device": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "versions": package_versions("torch", "numpy", "sparseprop", "scipy"),
            "git": git_state("itop_kernels", "benchmarks/bench_cpu.py", dirty_key="kernels_dirty"),
            "argv": [sys.executable, __file__, *argv_list],
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shape": {"M": a.batch, "K": a.in_features, "N": a.out_features},
            "reps": a.reps, "warmup": a.warmup, "seed": a.seed,
            "loadavg_end": os.getloadavg(),
            "timing": "time.perf_counter around one full step per method; methods interleaved "
                      "(rotating order) within each repetition",
            "notes": {k: v for c in children for k, v in c["notes"].items()},
        },
        "rows": [r for c in children for r in c["rows"]],
    }
    loads = [r["loadavg_before"][0] for r in result["rows"]] + \
            [r["loadavg_after"][0] for r in result["rows"]]
    result["meta"]["loadavg_1min_max"] = max(loads) if loads else None
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    png = Path(a.png) if a.png else out.with_suffix(".png")
    _plot(result, png)
    print(_table(result))
    print(f"\nmax 1-min load average during the run: {result['meta']['loadavg_1min_max']:.2f} "
          f"on {os.cpu_count()} cores")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
