"""``benchmarks/pick_conv_configs.py``: the offline choice of the conv configs and options from
a GPU run's per-kernel candidate timings, on synthetic timings where the answer is known (the
CPU smoke run's JSON, the schema the GPU run writes, is picked in
``tests/test_render_gpu_results.py``, which has it at hand)."""
import json

import pytest

from bench_scripts import bench_module


@pytest.fixture(scope="module")
def pick():
    return bench_module("pick_conv_configs")


def _cfg(bm, wbm):
    return {"BM": bm, "BK": 16, "warps": 4, "stages": 3, "WBM": wbm, "WBO": 16, "wwarps": 4,
            "wstages": 3, "wsplit": 4}


def _row(candidate, cfg, density, times, name="s3_3x3", block=16):
    return {"net": "resnet50", "name": name, "block_size": block, "density_nominal": density,
            "density": density, "candidate": candidate, "config": cfg,
            "kernels": {k: {"s": v} for k, v in times.items()}}


def _result():
    """Two cases (densities). Candidate "a" has the faster forward, "b" the faster dgrad by more,
    so b wins the shared forward/dgrad tile; "a" has the faster wgrad. The stacked forward
    beats b's per-tap forward by 2×, the stacked dgrad loses, the stacked wgrad loses."""
    rows = []
    for d, f in ((0.1, 1.0), (0.5, 3.0)):
        rows.append(_row("shipped", _cfg(128, 64), d,
                         {"fwd": 9 * f, "dgrad": 9 * f, "wgrad": 9 * f,
                          "fwd_taps4": 2 * f, "dgrad_taps4": 8 * f, "wgrad_taps4": 5 * f,
                          "wgrad_torch_reduce": 9.5 * f}))
        rows.append(_row("a", _cfg(64, 32), d, {"fwd": 3 * f, "dgrad": 7 * f, "wgrad": 2 * f}))
        rows.append(_row("b", _cfg(256, 128), d, {"fwd": 4 * f, "dgrad": 3 * f, "wgrad": 6 * f}))
    return {"device_name": "NVIDIA H200", "candidates": rows, "rows": [
        {"ours_eager_fwd_bwd_s": {"plain": 2.0, "cached": 1.5}, "ours_graph_fwd_bwd": {"s": 1.0},
         "routes_1x1": {"gemm": {"graph_fwd_bwd": {"s": 0.8}},
                        "gemm_fwd_dx": {"graph_fwd_bwd": {"s": 0.7}}}},
        {"ours_eager_fwd_bwd_s": {"plain": 1.0, "cached": 1.2}, "ours_graph_fwd_bwd": {"s": 1.0}}]}


def test_ranking_config_and_variants(pick):
    res = _result()
    table = pick.ways(res["candidates"])
    ranked = pick.rank(table[(16, "fwd")])
    assert ranked[0] == (1.0, "variant:fwd_taps4")
    assert [w for _, w in ranked][1:3] == ["config:a", "config:b"]
    cfg = pick.pick_config(16, table, res["candidates"])
    assert cfg["fwd_dgrad_from"] == "config:b"       # 4 + 3 beats a's 3 + 7
    assert cfg["wgrad_from"] == "config:a"
    assert (cfg["BM"], cfg["WBM"]) == (256, 32)
    name, ratio = pick.variant_gain(16, "fwd", table, "config:b")
    assert name == "fwd_taps4" and ratio == pytest.approx(0.5)
    name, ratio = pick.variant_gain(16, "dgrad", table, "config:b")
    assert name == "dgrad_taps4" and ratio > 1
    rl = pick.route_and_launch(res["rows"])
    assert rl == {"route_1x1_wins": {"gemm_fwd_dx": 1}, "launch_wins": {"cached": 1, "plain": 1}}
    text = pick.report(res)
    assert "ConvConfig(BM=256, BK=16, warps=4, stages=3, WBM=32," in text
    assert "fwd: best variant fwd_taps4 at 0.50× the per-tap time with that config: use it" in text
    assert "dgrad: best variant dgrad_taps4 at 2.67× the per-tap time with that config: keep" in text
    assert 'STACKED_TAPS[90][16] = {"fwd": 4, "dgrad": 1, "wgrad": 1}' in text
    assert [pick.stacked_taps_of(v) for v in ("fwd_taps4", "wgrad_taps8_s1",
                                              "wgrad_torch_reduce")] == [4, 8, 0]


def test_a_way_missing_a_case_is_not_ranked(pick):
    res = _result()
    res["candidates"][1]["kernels"]["fwd"] = {"skipped": "error"}   # a's forward at d 0.1
    ranked = pick.rank(pick.ways(res["candidates"])[(16, "fwd")])
    assert "config:a" in [w for _, w in ranked]        # still timed at 0.5 ...
    table = pick.ways(res["candidates"])
    assert set(table[(16, "fwd")]["config:a"]) == {("s3_3x3", 0.5)}
    # ... but ranked only over the cases every way has: (s3_3x3, 0.5) alone
    assert pick.rank({"x": {1: 1.0, 2: 2.0}, "y": {2: 1.0}}) == [(1.0, "y"), (2.0, "x")]


def test_cli_without_candidates_or_file(pick, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"rows": []}))
    assert pick.main([str(empty)]) == 1
    with pytest.raises(SystemExit):
        pick.main([str(tmp_path / "missing.json")])
