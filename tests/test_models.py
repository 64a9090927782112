"""The paper models: shapes on every data set's samples, parameter counts of the standard
architectures, sparsification with block size 16, and the FLOP accounting."""
import warnings

import pytest
import torch
from torch import nn

import itop
from itop.app.flops import flop_report, layer_flops
from itop.app.models import MODELS, build_model

SMALL = ["mlp", "lenet5", "cnn1d"]
LARGE = ["vgg-c", "vgg-d", "vgg-like", "resnet-18", "resnet-34", "wrn-16-8", "wrn-28-2"]


@pytest.mark.parametrize("name", SMALL + LARGE)
@pytest.mark.parametrize("shape,classes", [((1, 1, 40), 10), ((1, 8, 8), 10),
                                           ((3, 32, 32), 100)])
def test_model_output_shape(name, shape, classes):
    if name in LARGE and shape == (3, 32, 32) and name not in ("resnet-18", "wrn-28-2"):
        shape = (3, 16, 16)  # same code paths, a quarter of the time
    torch.manual_seed(0)
    m = build_model(name, shape, classes)
    m.train()
    out = m(torch.randn(2, *shape))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


# parameter counts of the reference implementations (10 classes; CIFAR for the conv nets)
@pytest.mark.parametrize("name,shape,count", [
    ("mlp", (1, 28, 28), 266_610),          # LeNet-300-100
    ("lenet5", (1, 28, 28), 431_080),       # Caffe LeNet-5
    ("resnet-18", (3, 32, 32), 11_173_962),
    ("resnet-34", (3, 32, 32), 21_282_122),
    ("wrn-28-2", (3, 32, 32), 1_467_610),
    ("wrn-16-8", (3, 32, 32), 10_961_370),
])
def test_parameter_counts(name, shape, count):
    m = build_model(name, shape, 10)
    assert sum(p.numel() for p in m.parameters()) == count


def test_vgg_c_has_1x1_convs_and_d_does_not():
    c = build_model("vgg-c", (3, 32, 32), 10)
    d = build_model("vgg-d", (3, 32, 32), 10)
    k_c = [m.kernel_size for m in c.modules() if isinstance(m, nn.Conv2d)]
    k_d = [m.kernel_size for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(k_c) == len(k_d) == 13
    assert k_c.count((1, 1)) == 3 and k_d.count((1, 1)) == 0


def test_unknown_model_and_bad_shape():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("resnet-50", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="in_shape"):
        build_model("mlp", (40,), 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", (1, 1, 40), 1)


@pytest.mark.parametrize("name", ["cnn1d", "resnet-18", "wrn-28-2", "vgg-like"])
def test_sparsify_block16_trains(name):
    """Every conv/linear layer the block size divides becomes sparse (uniform densities, so
    no layer is made dense by ERK), and a backward pass reaches every sparse layer."""
    shape = (1, 1, 40) if name == "cnn1d" else (3, 8, 8)
    torch.manual_seed(0)
    m = build_model(name, shape, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = itop.sparsify(m, 0.2, distribution="uniform", block_size=16)
    sparse = [x for x in m.modules() if isinstance(x, itop.SparseLayer)]
    dense = [x for x in m.modules() if type(x) in (nn.Conv2d, nn.Linear)]
    assert sparse
    # only the layers with a channel count 16 does not divide stay dense
    for x in dense:
        dims = (x.in_features, x.out_features) if isinstance(x, nn.Linear) else \
            (x.in_channels, x.out_channels)
        assert any(v % 16 for v in dims)
    out = m(torch.randn(4, *shape))
    out.sum().backward()
    assert all(s.values.grad is not None for s in sparse)


def test_layer_flops_counts_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 5 * 5, 16))
    rows = layer_flops(model, (3, 5, 5))
    assert [r.dense for r in rows] == [2 * 8 * 3 * 9 * 25, 2 * 200 * 16]
    assert all(r.density == 1.0 and not r.sparse_layer for r in rows)


def test_flop_report_fractions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    model = itop.sparsify(model, 0.25, distribution="uniform", block_size=1)
    rows = layer_flops(model, (1, 1, 64))
    f_d = 2 * 64 * 32 + 2 * 32 * 16
    assert sum(r.dense for r in rows) == f_d
    assert [r.density for r in rows] == [0.25, 0.25]
    rep = flop_report(rows, steps=100, dense_grad_steps=0)
    assert rep.inference_fraction == pytest.approx(0.25)
    assert rep.training_fraction == pytest.approx(0.25)
    # RigL: 10 update steps each add one dense forward's worth (the dense weight gradient)
    rep = flop_report(rows, steps=100, dense_grad_steps=10)
    assert rep.training_fraction == pytest.approx((100 * 3 * 0.25 * f_d + 10 * f_d) /
                                                  (100 * 3 * f_d))
    assert rep.inference_fraction == pytest.approx(0.25)


def test_all_models_registered():
    assert set(MODELS) == set(SMALL + LARGE)
