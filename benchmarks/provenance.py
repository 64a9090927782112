"""Where a benchmark figure came from: the machine, package versions and the code's git state.

Shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this directory
is on ``sys.path``).
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "cpu_model", "package_versions", "git_state"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform strings where that is missing)."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(*packages: str) -> dict:
    """``{"python": ..., pkg: version or None}`` for the installed ``packages``."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def git_state(*paths: str, dirty_key: str = "code_dirty") -> dict:
    """``{"commit": HEAD, dirty_key: whether ``paths`` have uncommitted changes}``.

    In a copy without ``.git`` (a device machine), the commit is ``ITOP_GIT_COMMIT`` if set and
    the dirty flag is ``None`` (unknown).
    """
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
    commit = git("rev-parse", "HEAD").strip()
    if not commit:
        return {"commit": os.environ.get("ITOP_GIT_COMMIT", "unknown (no .git)"),
                dirty_key: None}
    dirty = git("status", "--porcelain", "--", *paths).strip()
    return {"commit": commit, dirty_key: bool(dirty)}
