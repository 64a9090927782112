"""Ahead-of-time compile of every shipped Triton config for sm_80 and sm_90, without a GPU.

Runs ``python -m itop_kernels.compile_check`` in a subprocess (the test session imports the
kernels in interpreter mode, which cannot be compiled ahead of time) and fails on any compile
error, register spill, stack frame or shared-memory overflow it reports.
"""
import os
import re
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
    # Every case is compiled as launched: aligned pointers, ints that are multiples of 16; the
    # linear kernels also with a ragged row count M.
    specs = {}
    for ln in compiled:
        name, spec = re.match(r"\[ok\] sm_\d+ (.*) \((aligned|ragged)\): ", ln).groups()
        specs.setdefault(name, {})[spec] = int(re.search(r"scalar16=(\d+)", ln).group(1))
    assert specs and all("aligned" in s for s in specs.values())
    assert all(set(s) == {"aligned", "ragged"} for n, s in specs.items() if n.startswith("linear"))
    assert not any("ragged" in s for n, s in specs.items() if not n.startswith("linear"))
    # No 16-bit case loads a tile an element at a time: at most one scalar load per thread (a
    # bias, or a 16×16 tile spread over 256 threads). A kernel that loses its 16-byte vectors (a
    # missing alignment hint, an index formula the compiler cannot see through) shows here.
    sixteen = {(n, sp): k for n, s in specs.items() for sp, k in s.items()
               if re.search(r"fp16|bf16", n)}
    assert sixteen
    unvectorized = {key: k for key, k in sixteen.items() if k > 1}
    assert not unvectorized, unvectorized
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


def test_specializations_follow_the_jit(tmp_path):
    """``specialization_attrs`` marks what Triton's JIT marks at a launch with aligned tensors
    and ints that are multiples of 16: every pointer and every int the kernel lets it
    specialize, not the ``do_not_specialize`` ones and not constexprs; ``"ragged"`` also leaves
    the case's ragged ints unmarked, and is compiled only for cases that have some. With the
    facts, a vector load compiles to vectors (``scalar_loads`` 0); a load the compiler cannot
    prove aligned still counts its scalar loads (the counter can fail)."""
    (tmp_path / "smallkernel.py").write_text(r"""
import triton, triton.language as tl

@triton.jit(do_not_specialize=["n"])
def k(a, b, m, n, BM: tl.constexpr):
    pass

@triton.jit
def copy(a, b, SHIFT: tl.constexpr):
    o = tl.arange(0, 1024)
    tl.store(b + o, tl.load(a + SHIFT + o))
""")
    code = r"""
from smallkernel import k, copy
from itop_kernels.compile_check import AotCase, case_specs, check_case, specialization_attrs

sig = {"a": "*fp16", "b": "*i32", "m": "i32", "n": "i32", "BM": "constexpr"}
case = AotCase("k", k, sig, {"BM": 16}, ragged=("m",))
print(sorted(i for (i,) in specialization_attrs(case, "aligned")))
print(sorted(i for (i,) in specialization_attrs(case, "ragged")))
print(set(map(str, specialization_attrs(case, "aligned").values())))
print(case_specs(case), case_specs(AotCase("k", k, sig, {"BM": 16})))
try:
    specialization_attrs(case, "odd")
except ValueError as exc:
    print("ValueError", "spec" in str(exc))
csig = {"a": "*fp16", "b": "*fp16", "SHIFT": "constexpr"}
for shift in (0, 1):
    rep = check_case(AotCase("copy", copy, csig, {"SHIFT": shift}, 4, 1), 90)
    print(rep.ok, rep.scalar_loads)
"""
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    aligned, ragged, values, specs, error, vec, scalar = res.stdout.splitlines()
    assert aligned == "[0, 1, 2]"   # a, b, m; not n (do_not_specialize), not BM (constexpr)
    assert ragged == "[0, 1]"       # m is ragged
    assert values == "{\"[['tt.divisibility', 16]]\"}"
    assert specs == "('aligned', 'ragged') ('aligned',)"
    assert error == "ValueError True"
    assert vec == "True 0"          # 1024 fp16 over 128 threads: 16-byte vectors
    ok, count = scalar.split()
    assert ok == "True" and int(count) >= 8, scalar   # one element past alignment: scalars


def test_report_fails_over_the_shared_memory_limit():
    from itop_kernels.compile_check import SMEM_LIMIT, AotCase, CompileReport

    case = AotCase("k", None, {}, {})
    assert CompileReport(case, 90, shared_bytes=SMEM_LIMIT[90]).ok
    assert not CompileReport(case, 90, shared_bytes=SMEM_LIMIT[90] + 1).ok
    assert not CompileReport(case, 80, shared_bytes=SMEM_LIMIT[80] + 1).ok
    assert not CompileReport(case, 80, error="boom").ok
