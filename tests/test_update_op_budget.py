"""Guard on the host cost of a topology update (issue 14): the aten ops one update runs per
sparse layer (``benchmarks/update_ops.py``), for linear and conv layers, random and gradient
growth, SGD with momentum and AdamW, stay under a ceiling set just above their count when it
was set (34-37 per layer; main's code before the cut ran 71-80). On a GPU each op is a kernel
launch or a few µs of host time, so a regression here is a slower update there. If a change
needs more ops, raise the ceiling in the same commit and say why.

With layers of the same shape updated as one group (``itop.topology._BATCH_LAYERS``, the
default) the count is per UPDATE: ops grow with the number of groups, not of layers. The
per-layer ceilings below hold the per-layer path (batching off, what a layer without a twin
runs); ``GROUP_CEILING`` holds the three identical layers of ``update_ops`` as one group and
``GPT2_TOY_CEILING`` a GPT-2-like toy (4 blocks × GPT-2's 4 sparse layer shapes, interleaved:
4 groups of 4), each set just above its count when batching landed.

The gradient score ops (``itop_kernels::block_grad_norms`` and friends) count as the aten ops
inside them (casts, GEMMs, square, block sum, sqrt: ``update_ops.EXPANDED``), so the gradient
ceilings were raised with that counting (per layer 39 -> 54 linear, 37 -> 49 conv), and the
GPT-2 toy's gradient ceiling set just above its count once same-shape linear layers were scored
together (``itop.topology._BATCH_SCORES``: 532 -> 424 ops per update, 268 -> 200 launching, on
the CPU, where each layer keeps its own GEMM and casts; ``GPT2_TOY_BMM_CEILING``: the stacked,
batched-GEMM variant a GPU runs for small layers, 364 and 172)."""
import pytest

from bench_scripts import bench_module

# per layer, per update: (all aten ops, ops that launch a kernel on a GPU)
CEILING = {("linear", "random"): (36, 28), ("linear", "gradient"): (54, 37),
           ("conv", "random"): (36, 28), ("conv", "gradient"): (49, 38)}


# per update of 3 identical layers (one group): (all aten ops, ops that launch a kernel)
GROUP_CEILING = {("linear", "random"): (60, 35), ("linear", "gradient"): (99, 48),
                 ("conv", "random"): (60, 35), ("conv", "gradient"): (101, 64)}
# per update of the GPT-2-like toy (16 sparse layers in 4 groups); per-layer path: 544 (432)
# random, 832 (560) gradient; batched update with per-layer scores: 532 (268) gradient
GPT2_TOY_CEILING = {"random": (232, 140), "gradient": (430, 204)}
# the same with the group scores' stacked, batched GEMM (block_norms._GROUP_GEMM = "bmm", what
# CUDA's "auto" runs for layers of M·(K+N) <= block_norms._BMM_MAX_ELEMENTS)
GPT2_TOY_BMM_CEILING = (368, 176)


@pytest.fixture
def per_layer(monkeypatch):
    from itop import topology
    monkeypatch.setattr(topology, "_BATCH_LAYERS", False)


