"""What a block size costs in accuracy, on a layer wide enough for blocks, next to what it buys
in speed.

The model is an MLP ``40 → 1024 → 1024 → 10`` on MNIST-1D (ReLU). Its 1024×1024 layer is the
sparse one at every block size; the first layer (40 inputs: no block size above 8 divides it)
and the output layer (10 outputs) stay dense, so every run prunes the same layer. Training is
RigL-ITOP with the ``itop train`` recipe: SGD with Nesterov momentum 0.9, weight decay 5e-4,
lr 0.1 ×0.1 at 1/2 and 3/4, batch 100, gradient growth, prune rate 0.5 cosine-decayed, ΔT
``--update-every`` steps; every run is seeded. The grid: block 1 / 16 / 32 / 64 × sparsity 90 /
95 / 98 % × any fan-in / constant fan-in (``fan_in="constant"`` with ablation), plus dense.

The speed side comes from the committed kernel benchmarks (not re-measured here):
``benchmarks/results/cpu_linear.json`` (``bench_cpu.py``: a 4096×4096 layer, batch 512, fp32,
forward + backward on this project's 2-core CPU) and ``benchmarks/results/linear_gpu_h100.json``
(``bench_linear.py``: 4096×4096, M = 16384, bf16, forward + backward on an H100).

Writes ``benchmarks/results/block_size_accuracy.json`` (every run, device, versions, commit),
``.png`` (accuracy against block size, one panel per sparsity) and ``.md``, and the generated
section of ``docs/block-size.md`` (between its ``block-size-results`` markers) with the plot
in ``docs/img/``. Finished runs in the JSON are kept (``--fresh`` starts over; a JSON made with
other settings, or holding runs outside the grid asked for, is refused rather than replaced);
``--from-json`` only re-renders.

    python benchmarks/block_size_accuracy.py [--epochs 30] [--seeds 2] [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from grid_runs import run_grid  # noqa: E402
from provenance import cpu_model, git_state, package_versions  # noqa: E402
from results_files import FRESH_HELP, RESULTS, resumable_runs  # noqa: E402

DOCS_PAGE = os.path.join(ROOT, "docs", "block-size.md")
DOCS_IMG = os.path.join(ROOT, "docs", "img", "block_size_accuracy.png")
START, END = "<!-- block-size-results:start -->", "<!-- block-size-results:end -->"
WIDTH = 1024


# ------------------------------------------------------------------------------ one run
def build(block: Optional[int], density: float, fan_in: str, seed: int):
    """The MLP, its sparse middle layer at ``block`` (``None``: dense)."""
    import torch
    from torch import nn
    import itop
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, WIDTH), nn.ReLU(),
                          nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
    if block is not None:
        model = itop.sparsify(model, density, block_size=block, exclude=["1", "5"],
                              fan_in=fan_in, ablation=fan_in == "constant")
    return model


def run_one(spec: Dict[str, Any], epochs: int, update_every: int) -> Dict[str, Any]:
    """Train one configuration (one thread) and return its result."""
    import torch
    import torch.nn.functional as F
    import itop
    from itop.app.data import load_dataset, prepare_batch
    from itop.app.train import lr_at
    from itop.fan_in import row_counts
    torch.set_num_threads(1)
    t0 = time.time()
    ds = load_dataset("mnist1d")
    dense = spec["block"] is None
    model = build(spec["block"], 1.0 - spec["sparsity"], spec["fan_in"], 1000 + spec["seed"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    bs, n = 100, len(ds.train_x)
    steps_per_epoch = n // bs
    total = steps_per_epoch * epochs
    mgr = None
    if not dense:
        mgr = itop.TopologyManager(model, opt, update_every=update_every, total_steps=total,
                                   growth="gradient", seed=spec["seed"],
                                   fan_in=spec["fan_in"], ablation=spec["fan_in"] == "constant")
    g = torch.Generator().manual_seed(spec["seed"])
    x_test = prepare_batch(ds, ds.test_x, train=False, device=torch.device("cpu"))
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            b = order[i * bs:(i + 1) * bs]
            x = prepare_batch(ds, ds.train_x[b], train=False, device=torch.device("cpu"))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, 0.1)
            loss = F.cross_entropy(model(x), ds.train_y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if mgr is not None:
                mgr.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == ds.test_y).float().mean())
    out = {**spec, "key": key(spec), "test_acc": acc, "steps": step,
           "seconds": time.time() - t0}
    if mgr is not None:
        layer = mgr.layers[0][1]
        counts = row_counts(layer.block_mask)
        out.update(itop_rate=mgr.itop_rate, density=layer.density,
                   live_rows=int((counts > 0).sum()), rows=int(counts.numel()))
    return out


def _worker(args) -> Dict[str, Any]:
    return run_one(*args)


def key(spec: Dict[str, Any]) -> str:
    """A run's name."""
    return f"b{spec['block']}-s{spec['sparsity']}-{spec['fan_in']}-seed{spec['seed']}"


def grid(blocks: Sequence[int], sparsities: Sequence[float], seeds: int
         ) -> List[Dict[str, Any]]:
    """Constant fan-in and any-fan-in runs for every block and sparsity, then dense."""
    specs = []
    for seed in range(seeds):
        for sp in sparsities:
            for bl in blocks:
                for fan in ("any", "constant"):
                    specs.append({"block": bl, "sparsity": sp, "fan_in": fan, "seed": seed})
        specs.append({"block": None, "sparsity": 0.0, "fan_in": "any", "seed": seed})
    return specs


# ------------------------------------------------------------------------------ speed side
def cpu_speedups(path: str) -> Dict[Tuple[int, float], float]:
    """``{(block, density): dense median / ours median}`` at 2 threads from bench_cpu's JSON."""
    if not os.path.exists(path):
        return {}
    rows = json.load(open(path, encoding="utf-8"))["rows"]
    dense = {r["density"]: r["median_s"] for r in rows
             if r["method"] == "dense" and r["threads"] == 2}
    out = {}
    for r in rows:
        if r["threads"] == 2 and r["method"].startswith("ours_b") and r["density"] in dense:
            out[(int(r["method"][6:]), r["density"])] = dense[r["density"]] / r["median_s"]
    return out


def gpu_speedups(path: str) -> Dict[Tuple[int, float], float]:
    """``{(block, density): speedup vs dense}`` of ours, bf16 fwd+bwd, from bench_linear."""
    if not os.path.exists(path):
        return {}
    rows = json.load(open(path, encoding="utf-8"))["rows"]
    return {(r["block"], r["density"]): r["speedup_vs_dense"] for r in rows
            if r["method"] == "ours" and r["dtype"] == "bf16" and r["phase"] == "fwd+bwd"}


# ------------------------------------------------------------------------------ report
def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def _cell(runs: List[Dict[str, Any]]) -> str:
    if not runs:
        return "-"
    accs = [100 * r["test_acc"] for r in runs]
    spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
    return f"{_mean(accs):.1f}{spread}"


