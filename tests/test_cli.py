"""The ``itop`` command line end to end on tiny settings: train (sparse/static/dense, CIFAR
archive), resume bit for bit, report, bench, bad arguments, ``python -m itop`` and torchrun."""
import hashlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from itop.app.cli import main
from itop.app.plots import PLOT_FILES
from itop.app.train import lr_at, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--batch-size", "64", "--update-every", "2", "--block-size", "4",
        "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_INTERPRET"] = "0"
    env["ITOP_NO_DOWNLOAD"] = "1"  # never fetch CIFAR from a test, online or not
    return env


def _strip_times(records):
    out = []
    for r in records:
        r = {k: v for k, v in r.items()
             if k not in ("epoch_time", "wall_time", "train_time", "out", "resume",
                          "stop_after_epoch")}
        out.append(r)
    return out


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "r")
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["train", *TINY, "--epochs", "2", "--out", out])
    assert rc == 0
    return out, buf.getvalue()


def test_train_writes_metrics_checkpoint_and_plots(sparse_run):
    out, printed = sparse_run
    for key in ("test accuracy", "ITOP rate", "FLOP fraction   training", "inference",
                "wall time"):
        assert key in printed
    recs = read_metrics(out)
    kinds = [r["type"] for r in recs]
    assert kinds[0] == "config" and kinds[-1] == "final"
    assert recs[0]["score_precision"] == "auto"
    assert kinds.count("epoch") == 2 and kinds.count("final") == 1
    cfg = recs[0]
    assert cfg["steps_per_epoch"] == 512 // 64 and cfg["total_steps"] == 16
    final = recs[-1]
    topo = [r for r in recs if r["type"] == "topology"]
    # initial record + one record per update (steps 2, 4, ..., 14 < 16)
    assert [r["step"] for r in topo] == [0, 2, 4, 6, 8, 10, 12, 14]
    rates = [r["itop_rate"] for r in topo]
    assert rates == sorted(rates) and rates[-1] > rates[0]
    assert final["itop_rate"] == pytest.approx(rates[-1])
    assert 0 < final["density"] < final["itop_rate"] <= 1
    assert final["steps"] == 16 and final["finished"]
    # gradient growth: the training FLOPs include the dense gradients of the 7 update steps
    assert final["dense_grad_steps"] == 7
    assert final["training_flop_fraction"] > final["inference_flop_fraction"]
    assert final["inference_flop_fraction"] < 0.5
    assert 0.0 <= final["test_acc"] <= 1.0
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ck["epoch"] == 2 and ck["step"] == 16
    for name in PLOT_FILES:
        path = os.path.join(out, name)
        with open(path, "rb") as f:
            head = f.read(8)
        assert head == PNG_MAGIC and os.path.getsize(path) > 5000, name


def test_report_rerenders_plots_and_prints_tables(sparse_run, capsys):
    out, _ = sparse_run
    for name in PLOT_FILES:
        os.remove(os.path.join(out, name))
    assert main(["report", out]) == 0
    text = capsys.readouterr().out
    assert "test acc" in text and "ITOP rate" in text and "layer" in text
    assert text.count("\n1 ") + text.count("\n2 ") >= 2  # one row per epoch
    for name in PLOT_FILES:
        assert os.path.getsize(os.path.join(out, name)) > 5000


