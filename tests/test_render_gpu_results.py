"""``benchmarks/render_docs.py`` on the GPU benchmarks' new JSON schemas: the JSON the CPU smoke
modes of ``bench_linear.py --sweep``, ``bench_conv.py`` and ``bench_train_gpu.py`` write is
marked as measured on a GPU (the renderer ignores CPU runs), put in a results directory under
``tmp_path``, and rendered; the tests check that the tables carry the JSON's numbers and that
each issue's targets flip between met and missed with them."""
import copy
import json
import shutil
from pathlib import Path

import pytest

from bench_scripts import bench_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def render():
    return bench_module("render_docs")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``{kind: parsed JSON}`` of the three benchmarks' CPU smoke runs (about 30 s in all; the
    linear and conv ones through Triton's interpreter, the training steps on the CPU path)."""
    import os
    out = tmp_path_factory.mktemp("smoke")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        lin, conv, train = (bench_module(m) for m in
                            ("bench_linear", "bench_conv", "bench_train_gpu"))
        assert lin.main(["--device", "cpu", "--sweep", "--smoke", "--blocks", "16",
                         "--densities", "0.5", "--K", "32", "--N", "32", "--M", "16",
                         "--out", str(out / "linear.json")]) == 0
        assert conv.main(["--smoke", "--out", str(out / "conv.json")]) == 0
        os.environ.pop("TRITON_INTERPRET")   # the CPU path, as the tiny run is meant to take
        assert train.main(["--tiny", "--no-plot", "--out-dir", str(out)]) == 0
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return {"linear": json.loads((out / "linear.json").read_text()),
            "conv": json.loads((out / "conv.json").read_text()),
            "train": json.loads((out / "train_gpu_tiny.json").read_text())}


def as_gpu(kind: str, d: dict, time: str = "2030-01-01T00:00:00Z") -> dict:
    """``d`` as if measured on an H200 (the fields the renderer's discovery reads)."""
    d = copy.deepcopy(d)
    d["time"] = time
    if kind == "linear":
        d.update(device_type="cuda", device="NVIDIA H200")
    else:
        d.update(device="cuda", device_name="NVIDIA H200")
    return d


def results_dir(tmp_path: Path, files: dict) -> Path:
    """A results directory: the committed JSON plus ``files`` (``{name: dict}``)."""
    res = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", res, ignore=shutil.ignore_patterns("*.png", "*.txt"))
    for name, d in files.items():
        (res / name).write_text(json.dumps(d))
    return res


