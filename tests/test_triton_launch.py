"""The cached launch (:mod:`itop_kernels.triton_launch`) can replay every shipped kernel.

A replay passes the runtime arguments in order and then the constexprs in signature order, so
every kernel's constexpr parameters must be its trailing ones; a kernel that breaks this would
make the first cached launch on a GPU warn and fall back to plain launches for the whole
process. This checks it on the CPU, for every ``@triton.jit`` kernel in the kernel modules.
"""
import importlib
import inspect

import pytest
import torch
from triton.runtime.jit import KernelInterface


def _kernels(module_name: str):
    """``(name, python function)`` of every kernel (jitted, or interpreted under the tests)."""
    mod = importlib.import_module(module_name)
    return [(name, obj.fn) for name, obj in vars(mod).items() if isinstance(obj, KernelInterface)]


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)   # tl.constexpr, or its string annotation


@pytest.mark.parametrize("module_name", ["itop_kernels.triton_linear", "itop_kernels.triton_conv",
                                         "itop_kernels.triton_split_sum"])
def test_constexprs_are_trailing(module_name):
    kernels = _kernels(module_name)
    assert kernels, f"no Triton kernels found in {module_name}"
    for name, fn in kernels:
        params = list(inspect.signature(fn).parameters.values())
        flags = [_is_constexpr(p) for p in params]
        if not any(flags):
            continue
        first = flags.index(True)
        assert all(flags[first:]), (
            f"{module_name}.{name}: runtime parameter after a constexpr "
            f"({[p.name for p in params]})")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cached launches replay on CUDA only")
@pytest.mark.parametrize("rows", [256, 250])          # M divisible by 16, and not
def test_cached_linear_launch_matches_plain_on_gpu(rows, recwarn):
    """On a GPU, block-sparse linear fwd+bwd (bf16, block 32) through replayed compiled handles
    is bit-identical to plain launches, also for an input that starts 2 bytes off alignment,
    and needs no fallback."""
    from itop_kernels import BlockLayout, block_sparse_linear, triton_launch

    gen = torch.Generator(device="cuda").manual_seed(rows)
    mask = torch.rand(8, 6, generator=gen, device="cuda") < 0.5
    mask[:, 0] = True
    layout = BlockLayout.from_mask(mask, 32)
    values = torch.randn(layout.nnz, 32, 32, generator=gen, device="cuda", dtype=torch.bfloat16)
    base = torch.randn(rows * 192 + 1, generator=gen, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(rows, 256, generator=gen, device="cuda", dtype=torch.bfloat16)

    def run(offset):
        x = base[offset:offset + rows * 192].view(rows, 192).detach().requires_grad_()
        v = values.detach().requires_grad_()
        y = block_sparse_linear(x, v, layout)
        y.backward(dy)
        return y.detach(), x.grad, v.grad

    results = {}
    for mode in ("plain", "cached"):
        with triton_launch.launching(mode):
            for _ in range(2):                        # the second call replays
                results[mode] = [run(0), run(1)]
    for p, c in zip(results["plain"], results["cached"]):
        assert all(torch.equal(a, b) for a, b in zip(p, c))
    assert triton_launch._handles and triton_launch.launch_mode() == "cached"
    assert not [w for w in recwarn if "cached Triton launches" in str(w.message)]


def test_no_launch_hook_means_replay():
    """Triton keeps its launch hooks as chains that are never ``None``: with none installed the
    cached launch must replay, and with one installed (a profiler) it must launch plainly."""
    from triton import knobs

    from itop_kernels import triton_launch

    assert not triton_launch._hooked()
    chain = knobs.runtime.launch_enter_hook

    def hook(metadata):
        pass

    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            assert triton_launch._hooked()
        finally:
            chain.remove(hook)
    else:   # a Triton whose hook is a plain attribute
        knobs.runtime.launch_enter_hook = hook
        try:
            assert triton_launch._hooked()
        finally:
            knobs.runtime.launch_enter_hook = chain
    assert not triton_launch._hooked()


def test_launch_keys_follow_tritons_specialization(monkeypatch):
    """The cached launch keys a call on what Triton specializes on, no more and no less: each
    pointer's dtype and 16-byte alignment, each int's width (i32, i64, u64), divisibility by 16
    and equality to 1. The trailing ints are looked up as one tuple in a bounded memo, which a
    bool (equal to 1, and hashed like it) must not hit."""
    from itop_kernels import triton_launch as L

    t = torch.zeros(64)

    def key(*args):
        return L._args_key(args)

    assert key(t, 16, 32) == key(t, 48, 64)                 # same facts about every argument
    assert key(t, 16, 32) != key(t, 16, 33)                 # divisibility by 16
    assert key(t, 1, 32) != key(t, 17, 32)                  # equality to 1
    assert key(t, 2**31, 32) != key(t, 2**31 - 16, 32)      # i64 against i32
    assert key(t, 2**63, 32) != key(t, 2**62, 32)           # u64 against i64
    assert key(t, True, 32) != key(t, 1, 32)                # a bool is not the int 1
    assert key(t[1:], 16) != key(t, 16)                     # pointer alignment
    assert key(t.half(), 16) != key(t, 16)                  # pointer dtype
    assert key(t, 16) == key(t, 16)                         # from the memo, the same key

    monkeypatch.setattr(L, "_INT_TAIL_KEYS", {})
    monkeypatch.setattr(L, "_INT_TAIL_KEYS_MAX", 2)
    keys = [key(t, n) for n in (3, 1, 16, 5)]
    assert len(L._INT_TAIL_KEYS) == 2                       # bounded
    assert keys[0] == keys[3] and len(set(keys)) == 3       # 3 and 5: neither 1 nor × 16
    assert [key(t, n) for n in (3, 1, 16, 5)] == keys       # memoized or not, the same
