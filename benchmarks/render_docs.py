"""Render the documentation's performance tables and headline figure from the committed JSON.

Every performance figure in README.md and docs/ comes from a JSON file in benchmarks/results/
(written by the scripts beside this one, with the device, versions and git commit). This
script turns them into:

- ``docs/generated/*.md``: Markdown fragments (tables and the sample ``itop train`` output).
  The docs pages include them (``--8<--``, pymdownx.snippets); README.md holds copies of
  :data:`README_FRAGMENTS`, which this script rewrites in place when their figures change.
- ``docs/assets/speedup_vs_density.png``: the headline figure (speedup over dense against
  density, GPU and CPU). The PNG carries a hash of the plotted numbers in a text chunk
  (``itop-data-sha256``), so a test can tell whether it still matches the JSON.

    python benchmarks/render_docs.py            # (re)write the fragments, the PNG and README.md
    python benchmarks/render_docs.py --check    # exit 1 if any of them is out of date

Run it after adding or replacing a result JSON; tests/test_docs_generated.py runs the check.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GENERATED = ROOT / "docs" / "generated"
HEADLINE_PNG = ROOT / "docs" / "assets" / "speedup_vs_density.png"
README = ROOT / "README.md"
#: Fragments that README.md contains verbatim (the rest appear in docs/ only).
README_FRAGMENTS = ("when_faster.md", "quickstart_output.md")
PNG_KEY = "itop-data-sha256"

__all__ = ["fragments", "headline_series", "series_hash", "check", "write", "png_text"]


# ----------------------------------------------------------------------------- helpers
def load(name: str) -> dict:
    """The parsed JSON file ``benchmarks/results/<name>``."""
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def clean_device(name: str) -> str:
    """A CPU or GPU name without trademark marks and the trailing core count in brackets."""
    for mark in ("(R)", "(TM)", "(tm)"):
        name = name.replace(mark, "")
    return " ".join(name.split(" (")[0].split()).removesuffix(" Processor")


def fmt_x(s: Optional[float], bold_from: Optional[float] = None) -> str:
    """A speedup as ``2.47×`` (``11.7×`` from 10 on); bold when ``>= bold_from``; ``–`` if None."""
    if s is None:
        return "–"
    text = f"{s:.1f}×" if s >= 10 else f"{s:.2f}×"
    return f"**{text}**" if bold_from is not None and s >= bold_from else text


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def commit_of(meta_git) -> str:
    """A short description of the git commit a result records (a dict or a free-text note)."""
    if isinstance(meta_git, dict):
        c = str(meta_git.get("commit", "unknown"))
        dirty = [k for k, v in meta_git.items() if k != "commit" and v]
        return c[:10] + (" (uncommitted changes)" if dirty else "")
    text = str(meta_git)
    return text[:10] + (" (uncommitted changes)" if "uncommitted" in text else "")


def source(script: str, result: str, device: str, commit: str) -> str:
    """One line naming the script, the JSON, the device and the commit of a table."""
    return (f"Source: `benchmarks/{script}` → `benchmarks/results/{result}`; {device}; "
            f"commit {commit}.")


# ----------------------------------------------------------------------------- CPU linear
def cpu_linear_speedups(d: dict) -> Dict[Tuple[int, float, str], float]:
    """``{(threads, density, method): dense median / method median}`` (fwd+bwd methods)."""
    med = {(r["threads"], r["density"], r["method"]): r["median_s"] for r in d["rows"]}
    out = {}
    for (nt, dens, m), t in med.items():
        base = med.get((nt, dens, "dense_fwd" if r_fwd_only(m) else "dense"))
        if base:
            out[(nt, dens, m)] = base / t
    return out


def r_fwd_only(method: str) -> bool:
    return method in ("torch_bsr_fwd", "dense_fwd")


def cpu_device(d: dict) -> str:
    m = d["meta"]
    return f"{clean_device(m['device'])}, {m['cores']} cores, torch {m['versions'].get('torch')}"


def cpu_linear_table(d: dict, methods: Sequence[str], labels: Dict[str, str]) -> str:
    """Per thread count and density: speedup of each method over dense fwd+bwd."""
    sp = cpu_linear_speedups(d)
    med = {(r["threads"], r["density"], r["method"]): r["median_s"] for r in d["rows"]}
    present = [m for m in methods if any(k[2] == m for k in sp)]
    peers = [m for m in ("sparseprop", "torch_csr") if m in present]
    header = ["threads", "density", "dense ms"] + [labels.get(m, m) for m in present]
    if peers:
        header += ["block 32 / faster peer", "block 1 / faster peer"]
    rows = []
    for nt in sorted({k[0] for k in sp}):
        for dens in sorted({k[1] for k in sp if k[0] == nt}):
            dense = med.get((nt, dens, "dense"))
            row = [str(nt), f"{dens:g}", f"{dense * 1e3:.3g}" if dense else "–"]
            row += [fmt_x(sp.get((nt, dens, m)), 1.0) for m in present]
            if peers:
                best = min(med[(nt, dens, p)] for p in peers if (nt, dens, p) in med)
                for ours in ("ours_b32", "ours_b1"):
                    t = med.get((nt, dens, ours))
                    row.append(fmt_x(best / t) if t else "–")
            rows.append(row)
    return table(header, rows)


LINEAR_LABELS = {"ours_b1": "block 1", "ours_b16": "block 16", "ours_b32": "block 32",
                 "ours_b64": "block 64", "sparseprop": "SparseProp", "torch_csr": "torch CSR",
                 "torch_bsr_fwd": "torch BSR (fwd only)"}


def frag_cpu_linear() -> str:
    d = load("cpu_linear.json")
    m = d["meta"]
    shape = m["shape"]
    return "\n".join([
        f"Layer {shape['N']}×{shape['K']}, batch {shape['M']}, fp32, forward + backward: speedup "
        f"over dense `F.linear` (medians of {m['reps']} interleaved repetitions; torch BSR is its "
        "forward alone over the dense forward). The last two columns are ours over the faster of "
        "SparseProp and torch CSR at the same density. Bold: faster than dense.",
        "",
        cpu_linear_table(d, ["ours_b1", "ours_b16", "ours_b32", "ours_b64", "sparseprop",
                             "torch_csr", "torch_bsr_fwd"], LINEAR_LABELS),
        "",
        source("bench_cpu.py", "cpu_linear.json",
               f"{cpu_device(d)}, SparseProp {m['versions'].get('sparseprop')}, highest 1-minute "
               f"load average during the run {m['loadavg_1min_max']:.2f}",
               commit_of(m["git"])),
    ])


def frag_cpu_threads() -> str:
    d = load("cpu_linear_threads_xeon16.json")
    m = d["meta"]
    return "\n".join([
        f"The same layer ({m['shape']['N']}×{m['shape']['K']}, batch {m['shape']['M']}, fp32) on a "
        f"{m['cores']}-core {clean_device(m['device'])} at 1, 4 and 16 threads (SparseProp not "
        "installed there, so the peer is torch CSR):",
        "",
        cpu_linear_table(d, ["ours_b1", "ours_b32", "torch_csr"], LINEAR_LABELS),
        "",
        source("bench_cpu.py", "cpu_linear_threads_xeon16.json",
               cpu_device(d), commit_of(m["git"])),
    ])


SIZES = ("cpu_linear_sizes_256.json", "cpu_linear_sizes_1024.json",
         "cpu_linear_sizes_4096.json")


def frag_cpu_sizes() -> str:
    d0 = load(SIZES[0])
    parts = [f"Layer size, on one machine ({cpu_device(d0)}, 1 thread): speedup over dense "
             "`F.linear`, forward + backward, fp32. Per-call costs (gathering operands, "
             "grouping block-rows, building CSR views) do not shrink with the layer, so a "
             "256-wide layer is slower than dense at every density measured.", ""]
    for name in SIZES:
        d = load(name)
        m = d["meta"]
        parts += [f"**{m['shape']['N']}×{m['shape']['K']}, batch {m['shape']['M']}** "
                  f"(medians of {m['reps']}):", "",
                  cpu_linear_table(d, ["ours_b1", "ours_b16", "ours_b32", "torch_csr"],
                                   LINEAR_LABELS), "",
                  source("bench_cpu.py", name, f"{cpu_device(d)}, highest 1-minute load "
                         f"average {m['loadavg_1min_max']:.2f}", commit_of(m["git"])), ""]
    return "\n".join(parts).rstrip()


# ----------------------------------------------------------------------------- GPU linear
def gpu_linear_cells(d: dict, dtype: str = "bf16") -> Dict[Tuple[int, float], dict]:
    """``{(block, density): {"x": fwd+bwd speedup, "roof": fraction, "bsr": fwd over BSR}}``."""
    rows = [r for r in d["rows"] if r["dtype"] == dtype]
    out: Dict[Tuple[int, float], dict] = {}
    for r in rows:
        key = (r["block"], r["density"])
        c = out.setdefault(key, {})
        if r["method"] == "ours" and r["phase"] == "fwd+bwd":
            c["x"], c["roof"] = r["speedup_vs_dense"], r["roofline_fraction"]
        if r["phase"] == "fwd" and r["method"] in ("ours", "torch_bsr"):
            c[r["method"] + "_fwd_ms"] = r["ms"]
    for c in out.values():
        if "ours_fwd_ms" in c and "torch_bsr_fwd_ms" in c:
            c["bsr"] = c["torch_bsr_fwd_ms"] / c["ours_fwd_ms"]
    return out


def frag_gpu_linear() -> str:
    d = load("linear_gpu_h100.json")
    cells = gpu_linear_cells(d)
    blocks = sorted({k[0] for k in cells})
    dens = sorted({k[1] for k in cells}, reverse=True)
    r0 = d["rows"][0]
    rows = []
    for b in blocks:
        row = [str(b)]
        for dn in dens:
            c = cells.get((b, dn), {})
            row.append(f"{fmt_x(c.get('x'), 1.0)} ({100 * c['roof']:.0f} % of floor; fwd "
                       f"{fmt_x(c.get('bsr'))} BSR)" if "x" in c else "–")
        rows.append(row)
    pk = d["peaks"]["bf16"]
    return "\n".join([
        f"Linear {r0['N']}×{r0['K']}, batch {r0['M']}, bf16, forward + backward: speedup of "
        "`block_sparse_linear` over dense cuBLAS `F.linear`, the fraction of the roofline floor "
        "max(FLOPs / peak, bytes / bandwidth) it reaches, and how much faster its forward is "
        f"than torch BSR's (measured peaks {pk['tflops']:.0f} TFLOP/s, {pk['tbps']:.2f} TB/s; "
        "`triton.testing.do_bench` medians). Bold: faster than dense.",
        "",
        table(["block"] + [f"density {x:g}" for x in dens], rows),
        "",
        source("bench_linear.py", "linear_gpu_h100.json (fp16 too)",
               f"{d['device']}, torch {d['versions']['torch']}, triton "
               f"{d['versions']['triton']}", commit_of(d["git_commit"])),
    ])


# ----------------------------------------------------------------------------- conv
def conv_rows(d: dict) -> List[List[str]]:
    rows = []
    for r in d["rows"]:
        shape = (f"{r['net']} {r['cin']}→{r['cout']}, {r['k']}×{r['k']}, {r['hw']}×{r['hw']}, "
                 f"stride {r['stride']}, batch {r['batch']}")
        row = [shape, str(r["block_size"]), f"{r['density_nominal']:g}",
               fmt_x(r["speedup_vs_dense"]["fwd+bwd"], 1.0)]
        if "speedup_vs_dense_cuda_graph" in r:
            row.append(fmt_x(r["speedup_vs_dense_cuda_graph"], 1.0))
        rows.append(row)
    return rows


def frag_conv() -> str:
    g = load("conv_gpu_h100_quick.json")
    c = load("conv_cpu.json")
    return "\n".join([
        "**GPU** (bf16, channels-last, `do_bench` medians): fwd+bwd speedup of "
        "`block_sparse_conv2d` over cuDNN `F.conv2d`, called from Python and replayed from a "
        "CUDA graph (both sides), which removes the host's launch overhead:",
        "",
        table(["layer", "block", "density", "speedup", "speedup, CUDA graphs"], conv_rows(g)),
        "",
        source("bench_conv.py --quick", "conv_gpu_h100_quick.json",
               f"{g['device_name']}, torch {g['torch']}, triton {g['triton']}",
               commit_of(g["git_commit"])),
        "",
        "**CPU** (fp32, channels-last, medians of interleaved runs): fwd+bwd speedup over "
        "oneDNN `F.conv2d`:",
        "",
        table(["layer", "block", "density", "speedup"], conv_rows(c)),
        "",
        source("bench_conv.py", "conv_cpu.json",
               f"{c['device_name']}, {c['threads']} threads, torch {c['torch']}",
               commit_of(c["git_commit"])),
    ])


# ----------------------------------------------------------------------------- training steps
def frag_train_cpu() -> str:
    d = load("train_cpu.json")
    m = d["meta"]
    rows = []
    for p in d["per_threads"]:
        for r in p["rows"]:
            rows.append([str(p["threads"]), r["model"], f"{1e3 * r['step_median_s']:.1f}",
                         fmt_x(r["speedup_median"], 1.0),
                         f"{100 * r['update_share_median']:.1f} %"
                         if r["model"] != "dense" else "–"])
    return "\n".join([
        f"An MLP-heavy model ({m['repeats']} × [{m['width']}→{m['hidden']}, ReLU, "
        f"{m['hidden']}→{m['width']}, ReLU] + a dense {m['width']}→10 head, batch {m['batch']}, "
        f"fp32, {m['optimizer']}) sparsified to density {m['density']:g} ({m['distribution']}, "
        f"head dense) with a RigL `TopologyManager` updating every {m['update_every']} steps, "
        "against the dense model in the same run. Step times include the topology updates; "
        "the last column is the updates' share of the sparse model's time.",
        "",
        table(["threads", "model", "ms / step", "speedup", "topology updates"], rows),
        "",
        source("bench_train_cpu.py", "train_cpu.json", f"{m['device']}, torch "
               f"{m['versions']['torch']}", commit_of(m["git"])),
    ])


# ----------------------------------------------------------------------------- topology update
TOPOLOGY_CPU = ("topology_update_cpu.json", "topology_update_cpu_rerun1.json",
                "topology_update_cpu_rerun2.json")


def frag_topology_update() -> str:
    runs = [load(n) for n in TOPOLOGY_CPU]
    by_case: Dict[tuple, List[float]] = {}
    for d in runs:
        for c in d["cases"]:
            key = (c["block_size"], c["growth"], c.get("score_precision_resolved") or "–",
                   c["threads"])
            by_case.setdefault(key, []).append(100 * c["overhead_at_update_every_100"])
    rows = [[str(b), g, p, str(t), f"{min(v):.2f}–{max(v):.2f} %"]
            for (b, g, p, t), v in sorted(by_case.items(), key=lambda kv: (-kv[0][0], kv[0][1],
                                                                            kv[0][2], kv[0][3]))]
    d0 = runs[0]
    c0 = d0["cases"][0]
    gpu = load("topology_update_gpu_h100.json")
    grows = [[str(c["block_size"]), c["growth"], f"{100 * c['overhead_at_update_every_100']:.2f} %"]
             for c in gpu["cases"]]
    gc = gpu["cases"][0]
    return "\n".join([
        f"One topology update as a share of training time at `update_every=100`: "
        f"{c0['depth']} sparse {c0['width']}×{c0['width']} layers at density {c0['density']:g}, "
        f"batch {c0['batch']}, fp32; the range over {len(runs)} runs. `bf16` is "
        "`score_precision=\"auto\"` on a CPU with native bf16 products; `exact` scores in the "
        "layers' dtype.",
        "",
        table(["block", "growth", "score precision", "threads", "update share"], rows),
        "",
        source("bench_topology_update.py", ", ".join(TOPOLOGY_CPU),
               f"{d0['device_name']}, {d0['cores']} cores, torch {d0['versions']['torch']}",
               commit_of(d0["git"])),
        "",
        f"On the GPU the only committed run predates the bf16 scores and the position-based "
        f"layout rebuilds ({gc['depth']} layers {gc['width']}×{gc['width']}, batch "
        f"{gc['batch']}, bf16):",
        "",
        table(["block", "growth", "update share"], grows),
        "",
        source("bench_topology_update.py", "topology_update_gpu_h100.json",
               f"{gpu['device_name']}, torch {gpu['torch']}", commit_of(gpu["git_commit"])),
    ])


def frag_score_precision() -> str:
    d = load("score_precision_agreement.json")
    agg: Dict[Tuple[int, str], List[float]] = {}
    for r in d["rows"]:
        agg.setdefault((r["block_size"], r["precision"]), []).append(r["same_choice"])
    rows = [[str(b), p, f"{100 * min(v):.2f} %"] for (b, p), v in sorted(agg.items())]
    a = d["args"]
    return "\n".join([
        f"Growth choices from bf16 scores against exact ones on the gradients of an MNIST-1D "
        f"MLP after {a['steps']} training steps (batch {a['batch']}, growing "
        f"{100 * a['grow_fraction']:g} % of each layer's units): the share of the exactly "
        "chosen units that each precision picks too (the lower of the two sparse layers).",
        "",
        table(["block", "precision", "same choice"], rows),
        "",
        source("score_precision_agreement.py", "score_precision_agreement.json",
               f"{d['device']}, torch {d['versions']['torch']}", commit_of(d["git"])),
    ])


# ----------------------------------------------------------------------------- itop train
def frag_quickstart_output() -> str:
    d = load("itop_train_default_cpu.json")
    return "\n".join([
        f"On a {d['cores']}-core {clean_device(d['device'])} (1-minute load average "
        f"{d['loadavg_before'][0]:.1f} at the start) it took {d['wall_s']:.0f} s from the shell, "
        "imports and data generation included; the `wall time` line counts training and "
        "evaluation only. It printed (`benchmarks/time_default_train.py` → "
        "`benchmarks/results/itop_train_default_cpu.json`):",
        "",
        "```text",
        *d["printed"],
        "```",
    ])


# ----------------------------------------------------------------------------- summary
def _linear_cells_by_density(d: dict, threads: int, methods: Sequence[str]
                             ) -> Dict[str, Dict[float, float]]:
    sp = cpu_linear_speedups(d)
    return {m: {k[1]: v for k, v in sp.items() if k[0] == threads and k[2] == m}
            for m in methods}


SUMMARY_DENSITIES = (0.02, 0.05, 0.1, 0.2)


def frag_when_faster() -> str:
    """The README's table: speedup over dense by device, layer size, block size and density."""
    rows: List[List[str]] = []

    def add(device: str, layer: str, block: str, by_density: Dict[float, float], src: str):
        rows.append([device, layer, block] +
                    [fmt_x(by_density.get(x), 1.0) for x in SUMMARY_DENSITIES] + [src])

    def cpu(name: str, cores: int) -> str:
        return f"{clean_device(name)} ({cores} cores)"

    def threads(n: int) -> str:
        return f"{n} thread" + ("s" if n > 1 else "")

    g = load("linear_gpu_h100.json")
    cells = gpu_linear_cells(g)
    r0 = g["rows"][0]
    gpu = clean_device(g["device"]).replace("NVIDIA ", "").split()[0] + " GPU"
    for b in sorted({k[0] for k in cells}):
        add(gpu, f"linear {r0['N']}², batch {r0['M']}, bf16", str(b),
            {dn: c["x"] for (bb, dn), c in cells.items() if bb == b and "x" in c},
            "`linear_gpu_h100.json`")
    conv = load("conv_gpu_h100_quick.json")
    for b in sorted({r["block_size"] for r in conv["rows"]}):
        by: Dict[float, List[float]] = {}
        for r in conv["rows"]:
            if r["block_size"] == b:
                by.setdefault(r["density_nominal"], []).append(r["speedup_vs_dense"]["fwd+bwd"])
        rows.append([gpu, "conv, ResNet/VGG layers, bf16", str(b)] +
                    [(f"{fmt_x(min(by[x]))}–{fmt_x(max(by[x]))}" if x in by else "–")
                     for x in SUMMARY_DENSITIES] + ["`conv_gpu_h100_quick.json`"])
    c = load("cpu_linear.json")
    cm = c["meta"]
    for b in (1, 32, 64):
        add(cpu(cm["device"], cm["cores"]), f"linear {cm['shape']['N']}², batch "
            f"{cm['shape']['M']}, fp32, {threads(cm['cores'])}", str(b),
            _linear_cells_by_density(c, cm["cores"], [f"ours_b{b}"])[f"ours_b{b}"],
            "`cpu_linear.json`")
    for name in SIZES:
        d = load(name)
        m = d["meta"]
        for b in (1, 32):
            add(cpu(m["device"], m["cores"]), f"linear {m['shape']['N']}², batch "
                f"{m['shape']['M']}, fp32, 1 thread", str(b),
                _linear_cells_by_density(d, 1, [f"ours_b{b}"])[f"ours_b{b}"], f"`{name}`")
    x = load("cpu_linear_threads_xeon16.json")
    xm = x["meta"]
    for b in (1, 32):
        add(cpu(xm["device"], xm["cores"]), f"linear {xm['shape']['N']}², batch "
            f"{xm['shape']['M']}, fp32, {threads(xm['cores'])}", str(b),
            _linear_cells_by_density(x, xm["cores"], [f"ours_b{b}"])[f"ours_b{b}"],
            "`cpu_linear_threads_xeon16.json`")
    cc = load("conv_cpu.json")
    for b in (16, 32):
        add(cpu(cc["device_name"], cm["cores"]),
            f"conv 256→256, 3×3, 32×32, batch 16, fp32, {threads(cc['threads'])}", str(b),
            {r["density_nominal"]: r["speedup_vs_dense"]["fwd+bwd"] for r in cc["rows"]
             if r["net"] == "issue3" and r["block_size"] == b}, "`conv_cpu.json`")
    t = load("train_cpu.json")
    tm = t["meta"]
    for p in t["per_threads"]:
        if p["threads"] != tm["cpu_count"]:
            continue
        for r in sorted((r for r in p["rows"] if r["model"] != "dense"),
                        key=lambda r: int(r["model"].split()[-1])):
            add(cpu(tm["device"], tm["cpu_count"]),
                f"training step, MLP {tm['width']}↔{tm['hidden']}, batch {tm['batch']}, "
                f"{threads(p['threads'])}",
                r["model"].replace("block ", ""), {tm["density"]: r["speedup_median"]},
                "`train_cpu.json`")
    header = ["device", "what", "block"] + [f"density {x:g}" for x in SUMMARY_DENSITIES] + \
             ["source"]
    return "\n".join([
        table(header, rows),
        "",
        "Speedup of forward + backward over the same dense layer (cuBLAS/cuDNN on the GPU, "
        "oneDNN/MKL on the CPU), medians; bold where itop is faster; – not measured; a range is "
        "min–max over the layer shapes measured. Training steps include the topology updates. "
        "Sources are in `benchmarks/results/`.",
    ])


