"""The benchmark scripts never replace an earlier results file unless asked (``--overwrite``, or
``--fresh`` for the accuracy grids), and they refuse before they time or train anything.

Every script is called in-process with an output that already exists; the test checks the exit
status and message, and that the file is byte for byte what it was. A refused script that
went on working would make these tests slow, not wrong, so each also bounds its own time."""
import importlib
import json
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SENTINEL = '{"earlier": "results a user wants kept"}'


@pytest.fixture
def scripts(monkeypatch):
    """Imports a benchmark script by its module name, as `python benchmarks/<name>.py` would."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # restored after, should one set it

    def load(name: str):
        monkeypatch.setattr(sys, "argv", [f"{name}.py"])
        return importlib.import_module(name)
    return load


def _refused(main, argv, capsys, *kept: Path) -> str:
    """Run ``main(argv)``, expecting argparse's exit status 2 within a few seconds and every
    path in ``kept`` unchanged; returns the error text."""
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert time.perf_counter() - t0 < 20, "refused only after doing the work"
    for path in kept:
        assert path.read_text() == SENTINEL, path
    return capsys.readouterr().err


def _earlier(path: Path) -> Path:
    path.write_text(SENTINEL)
    return path


# ------------------------------------------------------------------------------ the shared rule
def test_refuse_overwrite_names_every_existing_file(scripts, tmp_path, capsys):
    rf = scripts("results_files")
    import argparse
    parser = argparse.ArgumentParser(prog="bench_x")
    a, b = _earlier(tmp_path / "a.json"), _earlier(tmp_path / "a.png")
    missing = tmp_path / "new.json"
    rf.refuse_overwrite(parser, False, missing, None)            # nothing there: goes on
    rf.refuse_overwrite(parser, True, a, b)                      # asked to replace: goes on
    with pytest.raises(SystemExit) as e:
        rf.refuse_overwrite(parser, False, missing, a, b)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(a) in err and str(b) in err and str(missing) not in err
    assert "--overwrite" in err and "--out-dir" in err
    assert rf.existing_paths(missing, a, None, b) == [a, b]


def test_resumable_runs(scripts, tmp_path, capsys):
    rf = scripts("results_files")
    import argparse
    parser = argparse.ArgumentParser(prog="grid")
    path = tmp_path / "grid.json"
    same = lambda s: s["epochs"] == 30  # noqa: E731
    assert rf.resumable_runs(parser, path, False, {"a"}, same) == {}      # no file yet
    path.write_text(json.dumps({"meta": {"settings": {"epochs": 30}},
                                "results": [{"key": "a", "acc": 0.5}, {"key": "b"}]}))
    done = rf.resumable_runs(parser, path, False, {"a", "b", "c"}, same)  # continues it
    assert set(done) == {"a", "b"} and done["a"]["acc"] == 0.5
    assert rf.resumable_runs(parser, path, True, {"a"}, same) == {}       # --fresh
    with pytest.raises(SystemExit):                                       # would drop "b"
        rf.resumable_runs(parser, path, False, {"a", "c"}, same)
    assert "1 run(s) outside this grid (e.g. b)" in capsys.readouterr().err
    with pytest.raises(SystemExit):                                       # other settings
        rf.resumable_runs(parser, path, False, {"a", "b"}, lambda s: s["epochs"] == 50)
    err = capsys.readouterr().err
    assert "other settings" in err and "--fresh" in err


# ------------------------------------------------------------------------------ every script
def test_bench_conv(scripts, tmp_path, capsys):
    main = scripts("bench_conv").main
    out = _earlier(tmp_path / "conv.json")
    err = _refused(main, ["--smoke", "--out", str(out)], capsys, out)
    assert str(out) in err
    png = _earlier(tmp_path / "c2.png")                 # the plot alone is an earlier result too
    err = _refused(main, ["--quick", "--out", str(tmp_path / "c2.json")], capsys, png)
    assert str(png) in err and not (tmp_path / "c2.json").exists()
    host = _earlier(tmp_path / "host_overhead_conv_cpu.json")
    _refused(main, ["--host-overhead", "--out-dir", str(tmp_path)], capsys, host)


def test_bench_linear(scripts, tmp_path, capsys):
    bench = scripts("bench_linear")
    out = _earlier(tmp_path / "linear_sweep_cpu_smoke.json")
    _refused(bench.main, ["--device", "cpu", "--sweep", "--smoke", "--out-dir", str(tmp_path)],
             capsys, out)
    legacy = _earlier(tmp_path / "linear_cpu_quick.json")
    _refused(bench.main, ["--quick", "--out-dir", str(tmp_path)], capsys, legacy)
    # --host-overhead adds entries: only one with the same --label is a replacement
    host = tmp_path / "host.json"
    host.write_text(json.dumps({"entries": [{"label": "before"}, {"label": "current"}]}))
    assert bench.host_overhead_labels(host) == ["before", "current"]
    assert bench.host_overhead_labels(tmp_path / "none.json") == []
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--host-overhead", "--out", str(host), "--label", "before"])
    assert e.value.code == 2 and "--label 'before'" in capsys.readouterr().err
    args = bench.parse_args(["--host-overhead", "--out", str(host), "--label", "after"])
    assert args.out == host
    args = bench.parse_args(["--host-overhead", "--out", str(host), "--label", "before",
                             "--overwrite"])
    assert args.overwrite


def test_bench_cpu(scripts, tmp_path, capsys):
    bench = scripts("bench_cpu")
    png = _earlier(tmp_path / "mine.png")
    _refused(bench.main, ["--quick", "--out", str(tmp_path / "x.json"), "--png", str(png)],
             capsys, png)
    out = _earlier(tmp_path / "cpu_linear_quick.json")
    _refused(bench.main, ["--quick", "--out-dir", str(tmp_path)], capsys, out)
    # the per-thread child never writes, so it is not refused; --report only reads
    assert bench.parse_args(["--quick", "--out-dir", str(tmp_path), "--_child", "1"])
    assert bench.parse_args(["--report", str(out)])


def test_bench_topology_update(scripts, tmp_path, capsys):
    main = scripts("bench_topology_update").main
    out = _earlier(tmp_path / "topology_update_cpu_quick.json")
    _refused(main, ["--quick", "--out-dir", str(tmp_path)], capsys, out)


def test_bench_train_cpu(scripts, tmp_path, capsys):
    main = scripts("bench_train_cpu").main
    out = _earlier(tmp_path / "train_cpu_quick.json")
    _refused(main, ["--quick", "--out-dir", str(tmp_path)], capsys, out)


def test_bench_train_gpu_refuses_then_replaces_when_asked(scripts, tmp_path, capsys):
    main = scripts("bench_train_gpu").main
    out = _earlier(tmp_path / "train_gpu_tiny.json")
    _refused(main, ["--tiny", "--no-plot", "--out-dir", str(tmp_path)], capsys, out)
    png = _earlier(tmp_path / "train_gpu_tiny.png")   # --no-plot: an old plot is not in the way
    out.unlink()
    assert main(["--tiny", "--no-plot", "--budget-s", "0.5", "--out-dir", str(tmp_path)]) == 0
    assert png.read_text() == SENTINEL
    assert main(["--tiny", "--no-plot", "--budget-s", "0.5", "--out-dir", str(tmp_path),
                 "--overwrite"]) == 0
    assert json.loads(out.read_text())["benchmark"] == "train_gpu"


def test_score_precision_agreement_and_time_default_train(scripts, tmp_path, capsys):
    out = _earlier(tmp_path / "spa.json")
    _refused(scripts("score_precision_agreement").main, ["--out", str(out)], capsys, out)
    out = _earlier(tmp_path / "tdt.json")
    with pytest.raises(SystemExit):
        scripts("time_default_train").parse_args(["--out", str(out)])
    assert str(out) in capsys.readouterr().err
    assert scripts("time_default_train").parse_args(["--out", str(out), "--overwrite"]).overwrite


def test_bn_aware_prune(scripts, tmp_path, capsys, monkeypatch):
    bn = scripts("bn_aware_prune")
    monkeypatch.setattr(bn, "RESULTS", str(tmp_path))
    out = _earlier(tmp_path / "bn_aware_prune.json")
    _refused(bn.main, ["--epochs", "1", "--seeds", "1"], capsys, out)


def test_accuracy_grids_refuse_to_drop_runs(scripts, tmp_path, capsys, monkeypatch):
    bsa = scripts("block_size_accuracy")
    monkeypatch.setattr(bsa, "RESULTS", str(tmp_path))
    path = tmp_path / "block_size_accuracy.json"
    old = {"meta": {"settings": {"epochs": 30, "update_every": 25}},
           "results": [{"key": bsa.key(bsa.grid([64], [0.9], 1)[0])}]}
    path.write_text(json.dumps(old))
    before = path.read_text()
    for argv in (["--epochs", "2"],                    # other settings
                 ["--blocks", "16", "--seeds", "1"]):  # the block-64 run would be dropped
        with pytest.raises(SystemExit) as e:
            bsa.main(argv)
        assert e.value.code == 2 and str(path) in capsys.readouterr().err
        assert path.read_text() == before

    pm = scripts("paper_mnist1d")
    path = tmp_path / "g.json"
    spec = {"method": "rigl", "sparsity": 0.9, "block": 16, "update_every": 5, "seed": 0}
    path.write_text(json.dumps({"meta": {"settings": {"epochs": 30}},
                                "results": [{"key": pm.run_key(spec)}]}))
    before = path.read_text()
    for argv in (["--epochs", "3"], ["--blocks", "1", "--seeds", "1"]):
        with pytest.raises(SystemExit) as e:
            pm.main([*argv, "--out-dir", str(tmp_path), "--name", "g", "--no-docs"])
        assert e.value.code == 2 and str(path) in capsys.readouterr().err
        assert path.read_text() == before


# ------------------------------------------------------------------------------ `itop bench`
def test_itop_bench_overwrite_reaches_the_scripts(tmp_path, monkeypatch, capsys):
    from itop.app.cli import main
    scripts_dir = tmp_path / "scripts"
    scripts_dir.mkdir()
    (scripts_dir / "bench_args.py").write_text(
        "import json, os, sys\n"
        "# takes --quick, --out-dir and --overwrite\n"
        "out = sys.argv[sys.argv.index('--out-dir') + 1]\n"
        "open(os.path.join(out, 'argv.json'), 'w').write(json.dumps(sys.argv[1:]))\n")
    out = tmp_path / "runs"
    assert main(["bench", "--benchmarks-dir", str(scripts_dir), "--out", str(out)]) == 0
    assert "--overwrite" not in json.loads((out / "argv.json").read_text())
    assert main(["bench", "--benchmarks-dir", str(scripts_dir), "--out", str(out),
                 "--overwrite"]) == 0
    assert "--overwrite" in json.loads((out / "argv.json").read_text())
