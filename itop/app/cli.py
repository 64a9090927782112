"""The ``itop`` command line: ``itop train``, ``itop report RUN_DIR``, ``itop bench``.

``itop train`` mirrors the options of the ITOP reference code (``--density``, ``--growth``,
``--prune-rate`` (its ``--death-rate``), ``--update-every`` (its ``--update_frequency``),
``--distribution`` (its ``--sparse_init``), ``--multiplier``, ...), plus ``--block-size``,
``--dense``/``--static`` and output/resume options. A plain ``itop train`` trains a sparse 1-D
CNN on MNIST-1D with RigL-ITOP at 90 % unstructured sparsity (block size 1, the paper's
setting) in about a minute on two CPU cores. Block size 1 is the default because block 16
makes this small CNN's DST runs collapse in some seeds (see benchmarks/results/
paper_mnist1d.md); ``--block-size 16`` runs the block kernels. It also runs
under ``torchrun --nproc_per_node N -m itop train ...`` (DDP).

Errors in the arguments or the data print one ``itop <command>: error: ...`` line and exit
with status 2, without a traceback (``ITOP_DEBUG=1`` re-raises them instead).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from typing import Callable, List, Optional, Sequence

__all__ = ["main", "build_parser"]

GROWTH = ("gradient", "random", "momentum", "random_unfired")
DISTRIBUTIONS = ("erk", "er", "uniform")
PRECISIONS = ("auto", "exact", "bf16")  # itop_kernels.block_norms.PRECISIONS


# ------------------------------------------------------------------------------ arg types
def _number(kind: Callable, test: Callable[[float], bool], what: str) -> Callable[[str], object]:
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(v, float) and math.isnan(v) or not test(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v
    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
density_type = _number(float, lambda v: 0.0 < v <= 1.0, "a density in (0, 1]")
unit_interval = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
positive_float = _number(float, lambda v: v > 0.0, "a positive number")
nonneg_float = _number(float, lambda v: v >= 0.0, "a number >= 0")


def device_type(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda or cuda:N)")
    return text


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The ``itop`` argument parser (sub-commands train, report, bench)."""
    from .data import DATASETS
    from .models import MODELS
    from ..fan_in import FAN_IN_MODES
    from .train import TrainConfig
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="itop", description="Dynamic sparse training with In-Time Over-Parameterization "
                                 "on block-sparse kernels.")
    sub = p.add_subparsers(dest="command", metavar="{train,report,bench}")
    sub.required = True

    t = sub.add_parser("train", help="train a model (sparse by default)",
                       description="Train a paper model with dense, static sparse or dynamic "
                                   "sparse (SET-/RigL-ITOP) training.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = t.add_argument_group("model and data")
    g.add_argument("--model", choices=sorted(MODELS), default=d.model)
    g.add_argument("--data", choices=sorted(DATASETS), default=d.data)
    g.add_argument("--data-dir", default=None,
                   help="where data sets are cached/read (default $ITOP_DATA or ~/.cache/itop)")
    g = t.add_argument_group("sparsity")
    g.add_argument("--density", type=density_type, default=d.density,
                   help="overall density of the sparse layers (0.1 = 90%% sparsity)")
    g.add_argument("--distribution", choices=DISTRIBUTIONS, default=d.distribution,
                   help="per-layer densities (the reference's --sparse_init)")
    g.add_argument("--block-size", type=positive_int, default=d.block_size,
                   help="block side; 1 = unstructured (element-level) sparsity")
    g.add_argument("--growth", choices=GROWTH, default=d.growth,
                   help="gradient = RigL-ITOP, random = SET-ITOP")
    g.add_argument("--score-precision", choices=PRECISIONS, default=d.score_precision,
                   help="arithmetic of RigL's dense-gradient scores: auto = bf16 where the "
                        "device multiplies bf16 natively, exact = the model's dtype")
    g.add_argument("--prune-rate", type=unit_interval, default=d.prune_rate,
                   help="initial fraction of active weights replaced per update "
                        "(the reference's --death-rate; cosine-decayed)")
    g.add_argument("--update-every", type=positive_int, default=d.update_every,
                   help="steps between topology updates (ΔT, the reference's "
                        "--update_frequency)")
    g.add_argument("--fan-in", choices=FAN_IN_MODES, default=d.fan_in,
                   help="'constant': every row of a layer (block-row, or output unit at block "
                        "size 1) keeps the same number of active units through training "
                        "(SRigL-style; see docs/block-size.md)")
    g.add_argument("--ablation", action="store_true",
                   help="with --fan-in constant: when the budget cannot give every row a unit, "
                        "keep fewer live rows (explicitly empty ones) instead of refusing")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--dense", action="store_true", help="dense baseline (no sparsity)")
    mode.add_argument("--static", action="store_true",
                      help="static sparse training (no exploration)")
    g = t.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=d.epochs)
    g.add_argument("--multiplier", type=positive_int, default=d.multiplier,
                   help="extended training: epochs × multiplier (ITOP)")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="global batch size (split over torchrun processes)")
    g.add_argument("--lr", type=positive_float, default=d.lr,
                   help="learning rate; ×0.1 after 1/2 and after 3/4 of training")
    g.add_argument("--momentum", type=unit_interval, default=d.momentum)
    g.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay)
    g.add_argument("--label-smoothing", type=unit_interval, default=d.label_smoothing)
    g.add_argument("--seed", type=nonneg_int, default=d.seed)
    g.add_argument("--device", type=device_type, default=d.device)
    g.add_argument("--amp", action="store_true",
                   help="mixed precision (bf16 autocast on CPU, fp16 + GradScaler on CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: 1 for small models, else torch's)")
    g = t.add_argument_group("output")
    g.add_argument("--out", default=None, help="run directory (default runs/<timestamp>)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from a checkpoint (a file or run directory; default --out)")
    g.add_argument("--stop-after-epoch", type=positive_int, default=None,
                   help="stop after this epoch as if interrupted (resume later)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plots", action="store_true", help="do not render the PNG plots")

    r = sub.add_parser("report", help="re-render the plots and print the summary of a run",
                       description="Re-render the PNG plots of a run directory and print its "
                                   "per-epoch, final and per-layer tables.")
    r.add_argument("run_dir", help="a directory written by itop train")

    b = sub.add_parser("bench", help="run the benchmark scripts (quick mode) and print them",
                       description="Run benchmarks/bench_*.py (with --quick where supported) "
                                   "and print their tables.")
    b.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these scripts (e.g. bench_conv)")
    b.add_argument("--full", action="store_true", help="full sweeps instead of --quick")
    b.add_argument("--list", action="store_true", help="list the scripts and exit")
    b.add_argument("--benchmarks-dir", default=None, help="where the bench_*.py scripts are")
    return p


# ------------------------------------------------------------------------------ commands
def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train import TrainConfig, train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.resume == "auto" and args.out is None:
        parser.error("--resume without a PATH needs --out DIR (the run to continue)")
    out = args.out
    if out is None:
        if args.resume not in (None, "auto"):
            out = args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume)
        elif world > 1:
            parser.error("under torchrun, give --out DIR (every process must agree on it)")
        else:
            out = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    cfg = TrainConfig(
        model=args.model, data=args.data, data_dir=args.data_dir, density=args.density,
        distribution=args.distribution, block_size=args.block_size, growth=args.growth,
        score_precision=args.score_precision, fan_in=args.fan_in, ablation=args.ablation,
        prune_rate=args.prune_rate, update_every=args.update_every, dense=args.dense,
        static=args.static, epochs=args.epochs, multiplier=args.multiplier,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, seed=args.seed,
        device=args.device, amp=args.amp, compile=args.compile, threads=args.threads, out=out,
        resume=args.resume, stop_after_epoch=args.stop_after_epoch,
        progress=not args.no_progress, plots=not args.no_plots)
    final = train(cfg)
    if _rank() == 0:
        print(format_final(final, out))
    return 0


def format_final(final: dict, out: str) -> str:
    """The closing lines of ``itop train``."""
    lines = []
    if not final["finished"]:
        lines.append(f"stopped after epoch {final['epochs_done']} (resume with --resume)")
    lines += [
        f"test accuracy   {100 * final['test_acc']:.2f} %",
        f"ITOP rate       {final['itop_rate']:.4f}  (explored fraction of the sparse layers' "
        f"weights; their density {final['density']:.4f})",
        f"FLOP fraction   training {final['training_flop_fraction']:.4f}, "
        f"inference {final['inference_flop_fraction']:.4f}  (of dense)",
        f"wall time       {final['wall_time']:.1f} s",
        f"run directory   {out}",
    ]
    return "\n".join(lines)


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in
                               enumerate(zip(r, widths))) for r in rows)