def test_resume_is_bit_identical(tmp_path, capsys):
    args = ["train", *TINY, "--block-size", "1", "--epochs", "2", "--seed", "3"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main([*args, "--out", a, "--no-plots"]) == 0
    assert main([*args, "--out", b, "--no-plots", "--stop-after-epoch", "1"]) == 0
    assert "stopped after epoch 1" in capsys.readouterr().out
    part = read_metrics(b)
    assert [r["type"] for r in part].count("epoch") == 1
    assert main([*args, "--out", b, "--no-plots", "--resume"]) == 0
    ra, rb = _strip_times(read_metrics(a)), _strip_times(read_metrics(b))
    assert [r["type"] for r in ra] == [r["type"] for r in rb]
    assert ra == rb  # every loss, accuracy, ITOP rate and the final record, exactly
    ca = torch.load(os.path.join(a, "checkpoint.pt"), weights_only=True)
    cb = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    for k, v in ca["topology"]["fired"].items():
        assert torch.equal(v, cb["topology"]["fired"][k]), k


def test_resume_restores_the_dropout_rng(tmp_path, capsys):
    """A model with dropout (wrn-28-2, dropout 0.3) draws on torch's global RNG after a resume:
    only a restored RNG state continues bit for bit."""
    args = ["train", *TINY, "--model", "wrn-28-2", "--block-size", "16", "--batch-size", "512",
            "--epochs", "2", "--seed", "5", "--no-plots"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main([*args, "--out", a]) == 0
    assert main([*args, "--out", b, "--stop-after-epoch", "1"]) == 0
    assert main([*args, "--out", b, "--resume"]) == 0
    capsys.readouterr()
    ra, rb = _strip_times(read_metrics(a)), _strip_times(read_metrics(b))
    assert [r["type"] for r in ra].count("epoch") == 2
    assert ra == rb  # losses and accuracies of both epochs, exactly
    ca = torch.load(os.path.join(a, "checkpoint.pt"), weights_only=False)
    cb = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=False)
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k


def test_static_and_dense(tmp_path, capsys):
    s, d = str(tmp_path / "s"), str(tmp_path / "d")
    assert main(["train", *TINY, "--static", "--epochs", "1", "--out", s, "--no-plots"]) == 0
    assert main(["train", *TINY, "--dense", "--epochs", "1", "--out", d, "--no-plots"]) == 0
    fs, fd = read_metrics(s)[-1], read_metrics(d)[-1]
    topo = [r for r in read_metrics(s) if r["type"] == "topology"]
    assert [r["step"] for r in topo] == [0]  # the topology never changed
    assert fs["itop_rate"] == pytest.approx(fs["density"]) and fs["dense_grad_steps"] == 0
    assert fs["training_flop_fraction"] == pytest.approx(fs["inference_flop_fraction"])
    assert fd["itop_rate"] == 1.0 and fd["training_flop_fraction"] == 1.0
    assert fd["inference_flop_fraction"] == 1.0 and fd["method"] == "dense"


def test_train_on_a_cifar_archive(tmp_path, capsys):
    from test_data import _batch, _write_archive
    members = {f"cifar-10-batches-py/data_batch_{i}": _batch(8, i, [(b"labels", 10)])
               for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = _batch(8, 9, [(b"labels", 10)])
    _write_archive(str(tmp_path / "cifar-10-python.tar.gz"), members)
    out = str(tmp_path / "run")
    assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--model", "mlp",
                 "--batch-size", "20", "--epochs", "1", "--block-size", "4", "--no-progress",
                 "--no-plots", "--out", out]) == 0
    recs = read_metrics(out)
    assert recs[0]["in_shape"] == [3, 32, 32] and recs[0]["steps_per_epoch"] == 2
    assert recs[-1]["finished"]


def test_cli_precisions_are_the_kernels():
    from itop.app.cli import PRECISIONS
    from itop_kernels.block_norms import PRECISIONS as KERNEL_PRECISIONS
    assert PRECISIONS == KERNEL_PRECISIONS


def test_lr_schedule():
    assert [lr_at(s, 8, 1.0) for s in range(8)] == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize("argv,needle", [
    (["train", "--density", "1.5"], "--density: '1.5' is not a density in (0, 1]"),
    (["train", "--density", "0"], "--density"),
    (["train", "--block-size", "0"], "--block-size: '0' is not a positive integer"),
    (["train", "--model", "resnet-50"], "--model: invalid choice: 'resnet-50'"),
    (["train", "--growth", "magic"], "--growth: invalid choice"),
    (["train", "--score-precision", "fp8"], "--score-precision: invalid choice"),
    (["train", "--device", "gpu"], "--device: 'gpu' is not a device"),
    (["train", "--dense", "--static"], "--static: not allowed with argument --dense"),
    (["train", "--prune-rate", "2"], "--prune-rate"),
    (["train", "--resume"], "--resume without a PATH needs --out"),
    (["report", "/nonexistent/run"], "has no metrics.jsonl"),
    (["bench", "--only", "bench_nothing"], "unknown benchmark"),
])
def test_bad_arguments_exit_2_with_a_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_runtime_errors_are_messages_not_tracebacks(tmp_path):
    """Through ``python -m itop``: bad combinations found after parsing exit 2 with one line."""
    for argv, needle in [
        (["--batch-size", "1000"], "--batch-size 1000 is larger than the training set"),
        (["--data", "cifar10", "--data-dir", str(tmp_path / "none")],
         "not found; copy cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a"),
        (["--resume", str(tmp_path / "missing.pt")], "no checkpoint"),
    ]:
        res = subprocess.run([sys.executable, "-m", "itop", "train", "--data", "synthetic",
                              "--no-progress", "--out", str(tmp_path / "o"), *argv],
                             capture_output=True, text=True, env=_env(), cwd=str(tmp_path),
                             timeout=300)
        assert res.returncode == 2, res.stderr
        assert needle in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and "itop train: error:" in res.stderr