# ----------------------------------------------------------------------------- headline figure
def headline_series() -> dict:
    """The numbers the headline PNG plots: ``{panel: {"title", "lines": {label: [[d, x]...]}}}``."""
    g = load("linear_gpu_h100.json")
    cells = gpu_linear_cells(g)
    r0 = g["rows"][0]
    gpu_lines = {f"block {b}": [[dn, cells[(b, dn)]["x"]] for dn in
                                sorted({k[1] for k in cells if k[0] == b}) if "x" in cells[(b, dn)]]
                 for b in sorted({k[0] for k in cells})}
    cpu = load("cpu_linear.json")
    cm = cpu["meta"]
    nt = cm["cores"]
    sp = cpu_linear_speedups(cpu)
    cpu_lines = {}
    for m in ("ours_b1", "ours_b16", "ours_b32", "ours_b64", "torch_csr", "sparseprop"):
        pts = sorted([k[1], v] for k, v in sp.items() if k[0] == nt and k[2] == m)
        if pts:
            cpu_lines[LINEAR_LABELS[m] + (" (peer)" if m in ("torch_csr", "sparseprop")
                                          else "")] = pts
    return {
        "gpu": {"title": f"GPU: {g['device']}\nlinear {r0['N']}×{r0['K']}, batch {r0['M']}, "
                         f"bf16, vs cuBLAS", "source": "linear_gpu_h100.json",
                "lines": gpu_lines},
        "cpu": {"title": f"CPU: {clean_device(cm['device'])} ({cm['cores']} cores), {nt} threads\nlinear {cm['shape']['N']}×"
                         f"{cm['shape']['K']}, batch {cm['shape']['M']}, fp32, vs MKL",
                "source": "cpu_linear.json", "lines": cpu_lines},
    }


