"""Ahead-of-time compile of every shipped Triton config for sm_80 and sm_90, without a GPU.

Runs ``python -m itop_kernels.compile_check`` in a subprocess (the test session imports the
kernels in interpreter mode, which cannot be compiled ahead of time) and fails on any compile
error, register spill, stack frame or shared-memory overflow it reports.
"""
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_config_compiles_without_spills(arch):
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-m", "itop_kernels.compile_check", "--arch", str(arch)],
                         capture_output=True, text=True, env=env, timeout=1800)
    lines = res.stdout.splitlines()
    failures = [ln for ln in lines if ln.startswith("[FAIL]")]
    assert res.returncode == 0 and not failures, "\n".join(failures) + res.stderr[-3000:]
    compiled = [ln for ln in lines if ln.startswith("[ok]")]
    assert any("linear_fwd" in ln for ln in compiled)
    assert any("linear_dx" in ln for ln in compiled) and any("linear_dw" in ln for ln in compiled)
    if arch == 90:  # the 16-bit dots must reach Hopper's warpgroup MMA
        assert any("wgmma" in ln and "bf16" in ln for ln in compiled)
    # TMA configs (sm_90 only) must really load through TMA: cp.async.bulk.tensor in the PTX
    tma = [ln for ln in compiled if " tma]" in ln]
    assert (len(tma) > 0) == (arch == 90), tma
    assert all(ln.endswith(" tma") for ln in tma), [ln for ln in tma if not ln.endswith(" tma")]
    assert not any(ln.endswith(" tma") for ln in compiled if " tma]" not in ln)


def test_check_case_reports_spills(tmp_path):
    """The checker itself must be able to fail: a [128, 128] fp32 accumulator in one warp spills."""
    (tmp_path / "bigkernel.py").write_text(r"""
import triton, triton.language as tl

@triton.jit
def big(a, BM: tl.constexpr):
    o = tl.arange(0, BM)
    x = tl.load(a + o[:, None] * BM + o[None, :])
    acc = tl.dot(x, x)
    tl.store(a + o[:, None] * BM + o[None, :], acc.to(tl.float16))
""")
    code = r"""
from bigkernel import big
from itop_kernels.compile_check import AotCase, check_case
rep = check_case(AotCase("big", big, {"a": "*fp16", "BM": "constexpr"}, {"BM": 128}, 1, 1), 80)
print("OK" if rep.ok else "NOTOK", rep.spill_bytes)
"""
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    verdict, spill = res.stdout.split()
    assert verdict == "NOTOK" and int(spill) > 0, res.stdout


def test_report_fails_over_the_shared_memory_limit():
    from itop_kernels.compile_check import SMEM_LIMIT, AotCase, CompileReport

    case = AotCase("k", None, {}, {})
    assert CompileReport(case, 90, shared_bytes=SMEM_LIMIT[90]).ok
    assert not CompileReport(case, 90, shared_bytes=SMEM_LIMIT[90] + 1).ok
    assert not CompileReport(case, 80, shared_bytes=SMEM_LIMIT[80] + 1).ok
    assert not CompileReport(case, 80, error="boom").ok
