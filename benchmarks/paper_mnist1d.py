"""The ITOP paper's findings, re-tested on MNIST-1D with the sparse 1-D CNN (``itop train``).

The grid (every run is an ``itop train`` run, in process, through :func:`itop.app.train.train`):

- dense;
- static sparse (no exploration);
- SET-ITOP (random growth) and RigL-ITOP (gradient growth), each with several ``update_every``
  values (ΔT; a smaller ΔT explores more, so it raises the ITOP rate ``Rs``);
- at 90 % and 98 % sparsity (ERK), block sizes 1 (unstructured, the paper's setting) and 16;
- with any fan-in (the ITOP/RigL topology) and, at block sizes > 1, with constant fan-in
  (``--fan-in constant --ablation``, SRigL-style, see ``docs/block-size.md``);
- 3 seeds each.

Each run's final test accuracy is reported beside its ITOP rate. Writes into ``--out-dir``
(default ``benchmarks/results``):

- ``paper_mnist1d.json``: every run's raw result with the device, versions, git commit, argv;
- ``paper_mnist1d.md``: the table and an analysis of the claims (higher ``Rs`` → higher
  accuracy; DST beats static sparse; the cost of block granularity; the constant fan-in
  targets), computed from the data;
- ``paper_mnist1d.png``: accuracy against ITOP rate per method, sparsity and block size.

``--name`` changes the file stem (the 50-epoch grid is ``paper_mnist1d_50ep``). The docs page
``docs/paper-mnist1d.md`` is rebuilt from every grid of :data:`DOCS_GRIDS` present, with its
plots in ``docs/img/``, unless ``--no-docs``. ``--from-json`` re-renders the outputs
from an existing JSON without training. Finished runs already in the JSON are skipped
(``--fresh`` starts over), so an interrupted grid continues where it stopped; a JSON made with
other epochs, or holding runs outside the grid asked for, is refused rather than replaced.

    python benchmarks/paper_mnist1d.py [--epochs 30] [--jobs 2] [--fan-in any constant]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from grid_runs import run_grid  # noqa: E402
from results_files import FRESH_HELP, RESULTS, resumable_runs  # noqa: E402

DOCS_PAGE = os.path.join(ROOT, "docs", "paper-mnist1d.md")
DOCS_IMG_DIR = os.path.join(ROOT, "docs", "img")
METHODS = ("dense", "static", "set", "rigl")
LABEL = {"dense": "dense", "static": "static sparse", "set": "SET-ITOP", "rigl": "RigL-ITOP"}


# ------------------------------------------------------------------------------ the grid
def grid(sparsities: Sequence[float], blocks: Sequence[int], update_every: Sequence[int],
         seeds: int, fan_ins: Sequence[str] = ("any",)) -> List[Dict[str, Any]]:
    """The run specifications: dense, static, SET and RigL over the given axes, in the order
    they run: constant fan-in runs (block sizes > 1 only), the references they are measured
    against (static runs, block-1 DST, dense), then the other DST runs, so that a grid cut
    short holds what the comparisons need."""
    first: List[Dict[str, Any]] = []
    refs: List[Dict[str, Any]] = []
    rest: List[Dict[str, Any]] = []
    for fan_in in fan_ins:
        for sp in sparsities:
            for bs in blocks:
                if fan_in == "constant" and bs == 1:
                    continue
                cfi = fan_in == "constant"
                for seed in range(seeds):
                    (first if cfi else refs).append(
                        {"method": "static", "sparsity": sp, "block": bs,
                         "update_every": None, "seed": seed, "fan_in": fan_in})
                for method in ("rigl", "set"):
                    for ue in update_every:
                        for seed in range(seeds):
                            (first if cfi else refs if bs == 1 else rest).append(
                                {"method": method, "sparsity": sp, "block": bs,
                                 "update_every": ue, "seed": seed, "fan_in": fan_in})
    for seed in range(seeds):
        refs.append({"method": "dense", "sparsity": 0.0, "block": None, "update_every": None,
                     "seed": seed, "fan_in": "any"})
    return first + refs + rest


def run_key(r: Dict[str, Any]) -> str:
    """A unique name of a run specification (constant fan-in runs end in ``-cfi``)."""
    key = f"{r['method']}-s{r['sparsity']}-b{r['block']}-u{r['update_every']}-seed{r['seed']}"
    return key + ("-cfi" if r.get("fan_in", "any") == "constant" else "")


def _run_one(spec: Dict[str, Any], epochs: int) -> Dict[str, Any]:
    """Train one run (in a worker process, one thread) and return its result."""
    import torch
    torch.set_num_threads(1)
    from itop.app.train import TrainConfig, train
    with tempfile.TemporaryDirectory() as out:
        m = spec["method"]
        cfi = spec.get("fan_in", "any") == "constant"
        cfg = TrainConfig(
            density=1.0 - spec["sparsity"] if m != "dense" else 0.1,
            block_size=spec["block"] or 1, dense=m == "dense", static=m == "static",
            growth="gradient" if m == "rigl" else "random",
            fan_in="constant" if cfi else "any", ablation=cfi,
            update_every=spec["update_every"] or 1, epochs=epochs, seed=100 + spec["seed"],
            threads=1, out=out, progress=False, plots=False)
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            final = train(cfg)
    return {**spec, "key": run_key(spec), "test_acc": final["test_acc"],
            "itop_rate": final["itop_rate"], "density": final["density"],
            "training_flop_fraction": final["training_flop_fraction"],
            "inference_flop_fraction": final["inference_flop_fraction"],
            "steps": final["steps"], "seconds": time.time() - t0}


def _worker(args: Tuple[Dict[str, Any], int]) -> Dict[str, Any]:
    return _run_one(*args)


# ------------------------------------------------------------------------------ environment
def environment() -> Dict[str, Any]:
    """Device, versions and git commit of this run."""
    import numpy
    import torch
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "itop"],
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {"device": f"cpu: {platform.processor() or platform.machine()}, "
                      f"{os.cpu_count()} cores",
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "platform": platform.platform(),
            "git_commit": commit, "itop_dirty": dirty, "argv": sys.argv}


# ------------------------------------------------------------------------------ analysis
def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = _mean(rx), _mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else float("nan")


def _fan(r: Dict[str, Any]) -> str:
    return r.get("fan_in", "any")


def _arm(r: Dict[str, Any]) -> Tuple[int, str]:
    """A run's (block, fan-in) arm."""
    return (r["block"] or 0, _fan(r))


