"""No code runs from a user's files and no run is ever lost (issue 16, items 1-7 and the
command-line side of 11): checkpoints load with ``weights_only=True``, CIFAR batches through a
restricted unpickler, a used run directory is refused, a finished run stays finished, a resume
takes (and keeps) its stored settings, bad run files give one line and exit 2 touching nothing,
and ``itop bench`` writes into a new directory, streaming its scripts' output."""
import hashlib
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from itop.app.cli import main
from itop.app.data import DataError, load_cifar
from itop.app.run_files import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--batch-size", "64", "--update-every", "2", "--block-size", "4",
        "--no-progress", "--no-plots"]
#: A run that is not the command line's default: --model mlp, --lr 0.05.
RUN = ["train", *TINY, "--model", "mlp", "--lr", "0.05", "--epochs", "2"]


class _OpensAFile:
    """Unpickling this creates ``path`` (what a crafted file would do with worse code)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _tree(d: str) -> dict:
    """{file name: sha256} of a directory: to show that nothing in it changed."""
    out = {}
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _strip(records):
    drop = ("epoch_time", "wall_time", "train_time", "out", "resume", "stop_after_epoch")
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 2-epoch run and the same run stopped after epoch 1."""
    base = tmp_path_factory.mktemp("runs")
    finished, partial = str(base / "finished"), str(base / "partial")
    assert main([*RUN, "--out", finished]) == 0
    assert main([*RUN, "--out", partial, "--stop-after-epoch", "1"]) == 0
    return finished, partial


def _copy(src: str, tmp_path, name: str = "run") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _fails_with_one_line(argv, capsys, needle: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"itop {argv[0]}: error:"), err
    assert needle in err, err
    return err


# ------------------------------------------------------------------------------ item 1
def test_a_crafted_checkpoint_runs_no_code(runs, tmp_path, capsys):
    d = _copy(runs[1], tmp_path)
    marker = str(tmp_path / "code-ran")
    ck = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)
    ck["config"]["note"] = _OpensAFile(marker)
    torch.save(ck, os.path.join(d, "checkpoint.pt"))
    before = _tree(d)
    _fails_with_one_line(["train", "--resume", d], capsys, "refused to load it")
    _fails_with_one_line(["report", d], capsys, "refused to load it")
    assert not os.path.exists(marker)
    assert _tree(d) == before


def test_checkpoints_hold_only_what_weights_only_loads(runs):
    ck = torch.load(os.path.join(runs[0], "checkpoint.pt"), weights_only=True)
    assert ck["config"]["model"] == "mlp" and isinstance(ck["rng"]["torch"], torch.Tensor)
    assert ck["topology"]["step_count"] == ck["step"] == 16