@pytest.fixture(scope="module")
def update_ops():
    return bench_module("update_ops")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("growth", ["random", "gradient"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_update_ops_per_layer_stay_under_the_ceiling(update_ops, per_layer, kind, growth,
                                                      optimizer):
    res = update_ops.count_update_ops(kind, growth, optimizer)
    total, launching = CEILING[kind, growth]
    assert res["per_layer"] <= total and res["launching_per_layer"] <= launching, (
        f"{kind}/{growth}/{optimizer}: {res['per_layer']:g} ops per layer "
        f"({res['launching_per_layer']:g} launching), ceiling {total} ({launching}); "
        f"by category {res['by_category']}")
    assert res["per_layer"] >= 20   # the counter saw the update


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("growth", ["random", "gradient"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_update_ops_of_a_group_stay_under_the_ceiling(update_ops, kind, growth, optimizer):
    res = update_ops.count_update_ops(kind, growth, optimizer)
    total, launching = GROUP_CEILING[kind, growth]
    n = res["layers"]
    assert res["total"] <= total and res["launching_per_layer"] * n <= launching, (
        f"{kind}/{growth}/{optimizer}: {res['total']} ops per update of {n} layers "
        f"({res['launching_per_layer'] * n:g} launching), ceiling {total} ({launching}); "
        f"by category {res['by_category']}")
    assert res["total"] >= 40   # the counter saw the update


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_gpt2_toy_update_ops_per_update(update_ops, growth, optimizer):
    res = update_ops.count_update_ops("gpt2_toy", growth, optimizer, layers=4)
    total, launching = GPT2_TOY_CEILING[growth]
    assert res["layers"] == 16
    launched = res["launching_per_layer"] * res["layers"]
    assert res["total"] <= total and launched <= launching, (
        f"gpt2_toy/{growth}/{optimizer}: {res['total']} ops per update ({launched:g} "
        f"launching), ceiling {total} ({launching}); by category {res['by_category']}")
    assert res["total"] >= 150   # the counter saw the update


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_gpt2_toy_ceiling_fails_without_batching(update_ops, per_layer, growth):
    """The per-update ceiling is one the per-layer path breaks (by far)."""
    res = update_ops.count_update_ops("gpt2_toy", growth, "adamw", layers=4)
    total, launching = GPT2_TOY_CEILING[growth]
    assert res["total"] > 1.8 * total and res["launching_per_layer"] * 16 > 2.5 * launching


def test_the_group_guard_sees_a_planted_op(update_ops, monkeypatch):
    """Three extra ops in the batched state move break the group ceiling."""
    from itop import storage
    move = storage._move_rows_group

    def slower(groups, order, keep):
        keep = keep.to(storage.torch.uint8).bool().clone()
        return move(groups, order, keep)

    monkeypatch.setattr(storage, "_move_rows_group", slower)
    res = update_ops.count_update_ops("linear", "random", "adamw")
    assert res["total"] > GROUP_CEILING["linear", "random"][0]


def test_the_guard_sees_a_planted_op(update_ops, per_layer, monkeypatch):
    """Three extra ops in the state move (a dtype round trip of the kept-rows mask and a copy)
    break the ceiling."""
    from itop import storage
    move = storage._move_rows

    def slower(tensors, order, keep):
        keep = keep.to(storage.torch.uint8).bool().clone()
        return move(tensors, order, keep)

    monkeypatch.setattr(storage, "_move_rows", slower)
    res = update_ops.count_update_ops("linear", "random", "adamw")
    assert res["per_layer"] > CEILING["linear", "random"][0]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_gpt2_toy_update_ops_with_batched_gemm_scores(update_ops, monkeypatch, optimizer):
    """What a GPU runs: one ``bmm`` per group and chunk instead of one ``mm`` per layer."""
    from itop_kernels import block_norms
    monkeypatch.setattr(block_norms, "_GROUP_GEMM", "bmm")
    res = update_ops.count_update_ops("gpt2_toy", "gradient", optimizer, layers=4)
    total, launching = GPT2_TOY_BMM_CEILING
    launched = res["launching_per_layer"] * res["layers"]
    assert res["total"] <= total and launched <= launching, (
        f"{res['total']} ops ({launched:g} launching), ceiling {total} ({launching}); "
        f"by category {res['by_category']}")
    assert res["by_op"]["aten.bmm.out"] * res["layers"] == 4   # one per group (one chunk each)
    assert "aten.mm.out" not in res["by_op"]


def test_gpt2_toy_gradient_ceiling_fails_with_scores_per_layer(update_ops, monkeypatch):
    """The gradient ceiling is one the batched update breaks when each layer computes its own
    scores (``_BATCH_SCORES`` off: the update before the scores were batched)."""
    from itop import topology
    monkeypatch.setattr(topology, "_BATCH_SCORES", False)
    res = update_ops.count_update_ops("gpt2_toy", "gradient", "adamw", layers=4)
    total, launching = GPT2_TOY_CEILING["gradient"]
    assert res["total"] > total and res["launching_per_layer"] * 16 > launching
    assert res["score_op_calls"] == {"itop_kernels::block_grad_norms": 16}


def test_score_ops_are_counted_by_the_ops_inside_them(update_ops):
    """The gradient score op counts as its casts, GEMMs and reductions, not as one op."""
    one = update_ops.count_update_ops("gpt2_toy", "gradient", "adamw", layers=4, expand=False)
    inner = update_ops.count_update_ops("gpt2_toy", "gradient", "adamw", layers=4)
    assert inner["score_op_calls"] == {"itop_kernels::block_grad_norms_group": 4}
    assert not any(op.startswith("itop_kernels") for op in inner["by_op"])
    assert one["by_op"]["itop_kernels.block_grad_norms_group.default"] * 16 == 4
    for op in ("aten.mm.out", "aten.square_.default", "aten.sum.dim_IntList",
               "aten.sqrt_.default"):
        assert inner["by_op"][op] > 0, op
    assert inner["total"] > one["total"] + 4 * 5
