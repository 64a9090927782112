"""TMA (tensor-descriptor) configs of the Triton linear kernels (``_Cfg.tma``, sm_90 candidates).

Under the interpreter (fp32/fp16, float64 reference, NaN-poisoned outputs in guard bands):
each kernel with ``tma=True`` and the features it composes with, odd ``M``, one block, empty
block-rows, a fully dense layout, and inputs TMA cannot read as they are (a misaligned base:
copied to an aligned buffer with one warning, then TMA; strided: copied contiguous, then TMA). That the sm_90 build really
loads through TMA (``cp.async.bulk.tensor`` in its PTX) is asserted on every TMA sweep case by
``tests/test_compile_check.py``; a GPU-only test runs the TMA configs in bf16.
"""
import warnings

import pytest
import torch

from block_masks import random_mask
from kernel_launches import (FakeKernel, at_odd_offset, fake_cuda_cached_launches,
                             record_operand_bases)
from itop_kernels import triton_launch as L
from itop_kernels import triton_linear as tl_mod
from numerics import rel_err, tol_for
from test_linear_candidates import _check, _operands, _run
from triton.tools.tensor_descriptor import TensorDescriptor

C = tl_mod._Cfg


@pytest.fixture
def descs(monkeypatch):
    """Records the block shape of every TMA descriptor the wrappers build (proof the TMA
    kernel, not the pointer one, ran), and re-arms the once-per-process alignment warning."""
    made = []
    real = tl_mod._desc

    def spy(t, rows, cols, block):
        made.append(tuple(block))
        return real(t, rows, cols, block)
    monkeypatch.setattr(tl_mod, "_desc", spy)
    monkeypatch.setattr(L, "_ALIGN_WARNED", False)
    return made


TMA_CASES = [
    ("fwd", C(16, 16, 4, 2, tma=True)), ("dx", C(16, 16, 4, 2, tma=True)),
    ("dw", C(16, 16, 4, 2, tma=True)), ("dw", C(32, 16, 4, 2, split=0, tma=True)),
    ("dw", C(16, 8, 4, 2, split=5, tma=True)),
    ("fwd", C(16, 8, 4, 2, wide=2, group_m=3, ordered=True, tma=True)),
    ("dx", C(16, 8, 4, 2, wide=4, group_m=2, tma=True)),
]


@pytest.mark.parametrize("kernel,cfg", TMA_CASES, ids=lambda v: v if isinstance(v, str) else v.tag())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_kernels_match_float64(triton_device, gen, descs, kernel, cfg, dtype):
    """Ragged M (200 rows in 16-row tiles; the split dW's last range is ragged too), empty
    block-rows, grouped/wide/ordered programs: the descriptors' zero fill replaces the row
    masks."""
    _check(kernel, cfg, 16, 200, dtype, triton_device, gen, R=5, C=3)
    assert len(descs) == 2, descs


@pytest.mark.parametrize("kind,R,Cc,M", [("dense", 2, 3, 37), ("dense", 1, 1, 1),
                                         ("empty_rows", 3, 2, 5)])
@pytest.mark.parametrize("kernel", ["fwd", "dx", "dw"])
def test_tma_edge_layouts(triton_device, gen, descs, kernel, kind, R, Cc, M):
    """A fully dense layout, one block with one row (M < the tile), and empty block-rows."""
    cfg = C(16, 16, 4, 2, split=0 if kernel == "dw" else 1, tma=True)
    mask = random_mask(R, Cc, 0.5, kind, gen)
    lay, x, dy, b, values, ref = _operands(mask, 16, M, torch.float16, triton_device, gen)
    out = _run(kernel, cfg, lay, x, dy, b, values, 16)
    assert rel_err(out, ref[kernel]) <= tol_for(torch.float16, triton_device)
    assert descs, "the TMA kernel did not run"


