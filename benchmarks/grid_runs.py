"""Running a grid of independent training runs, one after another or in worker processes.

Shared by ``paper_mnist1d.py`` and ``block_size_accuracy.py``: each calls :func:`run_grid`
with its run function and saves its JSON from ``on_result`` after every finished run, so an
interrupted grid keeps what it finished.
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable, Dict, Sequence

Result = Dict[str, Any]


def run_grid(work: Sequence[Any], worker: Callable[[Any], Result], jobs: int,
             on_result: Callable[[int, Result], None], maxtasksperchild: int = 8) -> None:
    """Call ``worker(w)`` for every ``w`` of ``work`` and ``on_result(i, result)`` (``i`` counts
    from 1 in finishing order) as each finishes.

    With ``jobs > 1`` the runs go to a pool of ``jobs`` spawned processes (``worker`` must be a
    module-level function), each replaced after ``maxtasksperchild`` runs; otherwise they run
    here, in order.
    """
    if jobs > 1:
        with mp.get_context("spawn").Pool(jobs, maxtasksperchild=maxtasksperchild) as pool:
            for i, r in enumerate(pool.imap_unordered(worker, work), 1):
                on_result(i, r)
    else:
        for i, w in enumerate(work, 1):
            on_result(i, worker(w))