def table(results: List[Dict[str, Any]], cpu: Dict, gpu: Dict) -> str:
    """Accuracy per (sparsity, block, fan-in) beside the measured speedups."""
    dense = [r for r in results if r["block"] is None]
    sps = sorted({r["sparsity"] for r in results if r["block"] is not None})
    blocks = sorted({r["block"] for r in results if r["block"] is not None})
    lines = ["| sparsity | block | test acc. %, any fan-in | test acc. %, constant fan-in "
             "| live rows (CFI) | density % (any / CFI) | ITOP rate (any / CFI) | CPU speedup "
             "| H100 speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for sp in sps:
        for bl in blocks:
            sel = {f: [r for r in results if r["block"] == bl and r["sparsity"] == sp and
                       r["fan_in"] == f] for f in ("any", "constant")}
            d = round(1.0 - sp, 4)
            c = cpu.get((bl, d))
            gp = gpu.get((bl, d))
            live = (f"{sel['constant'][0]['live_rows']} of {sel['constant'][0]['rows']}"
                    if sel["constant"] else "-")
            dens = " / ".join(f"{100 * _mean([r['density'] for r in sel[f]]):.1f}" if sel[f]
                              else "-" for f in ("any", "constant"))
            rates = " / ".join(f"{_mean([r['itop_rate'] for r in sel[f]]):.2f}" if sel[f]
                               else "-" for f in ("any", "constant"))
            lines.append(
                f"| {100 * sp:.0f} % | {bl} | {_cell(sel['any'])} | {_cell(sel['constant'])} | "
                f"{live} | {dens} | {rates} | "
                f"{f'{c:.1f}×' if c else '-'} | {f'{gp:.1f}×' if gp else '-'} |")
    summary = []
    for sp in sps:
        per = {(bl, f): _mean([100 * r["test_acc"] for r in results if r["block"] == bl and
                               r["sparsity"] == sp and r["fan_in"] == f])
               for bl in blocks for f in ("any", "constant")}
        anys = [per[(bl, "any")] for bl in blocks]
        diff = _mean([per[(bl, "constant")] - per[(bl, "any")] for bl in blocks])
        summary.append(f"at {100 * sp:.0f} % sparsity the any-fan-in means span "
                       f"{min(anys):.1f}–{max(anys):.1f} % over block sizes "
                       f"{blocks[0]}–{blocks[-1]} (block {blocks[-1]} minus block {blocks[0]}: "
                       f"{per[(blocks[-1], 'any')] - per[(blocks[0], 'any')]:+.1f} points), and "
                       f"constant fan-in is {diff:+.1f} points from any fan-in on average")
    lines.append("")
    lines.append("Summary: " + "; ".join(summary) + ".")
    return ("\n".join(lines) + f"\n\nDense: {_cell(dense)} % ({len(dense)} seeds). Speedups: "
            "forward + backward of one sparse linear layer against dense at the same density: "
            "CPU from `benchmarks/results/cpu_linear.json` (4096×4096, batch 512, fp32, 2 "
            "threads, medians), H100 from `benchmarks/results/linear_gpu_h100.json` "
            "(4096×4096, M = 16384, bf16); \"-\" where that benchmark has no such point "
            "(block 1 has no GPU kernel).\n")


def plot(results: List[Dict[str, Any]], path: str, title: str) -> None:
    """Accuracy against block size, one panel per sparsity, any vs constant fan-in."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sps = sorted({r["sparsity"] for r in results if r["block"] is not None})
    blocks = sorted({r["block"] for r in results if r["block"] is not None})
    dense = _mean([100 * r["test_acc"] for r in results if r["block"] is None])
    fig, axes = plt.subplots(1, len(sps), figsize=(4.6 * len(sps), 3.8), squeeze=False,
                             sharey=True)
    for ax, sp in zip(axes[0], sps):
        for fan, color, mk in (("any", "tab:gray", "o"), ("constant", "tab:red", "^")):
            xs, ys = [], []
            for i, bl in enumerate(blocks):
                runs = [r for r in results if r["block"] == bl and r["sparsity"] == sp and
                        r["fan_in"] == fan]
                if not runs:
                    continue
                ax.scatter([i] * len(runs), [100 * r["test_acc"] for r in runs], color=color,
                           marker=mk, alpha=0.35, s=18)
                xs.append(i)
                ys.append(_mean([100 * r["test_acc"] for r in runs]))
            ax.plot(xs, ys, color=color, marker=mk, label=f"{fan} fan-in")
        if not math.isnan(dense):
            ax.axhline(dense, color="k", ls="--", lw=1, label="dense")
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_xlabel("block size")
        ax.set_title(f"{100 * sp:.0f} % sparsity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(data: Dict[str, Any], docs: bool) -> str:
    """The Markdown section, the plot, and (with ``docs``) the docs page's generated part."""
    meta, results = data["meta"], data["results"]
    s = meta["settings"]
    png = os.path.join(RESULTS, "block_size_accuracy.png")
    plot(results, png, f"MNIST-1D, MLP 40-{WIDTH}-{WIDTH}-10, RigL-ITOP, {s['epochs']} epochs")
    cpu = cpu_speedups(os.path.join(RESULTS, "cpu_linear.json"))
    gpu = gpu_speedups(os.path.join(RESULTS, "linear_gpu_h100.json"))
    env = meta["env"]
    section = (
        f"Generated by `benchmarks/block_size_accuracy.py` on {env['device']} (torch "
        f"{env['versions'].get('torch')}, commit {env['git']['commit'][:10]}"
        f"{', itop/ modified' if env['git'].get('code_dirty') else ''}): {len(results)} runs, "
        f"{meta.get('grid_seconds', 0) / 60:.1f} min of wall clock ({s['jobs']} at a time). "
        f"MLP 40→{WIDTH}→{WIDTH}→10, only the {WIDTH}×{WIDTH} layer sparse, RigL-ITOP "
        f"(ΔT {s['update_every']}), {s['epochs']} epochs, {s['seeds']} seeds; final test "
        f"accuracy, mean ± std over seeds.\n\n" + table(results, cpu, gpu) +
        "\n![accuracy against block size](img/block_size_accuracy.png)\n")
    with open(os.path.join(RESULTS, "block_size_accuracy.md"), "w", encoding="utf-8") as f:
        f.write("# Accuracy against block size\n\n" + section.replace("](img/", "](")
                .replace("block_size_accuracy.png)", "block_size_accuracy.png)"))
    if docs:
        os.makedirs(os.path.dirname(DOCS_IMG), exist_ok=True)
        shutil.copyfile(png, DOCS_IMG)
        if os.path.exists(DOCS_PAGE):
            with open(DOCS_PAGE, encoding="utf-8") as f:
                text = f.read()
            if START in text and END in text:
                text = (text[:text.index(START) + len(START)] + "\n" + section +
                        text[text.index(END):])
                with open(DOCS_PAGE, "w", encoding="utf-8") as f:
                    f.write(text)
    return section


# ------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the grid (or re-render it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 16, 32, 64])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--update-every", type=int, default=25)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help=FRESH_HELP)
    p.add_argument("--from-json", action="store_true")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "block_size_accuracy.json")
    if args.from_json:
        write_outputs(json.load(open(path, encoding="utf-8")), not args.no_docs)
        return 0
    settings = {"epochs": args.epochs, "seeds": args.seeds, "blocks": args.blocks,
                "sparsities": args.sparsities, "update_every": args.update_every,
                "jobs": args.jobs}
    import torch
    meta = {"env": {"device": f"{cpu_model()} ({os.cpu_count()} cores)",
                    "versions": {**package_versions("numpy"), "torch": torch.__version__},
                    "git": git_state("itop", "itop_kernels"), "argv": sys.argv},
            "settings": settings}
    specs = grid(args.blocks, args.sparsities, args.seeds)
    done = resumable_runs(p, path, args.fresh, {key(s) for s in specs},
                          lambda old: (old["epochs"], old["update_every"]) ==
                          (args.epochs, args.update_every))
    results = [done[key(s)] for s in specs if key(s) in done]
    todo = [s for s in specs if key(s) not in done]
    print(f"{len(specs)} runs, {len(results)} done, {len(todo)} to run", flush=True)
    prior = sum(r["seconds"] for r in results) / max(1, args.jobs)
    t0 = time.time()

    def save():
        meta["grid_seconds"] = prior + time.time() - t0
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        os.replace(path + ".tmp", path)

    work = [(s, args.epochs, args.update_every) for s in todo]

    def finished(i: int, r: Dict[str, Any]) -> None:
        results.append(r)
        save()
        print(f"[{i}/{len(work)}] {r['key']}: {100 * r['test_acc']:.1f} % "
              f"({r['seconds']:.0f} s)", flush=True)

    run_grid(work, _worker, args.jobs, finished, maxtasksperchild=4)
    save()
    write_outputs({"meta": meta, "results": results}, not args.no_docs)
    print(f"grid: {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