@pytest.mark.parametrize("kernel", ["fwd", "dx", "dw"])
def test_empty_layout_takes_the_pointer_kernel_quietly(triton_device, gen, descs, kernel):
    """No active block: nothing to load (a descriptor of zero rows is invalid), so the pointer
    kernel runs, with no warning; fwd writes the bias, dx zeros, dw an empty tensor."""
    cfg = C(16, 16, 4, 2, tma=True)
    mask = random_mask(3, 2, 0.5, "empty", gen)
    lay, x, dy, b, values, ref = _operands(mask, 16, 20, torch.float32, triton_device, gen)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = _run(kernel, cfg, lay, x, dy, b, values, 16)
    assert not _alignment_warnings(seen) and descs == []
    assert out.shape == ref[kernel].shape
    assert torch.equal(out.double().cpu(), ref[kernel].cpu())


def _alignment_warnings(seen: list) -> list:
    """The wrappers' alignment warnings among ``seen`` (triton 3.6's interpreter warns on its
    own)."""
    return [w for w in seen if "not 16-byte aligned" in str(w.message)]


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("kernel,operand", [("fwd", "x"), ("fwd", "values"), ("dx", "dy"),
                                            ("dw", "x")])
def test_misaligned_operand_is_copied_with_one_warning(triton_device, gen, descs, monkeypatch,
                                                       kernel, operand, tma):
    """The kernels want 16-byte aligned operands (TMA needs them; the pointer kernels load
    16-byte vectors only when Triton knows the base is aligned): a misaligned operand is copied
    to an aligned buffer, with a RuntimeWarning naming it, given once per process. The TMA
    kernel still runs, the pointer kernel gets an aligned pointer, and the result is right."""
    cfg = C(16, 16, 4, 2, tma=tma)
    mask = random_mask(3, 2, 0.5, "empty_rows", gen)
    lay, x, dy, b, values, ref = _operands(mask, 16, 37, torch.float16, triton_device, gen)
    ops = {"x": x, "dy": dy, "values": values}
    ops[operand] = at_odd_offset(ops[operand])
    bases = record_operand_bases(monkeypatch, tl_mod, "launch")
    with pytest.warns(RuntimeWarning, match=f"{operand} is not 16-byte aligned"):
        out = _run(kernel, cfg, lay, ops["x"], ops["dy"], b, ops["values"], 16)
    assert rel_err(out, ref[kernel]) <= tol_for(torch.float16, triton_device)
    assert len(descs) == (2 if tma else 0)
    assert bases and not any(bases), "a kernel got a misaligned pointer"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        again = _run(kernel, cfg, lay, ops["x"], ops["dy"], b, ops["values"], 16)
    assert not _alignment_warnings(seen), "the second copy must be quiet"
    assert torch.equal(again, out)


def test_strided_input_is_copied_then_read_by_tma(triton_device, gen, descs):
    """A non-contiguous ``x`` (every other column of a wider tensor) is made contiguous by the
    wrapper, which gives an aligned copy: the TMA kernel runs and is correct."""
    mask = random_mask(3, 2, 0.5, "empty_rows", gen)
    lay, x, dy, b, values, ref = _operands(mask, 16, 37, torch.float32, triton_device, gen)
    wide = torch.zeros(37, 2 * x.shape[1], dtype=x.dtype, device=x.device)
    wide[:, ::2] = x
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    out = _run("fwd", C(16, 16, 4, 2, tma=True), lay, strided, dy, b, values, 16)
    assert rel_err(out, ref["fwd"]) <= tol_for(torch.float32, triton_device)
    assert descs == [(16, 16), (16, 16)]


def test_tma_is_an_sm90_candidate_only():
    """sm_80 has no TMA: no sm_80 table or sweep entry sets it; sm_90's sweep has TMA candidates
    at blocks 64 and 128 for every kernel, none shipped yet (chosen from the GPU sweep)."""
    for arch in (80, 90):
        for kernel, table in tl_mod.CONFIGS[arch].items():
            assert not any(c.tma for c in table.values()), (arch, kernel)
    for kernel, table in tl_mod.SWEEP[80].items():
        assert not any(c.tma for cfgs in table.values() for c in cfgs), kernel
    for kernel, table in tl_mod.SWEEP[90].items():
        for bs in (64, 128):
            assert any(c.tma for c in table[bs]), (kernel, bs)
    cases = tl_mod.sweep_cases(90)
    tma_cases = [c for c in cases if c.constexprs.get("TMA")]
    assert tma_cases and all(" tma]" in c.name for c in tma_cases)
    for c in tma_cases:   # descriptor arguments, typed with the tile the wrapper builds
        assert any(t.startswith("tensordesc<bf16[") for t in c.signature.values()), c.name
    assert not any(c.constexprs.get("TMA") for c in tl_mod.sweep_cases(80))


