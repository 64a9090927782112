"""The package layout: the library (``itop``, ``itop_kernels``) loads without the application's
packages, and no module of either package imports itself back through another."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from typing import Dict, List, Set

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
APP_ONLY = ("matplotlib", "tqdm", "sklearn", "mnist1d")


# The application's packages made unimportable, as on an install without the ``cli`` extra:
# a ``None`` entry in ``sys.modules`` makes ``import`` fail and ``find_spec`` answer None.
_BLOCK = f"""
import sys
for _name in {APP_ONLY!r}:
    sys.modules[_name] = None
"""


@pytest.mark.parametrize("package", ["itop", "itop_kernels"])
def test_library_imports_and_runs_without_application_packages(package: str) -> None:
    code = _BLOCK + f"""
import torch, {package}
import itop
layer = itop.SparseLinear(64, 32, density=0.5, block_size=16)
layer(torch.randn(3, 64)).sum().backward()
print(','.join(m for m in {APP_ONLY!r} if sys.modules.get(m) is not None))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == "", f"import {package} loaded {out}"


@pytest.mark.parametrize("package", ["itop", "itop_kernels"])
def test_library_import_adds_no_application_package_to_torch(package: str) -> None:
    # ``import torch`` itself loads tqdm (through torch.hub) when it is installed; the library
    # must load nothing of the application's beyond that.
    code = (f"import sys, torch, numpy\n"
            f"before = set(sys.modules)\n"
            f"import {package}\n"
            f"new = set(sys.modules) - before\n"
            f"print(','.join(sorted(m for m in new if m.split('.')[0] in {APP_ONLY!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == "", f"import {package} loaded {out}"


def test_cli_without_application_packages_says_what_to_install() -> None:
    code = _BLOCK + "from itop.app.cli import main\nsys.exit(main(['train']))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    assert "itop[cli]" in res.stderr and "Traceback" not in res.stderr


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path, name: str, known: Set[str]) -> Set[str]:
    """Every in-package module that ``path`` imports, at the top or inside functions."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_no_import_cycles() -> None:
    files = [p for pkg in ("itop", "itop_kernels") for p in (ROOT / pkg).rglob("*.py")]
    names = {_module_name(p): p for p in files}
    graph: Dict[str, Set[str]] = {n: _imports(p, n, set(names)) for n, p in names.items()}
    # A package's __init__ is imported by every module below it; that edge is no cycle.
    for n in graph:
        graph[n] = {m for m in graph[n] if not n.startswith(m + ".")}
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_library_does_not_import_the_application() -> None:
    for path in (ROOT / "itop").rglob("*.py"):
        name = _module_name(path)
        if name.startswith("itop.app") or name == "itop.__main__":
            continue
        names = set(_module_name(p) for p in (ROOT / "itop").rglob("*.py"))
        bad = {m for m in _imports(path, name, names) if m.startswith("itop.app")}
        assert not bad, f"{name} (library) imports {sorted(bad)} (application)"
