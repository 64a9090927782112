"""Ahead-of-time compile check: every shipped Triton kernel config, for sm_80 and sm_90.

Runs without a GPU. Each kernel module lists its shipped configs through ``aot_cases(arch)``;
this module compiles every one with Triton for the target, assembles the PTX with the ptxas
that ships inside Triton, and fails on

- a compile error,
- register spills (``spill stores``/``spill loads`` > 0 in ``ptxas -v``) or a stack frame,
- shared memory above the architecture's per-block limit.

Each case is compiled in the specializations Triton's JIT launches it with (``SPECS``).
Pointers are 16-byte aligned in both: the wrappers guarantee it (a misaligned operand is
copied), and without that fact Triton compiles a kernel that loads every element on its own,
through registers, a different program from the one that runs. ``"aligned"`` has every int
that the kernel lets Triton specialize a multiple of 16 (the usual shapes); ``"ragged"`` leaves
the case's ``ragged`` ints (a row count of 1000, say) unknown and is compiled only for cases
that have some.

Each report also says which MMA the PTX uses, whether it loads through TMA
(``cp.async.bulk.tensor``), so a test can assert that a TMA config really is one, and how many
scalar 16-bit global loads it has (``ld.global.b16``: a tile loaded an element at a time, not in
16-byte vectors).

Run by hand: ``python -m itop_kernels.compile_check [--arch 80 90] [--filter NAME]
[--spec aligned ragged] [--jobs N]``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["AotCase", "CompileReport", "KERNEL_MODULES", "SMEM_LIMIT", "SPECS", "all_cases",
           "case_specs", "check_case", "specialization_attrs", "main"]

# Modules whose ``aot_cases(arch: int) -> list[AotCase]`` lists their shipped configs.
KERNEL_MODULES = ["itop_kernels.triton_linear", "itop_kernels.triton_conv",
                  "itop_kernels.triton_split_sum"]

# Largest shared memory one block may use (opt-in maximum), bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# The argument specializations each case is compiled in (see the module docstring).
SPECS = ("aligned", "ragged")


@dataclass(frozen=True)
class AotCase:
    """One kernel specialization to compile: the Triton JIT function, its argument types
    (``{"x": "*fp16", "M": "i32", "BM": "constexpr", ...}``), constexpr values, launch
    options, and which int arguments may be ragged (not multiples of 16)."""

    name: str
    fn: Any
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    # int arguments that may be any value at run time (a batch of rows, say); every other int
    # the kernel lets Triton specialize is a multiple of 16 at every launch (sizes in blocks).
    ragged: tuple = ()


@dataclass
class CompileReport:
    case: AotCase
    arch: int
    spec: str = "aligned"
    registers: int = -1
    spill_bytes: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    error: str = ""
    mma: str = ""
    tma: bool = False   # the PTX loads through TMA descriptors (``cp.async.bulk.tensor``)
    scalar_loads: int = 0   # ``ld.global.b16`` in the PTX: 16-bit elements loaded one at a time

    @property
    def ok(self) -> bool:
        return (not self.error and self.spill_bytes == 0 and self.stack_bytes == 0
                and self.shared_bytes <= SMEM_LIMIT[self.arch])

    def line(self) -> str:
        status = "ok" if self.ok else "FAIL"
        detail = self.error or (f"regs={self.registers} spill={self.spill_bytes}B "
                                f"stack={self.stack_bytes}B smem={self.shared_bytes}B "
                                f"scalar16={self.scalar_loads} {self.mma}"
                                + (" tma" if self.tma else ""))
        return f"[{status}] sm_{self.arch} {self.case.name} ({self.spec}): {detail}"


def _ptxas() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def specialization_attrs(case: AotCase, spec: str) -> dict:
    """Triton's per-argument attributes for ``spec`` (one of ``SPECS``): ``tt.divisibility = 16``
    on every pointer (the wrappers hand the kernels 16-byte aligned operands) and on every int
    the kernel does not exclude with ``do_not_specialize`` (what the JIT derives from an int
    that is a multiple of 16), except, for ``"ragged"``, the case's ``ragged`` ints."""
    if spec not in SPECS:
        raise ValueError(f"spec must be one of {SPECS}, got {spec!r}")
    from triton.backends.compiler import BaseBackend

    fixed = {p.name for p in getattr(case.fn, "params", ()) if p.do_not_specialize}
    if spec == "ragged":
        fixed |= set(case.ragged)
    names = list(case.fn.arg_names)
    attrs = {}
    for name, ty in case.signature.items():
        if ty.startswith("*") or (ty in ("i32", "i64") and name not in fixed):
            attrs[(names.index(name),)] = BaseBackend.parse_attr("D")
    return attrs


