"""Every script in examples/ runs to completion on tiny shapes (``--tiny``), as a user would run
it: a fresh Python process (``torchrun`` with 2 processes for the DDP example). The scripts run
one thread each, all at once, so the module takes about the time of the slowest one."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script -> (launcher arguments before the script, a line its output must contain)
CASES = {
    "sparsify_and_train.py": ([], "ITOP rate"),
    "kernels.py": ([], "relative error vs float64"),
    "ddp_train.py": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                     "-> identical"),
    "gpu_train_step.py": ([], "training step, batch"),
}


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)        # the examples run the real CPU path
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_every_example_is_run_here() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """``{script: CompletedProcess}``: every example started at once, then awaited."""
    procs = {}
    for name, (launcher, _) in CASES.items():
        cwd = tmp_path_factory.mktemp(name.removesuffix(".py"))
        cmd = [sys.executable, *launcher, str(EXAMPLES / name), "--tiny"]
        procs[name] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True, env=_env(), cwd=str(cwd)))
    out = {}
    for name, (cmd, p) in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out[name] = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name: str, results: dict) -> None:
    res = results[name]
    expected = CASES[name][1]
    assert res.returncode == 0, f"{name} exited {res.returncode}:\n{res.stdout[-2000:]}\n" \
                                f"{res.stderr[-3000:]}"
    assert expected in res.stdout, res.stdout[-2000:]
    if name == "gpu_train_step.py":
        device_line = next(ln for ln in res.stdout.splitlines() if ln.startswith("device:"))
        if "no CUDA device" not in device_line:     # a GPU machine: it ran there
            assert "Triton kernels" in device_line