def target_row(text: str, start: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| {start}")]
    return line


# ----------------------------------------------------------------------------- discovery
def test_discovery_takes_the_newest_gpu_json_and_ignores_cpu_runs(render, smoke, tmp_path):
    res = results_dir(tmp_path, {"linear_gpu_tiny.json": smoke["linear"],   # a CPU run
                                 "train_gpu_tiny.json": smoke["train"]})
    assert render.gpu_result("linear", res)[0] == "linear_gpu_h100.json"   # the committed one
    assert render.gpu_result("train", res) is None
    assert render.frag_train_gpu(res) is None
    assert any("train_gpu.md" in n for n in render.skipped_notes(res))
    older = as_gpu("linear", smoke["linear"], "2020-01-01T00:00:00Z")
    newer = as_gpu("linear", smoke["linear"])
    res = results_dir(tmp_path / "2", {"linear_gpu_h200.json": newer,
                                       "linear_gpu_a100.json": older})
    assert render.gpu_result("linear", res)[0] == "linear_gpu_h200.json"
    assert "`linear_gpu_h200.json`" in render.frag_when_faster(res)
    assert render.headline_series(res)["gpu"]["source"] == "linear_gpu_h200.json"
    with pytest.raises(ValueError, match="kind"):
        render.gpu_result("lineer", res)


def test_the_committed_docs_are_unchanged_and_train_gpu_is_skipped(render, capsys):
    """Today's JSON renders byte for byte what is committed, and without a train_gpu JSON from
    a GPU the fragment is skipped, which --check says."""
    assert render.gpu_result("train") is None
    assert render.main(["--check"]) == 0
    assert "skipped docs/generated/train_gpu.md" in capsys.readouterr().out


def test_placeholder_is_replaced_by_the_include(render):
    body = ("a\n\n<!-- render_docs: train_gpu.md -->\n\nnot yet\n\n"
            "<!-- /render_docs: train_gpu.md -->\nb\n")
    assert render.replace_placeholder(body, "train_gpu.md") == \
        'a\n\n--8<-- "docs/generated/train_gpu.md"\nb\n'
    assert render.replace_placeholder("no marker", "train_gpu.md") == "no marker"
    page = render.PAGE_INCLUDES["train_gpu.md"].read_text()
    assert "<!-- render_docs: train_gpu.md -->" in page
    assert render.include_line("train_gpu.md") not in page


# ----------------------------------------------------------------------------- linear
def test_linear_sweep_table_and_targets(render, smoke, tmp_path):
    d = as_gpu("linear", smoke["linear"])
    (row,) = d["rows"]
    row.update(block=64, density=0.1)
    row["ours"].update({"eager fwd+bwd best": 2.0, "graph fwd+bwd best": 1.0,
                        "eager fwd shipped": 0.5})
    row.update({"sum_kernels_best_ms": 1.6, "roofline_fwd+bwd_ms": 0.9, "torch_bsr_fwd_ms": 1.5})
    d["dense"].update({"fwd+bwd": 10.0, "fwd+bwd graph": 8.0})
    d["peaks"] = {"tflops": 790.0, "tbps": 4.0}
    text = render.frag_gpu_linear(results_dir(tmp_path, {"linear_gpu_h200.json": d}))
    # eager 10 / 2, graph 8 / 1, floor 0.9 / 1.0, per FLOP 8 × 0.1, eager / kernels 2 / 1.6,
    # BSR 1.5 / 0.5
    assert "| 64 | 0.1 | **5.00×** | **8.00×** | 90 % | 0.80 | 1.25 | **3.00×** | – |" in text
    assert "790 TFLOP/s, 4.00 TB/s" in text and "results/linear_gpu_h200.json`" in text
    assert target_row(text, "block 64, 90 % sparse").endswith("| met from a CUDA graph only |")
    assert target_row(text, "block 64, every density: ≥ 80 %").endswith("| met |")
    assert target_row(text, "block 64, every density: eager").endswith("| missed |")
    row["ours"]["eager fwd+bwd best"] = 1.5          # 6.67× eager, 1.5 / 1.6 of its kernels
    text = render.frag_gpu_linear(results_dir(tmp_path / "2", {"linear_gpu_h200.json": d}))
    assert target_row(text, "block 64, 90 % sparse").endswith("| met |")
    assert target_row(text, "block 64, every density: eager").endswith("| met |")
    row["stk_fwd+bwd_ms"], row["block"] = 0.75, 128   # stk at block 128: ours 0.75 / 1.5
    text = render.frag_gpu_linear(results_dir(tmp_path / "3", {"linear_gpu_h200.json": d}))
    assert target_row(text, "block 128, every density: faster than stk").endswith("| missed |")
    assert "| 128 | 0.1 |" in text and "0.50×" in target_row(text, "block 128")
    assert target_row(text, "block 64, 90 % sparse").endswith("| not measured |")


# ----------------------------------------------------------------------------- conv
def test_conv_plan_tables_and_targets(render, smoke, tmp_path):
    d = as_gpu("conv", smoke["conv"])
    for r in d["rows"]:
        r.update(net="resnet50", batch=64, density_nominal=0.1)
        r["dense"] = {"eager_fwd_bwd_s": 9e-4, "graph_fwd_bwd": {"s": 8e-4}}
        r["ours_eager_fwd_bwd_s"] = {"plain": 4e-4, "cached": 3e-4}
        r["ours_graph_fwd_bwd"] = {"s": 2e-4}
    one = next(r for r in d["rows"] if r["k"] == 1 and r["stride"] == 1)
    assert set(one["routes_1x1"]) == {"gemm", "gemm_fwd_dx"}
    one["routes_1x1"]["gemm_fwd_dx"] = {"eager_fwd_bwd_s": 1e-4, "graph_fwd_bwd": {"s": 1.5e-4}}
    text = render.frag_conv(results_dir(tmp_path, {"conv_gpu_h200.json": d}))
    # eager 9 / 3, graph 8 / 2, eager / graph 3 / 2; the GEMM route from a graph 8 / 1.5
    assert "| 3x3 32→32, 3×3, 6×6, stride 1 | 16 | **3.00×** / **4.00×** | 1.50 |" in text
    assert "| 1x1 32→32, 1×1, 5×5, stride 1 | 16 | **3.00×** / **4.00×**; GEMM **5.33×** |" \
        in text
    assert "**ResNet-50 3×3 layers, batch 64**" in text and "**CPU**" in text
    assert target_row(text, "ResNet-50 3×3, block 16, 90 %").endswith("| met |")
    assert "eager 9.00×" in target_row(text, "ResNet-50 1×1")     # the GEMM route: 9 / 1
    eager_row = target_row(text, "ResNet-50, batch 64: eager")
    assert eager_row.endswith("| missed |")
    layers = len({r["name"] for r in d["rows"]})
    assert f"(cuDNN's own, {layers} layers: {9 / 8:.2f}–{9 / 8:.2f}×)" in eager_row
    # the host-overhead section as a table, the autograd floor among its variants
    host = [ln for ln in text.splitlines() if ln.startswith("| 3x3 64→64, 3×3, 8×8, batch 2 |")]
    assert {ln.split(" | ")[1] for ln in host} >= {"autograd floor", "eager, cached launch",
                                                   "dense F.conv2d"}
    for r in d["rows"]:
        r["ours_eager_fwd_bwd_s"]["cached"] = 2.2e-4          # 1.1× the graph time, 4.09×
    r3 = next(r for r in d["rows"] if r["k"] == 3 and r["stride"] == 2)
    r3["ours_eager_fwd_bwd_s"] = {"plain": 9e-4, "cached": 9e-4}  # 1×: one layer misses
    text = render.frag_conv(results_dir(tmp_path / "2", {"conv_gpu_h200.json": d}))
    assert target_row(text, "ResNet-50 3×3, block 16, 90 %").endswith(
        "| met from a CUDA graph only |")
    assert "eager 1.00×–4.09×" in target_row(text, "ResNet-50 3×3, block 16, 90 %")
    summary = render.frag_when_faster(results_dir(tmp_path / "3", {"conv_gpu_h200.json": d}))
    assert ("| H200 GPU | conv, ResNet/VGG layers, bf16 | 16 | – | – | 1.00×–4.09× | – | "
            "`conv_gpu_h200.json` |") in summary
    assert target_row(text, "the full sweep").endswith("| missed |")   # VGG/ResNet-34 absent


def test_conv_smoke_times_every_kernel_variant(smoke):
    """The candidate timings hold, for the shipped config, every variant the offline choice
    reads: the torch-reduced wgrad and the stacked-taps wgrad, forward and dgrad at every group
    size block 16 allows, the largest also with one stage."""
    shipped = [c for c in smoke["conv"]["candidates"] if c["candidate"] == "shipped"]
    assert shipped and all(c["block_size"] == 16 for c in shipped)
    want = {"fwd", "dgrad", "wgrad", "wgrad_torch_reduce"} | {
        f"{k}_taps{t}" for k in ("fwd", "dgrad", "wgrad") for t in (2, 4, 8)} | {
        f"{k}_taps8_s1" for k in ("fwd", "dgrad", "wgrad")}
    for c in shipped:
        assert set(c["kernels"]) == want
        assert all(v["s"] > 0 for v in c["kernels"].values())


def test_pick_conv_configs_reads_the_smoke_json(smoke, tmp_path, capsys):
    """``pick_conv_configs.py`` on the schema the GPU run writes: a ConvConfig per block size."""
    pick = bench_module("pick_conv_configs")
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(smoke["conv"]))
    assert pick.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "block 16" in out and "CONFIGS[90][16] = ConvConfig(BM=" in out
    assert "fwd: best variant fwd_taps" in out


