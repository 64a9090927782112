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
import statistics
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
README_FRAGMENTS = ("when_faster.md", "quickstart_output.md", "train_gpu.md")
PNG_KEY = "itop-data-sha256"

__all__ = ["fragments", "headline_series", "series_hash", "check", "write", "png_text"]


# ----------------------------------------------------------------------------- helpers
def load(name: str, results: Path = RESULTS) -> dict:
    """The parsed JSON file ``<results>/<name>`` (``benchmarks/results/<name>`` by default)."""
    return json.loads((Path(results) / name).read_text(encoding="utf-8"))


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


def frag_cpu_linear(results: Path = RESULTS) -> str:
    d = load("cpu_linear.json", results)
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


def frag_cpu_threads(results: Path = RESULTS) -> str:
    d = load("cpu_linear_threads_xeon16.json", results)
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


def frag_cpu_sizes(results: Path = RESULTS) -> str:
    d0 = load(SIZES[0], results)
    parts = [f"Layer size, on one machine ({cpu_device(d0)}, 1 thread): speedup over dense "
             "`F.linear`, forward + backward, fp32. Per-call costs (gathering operands, "
             "grouping block-rows, building CSR views) do not shrink with the layer, so a "
             "256-wide layer is slower than dense at every density measured.", ""]
    for name in SIZES:
        d = load(name, results)
        m = d["meta"]
        parts += [f"**{m['shape']['N']}×{m['shape']['K']}, batch {m['shape']['M']}** "
                  f"(medians of {m['reps']}):", "",
                  cpu_linear_table(d, ["ours_b1", "ours_b16", "ours_b32", "torch_csr"],
                                   LINEAR_LABELS), "",
                  source("bench_cpu.py", name, f"{cpu_device(d)}, highest 1-minute load "
                         f"average {m['loadavg_1min_max']:.2f}", commit_of(m["git"])), ""]
    return "\n".join(parts).rstrip()


# ----------------------------------------------------------------------------- GPU results
#: Result kinds measured on a GPU, each in ``benchmarks/results/<kind>_gpu_<device>[_<tag>].json``
#: (``<device>`` the GPU's model in lower case: ``h100``, ``h200``).
GPU_KINDS = ("linear", "conv", "train")


def _is_gpu_result(kind: str, d: dict) -> bool:
    """Whether ``d`` is a ``kind`` result measured on a GPU (CPU smoke runs and the CPU-only
    cases of ``bench_train_gpu.py`` write files of the same name pattern)."""
    if kind == "linear":
        return d.get("device_type") == "cuda" and "rows" in d
    if kind == "conv":
        return d.get("device") == "cuda" and "rows" in d
    return d.get("device") == "cuda" and d.get("benchmark") == "train_gpu"


