"""RigL gradient scores of same-shape linear layers computed together (issue 14, update cost):
``itop_kernels::block_grad_norms_group`` against ``block_grad_norms`` of each layer.

On the CPU the group op runs each layer's GEMM as its own ``mm`` (``gemm="mm"``, what ``"auto"``
picks there): a CPU ``bmm`` is not bit for bit the ``mm`` of each slice at every shape (checked
below), and the group scores must equal the per-layer ones BIT FOR BIT, float32 ``"exact"`` and
bfloat16 ``"auto"`` (bf16 GEMMs on this AVX512-BF16 CPU) alike, with micro-batches, several
chunks of block-rows and several sub-groups. On a GPU the op runs one ``bmm`` per chunk, compared
within 1e-3 relative (cuBLAS batched and single GEMMs may round differently).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import itop
from itop import topology
from itop.layers import SparseLinear
from itop_kernels import block_norms
from itop_kernels.block_norms import block_grad_norms, block_grad_norms_group

CASES = [  # (x dtype, precision)
    (torch.float32, "exact"), (torch.float32, "auto"), (torch.bfloat16, "auto"),
    (torch.float32, "bf16"), (torch.bfloat16, "exact")]


def _inputs(G, rows, K, N, dtype, seed=0, dy_dtype=None, device="cpu"):
    """Per layer, micro-batches ``[m, K]`` / ``[m, N]`` for each ``m`` in ``rows``."""
    g = torch.Generator().manual_seed(seed)
    xs = [[torch.randn(m, K, generator=g).to(device=device, dtype=dtype) for m in rows]
          for _ in range(G)]
    dys = [[torch.randn(m, N, generator=g).to(device=device, dtype=dy_dtype or dtype)
            for m in rows] for _ in range(G)]
    return xs, dys


def _per_layer(xs, dys, bs, precision):
    """What SparseLinear._grad_scores computes for each layer."""
    out = []
    for px, pd in zip(xs, dys):
        x = torch.cat(px)
        out.append(block_grad_norms(x, torch.cat(pd).to(x.dtype), bs, precision=precision))
    return out


@pytest.mark.parametrize("dtype,precision", CASES)
@pytest.mark.parametrize("bs,K,N,rows", [(8, 32, 96, (16,)), (8, 128, 32, (5, 11)),
                                         (1, 24, 16, (7,)), (16, 64, 48, (3, 9, 4))])
def test_group_scores_equal_the_per_layer_ones_bit_for_bit(dtype, precision, bs, K, N, rows):
    xs, dys = _inputs(3, rows, K, N, dtype)
    got = block_grad_norms_group(xs, dys, bs, precision=precision)
    assert got.shape == (3, N // bs, K // bs) and got.dtype == torch.float32
    for g, ref in enumerate(_per_layer(xs, dys, bs, precision)):
        assert torch.equal(got[g], ref), g


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "exact"), (torch.bfloat16, "auto")])
def test_group_scores_bit_for_bit_where_a_cpu_bmm_is_not(dtype, precision):
    """At M = 1024, K = N = 768 (a third of the block-rows per chunk) a CPU bmm rounds unlike
    the per-slice mm (measured with torch 2.13 on the development CPU); the CPU's group op keeps
    one mm per layer and stays bit for bit (``gemm="bmm"`` forced here fails)."""
    xs, dys = _inputs(2, (1024,), 768, 768, dtype, seed=4)
    got = block_grad_norms_group(xs, dys, 32, precision=precision)
    for g, ref in enumerate(_per_layer(xs, dys, 32, precision)):
        assert torch.equal(got[g], ref), g


@pytest.mark.parametrize("dtype,precision", CASES)
def test_chunks_and_sub_groups_keep_the_scores_bit_for_bit(monkeypatch, dtype, precision):
    """Small caps: 2 block-rows per chunk (a ragged last one), 2 layers per sub-group of 5."""
    K, N, bs, M = 32, 40, 8, 12
    monkeypatch.setattr(block_norms, "_CHUNK_ELEMENTS", 2 * bs * K)
    monkeypatch.setattr(block_norms, "_GROUP_CHUNK_ELEMENTS", 4 * bs * K)
    monkeypatch.setattr(block_norms, "_STACK_ELEMENTS", 2 * M * (K + N) + 1)
    assert block_norms._sub_groups(5, M, K, N, 2 * bs * K, 2 * M * (K + N) + 1,
                                   4 * bs * K) == [2, 2, 1]
    # dy in another dtype than x: cast to x's first, as the layers do
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    xs, dys = _inputs(5, (M,), K, N, dtype, seed=1, dy_dtype=other)
    calls = []
    real_mm = torch.mm

    def count_mm(*a, **kw):
        calls.append(1)
        return real_mm(*a, **kw)

    monkeypatch.setattr(block_norms.torch, "mm", count_mm)
    got = block_grad_norms_group(xs, dys, bs, precision=precision)
    assert len(calls) == 5 * 3           # 5 layers × 3 chunks of block-rows (2, 2, 1)
    monkeypatch.setattr(block_norms.torch, "mm", real_mm)
    for g, ref in enumerate(_per_layer(xs, dys, bs, precision)):
        assert torch.equal(got[g], ref), g


def test_sub_groups_bound_the_stacked_inputs():
    """Sub-groups: balanced, in order, each within both caps, one layer when one exceeds them."""
    assert block_norms._sub_groups(12, 8192, 3072, 768, 768 * 3072, 1 << 28, 1 << 25) == [6, 6]
    assert block_norms._sub_groups(12, 8192, 768, 768, 768 * 768, 1 << 28, 1 << 25) == [12]
    assert block_norms._sub_groups(3, 100, 10, 10, 10, 1, 1) == [1, 1, 1]
    for G in range(1, 14):
        sizes = block_norms._sub_groups(G, 64, 32, 32, 256, 64 * 64 * 4, 1 << 20)
        assert sum(sizes) == G and max(sizes) <= 4 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_gemm_variant_is_close_to_the_per_layer_scores(dtype):
    """``gemm="bmm"`` (the GPU's) on the CPU: within 1e-3 relative (a CPU bmm is not bit for bit
    the per-slice mm at every shape: see the module docstring)."""
    xs, dys = _inputs(4, (6, 10), 64, 32, dtype, seed=2)
    got = block_grad_norms_group(xs, dys, 8, precision="exact", gemm="bmm")
    for g, ref in enumerate(_per_layer(xs, dys, 8, "exact")):
        torch.testing.assert_close(got[g], ref, rtol=1e-3, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuBLAS bmm)")
@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "auto"), (torch.float32, "exact")])
def test_group_scores_on_the_gpu_are_close_to_the_per_layer_ones(dtype, precision):
    """On CUDA ``"auto"`` runs one bmm per chunk: within 1e-3 relative of the per-layer op."""
    xs, dys = _inputs(6, (256, 256), 512, 1536, dtype, seed=3, device="cuda")
    got = block_grad_norms_group(xs, dys, 64, precision=precision)
    refs = _per_layer(xs, dys, 64, precision)
    for g, ref in enumerate(refs):
        torch.testing.assert_close(got[g], ref, rtol=1e-3, atol=1e-6)


def test_group_op_is_a_custom_op_with_a_fake_impl():
    xs, dys = _inputs(2, (4, 4), 16, 8, torch.float32)
    flat_x = [a for p in xs for a in p]
    flat_dy = [a for p in dys for a in p]
    torch.library.opcheck(torch.ops.itop_kernels.block_grad_norms_group,
                          (flat_x, flat_dy, 2, 4, "exact", "mm"))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx = [mode.from_tensor(a) for a in flat_x]
        fd = [mode.from_tensor(a) for a in flat_dy]
        out = torch.ops.itop_kernels.block_grad_norms_group(fx, fd, 2, 4, "exact", "bmm")
    assert out.shape == (2, 2, 4) and out.dtype == torch.float32


def test_group_op_bad_arguments():
    x, dy = torch.randn(4, 16), torch.randn(4, 8)
    with pytest.raises(ValueError, match="gemm"):
        block_grad_norms_group([x], [dy], 4, gemm="cublas")
    with pytest.raises(ValueError, match="block_size"):
        block_grad_norms_group([x], [dy], 3)
    with pytest.raises(ValueError, match="equally long"):
        block_grad_norms_group([x, x], [dy], 4)
    with pytest.raises(ValueError, match="same M"):
        block_grad_norms_group([x, torch.randn(5, 16)], [dy, torch.randn(5, 8)], 4)
    with pytest.raises(ValueError, match="same K and N"):
        block_grad_norms_group([x, torch.randn(4, 8)], [dy, dy], 4)
    with pytest.raises(ValueError, match="micro-batches"):
        block_grad_norms_group([x, [x[:2], x[2:]]], [dy, [dy[:2], dy[2:]]], 4)
    with pytest.raises(ValueError, match="dtype"):
        block_grad_norms_group([x, x.double()], [dy, dy.double()], 4)
    with pytest.raises(TypeError, match="torch.Tensors"):
        block_grad_norms_group(["x"], [dy], 4)


# --------------------------------------------------------------------------- through the manager
class Twins(nn.Module):
    """Three 16→32→16 MLP blocks (two groups of three) and a 16→12 head (alone)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(16, 32) for _ in range(3))
        self.fc2 = nn.ModuleList(nn.Linear(32, 16) for _ in range(3))
        self.head = nn.Linear(16, 12)

    def forward(self, x):
        for a, b in zip(self.fc, self.fc2):
            x = x + b(torch.relu(a(x)))
        return self.head(x)