# ----------------------------------------------------------------------------- training steps
def test_train_gpu_fragment_and_targets(render, smoke, tmp_path):
    d = as_gpu("train", smoke["train"])
    rows = {(r["model"], r["variant"]): r for r in d["summary"]}
    dense, sparse = rows[("mlp", "dense")], rows[("mlp", "sparse_b16")]
    dense.update(eager_median_s=0.04, graph_median_s=0.036)
    sparse.update(eager_median_s=0.016, graph_median_s=0.01, rigl_eager_per_step_s=0.0125)
    res = results_dir(tmp_path, {"train_gpu_h200.json": d})
    assert render.gpu_result("train", res)[0] == "train_gpu_h200.json"
    text = render.frag_train_gpu(res)
    assert "on an NVIDIA H200" in text and "`benchmarks/results/train_gpu_h200.json`" in text
    # 40 / 16 eager, 36 / 10 graph; with RigL 40 / 12.5
    line = target_row(text, "`mlp` | sparse, block 16")
    assert "| 16.0 | 10.0 |" in line and "**2.50×** / **3.60×** / –" in line
    assert "**3.20×** / –" in line
    assert target_row(text, "`mlp` (block 16): ≥ 3×").endswith("| met from a CUDA graph only |")
    assert target_row(text, "`mlp` with RigL").endswith("| met |")
    gpt = target_row(text, "one RigL update of `gpt2`")
    share = next(c for c in d["cases"] if c.get("kind") == "update_cost"
                 and c["model"] == "gpt2")["overhead_at_update_every_100"]
    assert f"{100 * share:.2f} %" in gpt
    assert gpt.endswith("| met |" if share < 0.01 else "| missed |")
    mem = target_row(text, "parameters + gradients")
    assert "`mlp`" in mem and not mem.endswith("| not measured |")
    sparse["eager_median_s"] = 0.0125                  # 3.2× eager
    text = render.frag_train_gpu(results_dir(tmp_path / "2", {"train_gpu_h200.json": d}))
    assert target_row(text, "`mlp` (block 16): ≥ 3×").endswith("| met |")
    lay = next(c for c in d["cases"] if c.get("kind") == "layout_rebuild")
    lay["cases"]["from_positions"].update(per_call_s=2e-4, host_sync=True)
    text = render.frag_train_gpu(results_dir(tmp_path / "3", {"train_gpu_h200.json": d}))
    assert target_row(text, "a layout rebuild").endswith("| missed |")
    lay["cases"]["from_positions"]["host_sync"] = False
    text = render.frag_train_gpu(results_dir(tmp_path / "4", {"train_gpu_h200.json": d}))
    assert target_row(text, "a layout rebuild").endswith("| met |")
    assert "200 µs, host sync: no" in text


def test_conv_smoke_runs_every_section_without_errors(smoke):
    """The conv run's sections catch their own errors (a GPU run must not lose the rest to one
    failure), so a broken section shows only in ``errors``: the smoke must have none, and its
    host-overhead section timed every variant on the GPU route."""
    conv = smoke["conv"]
    assert conv["errors"] == []
    variants = {row["variant"] for row in conv["host_overhead"]}
    assert {"eager, cached launch", "eager, plain launch", "custom_ops, cached launch",
            "dense F.conv2d", "autograd floor"} <= variants
