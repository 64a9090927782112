"""End-to-end CPU training step: sparse (RigL, topology updates included) against dense (issue 9, item 5).

The model is MLP-heavy: ``repeats`` × [Linear 1024→4096, ReLU, Linear 4096→1024, ReLU], then a
dense head Linear 1024→10. SGD with momentum 0.9, cross-entropy, a few pre-generated random
batches (fixed seed; the same data for every model).

Models, all built from the same initial weights and trained in the same run on the same data:
- ``dense``: the model unsparsified;
- ``block B`` for each ``--blocks`` B: ``itop.sparsify(model, density, distribution="uniform",
  block_size=B, exclude=[head])`` and a RigL ``TopologyManager(update_every=25,
  growth="gradient", prune_rate=0.3, schedule="constant", total_steps=10**9)``.

Timing: for each thread count (``torch.set_num_threads``), every model is warmed up (its first
topology update included), then the models take turns running windows of ``--window``
consecutive steps (50 by default, so exactly 2 topology updates fall inside each sparse window;
the turn order rotates every round so machine noise hits all models). A step is forward,
``zero_grad``, backward, ``opt.step()`` and ``mgr.step()``; the window time divided by its
length is the per-step time, topology updates included. The time spent inside ``mgr.step()``
is recorded separately for every step; on update steps it is the topology update, and its sum
over a window divided by the window time is the update share. Per-step times are kept too:
the "+hooks share" is the sum over update steps of (step time - median plain step time) over
the window time, so it also counts the growth-score hooks that run in an update step's backward.

    python benchmarks/bench_train_cpu.py [--quick] [--threads 1 2] [--blocks 32 1] [--out PATH]

The committed results come from ``--blocks 32 16 64 1 --rounds 3`` (about 4 minutes on the
2-core machine).

Writes ``benchmarks/results/train_cpu.json`` (raw window and update times, device, versions, git
commit, argv, load averages) and ``train_cpu.png``, and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
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

UPDATE_EVERY = 25


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 repeat, window 25, 1 round, 1 thread, blocks 32 and 1")
    ap.add_argument("--repeats", type=int, default=2, help="number of 1024→4096→1024 blocks")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-batches", type=int, default=4, help="pre-generated batches, cycled")
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 1])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--window", type=int, default=50,
                    help="steps per timed window (a multiple of 25 puts a fixed number of "
                         "topology updates in every window)")
    ap.add_argument("--rounds", type=int, default=2, help="timed windows per model per thread count")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=None,
                    help="JSON path (default train_cpu[_quick].json in --out-dir)")
    ap.add_argument("--out-dir", default=None, help=OUT_DIR_HELP)
    ap.add_argument("--png", default=None, help="default: the JSON path with .png")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a = ap.parse_args(argv)
    if a.quick:
        a.repeats, a.window, a.rounds, a.threads = 1, 25, 1, [1]
    if a.out is None:
        a.out = str(results_path(f"train_cpu{'_quick' if a.quick else ''}.json", a.out_dir))
    refuse_overwrite(ap, a.overwrite, a.out, a.png or Path(a.out).with_suffix(".png"))
    return a


def build_model(a) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(a.repeats):
        layers += [nn.Linear(a.width, a.hidden), nn.ReLU(), nn.Linear(a.hidden, a.width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(a.width, 10))


class Runner:
    """One model with its optimizer, its topology manager (sparse only) and its timings."""

    def __init__(self, name, model, mgr, opt, data):
        self.name, self.model, self.mgr, self.opt, self.data = name, model, mgr, opt, data
        self.i = 0
        self.step_count = 0
        self.updates = 0

    def step(self):
        x, y = self.data[self.i % len(self.data)]
        self.i += 1
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        t0 = time.perf_counter()
        changed = bool(self.mgr.step()) if self.mgr is not None else False
        dt = time.perf_counter() - t0
        self.step_count += 1
        self.updates += changed
        return changed, dt

    def window(self, n):
        """Run ``n`` consecutive steps; return (window time, mgr.step times on update steps,
        mgr.step time summed over all steps, number of updates)."""
        upd, mgr_total, nupd, steps, flags = [], 0.0, 0, [], []
        t0 = time.perf_counter()
        last = t0
        for _ in range(n):
            changed, dt = self.step()
            now = time.perf_counter()
            steps.append(now - last)
            flags.append(changed)
            last = now
            mgr_total += dt
            if changed:
                upd.append(dt)
                nupd += 1
        return time.perf_counter() - t0, upd, mgr_total, nupd, steps, flags


def make_runners(a, data):
    runners = []
    dense = build_model(a)
    runners.append(Runner("dense", dense, None,
                          torch.optim.SGD(dense.parameters(), lr=a.lr, momentum=0.9), data))
    head = str(4 * a.repeats)
    for b in a.blocks:
        m = build_model(a)  # same initial weights as dense
        itop.sparsify(m, a.density, distribution="uniform", block_size=b, exclude=[head])
        opt = torch.optim.SGD(m.parameters(), lr=a.lr, momentum=0.9)
        mgr = itop.TopologyManager(m, opt, update_every=UPDATE_EVERY, prune_rate=0.3,
                                   schedule="constant", total_steps=10 ** 9, growth="gradient")
        runners.append(Runner(f"block {b}", m, mgr, opt, data))
    return runners


def bench_threads(a, runners, nt, bar):
    torch.set_num_threads(nt)
    load_before = os.getloadavg()
    # warm-up: a few steps per model; a sparse model runs until it has done at least one
    # topology update under this thread count (the first one also builds any lazy state).
    warm = {}
    for r in runners:
        t0 = time.perf_counter()
        n = 0
        if r.mgr is None:
            for _ in range(3):
                r.step()
                n += 1
        else:
            seen = 0
            while n < 3 or seen == 0:
                changed, _ = r.step()
                seen += changed
                n += 1
        warm[r.name] = {"steps": n, "s": time.perf_counter() - t0}
        if bar:
            bar.set_postfix_str(f"{nt}T warm {r.name}")
    rows = {r.name: {"window_s": [], "update_s": [], "mgr_step_total_s": [], "updates": [],
                     "step_s": [], "update_step_flags": []} for r in runners}
    order = list(runners)
    for rnd in range(a.rounds):
        k = rnd % len(order)
        for r in order[k:] + order[:k]:
            w, upd, mgr_total, nupd, steps, flags = r.window(a.window)
            row = rows[r.name]
            row["step_s"].append(steps)
            row["update_step_flags"].append(flags)
            row["window_s"].append(w)
            row["update_s"].append(upd)
            row["mgr_step_total_s"].append(mgr_total)
            row["updates"].append(nupd)
            if bar:
                bar.set_postfix_str(f"{nt}T {r.name} {1e3 * w / a.window:.1f} ms/step")
                bar.update(1)
    out = []
    for r in runners:
        row = rows[r.name]
        per_step = [w / a.window for w in row["window_s"]]
        share = [m / w for m, w in zip(row["mgr_step_total_s"], row["window_s"])]
        upd_all = [u for us in row["update_s"] for u in us]
        # the whole cost of an update step over a plain one (growth-score hooks in the
        # backward + the update in mgr.step()), as a share of the window time
        plain = [t for ts, fs in zip(row["step_s"], row["update_step_flags"])
                 for t, f in zip(ts, fs) if not f]
        plain_med = statistics.median(plain)
        full_share = [sum(t - plain_med for t, f in zip(ts, fs) if f) / w
                      for ts, fs, w in zip(row["step_s"], row["update_step_flags"],
                                           row["window_s"])]
        out.append({"model": r.name, "threads": nt, "warmup": warm[r.name], **row,
                    "step_median_s": statistics.median(per_step),
                    "step_mean_s": statistics.fmean(per_step),
                    "update_share_median": statistics.median(share),
                    "plain_step_median_s": plain_med,
                    "update_step_extra_share_median": statistics.median(full_share),
                    "update_median_s": statistics.median(upd_all) if upd_all else None})
    load_after = os.getloadavg()
    dense = next(o for o in out if o["model"] == "dense")
    for o in out:
        o["speedup_median"] = dense["step_median_s"] / o["step_median_s"]
        o["speedup_mean"] = dense["step_mean_s"] / o["step_mean_s"]
    return {"threads": nt, "torch_num_threads": torch.get_num_threads(),
            "loadavg_before": load_before, "loadavg_after": load_after, "rows": out}


def _table(result) -> str:
    lines = [f"{'threads':>7} {'model':>9} {'median ms/step':>15} {'mean ms/step':>13} "
             f"{'speedup':>8} {'update share':>13} {'+hooks share':>13} {'update ms':>10}"]
    for t in result["per_threads"]:
        for o in t["rows"]:
            um = f"{1e3 * o['update_median_s']:.1f}" if o["update_median_s"] is not None else "-"
            lines.append(f"{t['threads']:>7} {o['model']:>9} {1e3 * o['step_median_s']:>15.1f} "
                         f"{1e3 * o['step_mean_s']:>13.1f} {o['speedup_median']:>7.2f}x "
                         f"{100 * o['update_share_median']:>12.1f}% "
                         f"{100 * o['update_step_extra_share_median']:>12.1f}% {um:>10}")
    return "\n".join(lines)


def _plot(result, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    per = result["per_threads"]
    models = [o["model"] for o in per[0]["rows"]]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 + 1.1 * len(models) * len(per)), 5))
    width = 0.8 / len(per)
    for j, t in enumerate(per):
        xs = [i + (j - (len(per) - 1) / 2) * width for i in range(len(models))]
        step = [1e3 * o["step_median_s"] for o in t["rows"]]
        upd = [s * o["update_share_median"] for s, o in zip(step, t["rows"])]
        rest = [s - u for s, u in zip(step, upd)]
        ax.bar(xs, rest, width, label=f"{t['threads']} thread(s): step w/o topology update",
               color=f"C{j}")
        ax.bar(xs, upd, width, bottom=rest, color=f"C{j}", alpha=0.45, hatch="//",
               label=f"{t['threads']} thread(s): topology update (mgr.step)")
        for x, s, o in zip(xs, step, t["rows"]):
            ax.annotate(f"{s:.0f} ms\n{o['speedup_median']:.1f}x", (x, s), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models)
    ax.set_ylabel("median time per training step (ms)")
    m = result["meta"]
    ax.set_title(f"MLP {m['repeats']}×(1024→4096→1024)+head, batch {m['batch']}, density "
                 f"{m['density']}, RigL every 25\n{m['device']}", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.manual_seed(1234)
    data = [(torch.randn(a.batch, a.width), torch.randint(0, 10, (a.batch,)))
            for _ in range(a.n_batches)]
    runners = make_runners(a, data)
    load_start = os.getloadavg()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    total = len(a.threads) * a.rounds * len(runners)
    bar = tqdm(total=total, desc="windows", file=sys.stderr) if tqdm and not a.no_progress else None
    t_start = time.time()
    per = [bench_threads(a, runners, nt, bar) for nt in a.threads]
    if bar:
        bar.close()
    result = {
        "meta": {
            "benchmark": "train_cpu", "device": f"{cpu_model()} ({os.cpu_count()} cores)",
            "cpu_count": os.cpu_count(), "versions": package_versions("torch", "numpy"),
            "git": git_state("itop", "itop_kernels", "benchmarks/bench_train_cpu.py"),
            "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_s": time.time() - t_start, "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(), "repeats": a.repeats, "width": a.width,
            "hidden": a.hidden, "batch": a.batch, "n_batches": a.n_batches,
            "density": a.density, "distribution": "uniform", "blocks": a.blocks,
            "window_steps": a.window, "rounds": a.rounds, "update_every": UPDATE_EVERY,
            "prune_rate": 0.3, "growth": "gradient", "optimizer": "SGD(lr, momentum=0.9)",
            "lr": a.lr, "dtype": "float32",
            "timing": "per-step = window time / window steps, window = consecutive steps incl. "
                      "topology updates; update share = time inside mgr.step() / window time; "
                      "+hooks share = sum over update steps of (step time - median plain step "
                      "time) / window time (adds the growth-score hooks in that backward)",
            "targets": {"block 32": 3.0, "block 1": 2.0},
        },
        "per_threads": per,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    png = Path(a.png) if a.png else out.with_suffix(".png")
    _plot(result, png)
    print(_table(result))
    for t in per:
        for o in t["rows"]:
            tgt = result["meta"]["targets"].get(o["model"])
            if tgt:
                ok = "met" if o["speedup_median"] >= tgt else "MISSED"
                print(f"{t['threads']} thread(s) {o['model']}: {o['speedup_median']:.2f}x dense "
                      f"(target {tgt}x: {ok})")
    print(f"load average start {load_start}, end {result['meta']['loadavg_end']}; "
          f"wall {result['meta']['wall_s']:.0f} s")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