@pytest.mark.parametrize("precision", ["exact", "auto"])
def test_manager_scores_grouped_equal_per_layer_with_micro_batches_and_a_scaler(
        monkeypatch, precision):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = itop.sparsify(Twins(), 0.3, block_size=4, distribution="uniform")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    mgr = itop.TopologyManager(model, opt, update_every=1, total_steps=10,
                               score_precision=precision, grad_scaler=scaler)
    for mb in range(2):                                  # two micro-batches, one step
        x = torch.randn(6 + mb, 16)
        scaler.scale(F.cross_entropy(model(x), torch.randint(0, 12, (6 + mb,)))).backward()
    groups = mgr._score_groups()
    assert sorted(len(g) for g in groups) == [1, 3, 3]
    grouped = mgr._grad_scores()
    monkeypatch.setattr(topology, "_BATCH_SCORES", False)
    assert len(mgr._score_groups()) == 7
    alone = mgr._grad_scores()
    for (name, _), a, b in zip(mgr.layers, grouped, alone):
        assert torch.equal(a, b), name
    mgr.close()


def test_layers_with_their_own_scores_or_strided_captures_are_scored_alone():
    class Mine(SparseLinear):
        def _grad_scores(self, precision="exact"):
            return super()._grad_scores(precision)

    a, b = SparseLinear(8, 8, density=0.5, block_size=4), Mine(8, 8, density=0.5, block_size=4)
    c = SparseLinear(8, 8, density=0.5, block_size=4)
    for m in (a, b, c):
        m._captured = [[torch.randn(3, 8), torch.randn(3, 8), None]]
    c._captured = [[torch.randn(8, 3).t(), torch.randn(3, 8), None]]
    assert a._grad_score_key() is not None
    assert b._grad_score_key() is None and c._grad_score_key() is None
    a._captured = []
    assert a._grad_score_key() is None


