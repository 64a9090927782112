"""How long the README's first command takes: one plain ``itop train``, timed from the shell.

Runs ``python -m itop train --no-progress --out <temporary dir>`` (the defaults: sparse 1-D CNN
on MNIST-1D, RigL-ITOP, 90 % sparsity, block 1, 50 epochs) in a subprocess, so the time counts
the imports and the generation of MNIST-1D as a user's would. Writes the wall time, the run's
``final`` record, what the command printed, and the machine, versions, git commit and load
averages to ``benchmarks/results/itop_train_default_cpu.json``; ``benchmarks/render_docs.py``
quotes it in the README and the docs.

    python benchmarks/time_default_train.py [--out PATH] [-- EXTRA ITOP TRAIN OPTIONS]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import ROOT, cpu_model, git_state, package_versions
from results_files import OVERWRITE_HELP, refuse_overwrite


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/itop_train_default_cpu.json"))
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("extra", nargs="*", help="more `itop train` options (after --)")
    a = p.parse_args(argv)
    refuse_overwrite(p, a.overwrite, a.out)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from itop.app.run_files import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "itop", "train", "--no-progress", "--out", run_dir, *a.extra]
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return proc.returncode
        records = read_metrics(run_dir)
    final = next(r for r in records if r["type"] == "final")
    config = next(r for r in records if r["type"] == "config")
    printed = [ln.replace(run_dir, "runs/<timestamp>") for ln in proc.stdout.splitlines()]
    result = {
        "benchmark": "time_default_train.py: one plain `itop train`, wall time from the shell",
        "device": f"{cpu_model()} ({os.cpu_count()} cores)",
        "cores": os.cpu_count(),
        "versions": package_versions("torch", "numpy", "mnist1d"),
        "git": git_state("itop", "itop_kernels"),
        "argv": ["itop", "train", *a.extra],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "wall_s": wall,
        "config": config,
        "final": final,
        "printed": printed,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(printed))
    print(f"\nwall time from the shell: {wall:.1f} s (load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f}); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