def series_hash(series: dict) -> str:
    """sha256 of the plotted numbers (rounded to 6 significant digits) and labels."""
    def rnd(o):
        if isinstance(o, float):
            return float(f"{o:.6g}")
        if isinstance(o, dict):
            return {k: rnd(v) for k, v in o.items()}
        if isinstance(o, list):
            return [rnd(v) for v in o]
        return o
    return hashlib.sha256(json.dumps(rnd(series), sort_keys=True).encode()).hexdigest()


COLORS = {"block 1": "tab:blue", "block 16": "tab:orange", "block 32": "tab:green",
          "block 64": "tab:red", "block 128": "tab:purple", "torch CSR (peer)": "tab:gray",
          "SparseProp (peer)": "tab:brown"}


def render_png(series: dict, path: Path) -> None:
    """Draw the headline figure (two log-log panels) with the data hash in a PNG text chunk."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, key in zip(axes, ("gpu", "cpu")):
        panel = series[key]
        xs, ys = [], []
        for label, pts in panel["lines"].items():
            style = "--" if "peer" in label else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label,
                    color=COLORS.get(label))
            xs += [p[0] for p in pts]
            ys += [p[1] for p in pts]
        ax.axhline(1.0, color="black", lw=0.8)
        ax.text(0.99, 1.03, "dense", transform=ax.get_yaxis_transform(), ha="right",
                va="bottom", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        nice = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50]
        ax.xaxis.set_major_locator(FixedLocator([v for v in nice if min(xs) <= v <= max(xs)]))
        ax.yaxis.set_major_locator(FixedLocator([v for v in nice
                                                 if min(ys) / 1.5 <= v <= max(ys) * 1.5]))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.invert_xaxis()
        ax.set_xlabel("density (fraction of weights kept)")
        ax.set_ylabel("speedup over dense, forward + backward")
        ax.set_title(panel["title"] + f"\nbenchmarks/results/{panel['source']}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None, PNG_KEY: series_hash(series)})
    plt.close(fig)


def png_text(path: Path) -> Dict[str, str]:
    """The tEXt chunks of a PNG file as ``{keyword: text}``."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    out, pos = {}, 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            out[key.decode("latin-1")] = text.decode("latin-1")
        pos += 12 + length
    return out


