"""Ahead-of-time compile check: every shipped Triton kernel config, for sm_80 and sm_90.

Runs without a GPU. Each kernel module lists its shipped configs through ``aot_cases(arch)``;
this module compiles every one with Triton for the target, assembles the PTX with the ptxas
that ships inside Triton, and fails on

- a compile error,
- register spills (``spill stores``/``spill loads`` > 0 in ``ptxas -v``) or a stack frame,
- shared memory above the architecture's per-block limit.

Each report also says which MMA the PTX uses and whether it loads through TMA
(``cp.async.bulk.tensor``), so a test can assert that a TMA config really is one.

Run by hand: ``python -m itop_kernels.compile_check [--arch 80 90] [--filter NAME]``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["AotCase", "CompileReport", "KERNEL_MODULES", "SMEM_LIMIT", "all_cases", "check_case", "main"]

# Modules whose ``aot_cases(arch: int) -> list[AotCase]`` lists their shipped configs.
KERNEL_MODULES = ["itop_kernels.triton_linear", "itop_kernels.triton_conv",
                  "itop_kernels.triton_split_sum"]

# Largest shared memory one block may use (opt-in maximum), bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class AotCase:
    """One kernel specialization to compile: the Triton JIT function, its argument types
    (``{"x": "*fp16", "M": "i32", "BM": "constexpr", ...}``), constexpr values and launch
    options."""

    name: str
    fn: Any
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3


@dataclass
class CompileReport:
    case: AotCase
    arch: int
    registers: int = -1
    spill_bytes: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    error: str = ""
    mma: str = ""
    tma: bool = False   # the PTX loads through TMA descriptors (``cp.async.bulk.tensor``)

    @property
    def ok(self) -> bool:
        return (not self.error and self.spill_bytes == 0 and self.stack_bytes == 0
                and self.shared_bytes <= SMEM_LIMIT[self.arch])

    def line(self) -> str:
        status = "ok" if self.ok else "FAIL"
        detail = self.error or (f"regs={self.registers} spill={self.spill_bytes}B "
                                f"stack={self.stack_bytes}B smem={self.shared_bytes}B {self.mma}"
                                + (" tma" if self.tma else ""))
        return f"[{status}] sm_{self.arch} {self.case.name}: {detail}"


def _ptxas() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def check_case(case: AotCase, arch: int) -> CompileReport:
    """Compile ``case`` for ``sm_<arch>`` and read registers, spills and shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rep = CompileReport(case, arch)
    try:
        src = ASTSource(fn=case.fn, signature=dict(case.signature), constexprs=dict(case.constexprs))
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    except Exception as exc:  # report, don't crash: one bad config must not hide the others
        rep.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return rep
    rep.shared_bytes = int(ck.metadata.shared)
    ptx = ck.asm["ptx"]
    rep.mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "no-mma")
    rep.tma = "cp.async.bulk.tensor" in ptx
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m itop_kernels.compile_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    p.add_argument("--filter", default="", help="only cases whose name contains this")
    args = p.parse_args(argv)
    failed = 0
    total = 0
    for arch in args.arch:
        for case in all_cases(arch):
            if args.filter and args.filter not in case.name:
                continue
            rep = check_case(case, arch)
            total += 1
            failed += not rep.ok
            print(rep.line(), flush=True)
    print(f"{total - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
