"""BlockLayout: metadata against a brute-force reading of the mask, gather/scatter, errors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from itop_kernels import BlockLayout


def brute_force(mask: torch.Tensor):
    """Reference metadata from Python loops over the mask (test-only)."""
    R, C = mask.shape
    active = [(r, c) for r in range(R) for c in range(C) if mask[r, c]]
    index = {rc: i for i, rc in enumerate(active)}
    row_ptr = [0]
    for r in range(R):
        row_ptr.append(row_ptr[-1] + sum(1 for (rr, _) in active if rr == r))
    col_ptr, t_rows, t_blocks = [0], [], []
    for c in range(C):
        rows = [r for r in range(R) if mask[r, c]]
        col_ptr.append(col_ptr[-1] + len(rows))
        t_rows += rows
        t_blocks += [index[(r, c)] for r in rows]
    return active, row_ptr, col_ptr, t_rows, t_blocks


masks = st.integers(1, 6).flatmap(lambda R: st.integers(1, 6).flatmap(
    lambda C: st.lists(st.booleans(), min_size=R * C, max_size=R * C).map(
        lambda bits: torch.tensor(bits, dtype=torch.bool).reshape(R, C))))


@settings(max_examples=60, deadline=None)
@given(mask=masks, known_nnz=st.booleans())
def test_metadata_matches_brute_force(mask, known_nnz):
    nnz = int(mask.sum()) if known_nnz else None
    lay = BlockLayout.from_mask(mask, 16, nnz=nnz)
    active, row_ptr, col_ptr, t_rows, t_blocks = brute_force(mask)
    assert lay.nnz == len(active)
    assert lay.row_idx.tolist() == [r for r, _ in active]
    assert lay.col_idx.tolist() == [c for _, c in active]
    assert lay.row_ptr.tolist() == row_ptr
    assert lay.col_ptr.tolist() == col_ptr
    assert lay.t_row_idx.tolist() == t_rows
    assert lay.t_block_idx.tolist() == t_blocks
    for t in (lay.row_ptr, lay.col_idx, lay.row_idx, lay.col_ptr, lay.t_row_idx, lay.t_block_idx):
        assert t.dtype == torch.int32
    assert torch.equal(lay.block_mask, mask)


def _expanded(mask, bs):
    return mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)


@settings(max_examples=30, deadline=None)
@given(mask=masks, bs=st.sampled_from([1, 2, 16]), seed=st.integers(0, 2**32 - 1))
def test_gather_scatter_roundtrip_2d(mask, bs, seed):
    lay = BlockLayout.from_mask(mask, bs)
    W = torch.randn(lay.shape, generator=torch.Generator().manual_seed(seed))
    v = lay.gather(W)
    assert v.shape == (lay.nnz, bs, bs)
    for i in range(lay.nnz):
        r, c = lay.row_idx[i].item(), lay.col_idx[i].item()
        assert torch.equal(v[i], W[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs])
    assert torch.equal(lay.scatter(v), W * _expanded(mask, bs))


def test_gather_scatter_roundtrip_4d():
    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    bs = 4
    lay = BlockLayout.from_mask(mask, bs)
    W = torch.randn(12, 12, 3, 5)
    v = lay.gather(W)
    assert v.shape == (lay.nnz, 3, 5, bs, bs)
    i = 2  # third active block in row-major order: (2, 0)
    assert torch.equal(v[i, 1, 4], W[8:12, 0:4, 1, 4])
    assert torch.equal(lay.scatter(v), W * _expanded(mask, bs)[:, :, None, None])


def test_scatter_is_differentiable():
    mask = torch.rand(4, 3) < 0.5
    mask[0, 0] = True
    lay = BlockLayout.from_mask(mask, 2)
    v = torch.randn(lay.nnz, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: lay.scatter(v), (v,))


@pytest.mark.parametrize("kind", ["empty", "dense", "single", "empty_row_col"])
def test_edge_masks(kind):
    mask = {"empty": torch.zeros(3, 4, dtype=torch.bool),
            "dense": torch.ones(3, 4, dtype=torch.bool),
            "single": torch.zeros(1, 1, dtype=torch.bool).logical_not(),
            "empty_row_col": torch.tensor([[1, 0, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)}[kind]
    lay = BlockLayout.from_mask(mask, 32)
    assert lay.nnz == int(mask.sum())
    assert lay.row_ptr[-1].item() == lay.nnz and lay.col_ptr[-1].item() == lay.nnz
    W = torch.randn(lay.shape)
    assert torch.equal(lay.scatter(lay.gather(W)), W * _expanded(mask, 32))


def test_known_nnz_builds_the_same_layout():
    mask = torch.rand(16, 16) < 0.3
    a = BlockLayout.from_mask(mask, 32)
    b = BlockLayout.from_mask(mask, 32, nnz=int(mask.sum()))
    for name in ("row_ptr", "col_idx", "row_idx", "col_ptr", "t_row_idx", "t_block_idx"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_repr_and_density():
    lay = BlockLayout.from_mask(torch.tensor([[True, False], [False, False]]), 16)
    assert lay.density == 0.25 and "nnz=1" in repr(lay) and "block_size=16" in repr(lay)
    assert lay.shape == (32, 32) and lay.grid_shape == (2, 2)


@pytest.mark.parametrize("mask, bs, exc, words", [
    (torch.ones(2, 2), 16, TypeError, "torch.bool"),
    ([[True]], 16, TypeError, "torch.Tensor"),
    (torch.ones(2, 2, 2, dtype=torch.bool), 16, ValueError, "2-D"),
    (torch.ones(2, 2, dtype=torch.bool), 0, ValueError, "block_size"),
    (torch.ones(2, 2, dtype=torch.bool), 2.0, ValueError, "block_size"),
])
def test_from_mask_rejects_bad_input(mask, bs, exc, words):
    with pytest.raises(exc, match=words):
        BlockLayout.from_mask(mask, bs)


def test_bad_nnz_and_shapes_are_rejected():
    mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="nnz"):
        BlockLayout.from_mask(mask, 16, nnz=5)
    lay = BlockLayout.from_mask(mask, 16)
    with pytest.raises(ValueError, match="does not divide"):
        lay.gather(torch.randn(32, 33))
    with pytest.raises(ValueError, match="covers"):
        lay.gather(torch.randn(64, 32))
    with pytest.raises(ValueError, match="values must have shape"):
        lay.scatter(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="does not divide the weight's rows"):
        BlockLayout.grid_for((100, 64), 32)
    assert BlockLayout.grid_for((96, 64, 3, 3), 32) == (3, 2)