def test_bench_runs_scripts_quick(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its results go to a new runs/bench-<time> directory here
    (tmp_path / "bench_ok.py").write_text(textwrap.dedent("""
        import sys
        print("| shape | ours |")
        print("quick" if "--quick" in sys.argv else "full")
    """))
    (tmp_path / "bench_broken.py").write_text("raise SystemExit(3)  # --quick\n")
    (tmp_path / "helper.py").write_text("raise SystemExit(9)\n")  # not a bench_ script
    assert main(["bench", "--benchmarks-dir", str(tmp_path), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["bench_broken", "bench_ok"]
    assert main(["bench", "--benchmarks-dir", str(tmp_path), "--only", "bench_ok"]) == 0
    text = capsys.readouterr().out
    assert "| shape | ours |" in text and "quick" in text and "full" not in text.split("===")[2]
    assert main(["bench", "--benchmarks-dir", str(tmp_path)]) == 1
    assert "failed: bench_broken" in capsys.readouterr().err
    assert main(["bench", "--list"]) == 0  # the repository's own benchmarks
    assert "bench_conv" in capsys.readouterr().out.split()


def _mask_hash_of_checkpoint(path: str) -> str:
    ck = torch.load(path, weights_only=True)
    h = hashlib.sha256()
    for k, v in ck["model"].items():
        if k.endswith("block_mask"):
            h.update(k[: -len(".block_mask")].encode())
            h.update(v.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_torchrun_two_processes(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "itop", "train", *TINY, "--epochs", "1", "--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(tmp_path),
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("test accuracy") == 1  # rank 0 prints
    recs = read_metrics(out)
    kinds = [r["type"] for r in recs]
    # two writers would duplicate records
    assert kinds.count("config") == 1 and kinds.count("epoch") == 1 and kinds.count("final") == 1
    final = recs[-1]
    assert final["world_size"] == 2 and recs[0]["world_size"] == 2
    assert final["steps"] == 512 // 64  # the global batch is split over the ranks
    assert len(final["mask_hashes"]) == 2
    assert final["mask_hashes"][0] == final["mask_hashes"][1]  # same topology on both ranks
    assert final["mask_hashes"][0] == _mask_hash_of_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert final["itop_rate"] > final["density"]  # the topology did change
    assert sorted(os.listdir(out)) == sorted(["metrics.jsonl", "checkpoint.pt", *PLOT_FILES])


def test_multiplier_extends_training_and_amp_runs(tmp_path, capsys):
    """``--multiplier 2`` doubles the epochs and the schedule's length (ITOP's extended
    training, same ΔT); ``--amp`` (bf16 autocast on the CPU) trains to finite losses."""
    out = str(tmp_path / "m")
    assert main(["train", *TINY, "--epochs", "1", "--multiplier", "2", "--amp", "--out", out,
                 "--no-plots"]) == 0
    recs = read_metrics(out)
    assert recs[0]["total_steps"] == 2 * 8
    ep = [r for r in recs if r["type"] == "epoch"]
    assert [r["epoch"] for r in ep] == [1, 2]
    assert ep[0]["lr"] == 0.1 and ep[1]["lr"] == pytest.approx(0.001)  # decays at 8 and 12
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]) for r in ep)
    assert [r["step"] for r in recs if r["type"] == "topology"][-1] == 14
