"""The Triton linear kernels under every config the GPU benchmark sweeps (``SWEEP``), and the
features those configs switch on, against a float64 reference through the interpreter.

Outputs start as NaN inside NaN guard bands (the ``triton_device`` fixture), so an element a
config forgets to write, or writes out of bounds, fails. Masks have empty block-rows and a
transpose that is a real permutation (:mod:`block_masks`).
"""
import warnings

import pytest
import torch

from block_masks import random_mask
from kernel_launches import FakeKernel, fake_cuda_cached_launches
from itop_kernels import BlockLayout
from itop_kernels import triton_linear as tl_mod
from numerics import rel_err, tol_for


def _operands(mask, bs, M, dtype, device, gen):
    lay = BlockLayout.from_mask(mask, bs)
    R, C = mask.shape
    W = torch.randn(R * bs, C * bs, dtype=torch.float64, generator=gen)
    x = torch.randn(M, C * bs, dtype=torch.float64, generator=gen).to(dtype)
    dy = torch.randn(M, R * bs, dtype=torch.float64, generator=gen).to(dtype)
    b = torch.randn(R * bs, dtype=torch.float64, generator=gen).to(dtype)
    values = lay.gather(W).to(dtype)
    dense = lay.scatter(values.double())
    ref = {"fwd": x.double() @ dense.t() + b.double(), "dx": dy.double() @ dense,
           "dw": lay.gather(dy.double().t() @ x.double())}
    dev = lambda t: t.to(device)  # noqa: E731
    return lay.to(device), dev(x), dev(dy), dev(b), dev(values), ref


def _run(kernel, cfg, lay, x, dy, b, values, bs):
    if kernel == "fwd":
        return tl_mod.linear_forward(x, values, lay.row_ptr, lay.col_idx, b, bs, lay.shape[0],
                                     config=cfg)
    if kernel == "dx":
        return tl_mod.linear_grad_input(dy, values, lay.col_ptr, lay.t_row_idx, lay.t_block_idx,
                                        bs, lay.shape[1], config=cfg)
    return tl_mod.linear_grad_weight(dy, x, lay.row_idx, lay.col_idx, bs, config=cfg)


def _check(kernel, cfg, bs, M, dtype, device, gen, R=3, C=3):
    mask = random_mask(R, C, 0.5, "empty_rows" if R >= 3 else "random", gen)
    lay, x, dy, b, values, ref = _operands(mask, bs, M, dtype, device, gen)
    out = _run(kernel, cfg, lay, x, dy, b, values, bs)
    assert out.dtype == dtype and out.shape == ref[kernel].shape
    err = rel_err(out, ref[kernel])
    assert err <= tol_for(dtype, device), (kernel, cfg, dtype, err)
    return out


SWEPT = [(k, bs, cfg) for k in ("fwd", "dx", "dw") for bs, cfgs in tl_mod.SWEEP[90][k].items()
         for cfg in cfgs if bs <= 64]


@pytest.mark.parametrize("kernel,bs,cfg", SWEPT, ids=[f"{k}-{bs}-{c.tag()}" for k, bs, c in SWEPT])
def test_every_sweep_candidate_is_correct(triton_device, gen, kernel, bs, cfg):
    """Each candidate at its own tiles (block sizes up to 64; 128 shares the code paths and is
    compiled by the AOT test), fp16 at a ragged M."""
    _check(kernel, cfg, bs, 37, torch.float16, triton_device, gen)


C = tl_mod._Cfg


@pytest.mark.parametrize("kernel,cfg", [
    ("fwd", C(16, 16, 4, 2, group_m=3)), ("dx", C(16, 16, 4, 2, group_m=3)),
    ("fwd", C(16, 16, 4, 2, wide=2)), ("dx", C(16, 16, 4, 2, wide=2)),
    ("fwd", C(16, 16, 4, 2, wide=4, group_m=2)), ("dx", C(16, 8, 4, 2, wide=4, group_m=2)),
    ("fwd", C(16, 16, 4, 2, ordered=True)), ("dx", C(16, 16, 4, 2, wide=2, ordered=True)),
    ("fwd", C(16, 8, 4, 2, wide=2, group_m=3, ordered=True)),
    ("dw", C(16, 16, 4, 2, split=0)), ("dw", C(16, 8, 4, 2, split=5)),
    ("dw", C(32, 16, 4, 2, split=2)),
], ids=lambda v: v if isinstance(v, str) else v.tag())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_candidate_features_at_small_tiles(triton_device, gen, kernel, cfg, dtype):
    """Grouped order with a ragged last group, WIDE groups that overrun the block-rows
    (columns), and split-M dW with a ragged last split, at tiles small enough that a short M
    spans many row tiles and splits."""
    _check(kernel, cfg, 16, 200, dtype, triton_device, gen, R=5, C=3)


