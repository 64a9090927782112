"""The files of a run directory: ``metrics.jsonl`` (one JSON record per line) and
``checkpoint.pt``.

:mod:`itop.app.train` writes them and :mod:`itop.app.plots` and ``itop report`` read them; both
go through here, so neither imports the other.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

__all__ = ["CHECKPOINT", "METRICS", "read_metrics", "write_metrics", "append_metric"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, in order."""
    path = os.path.join(run_dir, METRICS)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
