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

A run directory that already holds files is refused unless ``--resume`` (continue it, with
its stored settings) or ``--overwrite``; see docs/reliability.md. ``itop bench`` runs the
benchmark scripts (``--quick`` unless ``--full``), streaming their output, and writes their JSON
and plots into a new directory (``runs/bench-<timestamp>`` or ``--out``), never over the
committed ``benchmarks/results/`` unless ``--out`` names it.

Errors in the arguments, the data or the run files print one ``itop <command>: error: ...``
line and exit with status 2, without a traceback (``ITOP_DEBUG=1`` re-raises them instead).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from typing import Callable, List, Optional, Sequence, Set, Tuple

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
    g.add_argument("--out", default=None,
                   help="run directory (default runs/<timestamp>); a directory that already "
                        "holds files is refused unless --resume or --overwrite")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from a checkpoint (a file or run directory; default --out), "
                        "with its stored settings; only --epochs/--multiplier (longer or "
                        "shorter, not below what is done), --data-dir, --device, --compile and "
                        "--threads may change")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --out directory that already holds a run "
                        "(its itop files are deleted; other files are kept)")
    g.add_argument("--stop-after-epoch", type=positive_int, default=None,
                   help="stop after this epoch as if interrupted (resume later)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plots", action="store_true", help="do not render the PNG plots")

    r = sub.add_parser("report", help="re-render the plots and print the summary of a run",
                       description="Re-render the PNG plots of a run directory and print its "
                                   "per-epoch, final and per-layer tables.")
    r.add_argument("run_dir", help="a directory written by itop train")

    b = sub.add_parser("bench", help="run the benchmark scripts (quick mode) and print them",
                       description="Run benchmarks/bench_*.py (with --quick where supported), "
                                   "streaming their output, and write their JSON and plots "
                                   "into a new directory (never over benchmarks/results/ "
                                   "unless --out says so).")
    b.add_argument("--out", default=None, metavar="DIR",
                   help="where the scripts write their JSON and PNG files (default "
                        "runs/bench-<timestamp>); a directory that already holds files is "
                        "refused unless --overwrite")
    b.add_argument("--overwrite", action="store_true",
                   help="allow --out to be a directory that already holds files, and let "
                        "the scripts replace theirs there (they get --overwrite)")
    b.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these scripts (e.g. bench_conv)")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="quick settings (the default: about a minute on 2 CPU cores)")
    size.add_argument("--full", action="store_true", help="full sweeps instead of --quick")
    b.add_argument("--list", action="store_true", help="list the scripts and exit")
    b.add_argument("--benchmarks-dir", default=None, help="where the bench_*.py scripts are")
    return p


# ------------------------------------------------------------------------------ commands
def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _new_dir(prefix: str) -> str:
    """``prefix<timestamp>``, with a ``-2``, ``-3``, ... suffix when that exists already."""
    base = prefix + time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def _explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str],
                      command: str) -> Set[str]:
    """The ``dest`` names of the options of ``command`` given on the command line ``argv``
    (parsed again with every default suppressed)."""
    sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    saved = [(a, a.default) for a in sub._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        given = vars(parser.parse_args(list(argv)))
    finally:
        for a, default in saved:
            a.default = default
    return set(given) - {"command"}


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train import TrainConfig, resume_paths, resumed_config, train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.resume == "auto" and args.out is None:
        parser.error("--resume without a PATH needs --out DIR (the run to continue)")
    if args.resume is not None and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    out = args.out
    if out is None:
        if args.resume not in (None, "auto"):
            out = args.resume if os.path.isdir(args.resume) else \
                (os.path.dirname(args.resume) or ".")
        elif world > 1:
            parser.error("under torchrun, give --out DIR (every process must agree on it)")
        else:
            out = _new_dir(os.path.join("runs", ""))
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
        progress=not args.no_progress, plots=not args.no_plots, overwrite=args.overwrite)
    if args.resume is not None:
        # the run's own settings, from its checkpoint, wherever the command line is silent
        from .run_files import load_checkpoint
        path, _ = resume_paths(args.resume, out)
        cfg = resumed_config(cfg, load_checkpoint(path)["config"], args.explicit)
    final = train(cfg)
    if _rank() == 0:
        if final.get("already_finished"):
            print(f"the run in {out} has already finished its {final['epochs_done']} epochs; "
                  "nothing to do, its record is unchanged (to train longer, resume with a "
                  "larger --epochs)")
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
    from .run_files import RunFileError
    try:
        return _report(args, parser)
    except (KeyError, TypeError, IndexError) as exc:  # a record without the fields it needs
        raise RunFileError(f"{args.run_dir}: a record of metrics.jsonl or the checkpoint lacks "
                           f"what itop report needs ({type(exc).__name__}: {exc})") from None


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .plots import layer_rows, render_plots
    from .run_files import CHECKPOINT, METRICS, load_checkpoint, read_metrics
    if not os.path.isfile(os.path.join(args.run_dir, METRICS)):
        parser.error(f"run_dir {args.run_dir!r} has no {METRICS}")
    records = read_metrics(args.run_dir)
    if os.path.exists(os.path.join(args.run_dir, CHECKPOINT)):  # refuse a bad one up front
        load_checkpoint(os.path.join(args.run_dir, CHECKPOINT))
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


def _script_flags(path: str) -> Tuple[bool, bool, bool]:
    """Whether the script at ``path`` takes ``--quick``, ``--out-dir`` and ``--overwrite``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return "--quick" in text, "--out-dir" in text, "--overwrite" in text


def _stream(cmd: List[str], env: dict) -> int:
    """Run ``cmd``, copying its output (stdout and stderr, progress bars included) to our
    stdout as it comes; returns its exit status."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    try:
        while True:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                break
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.stdout.close()
    return proc.wait()


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
    out = args.out or _new_dir(os.path.join("runs", "bench-"))
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        parser.error(f"--out {out} already holds files; pick a new directory, or pass "
                     "--overwrite to let the scripts replace theirs")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"writing results to {out}", flush=True)
    failed = []
    t_all = time.time()
    for i, name in enumerate(scripts, 1):
        path = os.path.join(bdir, name + ".py")
        quick_ok, out_dir_ok, overwrite_ok = _script_flags(path)
        cmd = [sys.executable, path] + (["--quick"] if quick_ok and not args.full else [])
        if out_dir_ok:
            cmd += ["--out-dir", out]
        if args.overwrite and overwrite_ok:   # the user let the scripts replace their files
            cmd += ["--overwrite"]
        print(f"=== [{i}/{len(scripts)}] {name} ({' '.join(cmd[2:]) or 'default settings'}) ===",
              flush=True)
        if not out_dir_ok:
            print(f"note: {name} takes no --out-dir; it writes wherever it chooses", flush=True)
        t0 = time.time()
        rc = _stream(cmd, env)
        print(f"=== {name}: exit {rc}, {time.time() - t0:.1f} s ===\n", flush=True)
        if rc:
            failed.append(name)
    print(f"{len(scripts)} script(s) in {time.time() - t_all:.1f} s; results in {out}")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "train":
        args.explicit = _explicit_options(parser, argv, "train")
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