def case_specs(case: AotCase) -> tuple:
    """The specializations ``case`` is compiled in: ``"ragged"`` only if it has ragged ints."""
    return SPECS if case.ragged else SPECS[:1]


def check_case(case: AotCase, arch: int, spec: str = "aligned") -> CompileReport:
    """Compile ``case`` for ``sm_<arch>`` in specialization ``spec`` (one of ``SPECS``) and read
    registers, spills, shared memory, the MMA kind, TMA use and scalar 16-bit loads."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rep = CompileReport(case, arch, spec)
    try:
        src = ASTSource(fn=case.fn, signature=dict(case.signature), constexprs=dict(case.constexprs),
                        attrs=specialization_attrs(case, spec))
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    except Exception as exc:  # report, don't crash: one bad config must not hide the others
        rep.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return rep
    rep.shared_bytes = int(ck.metadata.shared)
    ptx = ck.asm["ptx"]
    rep.mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "no-mma")
    rep.tma = "cp.async.bulk.tensor" in ptx
    rep.scalar_loads = len(re.findall(r"\bld\.global(?:\.\w+)*\.b16\b", ptx))
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(), "-v", "--gpu-name", gpu, path, "-o", os.devnull],
                             capture_output=True, text=True)
    if res.returncode != 0:
        rep.error = "ptxas failed: " + res.stderr.strip().splitlines()[-1]
        return rep
    out = res.stderr
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
    if m:
        rep.stack_bytes = int(m.group(1))
        rep.spill_bytes = int(m.group(2)) + int(m.group(3))
    m = re.search(r"Used (\d+) registers", out)
    if m:
        rep.registers = int(m.group(1))
    return rep


def all_cases(arch: int, modules: Iterable[str] = KERNEL_MODULES) -> list[AotCase]:
    """Every shipped config of every kernel module for ``sm_<arch>``."""
    cases: list[AotCase] = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a kernel module not written yet
                continue
            raise
        cases.extend(mod.aot_cases(arch))
    return cases


_worker_cases: dict = {}


def _check_indexed(arch: int, index: int, spec: str) -> str:
    """Worker side of ``--jobs``: compile case ``index`` of ``all_cases(arch)`` (the cases hold
    JIT functions, which do not pickle, so each worker lists them itself) and return its line
    with the verdict."""
    if arch not in _worker_cases:
        _worker_cases[arch] = all_cases(arch)
    rep = check_case(_worker_cases[arch][index], arch, spec)
    return rep.line()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m itop_kernels.compile_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    p.add_argument("--filter", default="", help="only cases whose name contains this")
    p.add_argument("--spec", nargs="+", default=list(SPECS), choices=SPECS,
                   help="argument specializations to compile each case in (default: both; "
                        "ragged only for cases with ragged ints)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="compile in this many processes (default: one per CPU)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    work = [(arch, i, spec) for arch in args.arch
            for i, case in enumerate(all_cases(arch)) if args.filter in case.name
            for spec in case_specs(case) if spec in args.spec]
    if args.jobs == 1:
        lines = (_check_indexed(*w) for w in work)
        pool = None
    else:
        pool = concurrent.futures.ProcessPoolExecutor(args.jobs)
        lines = pool.map(_check_indexed, *zip(*work)) if work else iter(())
    failed = 0
    try:
        for line in lines:   # in the order of ``work``, printed as each one is done
            failed += line.startswith("[FAIL]")
            print(line, flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    print(f"{len(work) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