def test_cached_launch_keys_and_replays_descriptors(monkeypatch):
    """A descriptor argument: the key holds its dtype, block shape and padding (what Triton
    specializes on), a descriptor first argument still finds the device, and the replay passes
    the descriptor object on (the compiled launcher encodes it)."""
    t = torch.zeros(64, 64)
    t16 = torch.zeros(64, 64, dtype=torch.float16)
    d = TensorDescriptor(t, [64, 64], [64, 1], [16, 32])
    assert L._arg_key(d) == L._arg_key(TensorDescriptor(t, [32, 64], [64, 1], [16, 32]))
    assert L._arg_key(d) != L._arg_key(TensorDescriptor(t, [64, 64], [64, 1], [32, 32]))
    assert L._arg_key(d) != L._arg_key(TensorDescriptor(t16, [64, 64], [64, 1], [16, 32]))

    k = FakeKernel(["xd", "n", "BS"])
    fake_cuda_cached_launches(monkeypatch, L)
    L.launch(k, (2,), (d, 32), {"BS": 16}, 4, 3)
    d2 = TensorDescriptor(t, [48, 64], [64, 1], [16, 32])
    L.launch(k, (2,), (d2, 32), {"BS": 16}, 4, 3)
    assert len(k.plain) == 1 and k.compiled.runs == [(2, 1, 1, 7, "fn", "meta", None, None, None,
                                                 d2, 32, 16)]
    L.launch(k, (2,), (TensorDescriptor(t, [64, 64], [64, 1], [32, 32]), 32), {"BS": 16}, 4, 3)
    assert len(k.plain) == 2


def test_picker_writes_the_tma_field(monkeypatch):
    """A winning TMA config comes out of the offline picker as an entry that keeps ``tma``
    (and ``ordered``), so pasting it into ``CONFIGS`` ships what was measured."""
    import dataclasses
    import importlib
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    pick = importlib.import_module("pick_linear_configs")
    cfg = C(128, 64, 4, 3, ordered=True, tma=True)
    src = pick.config_source(dataclasses.asdict(cfg))
    assert src == "C(128, 64, 4, 3, ordered=True, tma=True)"
    assert eval(src, {"C": C}) == cfg


GPU = pytest.mark.skipif(not torch.cuda.is_available(),
                         reason="bf16 TMA kernels need a CUDA GPU (bf16 is wrong in the "
                                "interpreter; TMA needs sm_90)")


@GPU
@pytest.mark.parametrize("kernel", ["fwd", "dx", "dw"])
def test_tma_sweep_configs_in_bf16_on_the_gpu(gen, kernel):
    """Every TMA sweep config of the device's arch in bf16 against float64, at a ragged M, and
    the same numbers through the cached and the plain launch."""
    arch = tl_mod._arch(torch.device("cuda"))
    cfgs = [(bs, c) for bs, cs in tl_mod.SWEEP[arch][kernel].items() for c in cs if c.tma]
    if not cfgs:
        pytest.skip(f"no TMA sweep config for sm_{arch} (TMA is an sm_90 candidate)")
    for bs, cfg in cfgs:
        out = _check(kernel, cfg, bs, 301, torch.bfloat16, "cuda", gen, R=4, C=3)
        mask = random_mask(4, 3, 0.5, "empty_rows", gen)
        lay, x, dy, b, values, _ = _operands(mask, bs, 301, torch.bfloat16, "cuda", gen)
        with L.launching("plain"):
            plain = _run(kernel, cfg, lay, x, dy, b, values, bs)
        with L.launching("cached"):
            first = _run(kernel, cfg, lay, x, dy, b, values, bs)
            again = _run(kernel, cfg, lay, x, dy, b, values, bs)
        assert torch.equal(plain, first) and torch.equal(first, again), (bs, cfg.tag())
        assert out.dtype == torch.bfloat16
