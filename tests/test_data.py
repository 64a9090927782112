"""Data sets: CIFAR loaders on tiny archives written here in the real format, the offline and
checksum errors, augmentation, MNIST-1D generation and caching, digits, synthetic."""
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from itop.app.data import (CIFAR_ARCHIVES, DataError, _augment, _download, load_cifar,
                       load_dataset, prepare_batch)


def _batch(n: int, seed: int, label_keys) -> dict:
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"tiny batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"filenames": [f"img{i}.png".encode() for i in range(n)]}
    for key, classes in label_keys:
        d[key] = [int(v) for v in rng.integers(0, classes, n)]
    return d


def _write_archive(path: str, members: dict) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


@pytest.fixture
def cifar10_dir(tmp_path):
    members = {f"cifar-10-batches-py/data_batch_{i}": _batch(6, i, [(b"labels", 10)])
               for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = _batch(4, 9, [(b"labels", 10)])
    members["cifar-10-batches-py/batches.meta"] = {b"label_names": [b"x"] * 10}
    _write_archive(str(tmp_path / "cifar-10-python.tar.gz"), members)
    return tmp_path, members


def test_cifar10_archive(cifar10_dir):
    d, members = cifar10_dir
    ds = load_cifar("cifar10", str(d), download=False)
    assert ds.train_x.shape == (30, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (4, 3, 32, 32)
    assert ds.num_classes == 10 and ds.in_shape == (3, 32, 32) and ds.augment
    # batches in order; the 3072 bytes of a row are the R, G, B planes, each row-major 32×32
    b2 = members["cifar-10-batches-py/data_batch_2"]
    img = ds.train_x[6 + 3]
    assert torch.equal(img[0].flatten(), torch.from_numpy(b2[b"data"][3, :1024]))
    assert torch.equal(img[2, 1, 5], torch.tensor(b2[b"data"][3, 2048 + 32 + 5]))
    assert ds.train_y[6:12].tolist() == b2[b"labels"]
    assert ds.test_y.tolist() == members["cifar-10-batches-py/test_batch"][b"labels"]


def test_cifar100_archive(tmp_path):
    keys = [(b"fine_labels", 100), (b"coarse_labels", 20)]
    members = {"cifar-100-python/train": _batch(7, 1, keys),
               "cifar-100-python/test": _batch(3, 2, keys)}
    _write_archive(str(tmp_path / "cifar-100-python.tar.gz"), members)
    ds = load_cifar("cifar100", str(tmp_path), download=False)
    assert ds.num_classes == 100
    assert ds.train_x.shape == (7, 3, 32, 32)
    assert ds.train_y.tolist() == members["cifar-100-python/train"][b"fine_labels"]


def test_cifar_missing_offline_and_malformed(tmp_path):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz.*md5 c58f30108f"):
        load_cifar("cifar10", str(tmp_path), download=False)
    _write_archive(str(tmp_path / "cifar-10-python.tar.gz"),
                   {"cifar-10-batches-py/data_batch_1": _batch(2, 0, [(b"labels", 10)])})
    with pytest.raises(DataError, match="no member 'cifar-10-batches-py/data_batch_2'"):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_download_offline_and_checksum(tmp_path):
    target = str(tmp_path / "a.tar.gz")
    with pytest.raises(DataError, match="offline.*a.tar.gz"):
        _download((tmp_path / "does-not-exist").as_uri(), target, "0" * 32)
    assert not os.listdir(tmp_path)  # no partial file left behind
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    with pytest.raises(DataError, match="checksum mismatch"):
        _download(src.as_uri(), target, "0" * 32)
    assert not os.path.exists(target)
    _download(src.as_uri(), target, hashlib.md5(b"payload").hexdigest())
    with open(target, "rb") as f:
        assert f.read() == b"payload"


def test_cifar_archive_specs_are_the_published_ones():
    assert CIFAR_ARCHIVES["cifar10"]["md5"] == "c58f30108f718f92721af3b95e74349a"
    assert CIFAR_ARCHIVES["cifar100"]["md5"] == "eb9058c3a382ffc7106e4002c42a8d85"


def test_augment_is_a_padded_crop_or_its_flip():
    x = torch.rand(20, 3, 6, 7)
    out = _augment(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(20):
        found = None
        for dy in range(9):
            for dx in range(9):
                crop = pad[i, :, dy:dy + 6, dx:dx + 7]
                if torch.equal(out[i], crop):
                    found = "plain"
                elif torch.equal(out[i], crop.flip(-1)):
                    found = "flip"
        assert found is not None, f"sample {i} is no crop of the padded input"
        flips += found == "flip"
    assert 0 < flips < 20  # both orientations occur (fixed seed)
    # deterministic in the generator
    assert torch.equal(out, _augment(x, torch.Generator().manual_seed(3)))


def test_prepare_batch_normalizes_cifar(cifar10_dir):
    d, _ = cifar10_dir
    ds = load_cifar("cifar10", str(d), download=False)
    x = prepare_batch(ds, ds.test_x, train=False, device=torch.device("cpu"))
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    assert torch.allclose(x, (ds.test_x.float() / 255 - mean) / std)
    with pytest.raises(ValueError, match="generator"):
        prepare_batch(ds, ds.train_x[:2], train=True, device=torch.device("cpu"))


def test_mnist1d_generated_and_cached(tmp_path):
    state = np.random.get_state()
    ds = load_dataset("mnist1d", str(tmp_path))
    assert np.array_equal(np.random.get_state()[1], state[1])  # global RNG untouched
    assert ds.train_x.shape == (4000, 1, 1, 40) and ds.test_x.shape == (1000, 1, 1, 40)
    assert ds.train_x.dtype == torch.float32
    assert sorted(ds.train_y.unique().tolist()) == list(range(10))
    assert os.path.exists(tmp_path / "mnist1d.npz")
    again = load_dataset("mnist1d", str(tmp_path))
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)


def test_digits_and_synthetic():
    ds = load_dataset("digits")
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1.0
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.in_shape == (3, 8, 8)
    assert len(a.train_y.unique()) > 3  # the teacher uses several classes
    with pytest.raises(ValueError, match="data must be one of"):
        load_dataset("imagenet")