# ------------------------------------------------------------------------------ item 2
def _cifar_dir(tmp_path, replace: dict) -> str:
    from test_data import _batch, _write_archive
    members = {f"cifar-10-batches-py/data_batch_{i}": _batch(4, i, [(b"labels", 10)])
               for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = _batch(4, 9, [(b"labels", 10)])
    members.update(replace)
    _write_archive(str(tmp_path / "cifar-10-python.tar.gz"), members)
    return str(tmp_path)


def test_a_crafted_cifar_archive_runs_no_code(tmp_path):
    import codecs
    marker = str(tmp_path / "code-ran")

    class Rot13:
        def __reduce__(self):
            return (codecs.encode, ("data", "rot13"))  # pickled as _codecs.encode

    for evil, needle in [(_OpensAFile(marker), "global io.open is not allowed"),
                         ({b"data": Rot13()}, "latin-1 text only")]:
        d = _cifar_dir(tmp_path, {"cifar-10-batches-py/data_batch_3": evil})
        with pytest.raises(DataError, match="data_batch_3' is not a CIFAR python batch") as e:
            load_cifar("cifar10", d, download=False)
        assert needle in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("batch,needle", [
    ({b"data": np.array([[1] * 3072], dtype=object), b"labels": [0]}, "not an array of integers"),
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, "labels outside [0, 10)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "1 labels for 2 images"),
    ({b"labels": [1]}, "no 'data' entry"),
    ([1, 2, 3], "not a dict"),
])
def test_malformed_cifar_batches_are_data_errors(tmp_path, batch, needle):
    d = _cifar_dir(tmp_path, {"cifar-10-batches-py/test_batch": batch})
    with pytest.raises(DataError, match="test_batch") as e:
        load_cifar("cifar10", d, download=False)
    assert needle in str(e.value)


def test_cifar_batches_with_str_keys_load(tmp_path):
    from test_data import _batch
    batch = {k.decode(): v for k, v in _batch(4, 9, [(b"labels", 10)]).items()}
    ds = load_cifar("cifar10", _cifar_dir(tmp_path, {"cifar-10-batches-py/test_batch": batch}),
                    download=False)
    assert ds.test_y.tolist() == batch["labels"] and ds.train_x.shape == (20, 3, 32, 32)


# ------------------------------------------------------------------------------ item 3
def test_a_used_run_directory_is_refused_unless_overwrite(runs, tmp_path, capsys):
    d = _copy(runs[0], tmp_path)
    before = _tree(d)
    _fails_with_one_line([*RUN, "--out", d], capsys, "already holds files")
    assert _tree(d) == before
    with open(os.path.join(d, "notes.txt"), "w") as f:
        f.write("mine")
    assert main([*RUN, "--epochs", "1", "--out", d, "--overwrite"]) == 0
    recs = read_metrics(d)
    assert [r["type"] for r in recs].count("epoch") == 1 and recs[0]["epochs"] == 1
    assert open(os.path.join(d, "notes.txt")).read() == "mine"  # not an itop file: kept
    _fails_with_one_line(["train", "--resume", d, "--overwrite"], capsys, "exclude each other")


# ------------------------------------------------------------------------------ item 4
def test_resuming_a_finished_run_keeps_its_record(runs, tmp_path, capsys):
    d = _copy(runs[0], tmp_path)
    before = _tree(d)
    final = read_metrics(d)[-1]
    capsys.readouterr()
    assert main(["train", "--resume", d]) == 0
    out = capsys.readouterr().out
    assert "already finished its 2 epochs" in out
    assert f"test accuracy   {100 * final['test_acc']:.2f} %" in out and "nan" not in out
    assert _tree(d) == before


# ------------------------------------------------------------------------------ item 5
def test_resume_takes_the_runs_own_settings(runs, tmp_path, capsys):
    """Resuming the mlp/lr 0.05 run without repeating its options continues it exactly as the
    uninterrupted run went; more epochs are applied and recorded."""
    d = _copy(runs[1], tmp_path)
    assert main(["train", "--resume", d, "--no-progress", "--no-plots"]) == 0
    assert _strip(read_metrics(d)) == _strip(read_metrics(runs[0]))
    assert main(["train", "--resume", d, "--epochs", "3", "--no-progress", "--no-plots"]) == 0
    recs = read_metrics(d)
    assert recs[0]["epochs"] == 3 and recs[0]["total_steps"] == 24 and recs[0]["lr"] == 0.05
    assert {"type": "resume", "epoch": 2, "step": 16, "changes": {"epochs": [2, 3]}} in recs
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [1, 2, 3]
    assert recs[-1]["type"] == "final" and recs[-1]["finished"] and recs[-1]["steps"] == 24
    ck = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)
    assert ck["config"]["epochs"] == 3


@pytest.mark.parametrize("extra,needle", [
    (["--lr", "0.1"], "trained with --lr 0.05, this command asks for --lr 0.1"),  # the default
    (["--model", "cnn1d"], "--model mlp"),
    (["--density", "0.2", "--growth", "random"], "--density 0.1 --growth gradient"),
    (["--amp"], "no --amp"),
])
def test_resume_refuses_settings_that_contradict_the_run(runs, tmp_path, capsys, extra, needle):
    d = _copy(runs[1], tmp_path)
    before = _tree(d)
    _fails_with_one_line(["train", "--resume", d, *extra], capsys, needle)
    assert _tree(d) == before


# ------------------------------------------------------------------------------ item 6
def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _garbage(path):
    open(path, "wb").write(b"not a checkpoint\n")


def _tear_metrics(d):
    with open(os.path.join(d, "metrics.jsonl"), "a") as f:
        f.write('{"type": "epoch", "epo')


def _other_model(path):
    ck = torch.load(path, weights_only=True)
    ck["config"]["model"] = "cnn1d"
    torch.save(ck, path)