# ----------------------------------------------------------------------------- driver
FRAGMENTS: Dict[str, Callable[[], str]] = {
    "when_faster.md": frag_when_faster,
    "quickstart_output.md": frag_quickstart_output,
    "gpu_linear.md": frag_gpu_linear,
    "conv.md": frag_conv,
    "cpu_linear.md": frag_cpu_linear,
    "cpu_threads.md": frag_cpu_threads,
    "cpu_layer_sizes.md": frag_cpu_sizes,
    "train_cpu.md": frag_train_cpu,
    "topology_update.md": frag_topology_update,
    "score_precision.md": frag_score_precision,
}


def fragments() -> Dict[str, str]:
    """``{file name in docs/generated: Markdown}``, each ending with one newline."""
    return {name: fn().rstrip() + "\n" for name, fn in FRAGMENTS.items()}


def claims() -> List[str]:
    """The statements README.md and docs/ make in words about the results, checked against the
    JSON: one message per statement the data no longer supports."""
    bad = []
    small = cpu_linear_speedups(load(SIZES[0]))
    if any(v >= 1 for (_, _, m), v in small.items() if m.startswith("ours_")):
        bad.append("'a 256 × 256 layer is slower than dense at every density measured' "
                   f"({SIZES[0]})")
    conv = load("conv_gpu_h100_quick.json")
    if any(r["speedup_vs_dense"]["fwd+bwd"] >= 1 for r in conv["rows"]):
        bad.append("'GPU convolutions are slower than cuDNN from Python' (conv_gpu_h100_quick)")
    gpu = gpu_linear_cells(load("linear_gpu_h100.json"))
    cpu = load("cpu_linear.json")
    cpu_sp = cpu_linear_speedups(cpu)
    x4096 = cpu_linear_speedups(load(SIZES[-1]))
    big = [gpu[(b, 0.1)]["x"] for b in (32, 64, 128)] + \
          [v for (nt, dn, m), v in cpu_sp.items() if dn == 0.1 and m in ("ours_b32", "ours_b64")] + \
          [v for (nt, dn, m), v in x4096.items() if dn == 0.1 and m == "ours_b32"]
    if min(big) <= 1:
        bad.append("'a 4096 × 4096 layer at density 0.1 with block 32 or larger beats dense on "
                   "the H100 and the 2-core CPUs'")
    nt = cpu["meta"]["cores"]
    if not (gpu[(64, 0.05)]["x"] > gpu[(32, 0.05)]["x"] > gpu[(16, 0.05)]["x"]) or not (
            cpu_sp[(nt, 0.05, "ours_b64")] > cpu_sp[(nt, 0.05, "ours_b32")]
            > cpu_sp[(nt, 0.05, "ours_b16")]):
        bad.append("'at density 0.05, block 64 is faster than 32, which is faster than 16' "
                   "(block-size.md)")
    return bad


