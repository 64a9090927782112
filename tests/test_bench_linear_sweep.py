"""The GPU benchmark's code paths, run on the CPU through Triton's interpreter at a tiny shape
(``bench_linear.py --sweep --smoke``), and the offline config picker on its JSON."""
import importlib
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_linear"), importlib.import_module("pick_linear_configs")


def test_sweep_smoke_runs_every_cpu_branch_and_picks_configs(triton_device, bench_modules,
                                                             tmp_path, capsys):
    bench, pick = bench_modules
    out = tmp_path / "sweep.json"
    assert bench.main(["--device", "cpu", "--sweep", "--smoke", "--blocks", "16", "--densities",
                       "0.5", "--K", "32", "--N", "32", "--M", "16", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["complete"] and not res["sections_skipped"]
    (row,) = res["rows"]
    for k in ("fwd", "dx", "dw"):
        timings = row["kernels"][k]["timings"]
        assert timings[0]["origin"] == "shipped" and len(timings) > 1
        assert all("ms" in t for t in timings), timings
    assert row["ours"]["eager fwd+bwd best"] > 0 and row["sum_kernels_best_ms"] > 0
    assert "torch_bsr_fwd_ms" in row   # a time, or None with the reason beside it
    assert row["torch_bsr_fwd_ms"] or row["torch_bsr_error"]
    assert res["correctness"]["fp16"]["ok"]
    assert set(res["host_overhead"]) == {"cached", "plain"}
    assert "Name" in res["profile"]["table"] and res["fp32"]
    assert out.with_suffix(".png").exists()
    assert pick.main([str(out)]) == 0
    printed = capsys.readouterr().out
    for k in ("fwd", "dx", "dw"):
        assert f"{k} = {{" in printed and '(16, "16bit"): C(' in printed


def test_budget_skips_sections_and_still_writes(triton_device, bench_modules, tmp_path):
    """A spent budget: every timed section is skipped and recorded, the JSON is complete=False."""
    bench, _ = bench_modules
    out = tmp_path / "sweep.json"
    bench.main(["--device", "cpu", "--sweep", "--smoke", "--blocks", "16", "--densities", "0.5",
                "--K", "32", "--N", "32", "--M", "16", "--budget-s", "0", "--out", str(out)])
    res = json.loads(out.read_text())
    assert not res["complete"] and not res["rows"]
    names = [s["section"] for s in res["sections_skipped"]]
    assert "correctness" in names and any(n.startswith("cell") for n in names)


def test_picker_ranks_by_geometric_mean_over_densities(bench_modules):
    _, pick = bench_modules
    cfg = lambda m: {"tile_m": m, "tile_k": 16, "num_warps": 4, "num_stages": 3,  # noqa: E731
                     "group_m": 1, "wide": 1, "split": 0 if m == 64 else 1}
    rows = [{"block": 16, "density": d, "kernels": {"dw": {"timings": [
        {"tag": "a", "config": cfg(128), "origin": "shipped", "ms": ta},
        {"tag": "b", "config": cfg(64), "origin": "sweep", "ms": tb},
        {"tag": "c", "config": cfg(32), "origin": "sweep", "error": "boom"}]}}}
        for d, ta, tb in ((0.5, 1.0, 1.5), (0.1, 1.0, 0.25))]
    ranked = pick.scores({"rows": rows})[("dw", 16)]
    assert [r[1] for r in ranked] == ["b", "a"]           # sqrt(1.5 * 1) < sqrt(1 * 4)
    assert pick.config_source(ranked[0][2]) == "C(64, 16, 4, 3, split=0)"
    only_dense = pick.scores({"rows": rows}, {0.5})[("dw", 16)]
    assert only_dense[0][1] == "a"