def gpu_result(kind: str, results: Path = RESULTS) -> Optional[Tuple[str, dict]]:
    """``(file name, parsed JSON)`` of the newest GPU result of ``kind`` in ``results``, or None.

    Newest = the latest ``time`` the JSON records (UTC, ISO 8601; a file without one, like the
    first H100 runs, counts as older than any with one), then the file name. Files whose JSON
    was not measured on a GPU are ignored (:func:`_is_gpu_result`).
    """
    if kind not in GPU_KINDS:
        raise ValueError(f"kind must be one of {GPU_KINDS}, got {kind!r}")
    found = []
    for path in sorted(Path(results).glob(f"{kind}_gpu_*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))
        if _is_gpu_result(kind, d):
            found.append((str(d.get("time") or ""), path.name, d))
    if not found:
        return None
    _, name, d = max(found, key=lambda t: (t[0], t[1]))
    return name, d


def is_linear_sweep(d: dict) -> bool:
    """The ``bench_linear.py --sweep`` schema (rows per block × density with kernel timings,
    eager and CUDA-graph fwd+bwd), not the first H100 run's rows per method × phase."""
    return d.get("benchmark") == "bench_linear --sweep"


def is_conv_plan(d: dict) -> bool:
    """The schema of ``bench_conv.py``'s GPU plan (``ours_eager_fwd_bwd_s``,
    ``ours_graph_fwd_bwd``, ``routes_1x1``, ``eager_over_graph``), not the first quick run's."""
    return "plan" in d


def gpu_label(device: str) -> str:
    """``NVIDIA H100 80GB HBM3`` → ``H100 GPU``."""
    return clean_device(device).replace("NVIDIA ", "").split()[0] + " GPU"


def verdict(eager_ok: Optional[bool], graph_ok: Optional[bool] = None) -> str:
    """A target's outcome from its eager and CUDA-graph figures (None: not measured)."""
    if eager_ok is None and graph_ok is None:
        return "not measured"
    if eager_ok:
        return "met"
    if graph_ok:
        return "met from a CUDA graph only"
    return "missed"


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num and den else None


def _ge(x: Optional[float], threshold: float) -> Optional[bool]:
    return None if x is None else x >= threshold


def fmt_pct(f: Optional[float]) -> str:
    return "–" if f is None else f"{100 * f:.0f} %"


def fmt_range(xs: Sequence[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return fmt_x(min(xs)) if len(xs) == 1 else f"{fmt_x(min(xs))}–{fmt_x(max(xs))}"


def _run_state(d: dict, skipped_key: str) -> str:
    skipped = d.get(skipped_key) or []
    errors = d.get("errors") or []
    if d.get("complete") and not skipped and not errors:
        return "complete run"
    return (f"incomplete run: {len(skipped)} case(s) skipped by the time budget"
            + (f", {len(errors)} error(s)" if errors else ""))


# ----------------------------------------------------------------------------- GPU linear
def gpu_linear_cells(d: dict, dtype: str = "bf16") -> Dict[Tuple[int, float], dict]:
    """First H100 schema: ``{(block, density): {"x": fwd+bwd speedup, "roof": fraction,
    "bsr": fwd over BSR}}``."""
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


def sweep_cells(d: dict) -> Dict[Tuple[int, float], dict]:
    """``bench_linear.py --sweep`` schema: per ``(block, density)`` the figures of the tables,
    computed from the raw times. Ours is timed with the run's fastest kernel configs where the
    row has them (``... best``), else with the shipped ones.

    Keys (None where not measured): ``eager_x`` (dense eager fwd+bwd / ours eager),
    ``graph_x`` (dense / ours, both replayed from CUDA graphs), ``roof`` (roofline floor / the
    faster of ours' two times), ``per_flop`` (the larger speedup × density),
    ``over_kernels`` (ours eager / the sum of its three kernels alone), ``bsr`` (torch BSR
    forward / ours forward), ``stk`` (stk fwd+bwd / ours eager fwd+bwd).
    """
    dense = d.get("dense") or {}
    out: Dict[Tuple[int, float], dict] = {}
    for r in d["rows"]:
        t = r.get("ours") or {}
        best = t.get("eager fwd+bwd best") is not None
        eager = t.get("eager fwd+bwd best") if best else t.get("eager fwd+bwd shipped")
        graph = t.get("graph fwd+bwd best") or t.get("graph fwd+bwd shipped")
        kernels = r.get("sum_kernels_best_ms") if best else r.get("sum_kernels_shipped_ms")
        eager_x = _ratio(dense.get("fwd+bwd"), eager)
        graph_x = _ratio(dense.get("fwd+bwd graph"), graph)
        fastest = min((v for v in (eager, graph) if v), default=None)
        top = max((v for v in (eager_x, graph_x) if v is not None), default=None)
        out[(r["block"], r["density"])] = {
            "eager_ms": eager, "graph_ms": graph, "eager_x": eager_x, "graph_x": graph_x,
            "roof": _ratio(r.get("roofline_fwd+bwd_ms"), fastest),
            "per_flop": None if top is None else top * r["density"],
            "over_kernels": _ratio(eager, kernels),
            "bsr": _ratio(r.get("torch_bsr_fwd_ms"), t.get("eager fwd shipped")),
            "stk": _ratio(r.get("stk_fwd+bwd_ms"), eager),
            "stk_error": r.get("stk_error"), "bsr_error": r.get("torch_bsr_error")}
    return out


#: Issue 13's targets (block 64, fwd+bwd over cuBLAS), written once: ``{density: speedup}``.
LINEAR_SPEEDUP_TARGETS = {0.2: 4.0, 0.1: 6.0, 0.02: 7.0}
LINEAR_TARGET_BLOCK = 64
LINEAR_ROOF_MIN = 0.8            # time within 80 % of the roofline floor: floor / time >= 0.8
LINEAR_PER_FLOP = (0.5, 0.9)     # at density 0.5: speedup × density >= 0.9
LINEAR_OVER_KERNELS_MAX = 1.10   # eager fwd+bwd through autograd <= 1.1 × its kernels' sum
LINEAR_STK_BLOCK = 128           # stk's only block size


def linear_targets(d: dict) -> List[List[str]]:
    """Rows ``[target, measured, outcome]`` of issue 13's targets, from a sweep JSON."""
    cells = sweep_cells(d)
    b = LINEAR_TARGET_BLOCK
    mine = {dn: c for (bb, dn), c in cells.items() if bb == b}
    rows = []
    for dn, need in sorted(LINEAR_SPEEDUP_TARGETS.items(), reverse=True):
        c = mine.get(dn, {})
        rows.append([f"block {b}, {100 * (1 - dn):g} % sparse: ≥ {need:g}× cuBLAS",
                     f"eager {fmt_x(c.get('eager_x'))}, CUDA graph {fmt_x(c.get('graph_x'))}",
                     verdict(_ge(c.get("eager_x"), need), _ge(c.get("graph_x"), need))])
    roofs = {dn: c["roof"] for dn, c in mine.items() if c["roof"] is not None}
    worst = min(roofs, key=roofs.get) if roofs else None
    rows.append([f"block {b}, every density: ≥ {100 * LINEAR_ROOF_MIN:.0f} % of the roofline "
                 "floor", f"lowest {fmt_pct(roofs[worst])} (density {worst:g})" if roofs else "–",
                 verdict(min(roofs.values()) >= LINEAR_ROOF_MIN if roofs else None)])
    pd, need = LINEAR_PER_FLOP
    pf = mine.get(pd, {}).get("per_flop")
    rows.append([f"block {b}, density {pd:g}: speedup × density ≥ {need:g}",
                 "–" if pf is None else f"{pf:.2f}", verdict(_ge(pf, need))])
    ok = {dn: c["over_kernels"] for dn, c in mine.items() if c["over_kernels"] is not None}
    worst = max(ok, key=ok.get) if ok else None
    rows.append([f"block {b}, every density: eager fwd+bwd ≤ {LINEAR_OVER_KERNELS_MAX:g}× the "
                 "sum of its kernels", f"highest {ok[worst]:.2f}× (density {worst:g})" if ok
                 else "–", verdict(max(ok.values()) <= LINEAR_OVER_KERNELS_MAX if ok else None)])
    stk = {dn: c["stk"] for (bb, dn), c in cells.items()
           if bb == LINEAR_STK_BLOCK and c["stk"] is not None}
    rows.append([f"block {LINEAR_STK_BLOCK}, every density: faster than stk (fwd+bwd)",
                 f"ours {fmt_range(list(stk.values()))} faster" if stk else "–",
                 verdict(min(stk.values()) > 1 if stk else None)])
    bsr = [c["bsr"] for c in cells.values() if c["bsr"] is not None]
    rows.append(["every block and density: forward faster than torch BSR",
                 f"ours {fmt_range(bsr)} faster" if bsr else "–",
                 verdict(min(bsr) > 1 if bsr else None)])
    corr = d.get("correctness") or {}
    for dt in ("fp16", "bf16"):
        if dt in corr:
            e = corr[dt]
            rows.append([f"{dt} correct (fwd+bwd against float64, rel. error ≤ 1e-2)",
                         f"largest rel. error {max(e['rel_err'].values()):.1e}",
                         "met" if e["ok"] else "missed"])
    return rows


def frag_gpu_linear(results: Path = RESULTS) -> Optional[str]:
    found = gpu_result("linear", results)
    if found is None:
        return None
    name, d = found
    return (frag_gpu_linear_sweep(name, d) if is_linear_sweep(d)
            else frag_gpu_linear_h100(name, d))


def frag_gpu_linear_h100(name: str, d: dict) -> str:
    """The table of the first H100 run's schema (rows per method × phase)."""
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
    also = " (fp16 too)" if any(r["dtype"] == "fp16" for r in d["rows"]) else ""
    return "\n".join([
        f"Linear {r0['N']}×{r0['K']}, batch {r0['M']}, bf16, forward + backward: speedup of "
        "`block_sparse_linear` over dense cuBLAS `F.linear`, the fraction of the roofline floor "
        "max(FLOPs / peak, bytes / bandwidth) it reaches, and how much faster its forward is "
        f"than torch BSR's (measured peaks {pk['tflops']:.0f} TFLOP/s, {pk['tbps']:.2f} TB/s; "
        "`triton.testing.do_bench` medians). Bold: faster than dense.",
        "",
        table(["block"] + [f"density {x:g}" for x in dens], rows),
        "",
        source("bench_linear.py", name + also,
               f"{d['device']}, torch {d['versions']['torch']}, triton "
               f"{d['versions']['triton']}", commit_of(d["git_commit"])),
    ])


def frag_gpu_linear_sweep(name: str, d: dict) -> str:
    """Tables of the ``bench_linear.py --sweep`` schema: per block × density, and the targets."""
    cells = sweep_cells(d)
    rows = []
    for (b, dn) in sorted(cells, key=lambda k: (k[0], -k[1])):
        c = cells[(b, dn)]
        rows.append([str(b), f"{dn:g}", fmt_x(c["eager_x"], 1.0), fmt_x(c["graph_x"], 1.0),
                     fmt_pct(c["roof"]), "–" if c["per_flop"] is None else f"{c['per_flop']:.2f}",
                     "–" if c["over_kernels"] is None else f"{c['over_kernels']:.2f}",
                     fmt_x(c["bsr"], 1.0), fmt_x(c["stk"], 1.0)])
    s, pk = d["shape"], d.get("peaks") or {}
    peaks = (f"peaks measured in the same run: {pk['tflops']:.0f} TFLOP/s, {pk['tbps']:.2f} TB/s"
             if pk else "no peaks measured, so no floor")
    notes = []
    for key, what in (("stk_error", "stk"), ("bsr_error", "torch BSR")):
        errs = sorted({c[key] for c in cells.values() if c[key]})
        if errs:
            notes += ["", f"{what} did not run: {errs[0]}"]
    fp32 = d.get("fp32") or []
    if fp32:
        notes += ["", f"fp32 ({fp32[0]['precision']}) at block {fp32[0]['block']}, eager, over "
                  "dense fp32: " + ", ".join(f"{fmt_x(r['speedup_vs_dense'])} at density "
                                             f"{r['density']:g}" for r in fp32) + "."]
    v = d["versions"]
    return "\n".join([
        f"Linear {s['N']}×{s['K']}, batch {s['M']}, {d['dtype']}, forward + backward through "
        "autograd: speedup of `block_sparse_linear` over dense cuBLAS `F.linear`, called from "
        "Python (eager) and replayed from a CUDA graph (both sides); the fraction of the "
        f"roofline floor max(FLOPs / peak, bytes / bandwidth) the faster of the two reaches "
        f"({peaks}); speedup × density (1 = cuBLAS's rate per FLOP); eager time over the sum "
        "of its three kernels timed alone (host and autograd overhead); the forward against "
        "torch BSR's; fwd+bwd against stk (block 128, its only size). Ours with the run's "
        "fastest kernel configs per cell (the shipped ones where none were swept); "
        "`triton.testing.do_bench` medians. Bold: faster than the baseline.",
        "",
        table(["block", "density", "eager", "CUDA graph", "of floor", "speedup × density",
               "eager / kernels", "fwd vs torch BSR", "vs stk"], rows),
        *notes,
        "",
        "Issue 13's targets:",
        "",
        table(["target", "measured", "outcome"], linear_targets(d)),
        "",
        source("bench_linear.py --sweep", name, f"{d['device']}, torch {v['torch']}, triton "
               f"{v['triton']}; {_run_state(d, 'sections_skipped')}",
               commit_of(d["git_commit"])),
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


def conv_cell(r: dict) -> dict:
    """Figures of one row of ``bench_conv.py``'s GPU plan, from its raw times (None where not
    measured): ``eager_x`` (cuDNN eager fwd+bwd / ours eager, the faster launch mode),
    ``graph_x`` (both replayed from CUDA graphs), ``eager_over_graph`` (ours), and for a
    stride-1 1×1 layer the best of the default route and the GEMM routes (``best_eager_x``,
    ``best_graph_x``, ``best_route``)."""
    dense = r.get("dense") or {}
    eager = min((r.get("ours_eager_fwd_bwd_s") or {}).values(), default=None)
    graph = (r.get("ours_graph_fwd_bwd") or {}).get("s")
    dense_graph = (dense.get("graph_fwd_bwd") or {}).get("s")
    c = {"eager_x": _ratio(dense.get("eager_fwd_bwd_s"), eager),
         "graph_x": _ratio(dense_graph, graph), "eager_over_graph": _ratio(eager, graph)}
    best = {"default": (c["eager_x"], c["graph_x"])}
    for route, t in (r.get("routes_1x1") or {}).items():
        best[route] = (_ratio(dense.get("eager_fwd_bwd_s"), t.get("eager_fwd_bwd_s")),
                       _ratio(dense_graph, (t.get("graph_fwd_bwd") or {}).get("s")))
    c["routes"] = best
    c["best_eager_x"] = max((e for e, _ in best.values() if e is not None), default=None)
    c["best_graph_x"] = max((g for _, g in best.values() if g is not None), default=None)
    ranked = sorted(best, key=lambda k: best[k][1] if best[k][1] is not None else -1)
    c["best_route"] = ranked[-1]
    return c


def conv_group(r: dict) -> str:
    """The table a row of the GPU plan belongs in."""
    if r["net"] == "resnet50":
        return f"ResNet-50 {r['k']}×{r['k']} layers, batch {r['batch']}"
    if r["net"] in ("vgg16", "resnet34"):
        return f"VGG-16 and ResNet-34 on CIFAR, batch {r['batch']}"
    return f"{r['net']} layers, batch {r['batch']}"


def conv_plan_tables(d: dict) -> List[str]:
    """One table per group of layers: a row per (layer, block), a column per density, each
    cell ``eager / CUDA graph`` speedup over cuDNN (``; GEMM`` the best 1×1 GEMM route's, from
    a CUDA graph), and the largest eager / graph ratio of the row."""
    groups: Dict[str, Dict[tuple, Dict[float, dict]]] = {}
    for r in d["rows"]:
        key = (r["net"], r["name"], r["cin"], r["cout"], r["k"], r["hw"], r["stride"],
               r["block_size"])
        groups.setdefault(conv_group(r), {}).setdefault(key, {})[r["density_nominal"]] = \
            conv_cell(r)
    out = []
    for title, layers in groups.items():
        dens = sorted({dn for by in layers.values() for dn in by}, reverse=True)
        rows = []
        for (net, lname, cin, cout, k, hw, stride, bs), by in layers.items():
            row = [f"{lname} {cin}→{cout}, {k}×{k}, {hw}×{hw}, stride {stride}", str(bs)]
            for dn in dens:
                c = by.get(dn)
                if c is None:
                    row.append("–")
                    continue
                cell = f"{fmt_x(c['eager_x'], 1.0)} / {fmt_x(c['graph_x'], 1.0)}"
                gemm = [g for route, (_, g) in c["routes"].items()
                        if route != "default" and g is not None]
                if gemm:
                    cell += f"; GEMM {fmt_x(max(gemm), 1.0)}"
                row.append(cell)
            eog = [c["eager_over_graph"] for c in by.values() if c["eager_over_graph"]]
            row.append(f"{max(eog):.2f}" if eog else "–")
            rows.append(row)
        out += [f"**{title}**:", "",
                table(["layer", "block"] + [f"density {x:g}" for x in dens] +
                      ["eager / graph, largest"], rows), ""]
    return out


#: Issue 15's targets, written once.
CONV_3X3_TARGETS = {0.1: 3.0, 0.5: 1.0}    # ResNet-50 3×3, blocks 16 and 32: {density: ×}
CONV_3X3_BLOCKS = (16, 32)
CONV_1X1_TARGET = (0.1, 3.0)               # ResNet-50 1×1 (stride 1: GEMMs), every block
CONV_EAGER_OVER_GRAPH_MAX = 1.15           # ResNet-50 batch 64, every row
CONV_FULL_SWEEP_NETS = ("resnet50", "vgg16", "resnet34")


def _all_layers(cs: List[dict], key: str, need: float) -> Optional[bool]:
    xs = [c[key] for c in cs]
    return None if not xs or any(x is None for x in xs) else all(x >= need for x in xs)


def dense_eager_over_graph(rows: List[dict]) -> List[float]:
    """cuDNN's eager / CUDA-graph fwd+bwd time ratio, once per layer of ``rows`` (the dense
    timings repeat on every row of a layer): what the host costs a dense ``F.conv2d``."""
    seen = {}
    for r in rows:
        dense = r.get("dense") or {}
        ratio = _ratio(dense.get("eager_fwd_bwd_s"), (dense.get("graph_fwd_bwd") or {}).get("s"))
        if ratio is not None:
            seen.setdefault((r["net"], r["name"]), ratio)
    return list(seen.values())


def conv_host_table(d: dict) -> List[str]:
    """The run's host-overhead section as a table: host µs per eager call (forward with inputs
    that require grad, and fwd+bwd) of each variant at each layer, ``autograd floor`` being an
    autograd op that only allocates its outputs (``bench_conv.AutogradFloor``)."""
    rows = d.get("host_overhead") or []
    if not rows:
        return []
    out = []
    for r in rows:
        lay = r["layer"]
        shape = (f"{lay['name']} {lay['cin']}→{lay['cout']}, {lay['k']}×{lay['k']}, "
                 f"{lay['hw']}×{lay['hw']}, batch {lay['batch']}")
        out.append([shape, r["variant"], f"{r['host_us']['fwd']:.1f}",
                    f"{r['host_us']['fwd+bwd']:.1f}"])
    return ["Host time per eager call (µs; on the GPU the calls are issued without a sync, so "
            "a row whose kernels outlast the host measures the kernels instead). `autograd "
            "floor` is an autograd op that only allocates its outputs: no wrapper can cost "
            "less, so an eager time near it is as close to the CUDA-graph time as a Python "
            "call gets.", "",
            table(["layer", "variant", "fwd", "fwd+bwd"], out), ""]


def conv_targets(d: dict) -> List[List[str]]:
    """Rows ``[target, measured, outcome]`` of issue 15's targets: a target over several layers
    is met when every layer meets it."""
    rows = []
    r50 = [r for r in d["rows"] if r["net"] == "resnet50"]
    for dn, need in sorted(CONV_3X3_TARGETS.items()):
        for bs in CONV_3X3_BLOCKS:
            cs = [conv_cell(r) for r in r50 if r["k"] == 3 and r["block_size"] == bs
                  and r["density_nominal"] == dn]
            rows.append([f"ResNet-50 3×3, block {bs}, {100 * (1 - dn):g} % sparse: ≥ {need:g}× "
                         "cuDNN", f"{len(cs)} layers: eager "
                         f"{fmt_range([c['eager_x'] for c in cs])}, CUDA graph "
                         f"{fmt_range([c['graph_x'] for c in cs])}" if cs else "–",
                         verdict(_all_layers(cs, "eager_x", need),
                                 _all_layers(cs, "graph_x", need))])
    dn, need = CONV_1X1_TARGET
    for bs in sorted({r["block_size"] for r in r50 if r["k"] == 1}):
        cs = [conv_cell(r) for r in r50 if r["k"] == 1 and r["stride"] == 1
              and r["block_size"] == bs and r["density_nominal"] == dn]
        rows.append([f"ResNet-50 1×1 (stride 1), block {bs}, {100 * (1 - dn):g} % sparse: "
                     f"≥ {need:g}× cuDNN, fastest route", f"{len(cs)} layers: eager "
                     f"{fmt_range([c['best_eager_x'] for c in cs])}, CUDA graph "
                     f"{fmt_range([c['best_graph_x'] for c in cs])}" if cs else "–",
                     verdict(_all_layers(cs, "best_eager_x", need),
                             _all_layers(cs, "best_graph_x", need))])
    eog = [c["eager_over_graph"] for c in map(conv_cell, r50) if c["eager_over_graph"]]
    dense_eog = dense_eager_over_graph(r50)
    rows.append([f"ResNet-50, batch 64: eager ≤ {CONV_EAGER_OVER_GRAPH_MAX:g}× the CUDA-graph "
                 "time", (f"{len(eog)} rows: {min(eog):.2f}–{max(eog):.2f}×, median "
                          f"{statistics.median(eog):.2f}×" if eog else "–")
                 + (f" (cuDNN's own, {len(dense_eog)} layers: {min(dense_eog):.2f}–"
                    f"{max(dense_eog):.2f}×)" if dense_eog else ""),
                 verdict(max(eog) <= CONV_EAGER_OVER_GRAPH_MAX if eog else None)])
    nets = sorted({r["net"] for r in d["rows"]})
    missing = [n for n in CONV_FULL_SWEEP_NETS if n not in nets]
    rows.append(["the full sweep: ResNet-50, VGG-16, ResNet-34 across density × block",
                 f"{len(d['rows'])} rows ({', '.join(nets) or 'none'}); "
                 f"{len(d.get('skipped') or [])} skipped, {len(d.get('errors') or [])} errors",
                 "met" if not missing and not d.get("skipped") and not d.get("errors")
                 else "missed"])
    return rows


def frag_conv(results: Path = RESULTS) -> str:
    c = load("conv_cpu.json", results)
    found = gpu_result("conv", results)
    gpu = []
    if found is not None:
        name, g = found
        gpu = conv_plan_gpu(name, g) if is_conv_plan(g) else conv_quick_gpu(name, g)
    return "\n".join(gpu + [
        "**CPU** (fp32, channels-last, medians of interleaved runs): fwd+bwd speedup over "
        "oneDNN `F.conv2d`:",
        "",
        table(["layer", "block", "density", "speedup"], conv_rows(c)),
        "",
        source("bench_conv.py", "conv_cpu.json",
               f"{c['device_name']}, {c['threads']} threads, torch {c['torch']}",
               commit_of(c["git_commit"])),
    ])


def conv_quick_gpu(name: str, g: dict) -> List[str]:
    """The GPU part of ``conv.md`` from the first quick run's schema."""
    return [
        "**GPU** (bf16, channels-last, `do_bench` medians): fwd+bwd speedup of "
        "`block_sparse_conv2d` over cuDNN `F.conv2d`, called from Python and replayed from a "
        "CUDA graph (both sides), which removes the host's launch overhead:",
        "",
        table(["layer", "block", "density", "speedup", "speedup, CUDA graphs"], conv_rows(g)),
        "",
        source("bench_conv.py --quick", name,
               f"{g['device_name']}, torch {g['torch']}, triton {g['triton']}",
               commit_of(g["git_commit"])),
        "",
    ]


def conv_plan_gpu(name: str, g: dict) -> List[str]:
    """The GPU part of ``conv.md`` from ``bench_conv.py``'s GPU plan: per group of layers, the
    eager and CUDA-graph speedups over cuDNN, then issue 15's targets."""
    dtype = str(g["dtype"]).replace("torch.", "").replace("bfloat16", "bf16") \
        .replace("float16", "fp16").replace("float32", "fp32")
    quick = " --quick" if "--quick" in (g.get("argv") or []) else ""
    return [
        f"**GPU** ({dtype}, channels-last, `do_bench` medians): fwd+bwd (dgrad and wgrad "
        "included) speedup of `block_sparse_conv2d` over cuDNN `F.conv2d`, each cell "
        "`called from Python / replayed from a CUDA graph` (both sides; the graph removes the "
        "host's launch overhead), with the faster of plain and cached Triton launches; "
        "`GEMM`: a stride-1 1×1 layer on the linear kernels (the faster of the `gemm` and "
        "`gemm_fwd_dx` routes), from a CUDA graph. The last column is ours' largest eager / "
        "graph time ratio over the row's densities. Bold: faster than cuDNN.",
        "",
        *conv_plan_tables(g),
        "Issue 15's targets (a target over several layers is met when every layer meets it):",
        "",
        table(["target", "measured", "outcome"], conv_targets(g)),
        "",
        *conv_host_table(g),
        source(f"bench_conv.py{quick}", name,
               f"{g['device_name']}, torch {g['torch']}, triton {g['triton']}; "
               f"{_run_state(g, 'skipped')}", commit_of(g["git_commit"])),
        "",
    ]


# ----------------------------------------------------------------------------- training steps
def frag_train_cpu(results: Path = RESULTS) -> str:
    d = load("train_cpu.json", results)
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


# ----------------------------------------------------------------------------- GPU training steps
#: Issue 14's targets, written once.
TRAIN_SPEEDUP_TARGETS = {"mlp": 3.0, "gpt2": 2.0, "resnet50": 2.0}   # × dense per step
TRAIN_RIGL_TARGET = ("mlp", 2.8)          # with RigL updates every 100 steps included
TRAIN_UPDATE_SHARE_MAX = ("gpt2", 0.01)   # one RigL update < 1 % of 100 steps
TRAIN_LAYOUT_MAX_S = 1e-3                 # a layout rebuild (from positions) <= 1 ms, no sync
TRAIN_STATE_SLACK = 1.10                  # state / dense <= 1.1 × parameters / dense


def train_rows(d: dict) -> List[dict]:
    """``bench_train_gpu.py``'s summary rows with the speedups recomputed from their times
    (``speedup_eager/graph/compiled``: dense / sparse step, same mode; ``speedup_rigl_eager/
    graph``: dense step / sparse step with RigL updates), the step cases' errors
    (``graph_error``, ``compile_error``) and the RigL update's extra seconds."""
    rows = [dict(r) for r in d.get("summary") or []]
    by = {(r["model"], r["variant"]): r for r in rows}
    for r in rows:
        base = by.get((r["model"], "dense"), {})
        for k in ("eager", "graph", "compiled"):
            r[f"speedup_{k}"] = _ratio(base.get(f"{k}_median_s"), r.get(f"{k}_median_s"))
            if k != "compiled":
                r[f"speedup_rigl_{k}"] = _ratio(base.get(f"{k}_median_s"),
                                                r.get(f"rigl_{k}_per_step_s"))
    for c in d["cases"]:
        if c.get("error") and str(c.get("case", "")).endswith("_compile"):
            model, variant = c["case"].split("_", 1)
            variant = variant.removesuffix("_compile")
            variant = "dense" if variant == "dense" else next(
                (v for (m, v) in by if m == model and v.startswith("sparse")), variant)
            if (model, variant) in by:
                by[(model, variant)]["compile_error"] = c["error"]
        r = by.get((c.get("model"), c.get("variant")))
        if r is None:
            continue
        if c.get("graph_error") and "kind" not in c:
            r["graph_error"] = c["graph_error"]
        if c.get("kind") == "update_cost":
            r["update_extra_s"] = c["update_extra_s"]
    return rows


def _ms(s: Optional[float]) -> str:
    return "–" if s is None else f"{1e3 * s:.1f}" if s >= 1e-3 else f"{1e3 * s:.3f}"


def _gib(b: Optional[float]) -> str:
    if b is None:
        return "–"
    return f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"


def _signed_ms(s: Optional[float]) -> str:
    return "–" if s is None else f"{1e3 * s:+.1f} ms" if abs(s) >= 1e-3 else f"{1e3 * s:+.3f} ms"


def _train_models(d: dict) -> List[str]:
    s = d["shapes"]
    info = {c["model"]: c.get("info", {}) for c in d["cases"]
            if c.get("variant") == "dense" and "info" in c}
    arch = info.get("resnet50", {}).get("arch", "torchvision resnet50")
    return [
        f"- `mlp`: {s['mlp_blocks']} residual blocks LayerNorm → Linear({s['mlp_width']}, "
        f"{s['mlp_hidden']}) → GELU → Linear({s['mlp_hidden']}, {s['mlp_width']}), "
        f"{s['mlp_rows']} rows; sparse: every Linear, block {s['block_mlp']};",
        f"- `gpt2`: {s['gpt_layers']} layers, d = {s['gpt_d']}, {s['gpt_heads']} heads, seq "
        f"{s['gpt_seq']}, batch {s['gpt_batch']}, vocabulary {s['gpt_vocab']}, "
        "`F.scaled_dot_product_attention`; sparse: the QKV, projection and MLP layers, block "
        f"{s['block_gpt']}; embeddings, norms and the tied head dense;",
        f"- `resnet50`: {arch}, batch {s['resnet_batch']}, {s['resnet_hw']}², channels_last; "
        "sparse: ERK, the stem and the head dense.",
    ]


def train_targets(d: dict, rows: List[dict]) -> List[List[str]]:
    """Rows ``[target, measured, outcome]`` of issue 14's targets."""
    out = []
    sparse = [r for r in rows if r["variant"] != "dense"]
    for model, need in TRAIN_SPEEDUP_TARGETS.items():
        rs = [r for r in sparse if r["model"] == model]
        best = {k: max((r[f"speedup_{k}"] for r in rs if r.get(f"speedup_{k}")), default=None)
                for k in ("eager", "graph", "compiled")}
        graph = max((v for v in (best["graph"], best["compiled"]) if v), default=None)
        variants = ", ".join(r["variant"].replace("sparse_b", "block ") for r in rs)
        out.append([f"`{model}` ({variants or 'sparse'}): ≥ {need:g}× dense per step",
                    f"eager {fmt_x(best['eager'])}, CUDA graph {fmt_x(best['graph'])}, "
                    f"compiled {fmt_x(best['compiled'])}",
                    verdict(_ge(best["eager"], need), _ge(graph, need))])
    model, need = TRAIN_RIGL_TARGET
    r = next((r for r in sparse if r["model"] == model), {})
    e, g = r.get("speedup_rigl_eager"), r.get("speedup_rigl_graph")
    out.append([f"`{model}` with RigL updates every 100 steps: ≥ {need:g}× dense",
                f"eager {fmt_x(e)}, CUDA graph {fmt_x(g)}", verdict(_ge(e, need), _ge(g, need))])
    model, most = TRAIN_UPDATE_SHARE_MAX
    r = next((r for r in sparse if r["model"] == model), {})
    share = r.get("update_overhead_at_100")
    out.append([f"one RigL update of `{model}`: < {100 * most:g} % of training time at "
                "`update_every=100`", "–" if share is None else
                f"{100 * share:.2f} % ({_signed_ms(r.get('update_extra_s'))} per update)",
                verdict(None if share is None else share < most)])
    lay = next((c for c in d["cases"] if c.get("kind") == "layout_rebuild"), None)
    pos = (lay or {}).get("cases", {}).get("from_positions")
    if pos is None:
        out.append(["a layout rebuild: ≤ 1 ms, no host sync", "–", verdict(None)])
    else:
        ok = None if pos["host_sync"] is None else (
            pos["per_call_s"] <= TRAIN_LAYOUT_MAX_S and not pos["host_sync"])
        out.append([f"a layout rebuild at {lay['grid'][0] * lay['block_size']}², block "
                    f"{lay['block_size']} (from positions): ≤ {1e3 * TRAIN_LAYOUT_MAX_S:g} ms, "
                    "no host sync", f"{1e6 * pos['per_call_s']:.0f} µs, host sync: "
                    + {True: "yes", False: "no", None: "not checked"}[pos["host_sync"]],
                    verdict(ok)])
    graphs = [(r, r.get("graph_median_s")) for r in sparse]
    out.append(["a sparse step between updates captured in a CUDA graph",
                ", ".join(f"`{r['model']}` {r['variant']}: " + (f"{_ms(t)} ms" if t else
                          "failed" if r.get("graph_error") else "not run") for r, t in graphs)
                or "–", verdict(all(t for _, t in graphs) if graphs else None)])
    comp = [r for r in sparse if r.get("compiled_median_s") or r.get("compile_error")]
    out.append(["`torch.compile(mode=\"reduce-overhead\")` of a sparse step",
                ", ".join(f"`{r['model']}` {r['variant']}: " + (
                    f"{_ms(r['compiled_median_s'])} ms" if r.get("compiled_median_s")
                    else "failed") for r in comp) or "not run",
                verdict(all(r.get("compiled_median_s") for r in comp) if comp else None)])
    mem = [r for r in sparse if r.get("state_vs_dense") and r.get("params_vs_dense")]
    out.append(["parameters + gradients + optimizer state ∝ density (≤ "
                f"{TRAIN_STATE_SLACK:g}× the parameter ratio)",
                ", ".join(f"`{r['model']}` {r['state_vs_dense']:.3f} of dense (parameters "
                          f"{r['params_vs_dense']:.3f})" for r in mem) or "–",
                verdict(all(r["state_vs_dense"] <= TRAIN_STATE_SLACK * r["params_vs_dense"]
                            for r in mem) if mem else None)])
    return out


def frag_train_gpu(results: Path = RESULTS) -> Optional[str]:
    """README's "Training speed on a GPU": ``bench_train_gpu.py``'s newest GPU result, or None
    (no such file yet: the fragment is skipped and nothing is claimed)."""
    found = gpu_result("train", results)
    if found is None:
        return None
    name, d = found
    return render_train_gpu(name, d)


def render_train_gpu(name: str, d: dict) -> str:
    """The training-step tables of one ``bench_train_gpu.py`` JSON (any device: the tests
    render a CPU smoke run)."""
    rows = train_rows(d)
    dense = {r["model"]: r for r in rows if r["variant"] == "dense"}
    table_rows = []
    for r in rows:
        base = dense.get(r["model"], {})
        is_dense = r["variant"] == "dense"
        speed = " / ".join(fmt_x(r.get(f"speedup_{k}"), 1.0) for k in ("eager", "graph",
                                                                       "compiled"))
        rigl = " / ".join(fmt_x(r.get(f"speedup_rigl_{k}"), 1.0) for k in ("eager", "graph"))
        peak = _gib(r.get("peak_bytes"))
        if not is_dense and r.get("peak_bytes") and base.get("peak_bytes"):
            peak += f" ({r['peak_bytes'] / base['peak_bytes']:.2f}×)"
        state = _gib(r.get("state_bytes"))
        if not is_dense and r.get("state_vs_dense"):
            state += f" ({r['state_vs_dense']:.2f}×)"
        upd = r.get("update_overhead_at_100")
        table_rows.append([
            f"`{r['model']}`", r["variant"].replace("sparse_b", "sparse, block "),
            _ms(r.get("eager_median_s")), _ms(r.get("graph_median_s")),
            _ms(r.get("compiled_median_s")), "–" if is_dense else speed,
            "–" if is_dense else rigl, peak, state,
            "–" if upd is None else f"{_signed_ms(r.get('update_extra_s'))} = {100 * upd:.2f} %"])
    lay = next((c for c in d["cases"] if c.get("kind") == "layout_rebuild"), None)
    layout = []
    if lay:
        sync = {True: "syncs", False: "no host sync", None: "sync not checked"}
        layout = ["", f"Layout rebuild, {lay['grid'][0] * lay['block_size']}² weight, block "
                  f"{lay['block_size']}, {lay['nnz']} active blocks: " + "; ".join(
                      f"{how.replace('_', ' ')} {1e6 * v['per_call_s']:.0f} µs "
                      f"({sync[v['host_sync']]})" for how, v in lay["cases"].items()) + "."]
    skipped = [sk["case"] for sk in d.get("skipped") or []]
    errors = [c["case"] for c in d["cases"] if c.get("error")]
    state = "complete run" if not skipped and not errors else (
        "incomplete run" + (f"; skipped by the time budget: {', '.join(skipped)}" if skipped
                            else "") + (f"; failed: {', '.join(errors)}" if errors else ""))
    s = d["shapes"]
    v = d["versions"]
    return "\n".join([
        f"Whole training steps (zero_grad, forward and backward under {d.get('autocast', 'bf16')} "
        f"autocast, {d.get('optimizer', 'AdamW')} step) on an {clean_device(d['device_name'])}, "
        f"each sparse model at density {s['density']:g} ({100 * (1 - s['density']):g} % "
        "sparse) against the same dense model in the same run:",
        "",
        *_train_models(d),
        "",
        "Milliseconds per step called from Python (eager), replayed from a CUDA graph, and "
        "through `torch.compile(mode=\"reduce-overhead\")` where measured; speedups over dense "
        "in the same mode (eager / graph / compiled); with RigL updates every 100 steps "
        "included (eager / graph); peak memory of a step and the bytes of parameters, "
        "gradients and optimizer state (× dense); and what one RigL update adds, as a share of "
        "100 steps. Bold: faster than dense.",
        "",
        table(["model", "variant", "eager ms", "graph ms", "compiled ms", "speedup",
               "with RigL", "peak memory", "parameters + state", "one RigL update"],
              table_rows),
        *layout,
        "",
        "Issue 14's targets:",
        "",
        table(["target", "measured", "outcome"], train_targets(d, rows)),
        "",
        source("bench_train_gpu.py", name, f"{d['device_name']}, torch {v.get('torch')}, "
               f"triton {v.get('triton')}, torchvision {v.get('torchvision')}; {state}",
               commit_of(d["git"])),
    ])


# ----------------------------------------------------------------------------- topology update
TOPOLOGY_CPU = ("topology_update_cpu.json", "topology_update_cpu_rerun1.json",
                "topology_update_cpu_rerun2.json")


def frag_topology_update(results: Path = RESULTS) -> str:
    runs = [load(n, results) for n in TOPOLOGY_CPU]
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
    gpu = load("topology_update_gpu_h100.json", results)
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


def frag_score_precision(results: Path = RESULTS) -> str:
    d = load("score_precision_agreement.json", results)
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
def frag_quickstart_output(results: Path = RESULTS) -> str:
    d = load("itop_train_default_cpu.json", results)
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
def gpu_linear_speedups(results: Path = RESULTS) -> Optional[dict]:
    """The newest GPU linear result as the summary table and the headline figure use it:
    ``{"name", "device", "label", "M", "K", "N", "dtype", "lines": {block: {density: x}}}``
    with ``x`` the fwd+bwd speedup over cuBLAS called from Python (the first H100 schema's
    ``speedup_vs_dense``; the sweep schema's eager speedup), or None without one."""
    found = gpu_result("linear", results)
    if found is None:
        return None
    name, d = found
    lines: Dict[int, Dict[float, float]] = {}
    if is_linear_sweep(d):
        shape, dtype = d["shape"], d["dtype"]
        for (b, dn), c in sweep_cells(d).items():
            if c["eager_x"] is not None:
                lines.setdefault(b, {})[dn] = c["eager_x"]
    else:
        shape, dtype = d["rows"][0], "bf16"
        for (b, dn), c in gpu_linear_cells(d).items():
            if "x" in c:
                lines.setdefault(b, {})[dn] = c["x"]
    return {"name": name, "device": d["device"], "label": gpu_label(d["device"]),
            "M": shape["M"], "K": shape["K"], "N": shape["N"], "dtype": dtype,
            "lines": dict(sorted(lines.items()))}


def _linear_cells_by_density(d: dict, threads: int, methods: Sequence[str]
                             ) -> Dict[str, Dict[float, float]]:
    sp = cpu_linear_speedups(d)
    return {m: {k[1]: v for k, v in sp.items() if k[0] == threads and k[2] == m}
            for m in methods}


SUMMARY_DENSITIES = (0.02, 0.05, 0.1, 0.2)


def frag_when_faster(results: Path = RESULTS) -> str:
    """The README's table: speedup over dense by device, layer size, block size and density."""
    rows: List[List[str]] = []

    def add(device: str, layer: str, block: str, by_density: Dict[float, float], src: str):
        rows.append([device, layer, block] +
                    [fmt_x(by_density.get(x), 1.0) for x in SUMMARY_DENSITIES] + [src])

    def cpu(name: str, cores: int) -> str:
        return f"{clean_device(name)} ({cores} cores)"

    def threads(n: int) -> str:
        return f"{n} thread" + ("s" if n > 1 else "")

    lin = gpu_linear_speedups(results)
    if lin is not None:
        for b, by_density in lin["lines"].items():
            add(lin["label"], f"linear {lin['N']}², batch {lin['M']}, {lin['dtype']}", str(b),
                by_density, f"`{lin['name']}`")
    found = gpu_result("conv", results)
    if found is not None:
        name, conv = found
        gpu = gpu_label(conv["device_name"])
        plan = is_conv_plan(conv)
        for b in sorted({r["block_size"] for r in conv["rows"]}):
            by: Dict[float, List[float]] = {}
            for r in conv["rows"]:
                if r["block_size"] == b:
                    x = conv_cell(r)["eager_x"] if plan else r["speedup_vs_dense"]["fwd+bwd"]
                    if x is not None:
                        by.setdefault(r["density_nominal"], []).append(x)
            rows.append([gpu, "conv, ResNet/VGG layers, bf16", str(b)] +
                        [(f"{fmt_x(min(by[x]))}–{fmt_x(max(by[x]))}" if x in by else "–")
                         for x in SUMMARY_DENSITIES] + [f"`{name}`"])
    c = load("cpu_linear.json", results)
    cm = c["meta"]
    for b in (1, 32, 64):
        add(cpu(cm["device"], cm["cores"]), f"linear {cm['shape']['N']}², batch "
            f"{cm['shape']['M']}, fp32, {threads(cm['cores'])}", str(b),
            _linear_cells_by_density(c, cm["cores"], [f"ours_b{b}"])[f"ours_b{b}"],
            "`cpu_linear.json`")
    for name in SIZES:
        d = load(name, results)
        m = d["meta"]
        for b in (1, 32):
            add(cpu(m["device"], m["cores"]), f"linear {m['shape']['N']}², batch "
                f"{m['shape']['M']}, fp32, 1 thread", str(b),
                _linear_cells_by_density(d, 1, [f"ours_b{b}"])[f"ours_b{b}"], f"`{name}`")
    x = load("cpu_linear_threads_xeon16.json", results)
    xm = x["meta"]
    for b in (1, 32):
        add(cpu(xm["device"], xm["cores"]), f"linear {xm['shape']['N']}², batch "
            f"{xm['shape']['M']}, fp32, {threads(xm['cores'])}", str(b),
            _linear_cells_by_density(x, xm["cores"], [f"ours_b{b}"])[f"ours_b{b}"],
            "`cpu_linear_threads_xeon16.json`")
    cc = load("conv_cpu.json", results)
    for b in (16, 32):
        add(cpu(cc["device_name"], cm["cores"]),
            f"conv 256→256, 3×3, 32×32, batch 16, fp32, {threads(cc['threads'])}", str(b),
            {r["density_nominal"]: r["speedup_vs_dense"]["fwd+bwd"] for r in cc["rows"]
             if r["net"] == "issue3" and r["block_size"] == b}, "`conv_cpu.json`")
    t = load("train_cpu.json", results)
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
def headline_series(results: Path = RESULTS) -> dict:
    """The numbers the headline PNG plots: ``{panel: {"title", "lines": {label: [[d, x]...]}}}``."""
    lin = gpu_linear_speedups(results)
    if lin is None:
        raise FileNotFoundError(f"no linear_gpu_*.json measured on a GPU in {results}")
    gpu_lines = {f"block {b}": [[dn, x] for dn, x in sorted(by.items())]
                 for b, by in lin["lines"].items()}
    cpu = load("cpu_linear.json", results)
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
        "gpu": {"title": f"GPU: {lin['device']}\nlinear {lin['N']}×{lin['K']}, batch {lin['M']}, "
                         f"{lin['dtype']}, vs cuBLAS", "source": lin["name"],
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
#: ``{file in docs/generated: renderer}``; a renderer returns None when its results do not exist
#: yet (the fragment is then skipped: not written, and README.md and docs/ must not include it).
FRAGMENTS: Dict[str, Callable[[Path], Optional[str]]] = {
    "when_faster.md": frag_when_faster,
    "quickstart_output.md": frag_quickstart_output,
    "gpu_linear.md": frag_gpu_linear,
    "conv.md": frag_conv,
    "cpu_linear.md": frag_cpu_linear,
    "cpu_threads.md": frag_cpu_threads,
    "cpu_layer_sizes.md": frag_cpu_sizes,
    "train_cpu.md": frag_train_cpu,
    "train_gpu.md": frag_train_gpu,
    "topology_update.md": frag_topology_update,
    "score_precision.md": frag_score_precision,
}
#: Why each optional fragment may be skipped.
SKIP_REASONS = {
    "gpu_linear.md": "no benchmarks/results/linear_gpu_<device>.json measured on a GPU",
    "train_gpu.md": "no benchmarks/results/train_gpu_<device>.json measured on a GPU yet "
                    "(bench_train_gpu.py has not run on one); README.md and docs/ claim nothing",
}
#: Docs pages that include an optional fragment once it exists: until then the page holds a
#: placeholder between ``<!-- render_docs: NAME -->`` and ``<!-- /render_docs: NAME -->``, which
#: :func:`write` replaces with the include.
PAGE_INCLUDES = {"train_gpu.md": ROOT / "docs" / "performance.md"}
#: Where README.md should hold a README fragment that :func:`write` could not place.
README_PLACES = {"train_gpu.md": 'under a section "Training speed on a GPU"'}


def include_line(name: str) -> str:
    return f'--8<-- "docs/generated/{name}"'


def replace_placeholder(body: str, name: str) -> str:
    """``body`` with the placeholder of ``name`` (markers included) replaced by its include."""
    start, end = f"<!-- render_docs: {name} -->", f"<!-- /render_docs: {name} -->"
    i, j = body.find(start), body.find(end)
    if i < 0 or j < i:
        return body
    return body[:i] + include_line(name) + body[j + len(end):]


def render_all(results: Path = RESULTS) -> Tuple[Dict[str, str], List[str]]:
    """``({file name in docs/generated: Markdown ending with one newline}, [skipped names])``."""
    out, skipped = {}, []
    for name, fn in FRAGMENTS.items():
        text = fn(results)
        if text is None:
            skipped.append(name)
        else:
            out[name] = text.rstrip() + "\n"
    return out, skipped


def fragments(results: Path = RESULTS) -> Dict[str, str]:
    """``{file name in docs/generated: Markdown}``, each ending with one newline; fragments
    whose results do not exist yet are left out."""
    return render_all(results)[0]


def skipped_notes(results: Path = RESULTS) -> List[str]:
    """One line per fragment skipped for want of results (not a problem: nothing claims it)."""
    return [f"skipped docs/generated/{name}: {SKIP_REASONS.get(name, 'no results')}"
            for name in render_all(results)[1]]


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
    rendered = fragments()
    for name, page in PAGE_INCLUDES.items():
        included = include_line(name) in page.read_text(encoding="utf-8")
        if name in rendered and not included:
            problems.append(f"{page.relative_to(ROOT)} does not include docs/generated/{name}")
        if name not in rendered and included:
            problems.append(f"{page.relative_to(ROOT)} includes docs/generated/{name}, which "
                            "has no results to render")
    for name, text in rendered.items():
        path = GENERATED / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            problems.append(f"docs/generated/{name} does not match the JSON it is rendered from")
        if name in README_FRAGMENTS and text not in readme:
            problems.append(f"README.md does not contain docs/generated/{name} verbatim")
    stale = sorted(p.name for p in GENERATED.glob("*.md") if p.name not in rendered)
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
    rendered = fragments()
    for name, page in PAGE_INCLUDES.items():
        body = page.read_text(encoding="utf-8")
        if name in rendered and include_line(name) not in body:
            page.write_text(replace_placeholder(body, name), encoding="utf-8")
    for name, text in rendered.items():
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
    for note in skipped_notes():
        print(note)
    if a.check:
        problems = check()
        for msg in problems:
            print(msg, file=sys.stderr)
        if problems:
            print("run: python benchmarks/render_docs.py", file=sys.stderr)
        return 1 if problems else 0
    unplaced = write()
    print(f"wrote {len(fragments())} fragments to {GENERATED.relative_to(ROOT)}/, "
          f"{HEADLINE_PNG.relative_to(ROOT)} and README.md's copies")
    for name in unplaced:
        print(f"README.md holds neither the old nor the new text of docs/generated/{name}: "
              f"paste the new text in {README_PLACES.get(name, '')}".rstrip(), file=sys.stderr)
    return 1 if unplaced else 0


if __name__ == "__main__":
    sys.exit(main())