def _arm_label(arm: Tuple[int, str]) -> str:
    return f"{arm[0]}" + (" CFI" if arm[1] == "constant" else "")


def groups(results: List[Dict[str, Any]]) -> Dict[Tuple, List[Dict[str, Any]]]:
    """Runs grouped by (method, sparsity, block, update_every, fan-in) over seeds."""
    out: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in results:
        out.setdefault((r["method"], r["sparsity"], r["block"], r["update_every"], _fan(r)),
                       []).append(r)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _sel(results, method, sp, arm) -> List[Dict[str, Any]]:
    return [r for r in results if r["method"] == method and r["sparsity"] == sp and
            _arm(r) == arm]


def _arms(results) -> List[Tuple[int, str]]:
    return sorted({_arm(r) for r in results if r["method"] != "dense"},
                  key=lambda a: (a[0], a[1] != "any"))


def markdown(results: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """The results table and the analysis of the claims, as Markdown."""
    g = groups(results)
    order = {m: i for i, m in enumerate(METHODS)}
    keys = sorted(g, key=lambda k: (k[1], k[2] or 0, k[4] != "any", order[k[0]], k[3] or 0))
    lines = [
        "| method | sparsity | block | ΔT | ITOP rate Rs | test acc. % (mean ± std) | "
        "per seed | train FLOPs | inference FLOPs |",
        "|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        rs = g[k]
        accs = [r["test_acc"] for r in rs]
        block = "-" if k[2] is None else _arm_label((k[2], k[4]))
        lines.append(
            f"| {LABEL[k[0]]} | {'-' if k[0] == 'dense' else f'{100 * k[1]:.0f} %'} | "
            f"{block} | {k[3] or '-'} | {_mean([r['itop_rate'] for r in rs]):.3f} | "
            f"{_pct(_mean(accs))} ± {_pct(_std(accs))} | "
            f"{' / '.join(_pct(a) for a in accs)} | "
            f"{_mean([r['training_flop_fraction'] for r in rs]):.3f} | "
            f"{_mean([r['inference_flop_fraction'] for r in rs]):.3f} |")
    table = "\n".join(lines)
    return (table + "\n\nBlock \"16 CFI\": block 16 with constant fan-in and ablation "
            "(`--fan-in constant --ablation`).\n\n" + analysis(results))


def _dst_by_ue(results, method, sp, arm) -> Dict[Any, float]:
    return {ue: _mean([r["test_acc"] for r in rr])
            for ue, rr in _by(_sel(results, method, sp, arm), "update_every").items()}


def analysis(results: List[Dict[str, Any]]) -> str:
    """The claims, tested on ``results`` (text generated from the numbers)."""
    dense = [r["test_acc"] for r in results if r["method"] == "dense"]
    sps = sorted({r["sparsity"] for r in results if r["method"] != "dense"})
    arms = _arms(results)
    out: List[str] = [targets(results), ""]

    out.append("**1. Higher ITOP rate → higher accuracy?** For each method, sparsity and block "
               "size, the Spearman correlation between the runs' Rs and test accuracy "
               "(over every ΔT and seed), and the mean accuracy at the lowest and highest "
               "mean Rs:\n")
    out.append("| method | sparsity | block | Spearman ρ(Rs, acc) | acc. at lowest Rs | "
               "acc. at highest Rs |")
    out.append("|---|---|---|---|---|---|")
    held = total = 0
    for m in ("set", "rigl"):
        for sp in sps:
            for arm in arms:
                runs = _sel(results, m, sp, arm)
                if len(runs) < 3:
                    continue
                rho = _spearman([r["itop_rate"] for r in runs], [r["test_acc"] for r in runs])
                per_ue = sorted(({ue: _mean([r["itop_rate"] for r in rr]) for ue, rr in
                                  _by(runs, "update_every").items()}).items(),
                                key=lambda kv: kv[1])
                lo = _mean([r["test_acc"] for r in runs if r["update_every"] == per_ue[0][0]])
                hi = _mean([r["test_acc"] for r in runs if r["update_every"] == per_ue[-1][0]])
                total += 1
                held += int(hi > lo)
                # undefined when every run of the group ended at the same accuracy
                rho_txt = f"{rho:+.2f}" if math.isfinite(rho) else "– (accuracy constant)"
                out.append(f"| {LABEL[m]} | {100 * sp:.0f} % | {_arm_label(arm)} | {rho_txt} | "
                           f"{_pct(lo)} % (Rs {per_ue[0][1]:.2f}) | "
                           f"{_pct(hi)} % (Rs {per_ue[-1][1]:.2f}) |")
    out.append(f"\nThe highest-Rs setting beat the lowest-Rs setting in {held} of {total} "
               "groups.\n")

    out.append("**2. Dynamic sparse training beats static sparse?** Mean test accuracy (best "
               "ΔT of each method, and the mean over all ΔT):\n")
    out.append("| sparsity | block | static | SET-ITOP best (all ΔT) | RigL-ITOP best (all ΔT) "
               "| dense |")
    out.append("|---|---|---|---|---|---|")
    wins = cmp = 0
    for sp in sps:
        for arm in arms:
            st = _mean([r["test_acc"] for r in _sel(results, "static", sp, arm)])
            cells = []
            for m in ("set", "rigl"):
                per = _dst_by_ue(results, m, sp, arm)
                if not per:
                    cells.append("-")
                    continue
                allm = _mean(list(per.values()))
                if not math.isnan(st):
                    cmp += 1
                    wins += int(allm > st)
                cells.append(f"{_pct(max(per.values()))} ({_pct(allm)})")
            out.append(f"| {100 * sp:.0f} % | {_arm_label(arm)} | {_pct(st)} | {cells[0]} | "
                       f"{cells[1]} | {_pct(_mean(dense))} |")
    out.append(f"\nAveraged over ΔT, DST beat static sparse training in {wins} of {cmp} "
               "(method, sparsity, block) settings.\n")

    out.append("**3. The cost of block granularity.** Accuracy of each block-16 arm minus block "
               "1 (mean over seeds, best ΔT for DST), and the ITOP rate each reached:\n")
    out.append("| method | sparsity | block 1 acc. (Rs) | block | acc. (Rs) | difference |")
    out.append("|---|---|---|---|---|---|")
    for m in ("static", "set", "rigl"):
        for sp in sps:
            base = _best(_sel(results, m, sp, (1, "any")))
            if base is None:
                continue
            for arm in arms:
                if arm == (1, "any"):
                    continue
                other = _best(_sel(results, m, sp, arm))
                if other is None:
                    continue
                out.append(f"| {LABEL[m]} | {100 * sp:.0f} % | {_pct(base[0])} % "
                           f"({base[1]:.2f}) | {_arm_label(arm)} | {_pct(other[0])} % "
                           f"({other[1]:.2f}) | {100 * (other[0] - base[0]):+.1f} points |")
    out.append("")
    out.append(collapses(results))
    return "\n".join(out) + "\n"


def _best(runs: List[Dict[str, Any]]) -> Optional[Tuple[float, float]]:
    """(mean accuracy, mean Rs) of the best ΔT of ``runs`` (None when empty)."""
    if not runs:
        return None
    best = max(_by(runs, "update_every").values(),
               key=lambda rr: _mean([r["test_acc"] for r in rr]))
    return _mean([r["test_acc"] for r in best]), _mean([r["itop_rate"] for r in best])


def targets(results: List[Dict[str, Any]]) -> str:
    """The block-16 targets of the constant fan-in mode (issue 18), checked on the data."""
    rows = ["**Block 16 with constant fan-in: the targets.** Static block 16 (any fan-in) and "
            "block-1 DST are the references; \"runs below static − 2\" counts every SET/RigL "
            "constant fan-in run (all ΔT and seeds):\n",
            "| sparsity | method | static b16 | mean over ΔT (per ΔT) | worst run | "
            "runs below static − 2 | block-1 DST mean over ΔT | gap to block 1 |",
            "|---|---|---|---|---|---|---|---|"]
    found = False
    for sp in sorted({r["sparsity"] for r in results if r["method"] != "dense"}):
        st = _mean([r["test_acc"] for r in _sel(results, "static", sp, (16, "any"))])
        for m in ("rigl", "set"):
            per = _dst_by_ue(results, m, sp, (16, "constant"))
            runs = _sel(results, m, sp, (16, "constant"))
            if not per:
                continue
            found = True
            allm = _mean(list(per.values()))
            b1 = _dst_by_ue(results, m, sp, (1, "any"))
            b1m = _mean(list(b1.values())) if b1 else float("nan")
            below = sum(r["test_acc"] < st - 0.02 for r in runs) if not math.isnan(st) else 0
            per_s = " / ".join(f"{_pct(v)}" for _, v in sorted(per.items()))
            rows.append(f"| {100 * sp:.0f} % | {LABEL[m]} | {_pct(st)} | {_pct(allm)} "
                        f"({per_s}) | {_pct(min(r['test_acc'] for r in runs))} | "
                        f"{below} of {len(runs)} | {_pct(b1m)} | "
                        f"{100 * (allm - b1m):+.1f} points |")
    return "\n".join(rows) + "\n" if found else ""


def collapses(results: List[Dict[str, Any]], margin: float = 0.10) -> str:
    """Count the DST runs that ended more than ``margin`` below the static runs of the same
    sparsity and block arm (where static training itself learned: above 50 %)."""
    rows = []
    for sp in sorted({r["sparsity"] for r in results if r["method"] != "dense"}):
        for arm in _arms(results):
            st = _mean([r["test_acc"] for r in _sel(results, "static", sp, arm)])
            dst = [r for r in results if r["method"] in ("set", "rigl") and
                   r["sparsity"] == sp and _arm(r) == arm]
            if not dst or math.isnan(st) or st < 0.5:
                continue
            bad = [r for r in dst if r["test_acc"] < st - margin]
            rows.append(f"{100 * sp:.0f} % / block {_arm_label(arm)}: {len(bad)} of {len(dst)} "
                        f"DST runs more than {100 * margin:.0f} points below static "
                        f"({_pct(st)} %)")
    return ("**Collapsed runs.** " + "; ".join(rows) + ". A collapsed run loses accuracy at "
            "one topology update and never recovers. A replay of one (RigL, 90 %, block 16, "
            "ΔT 125, seed 101, at commit c0689e2, before the constant fan-in mode) showed the "
            "mechanism. The two strided 1×3 convolutions hold only 4 of 32 and 6 of 64 blocks "
            "at block 16, and `ceil(prune_rate·nnz)` replaced 2 of the 4 blocks at every "
            "update; the update that took the two weakest blocks (a tenth of the L1 norm of "
            "the kept ones) sent the training loss from 0.23 to 1.8, where it stayed above "
            "1.1. Each convolution is followed by batch norm, which makes a block's magnitude "
            "a poor measure of its importance, and a block-row without blocks is a dead set "
            "of output channels. The constant fan-in mode keeps every block-row live (8 of 8 "
            "in both convolutions at 90 %), never replaces most of a layer in one update nor "
            "resets a row by magnitude, and at 98 % ablates rows explicitly (see "
            "docs/block-size.md).\n")


def _by(runs: List[Dict[str, Any]], key: str) -> Dict[Any, List[Dict[str, Any]]]:
    out: Dict[Any, List[Dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r[key], []).append(r)
    return out


# ------------------------------------------------------------------------------ plot
def plot(results: List[Dict[str, Any]], path: str, title: str) -> None:
    """Accuracy against ITOP rate: one panel per (sparsity, block arm); SET and RigL runs
    (small markers), their per-ΔT means (lines, ΔT annotated), static (gray) and dense
    (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sps = sorted({r["sparsity"] for r in results if r["method"] != "dense"})
    arms = _arms(results)
    dense = _mean([r["test_acc"] for r in results if r["method"] == "dense"])
    fig, axes = plt.subplots(len(sps), len(arms), figsize=(5.2 * len(arms), 4.0 * len(sps)),
                             squeeze=False)
    style = {"set": ("tab:blue", "o"), "rigl": ("tab:red", "^"), "static": ("gray", "s")}
    for i, sp in enumerate(sps):
        for j, arm in enumerate(arms):
            ax = axes[i][j]
            for m in ("static", "set", "rigl"):
                runs = _sel(results, m, sp, arm)
                if not runs:
                    continue
                c, mk = style[m]
                ax.scatter([r["itop_rate"] for r in runs], [100 * r["test_acc"] for r in runs],
                           color=c, marker=mk, alpha=0.35, s=18)
                by = sorted(_by(runs, "update_every").items(),
                            key=lambda kv: _mean([r["itop_rate"] for r in kv[1]]))
                xs = [_mean([r["itop_rate"] for r in rr]) for _, rr in by]
                ys = [100 * _mean([r["test_acc"] for r in rr]) for _, rr in by]
                ax.plot(xs, ys, color=c, marker=mk, ms=7, lw=1.5, label=LABEL[m])
                if m != "static":
                    for (ue, _), x, y in zip(by, xs, ys):
                        ax.annotate(f"ΔT={ue}", (x, y), textcoords="offset points",
                                    xytext=(4, -11 if m == "set" else 5), fontsize=7, color=c)
            if not math.isnan(dense):
                ax.axhline(100 * dense, color="k", ls="--", lw=1, label="dense")
            fan = ", constant fan-in" if arm[1] == "constant" else ""
            ax.set_title(f"{100 * sp:.0f} % sparsity, block {arm[0]}{fan}")
            ax.set_xlabel("ITOP rate Rs (fraction of weights ever explored)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_xlim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ outputs
def write_outputs(data: Dict[str, Any], out_dir: str, name: str = "paper_mnist1d") -> str:
    """Write ``<name>.md`` and ``<name>.png`` from ``data`` (the JSON document); returns the
    Markdown page."""
    results, meta = data["results"], data["meta"]
    md_path = os.path.join(out_dir, f"{name}.md")
    png_path = os.path.join(out_dir, f"{name}.png")
    s = meta["settings"]
    title = (f"MNIST-1D, cnn1d, {s['epochs']} epochs, {s['seeds']} seeds")
    plot(results, png_path, title)
    body = markdown(results, meta)
    epochs_note = (" (the ITOP default)" if s["epochs"] == 50 else
                   " instead of the default 50, to fit the grid into the time")
    header = (
        f"Generated by `benchmarks/paper_mnist1d.py` on {meta['env']['device']} "
        f"(torch {meta['env']['torch']}, commit {meta['env']['git_commit'][:10]}"
        f"{', itop/ modified' if meta['env'].get('itop_dirty') else ''}); "
        f"{len(results)} runs in {meta.get('grid_seconds', 0) / 60:.1f} min of wall clock "
        f"({s.get('jobs', 1)} at a time).\n\n"
        f"Settings: `itop train` defaults (cnn1d 64/128/128 + fc 256, ERK, SGD with Nesterov "
        f"momentum, lr 0.1 ×0.1 at 1/2 and 3/4, batch 100, prune rate 0.5 cosine-decayed), "
        f"{s['epochs']} epochs{epochs_note}. ΔT ∈ {s['update_every']} optimizer steps "
        f"({results[0]['steps'] // s['epochs']} steps per epoch). Accuracy is the final-epoch "
        f"test accuracy "
        f"(no checkpoint selection). With block 16 the first convolution (1 input channel) and "
        f"the last linear layer (10 outputs) stay dense; with block 1 every layer is sparse. "
        f"FLOP fractions count density × dense FLOPs per layer (training = forward + 2× "
        f"backward, plus RigL's dense gradients on update steps).\n\n")
    doc = (f"# ITOP on MNIST-1D: the paper's claims on a small 1-D CNN ({s['epochs']} epochs)"
           "\n\n" + header + body)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(doc)
    return doc


# Grids shown in the docs page, in this order, where their JSON exists in the out dir.
DOCS_GRIDS = ("paper_mnist1d_50ep", "paper_mnist1d")


def write_docs(out_dir: str) -> List[str]:
    """Rebuild ``docs/paper-mnist1d.md`` (and its images in ``docs/img``) from every grid of
    :data:`DOCS_GRIDS` whose JSON is in ``out_dir``; returns the grids it used."""
    parts, used = [], []
    for name in DOCS_GRIDS:
        path = os.path.join(out_dir, f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        doc = write_outputs(data, out_dir, name)
        os.makedirs(DOCS_IMG_DIR, exist_ok=True)
        shutil.copyfile(os.path.join(out_dir, f"{name}.png"),
                        os.path.join(DOCS_IMG_DIR, f"{name}.png"))
        parts.append("#" + doc + f"\n![accuracy vs ITOP rate, "
                     f"{data['meta']['settings']['epochs']} epochs](img/{name}.png)\n")
        used.append(name)
    if parts:
        with open(DOCS_PAGE, "w", encoding="utf-8") as f:
            f.write("# ITOP on MNIST-1D\n\nThe ITOP paper's claims, and the targets of the "
                    "constant fan-in mode ([block size](block-size.md)), re-tested on MNIST-1D "
                    "with the sparse 1-D CNN of `itop train`. Generated by "
                    "`benchmarks/paper_mnist1d.py` from its JSON in `benchmarks/results/`."
                    "\n\n" + "\n".join(parts))
    return used


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the grid (or re-render it) and write the JSON, Markdown and plot."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.98])
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 16])
    p.add_argument("--update-every", type=int, nargs="+", default=[5, 25, 125])
    p.add_argument("--jobs", type=int, default=1, help="parallel runs (one thread each)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--from-json", action="store_true",
                   help="re-render the Markdown/plot from the existing JSON")
    p.add_argument("--fresh", action="store_true", help=FRESH_HELP)
    p.add_argument("--fan-in", nargs="+", choices=("any", "constant"),
                   default=["any", "constant"],
                   help="fan-in modes (constant: --fan-in constant --ablation, block > 1 only)")
    p.add_argument("--no-docs", action="store_true",
                   help="do not write docs/paper-mnist1d.md and its images")
    p.add_argument("--name", default="paper_mnist1d",
                   help="file stem of this grid's JSON/MD/PNG in --out-dir (the docs page "
                        f"shows the grids {', '.join(DOCS_GRIDS)})")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, f"{args.name}.json")
    if args.from_json:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        write_outputs(data, args.out_dir, args.name)
        used = [] if args.no_docs else write_docs(args.out_dir)
        print(f"wrote {args.out_dir}/{args.name}.md/.png"
              + (f" and {DOCS_PAGE} from {', '.join(used)}" if used else ""))
        return 0

    specs = grid(args.sparsities, args.blocks, args.update_every, args.seeds, args.fan_in)
    settings = {"epochs": args.epochs, "seeds": args.seeds, "sparsities": args.sparsities,
                "blocks": args.blocks, "update_every": args.update_every,
                "fan_in": args.fan_in, "jobs": args.jobs}
    done = resumable_runs(p, json_path, args.fresh, {run_key(s) for s in specs},
                          lambda old: old["epochs"] == args.epochs)
    todo = [s for s in specs if run_key(s) not in done]
    print(f"{len(specs)} runs, {len(specs) - len(todo)} already done, {len(todo)} to run "
          f"({args.jobs} at a time)", flush=True)
    meta = {"env": environment(), "settings": settings}
    t0 = time.time()
    results = [done[run_key(s)] for s in specs if run_key(s) in done]
    prior = sum(r["seconds"] for r in results) / max(1, args.jobs)

    def save() -> None:
        meta["grid_seconds"] = prior + time.time() - t0
        with open(json_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        os.replace(json_path + ".tmp", json_path)

    work = [(s, args.epochs) for s in todo]

    def finished(i: int, r: Dict[str, Any]) -> None:
        results.append(r)
        save()
        print(f"[{i}/{len(work)}] {r['key']}: acc {100 * r['test_acc']:.1f} %, "
              f"Rs {r['itop_rate']:.3f}, {r['seconds']:.0f} s", flush=True)

    run_grid(work, _worker, args.jobs, finished, maxtasksperchild=8)
    save()
    write_outputs({"meta": meta, "results": results}, args.out_dir, args.name)
    if not args.no_docs:
        write_docs(args.out_dir)
    print(f"grid: {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
