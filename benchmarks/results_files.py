"""Where the benchmark scripts write their results, and the rule that keeps earlier ones.

Each script writes its JSON (and, most of them, a plot beside it) under a default name in
``benchmarks/results/`` (the committed results the docs cite), in ``--out-dir``, or at
``--out``. It never replaces a results file that is already there unless the user passes
``--overwrite``: without it the script stops before it times anything, with an error that names
the files. Shared by the scripts, which run as ``python benchmarks/<script>.py`` (so this
directory is on ``sys.path``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, Optional, Union

PathLike = Union[str, Path]

ROOT = Path(__file__).resolve().parents[1]
#: The committed results the README cites; scripts write here only when no --out-dir is given.
RESULTS = ROOT / "benchmarks" / "results"
OUT_DIR_HELP = ("directory for the JSON and plot, under their default names (default "
                "benchmarks/results/, the committed results; `itop bench` passes a new one)")
FRESH_HELP = ("start the grid over and replace its JSON (without it, a run continues the "
              "JSON's finished runs, and stops if the JSON's settings differ or it holds runs "
              "outside this grid)")
OVERWRITE_HELP = ("replace results files that already exist (without it, a run whose JSON or "
                  "plot would replace an earlier one stops before it starts)")

__all__ = ["RESULTS", "OUT_DIR_HELP", "OVERWRITE_HELP", "FRESH_HELP", "results_path",
           "existing_paths", "refuse_overwrite", "resumable_runs"]


def results_path(name: str, out_dir: Optional[PathLike] = None) -> Path:
    """``out_dir/name``, or ``benchmarks/results/name`` without ``out_dir``."""
    return Path(out_dir) / name if out_dir else RESULTS / name


def existing_paths(*paths: Optional[PathLike]) -> List[Path]:
    """The entries of ``paths`` that exist on disk, in order (``None`` entries are ignored)."""
    return [Path(p) for p in paths if p is not None and Path(p).exists()]


def refuse_overwrite(parser: argparse.ArgumentParser, overwrite: bool,
                     *paths: Optional[PathLike]) -> None:
    """Stop through ``parser.error`` (exit status 2) when any of ``paths`` exists, unless
    ``overwrite``. Call it before the work that would write them.

    The message names every existing file and the two ways on: ``--overwrite``, or a new
    ``--out`` / ``--out-dir``.
    """
    found = existing_paths(*paths)
    if found and not overwrite:
        names = ", ".join(str(p) for p in found)
        parser.error(f"{names} already exist{'s' if len(found) == 1 else ''}: pass --overwrite "
                     "to replace, or write elsewhere (--out / --out-dir)")


def resumable_runs(parser: argparse.ArgumentParser, path: PathLike, fresh: bool,
                   keys: Collection[str],
                   same_settings: Callable[[Dict[str, Any]], bool]) -> Dict[str, Dict[str, Any]]:
    """The finished runs of a grid's JSON at ``path`` (``{"meta": {"settings": ...},
    "results": [{"key": ...}, ...]}``), by key, for a run of the grid ``keys`` that continues it.

    Empty when ``path`` does not exist or ``fresh`` (the user asked to start over). Otherwise the
    run would rewrite the file, so it stops through ``parser.error`` rather than lose a result:
    when ``same_settings(old settings)`` is False (the old runs are not comparable), or when the
    file holds runs whose keys are not in ``keys`` (the new grid would drop them).
    """
    path = Path(path)
    if fresh or not path.exists():
        return {}
    old = json.loads(path.read_text(encoding="utf-8"))
    if not same_settings(old["meta"]["settings"]):
        parser.error(f"{path} holds runs made with other settings ({old['meta']['settings']}): "
                     "pass --fresh to replace them, or run with those settings to continue")
    outside = [r["key"] for r in old["results"] if r["key"] not in set(keys)]
    if outside:
        parser.error(f"{path} holds {len(outside)} run(s) outside this grid (e.g. {outside[0]}) "
                     "that this run would drop: run a grid that includes them, or pass --fresh "
                     "to replace the file")
    return {r["key"]: r for r in old["results"]}