def _cmd_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .plots import layer_rows, render_plots
    from .run_files import METRICS, read_metrics
    if not os.path.isfile(os.path.join(args.run_dir, METRICS)):
        parser.error(f"run_dir {args.run_dir!r} has no {METRICS}")
    records = read_metrics(args.run_dir)
    cfg = next((r for r in records if r["type"] == "config"), {})
    if cfg:
        mode = "dense" if cfg["dense"] else ("static" if cfg["static"] else cfg["growth"])
        print(f"{cfg['model']} on {cfg['data']}: {mode}, density {cfg['density']}, block "
              f"{cfg['block_size']}, update every {cfg['update_every']}, "
              f"{cfg['epochs']}×{cfg['multiplier']} epochs, seed {cfg['seed']}")
    rows = [["epoch", "lr", "train loss", "train acc", "test loss", "test acc", "ITOP rate"]]
    for r in records:
        if r["type"] == "epoch":
            rows.append([str(r["epoch"]), f"{r['lr']:.3g}", f"{r['train_loss']:.4f}",
                         f"{100 * r['train_acc']:.2f}", f"{r['test_loss']:.4f}",
                         f"{100 * r['test_acc']:.2f}", f"{r['itop_rate']:.4f}"])
    print(_table(rows))
    layers, final = layer_rows(args.run_dir)
    if final:
        print()
        print(format_final(final, args.run_dir))
    if layers:
        lrows = [["layer", "shape", "block", "density", "ITOP rate"]]
        for r in layers:
            lrows.append([r["name"], "x".join(map(str, r["shape"])),
                          str(r.get("block_size") or "-"), f"{r['density']:.4f}",
                          f"{r['itop_rate']:.4f}" if r.get("itop_rate") is not None else "-"])
        print()
        print(_table(lrows))
    paths = render_plots(args.run_dir)
    print("\nplots: " + ", ".join(paths))
    return 0


def default_benchmarks_dir() -> str:
    """``benchmarks/`` next to the ``itop`` package (a source checkout)."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(checkout, "benchmarks")


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    bdir = args.benchmarks_dir or default_benchmarks_dir()
    if not os.path.isdir(bdir):
        parser.error(f"no benchmarks directory at {bdir} (the scripts ship with the source "
                     "checkout; pass --benchmarks-dir)")
    scripts = sorted(f[:-3] for f in os.listdir(bdir)
                     if f.startswith("bench_") and f.endswith(".py"))
    if args.only:
        unknown = [n for n in args.only if n.removesuffix(".py") not in scripts]
        if unknown:
            parser.error(f"--only: unknown benchmark(s) {unknown}; available: {scripts}")
        scripts = [s for s in scripts if s in {n.removesuffix(".py") for n in args.only}]
    if args.list:
        print("\n".join(scripts))
        return 0
    failed = []
    for name in scripts:
        path = os.path.join(bdir, name + ".py")
        with open(path, encoding="utf-8") as f:
            quick_ok = "--quick" in f.read()
        cmd = [sys.executable, path] + (["--quick"] if quick_ok and not args.full else [])
        print(f"=== {name} ({' '.join(cmd[2:]) or 'default settings'}) ===", flush=True)
        t0 = time.time()
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(res.stdout.rstrip())
        print(f"=== {name}: exit {res.returncode}, {time.time() - t0:.1f} s ===\n", flush=True)
        if res.returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


#: The packages of the ``cli`` extra (``pip install "itop[cli]"``), by import name.
APP_PACKAGES = ("tqdm", "matplotlib", "mnist1d", "sklearn")


def missing_app_packages() -> List[str]:
    """The import names in :data:`APP_PACKAGES` that are not installed."""
    import importlib.util
    return [name for name in APP_PACKAGES if importlib.util.find_spec(name) is None]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``itop`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_app_packages()
    if missing:
        parser.exit(2, f"itop {args.command}: the application needs packages that are not "
                       f"installed ({', '.join(missing)}); install them with: "
                       f"pip install \"itop[cli]\" (or pip install -e \".[cli]\" in a checkout)\n")
    from .data import DataError
    commands = {"train": _cmd_train, "report": _cmd_report, "bench": _cmd_bench}
    try:
        return commands[args.command](args, parser)
    except (ValueError, FileNotFoundError, DataError) as exc:
        if os.environ.get("ITOP_DEBUG"):
            raise
        sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore
        sub.exit(2, f"{sub.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
