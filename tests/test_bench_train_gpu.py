"""Smoke test of ``benchmarks/bench_train_gpu.py --tiny``: every code path of the GPU training
benchmark (three models, dense and sparse, RigL window, update cost, profiler, layout rebuild,
JSON written after each case, table, PNG) on the CPU with tiny shapes, and its budget."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", ["bench_train_gpu.py"])
    import bench_train_gpu
    return bench_train_gpu


def test_tiny_runs_every_case(bench, tmp_path, capsys):
    assert bench.main(["--tiny", "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "train_gpu_tiny.json").read_text())
    assert (tmp_path / "train_gpu_tiny.png").stat().st_size > 0
    assert res["git"]["commit"] and res["versions"]["torch"] and not res["skipped"]
    cases = {c["case"]: c for c in res["cases"]}
    errors = {n: c["error"] for n, c in cases.items() if "error" in c}
    assert not errors, errors
    for m in ("mlp", "gpt2", "resnet50"):
        assert cases[f"{m}_dense"]["flops_per_step"] > 0
        sparse = cases[f"{m}_sparse_b16"]
        assert sparse["eager_median_s"] > 0 and sparse["info"]["sparse_layers"] > 0
        assert 0.3 < sparse["info"]["sparse_layer_density"] < 0.7     # tiny: density 0.5
        assert sparse["state_bytes"] < cases[f"{m}_dense"]["state_bytes"]
        assert "Self CPU" in cases[f"{m}_profile"]["table"]
    assert cases["mlp_rigl_window"]["eager_updates"] == 1
    for m in ("mlp", "gpt2", "resnet50"):
        assert "overhead_at_update_every_100" in cases[f"{m}_update_cost"]
    bounds = cases["amdahl"]["models"]
    assert bounds["mlp"]["amdahl_bound"] > bounds["gpt2"]["amdahl_bound"] > 1
    assert "update_step_profile_by_cpu_time" in cases["gpt2_update_cost"]
    paths = cases["gpt2_update_cost"]["update_paths"]   # batched vs per-layer updates timed
    assert set(paths) == set(bench.UPDATE_PATHS)
    assert all(len(p["update_step_s"]) >= 2 and p["update_step_s"][0] > 0 for p in paths.values())
    from itop import topology
    from itop_kernels import block_norms
    assert topology._BATCH_LAYERS and topology._BATCH_SCORES and block_norms._GROUP_GEMM == "auto"
    lay = cases["layout_rebuild"]
    assert lay["grid"] == [128, 128] and lay["block_size"] == 32
    assert set(lay["cases"]) == {"from_positions", "from_positions_with_mask",
                                 "from_mask_known_nnz", "copy_in_place"}
    rows = {(r["model"], r["variant"]) for r in res["summary"]}
    assert {("mlp", "sparse_b16"), ("gpt2", "sparse_b16"), ("resnet50", "sparse_b16")} <= rows
    assert "speedups against dense" in capsys.readouterr().out


def test_budget_skips_cases_and_still_writes_json(bench, tmp_path):
    assert bench.main(["--tiny", "--budget-s", "0.5", "--no-plot", "--out-dir",
                       str(tmp_path)]) == 0
    res = json.loads((tmp_path / "train_gpu_tiny.json").read_text())
    assert not res["cases"] and len(res["skipped"]) >= 10
    assert all(s["reason"] == "budget" for s in res["skipped"])
