"""The files of a run directory: ``metrics.jsonl`` (one JSON record per line) and
``checkpoint.pt``.

:mod:`itop.app.train` writes them and :mod:`itop.app.plots` and ``itop report`` read them; both
go through here, so neither imports the other.

What a user points us at is untrusted:

- checkpoints are loaded with ``torch.load(weights_only=True)``: tensors and plain containers
  only, never code (:func:`load_checkpoint`). Everything itop saves (model, optimizer,
  topology-manager and grad-scaler state, RNG states, the config) is made of tensors, dicts,
  lists, strings, numbers, booleans and ``None``, which that loader accepts;
- a file that cannot be read, or holds something else, raises :class:`RunFileError` (a
  ``ValueError``) with one line naming the file and what is wrong;
- a run directory that already holds files is never reused silently
  (:func:`check_new_run_dir`).
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from typing import Any, Dict, List

import torch

__all__ = ["CHECKPOINT", "METRICS", "PLOT_FILES", "RUN_FILES", "RunFileError", "read_metrics",
           "write_metrics", "append_metric", "load_checkpoint", "save_checkpoint",
           "check_new_run_dir", "remove_run_files"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
#: The PNG plots :mod:`itop.app.plots` renders into a run directory.
PLOT_FILES = ("curves.png", "itop_rate.png", "layer_density.png", "blocks_heatmap.png")
#: Every file ``itop train`` writes into a run directory (``--overwrite`` removes these only).
RUN_FILES = (METRICS, CHECKPOINT, METRICS + ".tmp", CHECKPOINT + ".tmp", *PLOT_FILES)
#: Keys every checkpoint written by ``itop train`` holds.
CHECKPOINT_KEYS = ("model", "optimizer", "topology", "epoch", "step", "dense_grad_steps",
                   "train_time", "rng", "config")


class RunFileError(ValueError):
    """A file of a run directory is missing, unreadable, malformed or not safe to load."""


def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, in order.

    Raises:
        RunFileError: the file is missing, or a line is not a JSON object with a ``"type"``
            (a line cut off by an interrupted write, say); the message names the line.
    """
    path = os.path.join(run_dir, METRICS)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise RunFileError(f"{path} does not exist (not a run directory of itop train?)") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFileError(f"cannot read {path}: {exc}") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            torn = " (cut off: an interrupted write?)" if i == len(lines) and \
                not line.endswith("\n") else ""
            raise RunFileError(f"{path}: line {i} is not valid JSON{torn}: {exc.msg}; "
                               "remove or repair that line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
            raise RunFileError(f"{path}: line {i} is not a metrics record (a JSON object "
                               "with a \"type\")")
        records.append(rec)
    return records


def write_metrics(path: str, records: List[Dict[str, Any]]) -> None:
    """Replace the file at ``path`` with ``records``, one JSON object a line (atomically)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def append_metric(path: str, record: Dict[str, Any]) -> None:
    """Append one JSON record as a line to the file at ``path``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _first_reason(exc: BaseException) -> str:
    """The informative sentence of a ``torch.load`` error, without torch's advice (its
    weights-only refusals suggest ``weights_only=False``, which we never do)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    marked = [ln.split("WeightsUnpickler error:", 1)[1].strip() for ln in lines
              if "WeightsUnpickler error:" in ln]
    picks = ([m for m in marked if m] or [ln for ln in lines if "GLOBAL" in ln] or
             [ln for ln in lines if not ln.startswith(("Weights only load failed", "(1)",
                                                       "(2)", "Please file", "Check the"))] or
             lines or [type(exc).__name__])
    return picks[0].split(". ")[0].rstrip(".")


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path``, loaded on the CPU with ``torch.load(weights_only=True)``.

    Raises:
        RunFileError: the file is missing, truncated, not a checkpoint, holds anything but
            tensors and plain containers (it could run code), or lacks a key of
            :data:`CHECKPOINT_KEYS`.
    """
    if not os.path.isfile(path):
        raise RunFileError(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _first_reason(exc)
        if "global" in reason.lower():
            raise RunFileError(f"{path}: refused to load it: it holds objects other than "
                               f"tensors and plain containers, which could run code "
                               f"({reason})") from None
        raise RunFileError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                           f"{reason}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile,
            UnicodeDecodeError, AttributeError, TypeError) as exc:
        raise RunFileError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                           f"{_first_reason(exc)}") from None
    if not isinstance(ck, dict):
        raise RunFileError(f"{path} is not a checkpoint of itop train (it holds a "
                           f"{type(ck).__name__}, not a dict)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ck]
    if missing:
        raise RunFileError(f"{path} is not a checkpoint of itop train (no {', '.join(missing)})")
    if not isinstance(ck["config"], dict) or not isinstance(ck["model"], dict):
        raise RunFileError(f"{path} is not a checkpoint of itop train (bad config or model)")
    return ck


def save_checkpoint(path: str, checkpoint: Dict[str, Any]) -> None:
    """Write ``checkpoint`` to ``path`` atomically (a temporary file, then a rename), so an
    interruption leaves the previous checkpoint whole."""
    tmp = path + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)




def check_new_run_dir(out: str, overwrite: bool) -> None:
    """Refuse to start a new run in ``out`` when it already holds files, unless ``overwrite``.

    Raises:
        RunFileError: ``out`` is a file, or a non-empty directory and ``overwrite`` is False.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunFileError(f"--out {out} is a file, not a directory")
    if overwrite or not os.path.isdir(out):
        return
    entries = sorted(os.listdir(out))
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise RunFileError(f"--out {out} already holds files ({shown}); continue that run with "
                           "--resume, start it over with --overwrite, or pick a new --out")


def remove_run_files(out: str) -> List[str]:
    """Delete the files ``itop train`` writes (and nothing else) from ``out``; returns them."""
    removed = []
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed
