"""The scripts of ``benchmarks/`` (a folder of scripts, not a package) imported as modules."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module. ``benchmarks/`` is on ``sys.path`` only while it is
    imported (the scripts import their siblings at the top)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
