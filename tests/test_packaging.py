"""What an install ships: every package directory of the library and the application is a
regular package (with ``__init__.py``), so ``setup.py``'s ``find_packages`` puts it into the
wheel. A directory without one (a namespace package) works from a checkout and in an editable
install, and is silently missing from ``pip install .``."""
from __future__ import annotations

import pathlib

from setuptools import find_packages

ROOT = pathlib.Path(__file__).resolve().parents[1]
INCLUDE = ["itop_kernels", "itop_kernels.*", "itop", "itop.*"]   # as setup.py


def test_every_directory_with_python_modules_is_shipped() -> None:
    shipped = set(find_packages(where=str(ROOT), include=INCLUDE))
    wanted = set()
    for top in ("itop", "itop_kernels"):
        for d in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            if d.name != "__pycache__" and any(d.glob("*.py")):
                wanted.add(".".join(d.relative_to(ROOT).parts))
    assert "itop.app" in wanted
    assert wanted <= shipped, f"not shipped by setup.py: {sorted(wanted - shipped)}"


def test_setup_py_includes_what_the_test_checks() -> None:
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert 'find_packages(include=["itop_kernels", "itop_kernels.*", "itop", "itop.*"])' in text
