"""A hard wall-clock budget for the GPU benchmark runs (a lease's minutes are few)."""
from __future__ import annotations

import time

__all__ = ["Budget"]


class Budget:
    """``seconds`` of wall clock from construction: ``left()`` seconds remain, ``elapsed()``
    have passed, and ``spent()`` is True once none remain."""

    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def spent(self) -> bool:
        return self.left() <= 0