def check() -> List[str]:
    """What is out of date: one message per stale or missing file (empty when all match), and
    per statement in words that the results no longer support (:func:`claims`)."""
    problems = [f"no longer true: {c}" for c in claims()]
    readme = README.read_text(encoding="utf-8")
    for name, text in fragments().items():
        path = GENERATED / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            problems.append(f"docs/generated/{name} does not match the JSON it is rendered from")
        if name in README_FRAGMENTS and text not in readme:
            problems.append(f"README.md does not contain docs/generated/{name} verbatim")
    stale = sorted(p.name for p in GENERATED.glob("*.md") if p.name not in FRAGMENTS)
    if stale:
        problems.append(f"docs/generated/ has files no renderer writes: {stale}")
    want = series_hash(headline_series())
    if not HEADLINE_PNG.is_file():
        problems.append(f"{HEADLINE_PNG.relative_to(ROOT)} is missing")
    elif png_text(HEADLINE_PNG).get(PNG_KEY) != want:
        problems.append(f"{HEADLINE_PNG.relative_to(ROOT)} was drawn from other numbers")
    return problems


def write() -> List[str]:
    """Rewrite the fragments, README.md's copies of the README fragments, and the PNG.

    Returns the README fragments it could not update (README.md held neither their old nor
    their new text: paste those in by hand).
    """
    GENERATED.mkdir(parents=True, exist_ok=True)
    readme = README.read_text(encoding="utf-8")
    unplaced = []
    for name, text in fragments().items():
        path = GENERATED / name
        old = path.read_text(encoding="utf-8") if path.is_file() else None
        if name in README_FRAGMENTS and text not in readme:
            if old is not None and old in readme:
                readme = readme.replace(old, text)
            else:
                unplaced.append(name)
        path.write_text(text, encoding="utf-8")
    README.write_text(readme, encoding="utf-8")
    render_png(headline_series(), HEADLINE_PNG)
    return unplaced


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report what is out of date")
    a = p.parse_args(argv)
    if a.check:
        problems = check()
        for msg in problems:
            print(msg, file=sys.stderr)
        if problems:
            print("run: python benchmarks/render_docs.py", file=sys.stderr)
        return 1 if problems else 0
    unplaced = write()
    print(f"wrote {len(FRAGMENTS)} fragments to {GENERATED.relative_to(ROOT)}/, "
          f"{HEADLINE_PNG.relative_to(ROOT)} and README.md's copies")
    for name in unplaced:
        print(f"README.md holds neither the old nor the new text of docs/generated/{name}: "
              "paste the new text in", file=sys.stderr)
    return 1 if unplaced else 0


if __name__ == "__main__":
    sys.exit(main())