def test_momentum_ema_of_grouped_scores_follows_its_formula_bit_for_bit():
    """``"momentum"`` growth: ``ema = β·ema + (1-β)·finite(scores)`` every step, by foreach ops
    over all layers and one non-finite fix per group tensor; a NaN planted in a group's scores
    is fixed in that layer only."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = itop.sparsify(Twins(), 0.3, block_size=4, distribution="uniform")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.8)
    mgr = itop.TopologyManager(model, opt, update_every=50, total_steps=100, growth="momentum")
    seen = []
    real = mgr._grad_scores

    def spy():
        out = real()
        out[0].view(-1)[1] = float("nan")                 # a row of the fc group's tensor
        assert out[0]._base is not None and out[0]._base is out[2]._base
        seen.append([s.clone() for s in out])
        return out

    mgr._grad_scores = spy
    lo = torch.finfo(torch.float32).min
    ref = None
    for step in range(3):
        x = torch.randn(5, 16)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 12, (5,))).backward()
        opt.step()
        mgr.step()
        fixed = [torch.nan_to_num(s, nan=lo) for s in seen[-1]]
        ref = [(1 - 0.8) * s for s in fixed] if ref is None else \
            [r.mul_(0.8).add_(s, alpha=1 - 0.8) for r, s in zip(ref, fixed)]
        for (name, _), r in zip(mgr.layers, ref):
            assert torch.equal(mgr._ema[name], r), (step, name)
    assert mgr._ema[mgr.layers[0][0]].view(-1)[1] < -1e30
    assert torch.isfinite(mgr._ema[mgr.layers[2][0]]).all()
    mgr.close()


def test_auto_gemm_stacks_small_layers_on_cuda_only():
    """``"auto"``: the CPU keeps one mm per layer (bit for bit); CUDA stacks into one bmm while
    a layer's ``M·(K+N)`` is at most ``_BMM_MAX_ELEMENTS`` (GPT-2 small at 1024 rows), one mm per
    layer above it (at 8192 rows the stacking copy would cost more than the launches saved)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not block_norms._use_bmm("auto", cpu, 16, 32, 32)
    assert block_norms._use_bmm("bmm", cpu, 16, 32, 32)
    assert block_norms._use_bmm("auto", cuda, 1024, 768, 3072)
    assert not block_norms._use_bmm("auto", cuda, 8192, 768, 768 * 4)
    assert not block_norms._use_bmm("mm", cuda, 16, 32, 32)