def test_split_dw_really_splits_and_is_deterministic(triton_device, gen, monkeypatch):
    """The split path runs (a workspace of several splits, then the fixed-order sum) and gives
    bit-identical results on repeated calls."""
    cfg = C(16, 16, 4, 2, split=0)
    seen = []
    real = tl_mod.empty_output

    def spy(shape, dtype, device):
        seen.append(tuple(shape))
        return real(shape, dtype, device)
    monkeypatch.setattr(tl_mod, "empty_output", spy)
    a = _check("dw", cfg, 16, 200, torch.float32, triton_device, gen, R=5, C=3)
    splits = seen[0][0]
    assert len(seen[0]) == 4 and splits > 1, seen
    mask = random_mask(5, 3, 0.5, "empty_rows", gen)
    lay, x, dy, _, _, _ = _operands(mask, 16, 200, torch.float32, triton_device, gen)
    one = tl_mod.linear_grad_weight(dy, x, lay.row_idx, lay.col_idx, 16, config=cfg)
    two = tl_mod.linear_grad_weight(dy, x, lay.row_idx, lay.col_idx, 16, config=cfg)
    assert torch.equal(one, two) and a.shape[1:] == (16, 16)


def test_nnz_order_is_largest_first_and_follows_in_place_rewrites():
    ptr = torch.tensor([0, 1, 4, 4, 6], dtype=torch.int32)      # counts 1, 3, 0, 2
    first = tl_mod._by_nnz(ptr)
    assert first.tolist() == [1, 3, 0, 2]
    assert first.dtype == torch.int32
    ptr.copy_(torch.tensor([0, 2, 2, 3, 6], dtype=torch.int32))  # counts 2, 0, 1, 3
    second = tl_mod._by_nnz(ptr)
    assert second.tolist() == [3, 0, 2, 1]
    # the same storage, rewritten: a CUDA graph captured before the update reads the new order
    assert second.data_ptr() == first.data_ptr() and first.tolist() == [3, 0, 2, 1]


def test_dw_split_count_follows_sm_count_and_nnz():
    big, small = C(64, 64, 4, 3, split=0), C(64, 64, 4, 3, split=3)
    cuda = torch.device("cpu")
    # few active blocks: split so that about 4 programs run per SM (2 "SMs" in the interpreter)
    assert tl_mod._dw_splits(big, 16384, 1, 64, cuda) == 8
    # many blocks: no split
    assert tl_mod._dw_splits(big, 16384, 10_000, 64, cuda) == 1
    # a fixed count, capped by M (each split reduces at least 4 steps)
    assert tl_mod._dw_splits(small, 16384, 1, 64, cuda) == 3
    assert tl_mod._dw_splits(small, 300, 1, 64, cuda) == 2


def test_configs_and_sweep_are_distinct_and_valid():
    for arch in (80, 90):
        for kernel, table in tl_mod.SWEEP[arch].items():
            for bs, cfgs in table.items():
                shipped = tl_mod.CONFIGS[arch][kernel][(bs, "16bit")]
                assert len(set(cfgs)) == len(cfgs) and shipped not in cfgs, (kernel, bs)
                for c in cfgs:
                    assert bs % c.tile_k == 0 and c.wide >= 1 and c.group_m >= 1, c
                    assert (c.split != 1) == (kernel == "dw"), c


def test_cached_launch_replays_the_compiled_handle(monkeypatch):
    """``triton_launch.launch`` in cached mode: the first call of a specialization goes through
    ``kernel[grid]``, later ones call the compiled launcher with every argument in signature
    order; a new pointer alignment or int divisibility compiles again; a failing replay warns
    once and falls back to the plain launch."""
    from itop_kernels import triton_launch as L

    k = FakeKernel(["a", "n", "BS", "HAS"])
    t = torch.zeros(64)
    fake_cuda_cached_launches(monkeypatch, L)
    L.launch(k, (3,), (t, 32), {"HAS": True, "BS": 16}, 4, 3)
    L.launch(k, (5, 2), (t, 48), {"HAS": True, "BS": 16}, 4, 3)
    assert len(k.plain) == 1 and k.plain[0][2] == {"HAS": True, "BS": 16, "num_warps": 4,
                                                    "num_stages": 3}
    assert k.compiled.runs == [(5, 2, 1, 7, "fn", "meta", None, None, None, t, 48, 16, True)]
    L.launch(k, (3,), (t, 33), {"HAS": True, "BS": 16}, 4, 3)        # 33 % 16 != 0
    L.launch(k, (3,), (t[1:], 32), {"HAS": True, "BS": 16}, 4, 3)    # misaligned pointer
    L.launch(k, (3,), (t, 32), {"HAS": True, "BS": 16}, 8, 3)        # other launch options
    assert len(k.plain) == 4 and len(k.compiled.runs) == 1

    def broken(*a):
        raise RuntimeError("launcher changed")
    k.compiled.run = broken
    with pytest.warns(RuntimeWarning, match="cached Triton launches disabled"):
        L.launch(k, (3,), (t, 32), {"HAS": True, "BS": 16}, 4, 3)
    assert len(k.plain) == 5 and L.launch_mode() == "plain"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.launch(k, (3,), (t, 32), {"HAS": True, "BS": 16}, 4, 3)   # plain now, no new warning
    assert len(k.plain) == 6
    with pytest.raises(ValueError, match="mode must be one of"):
        L.set_launch_mode("fast")