@pytest.mark.parametrize("damage,needle", [
    (lambda d: _truncate(os.path.join(d, "checkpoint.pt")), "not a readable checkpoint"),
    (lambda d: _garbage(os.path.join(d, "checkpoint.pt")), "not a readable checkpoint"),
    (_tear_metrics, "is not valid JSON (cut off: an interrupted write?)"),
    (lambda d: _other_model(os.path.join(d, "checkpoint.pt")), "does not fit the model"),
])
def test_bad_run_files_give_one_line_and_touch_nothing(runs, tmp_path, capsys, damage, needle):
    d = _copy(runs[1], tmp_path)
    damage(d)
    before = _tree(d)
    _fails_with_one_line(["train", "--resume", d], capsys, needle)
    assert _tree(d) == before


def test_resume_into_another_directory_is_refused(runs, tmp_path, capsys):
    d = _copy(runs[1], tmp_path)
    new = str(tmp_path / "new")
    _fails_with_one_line(["train", "--resume", d, "--out", new], capsys,
                         "a run continues in its own directory")
    assert not os.path.exists(new)


# ------------------------------------------------------------------------------ item 11 (CLI)
def test_density_one_is_explained(tmp_path, capsys):
    err = _fails_with_one_line(["train", *TINY, "--density", "1", "--out", str(tmp_path / "o")],
                               capsys, "use --dense for a dense baseline")
    assert "block" not in err and not os.path.exists(tmp_path / "o")


def test_starved_layout_and_slow_amp_are_warned(tmp_path, capsys, monkeypatch):
    import itop.app.train as train_module
    monkeypatch.setattr(train_module, "native_bf16_matmul", lambda device: False)
    assert main(["train", *TINY, "--block-size", "16", "--density", "0.02", "--growth", "random",
                 "--epochs", "1", "--amp", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "warning: --amp: this CPU has no native bfloat16" in err
    assert "warning: itop.sparsify:" in err and "features.3 has 1 active block" in err


# ------------------------------------------------------------------------------ item 7
_STREAMING = """
import os, sys, time
print("A", flush=True)
for _ in range(400):                    # 20 s at most: wait until our "A" has been shown
    if os.path.exists(os.environ["ITOP_TEST_GO"]):
        print("B")
        break
    time.sleep(0.05)
else:
    print("TIMEOUT")
out = sys.argv[sys.argv.index("--out-dir") + 1]
open(os.path.join(out, "stream.json"), "w").write("{}")
"""


class _Screen(io.StringIO):
    """A stdout that, once it has shown "A", lets the script go on."""

    def __init__(self, go: str):
        super().__init__()
        self.go = go

    def write(self, text: str) -> int:
        n = super().write(text)
        if "A\n" in self.getvalue() and not os.path.exists(self.go):
            open(self.go, "w").close()
        return n


def test_bench_writes_to_a_new_directory_and_streams(tmp_path, monkeypatch, capsys):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "bench_stream.py").write_text(_STREAMING + "# takes --quick\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    go = str(tmp_path / "go")
    monkeypatch.setenv("ITOP_TEST_GO", go)
    screen = _Screen(go)
    monkeypatch.setattr(sys, "stdout", screen)
    assert main(["bench", "--benchmarks-dir", str(scripts)]) == 0
    text = screen.getvalue()
    assert "B" in text.split() and "TIMEOUT" not in text  # shown while the script ran
    assert "--quick --out-dir runs" in text
    (made,) = os.listdir(work / "runs")
    assert made.startswith("bench-") and os.listdir(work / "runs" / made) == ["stream.json"]
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(SystemExit) as e:  # a directory that holds results is not reused
        main(["bench", "--benchmarks-dir", str(scripts), "--out", f"runs/{made}"])
    assert e.value.code == 2 and "already holds files" in capsys.readouterr().err
    assert main(["bench", "--quick", "--benchmarks-dir", str(scripts), "--out", f"runs/{made}",
                 "--overwrite"]) == 0


def test_repository_bench_scripts_take_quick_and_out_dir(tmp_path):
    bdir = os.path.join(ROOT, "benchmarks")
    for name in sorted(os.listdir(bdir)):
        if name.startswith("bench_") and name.endswith(".py"):
            text = open(os.path.join(bdir, name), encoding="utf-8").read()
            assert '"--quick"' in text and '"--out-dir"' in text, name
            assert '"--overwrite"' in text, name   # `itop bench --overwrite` passes it on
    # one of them for real, at a toy size: its files land in --out-dir
    res = subprocess.run([sys.executable, os.path.join(bdir, "bench_topology_update.py"),
                          "--quick", "--width", "64", "--depth", "1", "--batch", "8",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["topology_update_cpu_quick.json",
                                            "topology_update_cpu_quick.png"]
