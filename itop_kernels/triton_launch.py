"""Launching a Triton kernel with little host work: replaying a cached compiled handle.

``kernel[grid](*args, **constexprs)`` re-derives the kernel's specialization from every argument
on each call (the binder, a cache-key string, device and stream look-ups), several µs of host
time per launch; the block-sparse linear makes three launches per fwd+bwd. :func:`launch` keys
its own cache on what Triton specializes on (the constexprs and launch options, each pointer's
16-byte alignment and dtype, each int's divisibility by 16 and equality to 1), lets Triton
compile and launch the first call of every key the ordinary way, and afterwards calls the
compiled kernel's launcher directly.

Selectable, so the GPU benchmark measures it against the plain launch: ``ITOP_TRITON_LAUNCH``
(``cached``, the default, or ``plain``), read once at import, or :func:`set_launch_mode`. The
interpreter (``TRITON_INTERPRET=1``) always launches plainly. If the cached path fails, it
warns once and launches plainly from then on; with a Triton launch hook installed (a profiler)
it launches plainly too, so the hook sees every launch. Works with triton 3.6 and 3.8, whose
compiled kernels share ``run(grid0, grid1, grid2, stream, function, packed_metadata,
launch_metadata, enter_hook, exit_hook, *all_arguments)``. Host-side TMA descriptors
(``triton.tools.tensor_descriptor.TensorDescriptor``) may be arguments: the compiled launcher
encodes them on every call, as Triton's own launch does, and the key holds what Triton
specializes them on (the base's dtype, the block shape, the padding).
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # no Triton (a CPU-only install): no descriptors can be passed
    TensorDescriptor = None
try:
    from triton import knobs as _knobs   # where Triton keeps its launch hooks (_hooked)
except ImportError:
    _knobs = None

__all__ = ["LAUNCH_MODES", "launch", "launch_mode", "set_launch_mode", "launching", "cdiv",
           "cuda_facts", "aligned"]

LAUNCH_MODES = ("cached", "plain")
_mode = os.environ.get("ITOP_TRITON_LAUNCH", "cached")
if _mode not in LAUNCH_MODES:
    warnings.warn(f"ITOP_TRITON_LAUNCH={_mode!r} is not one of {LAUNCH_MODES}; using 'plain'")
    _mode = "plain"
_handles: Dict[tuple, Tuple[Any, tuple]] = {}   # key -> (compiled kernel, constexpr tail)
_failed = False
_ALIGN_WARNED = False


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for Python ints, for grid sizes (``triton.cdiv`` is a constexpr function:
    several µs per host call in triton 3.8, and a fwd+bwd sizes several grids)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _facts(index: int) -> Tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return (90 if props.major >= 9 else 80), props.multi_processor_count


def cuda_facts(device: torch.device) -> Tuple[int, int]:
    """``(config-table arch, SM count)`` of a CUDA ``device``, looked up once per device: the
    arch is 90 for Hopper and newer, else 80."""
    return _facts(device.index if device.index is not None else torch.cuda.current_device())


def launch_mode() -> str:
    """``"cached"`` or ``"plain"``: how :func:`launch` starts kernels now."""
    return "plain" if _failed else _mode


def set_launch_mode(mode: str) -> None:
    """Choose ``"cached"`` (replay compiled handles) or ``"plain"`` (``kernel[grid](...)``)."""
    global _mode
    if mode not in LAUNCH_MODES:
        raise ValueError(f"mode must be one of {LAUNCH_MODES}, got {mode!r}")
    _mode = mode


@contextlib.contextmanager
def launching(mode: str) -> Iterator[None]:
    """Within the block, :func:`launch` uses ``mode`` (``"cached"`` or ``"plain"``)."""
    global _mode
    old = _mode
    set_launch_mode(mode)
    try:
        yield
    finally:
        _mode = old


def _int_key(a: int) -> tuple:
    """What Triton specializes an int on: its type (i32, i64 or u64, from its range),
    divisibility by 16 and equality to 1."""
    width = 0 if -2**31 <= a < 2**31 else (1 if -2**63 <= a < 2**63 else 2)
    return (width, a % 16 == 0, a == 1)


def _arg_key(a: Any) -> Any:
    """What Triton specializes a runtime argument on: a tensor's dtype and 16-byte alignment;
    an int's :func:`_int_key`."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if TensorDescriptor is not None and isinstance(a, TensorDescriptor):
        return ("desc", a.base.dtype, tuple(a.block_shape), a.padding)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return _int_key(int(a))
    return type(a)


_INT_TAIL_KEYS: Dict[tuple, tuple] = {}   # a launch's trailing ints -> their keys
_INT_TAIL_KEYS_MAX = 4096


def _args_key(args: tuple) -> tuple:
    """``_arg_key`` of every argument. The kernels take their pointers first and their ints
    (shapes, strides) last: the run of plain ints at the end is looked up as one tuple in a
    memo (a conv launch passes about 17 ints; their keys cost more to compute than to find),
    the rest is computed."""
    i = len(args)
    while i and type(args[i - 1]) is int:   # exact ints only: True == 1 must not share a key
        i -= 1
    tail = args[i:]
    keys = _INT_TAIL_KEYS.get(tail)
    if keys is None:
        keys = tuple(map(_int_key, tail))
        if len(_INT_TAIL_KEYS) < _INT_TAIL_KEYS_MAX:
            _INT_TAIL_KEYS[tail] = keys
    return (tuple(map(_arg_key, args[:i])), keys)


def aligned(t: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format,
            warn_as: Optional[str] = None) -> torch.Tensor:
    """``t`` contiguous in ``memory_format`` with 16-byte aligned data, as the kernels are
    compiled for (Triton specializes on a pointer's alignment: with a misaligned base it builds
    a kernel that loads each element on its own, and TMA needs aligned bases). No copy for such
    a tensor. A misaligned one (a view at an odd offset) is copied; when ``warn_as`` names the
    operand, the copy is announced with a RuntimeWarning, once per process."""
    global _ALIGN_WARNED
    t = t.contiguous(memory_format=memory_format)
    if t.data_ptr() % 16:
        if warn_as is not None and not _ALIGN_WARNED:
            _ALIGN_WARNED = True
            warnings.warn(f"itop_kernels: {warn_as} is not 16-byte aligned (data_ptr % 16 = "
                          f"{t.data_ptr() % 16}); copied to an aligned buffer (one extra pass "
                          "over it; warned once)", RuntimeWarning, stacklevel=3)
        t = t.clone(memory_format=memory_format)
    return t


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch(kernel: Any, grid: tuple, args: tuple, constexprs: dict, num_warps: int,
           num_stages: int) -> None:
    """``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``, replaying the
    compiled handle after the first call of each specialization (see the module docstring).
    ``args`` are the kernel's runtime arguments in order; its constexprs follow them in its
    signature."""
    t0 = args[0]
    if TensorDescriptor is not None and isinstance(t0, TensorDescriptor):
        t0 = t0.base
    if (_mode != "cached" or _failed or not isinstance(t0, torch.Tensor) or not t0.is_cuda
            or _hooked()):
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    dev = t0.device.index if t0.device.index is not None else torch.cuda.current_device()
    key = (id(kernel), dev, tuple(constexprs.items()), num_warps, num_stages, _args_key(args))
    hit = _handles.get(key)
    if hit is None:
        if _interpreting():   # an interpreted kernel has no compiled handle to replay
            kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if hasattr(compiled, "result"):   # triton 3.6 may hand back a future of the compile
            compiled = compiled.result()
        names = list(kernel.arg_names)
        tail_names = names[len(args):]
        if compiled is None or set(tail_names) != set(constexprs):
            _fail(f"cannot replay {getattr(kernel, '__name__', kernel)}: constexprs "
                  f"{sorted(constexprs)} are not the trailing parameters {tail_names}")
            return
        _handles[key] = (compiled, tuple(constexprs[n] for n in tail_names))
        return
    compiled, tail = hit
    g0 = grid[0]
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    try:
        compiled.run(g0, g1, g2, torch._C._cuda_getCurrentRawStream(dev), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *tail)
    except Exception as exc:  # never hide it: say so once, then launch plainly
        _fail(f"{type(exc).__name__}: {exc}")
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)


def _hooked() -> bool:
    """True when a Triton launch hook is installed (a profiler such as proton): such hooks must
    see every launch, so :func:`launch` then launches plainly. Triton 3.6 and 3.8 keep each hook
    as a ``HookChain``, never ``None``: an empty chain means no hook."""
    try:
        runtime = _knobs.runtime
        hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    except AttributeError:
        return True  # a Triton without knobs: do not replay
    for hook in hooks:
        if hook is None:
            continue
        calls = getattr(hook, "calls", None)
        if calls is None or len(calls) > 0:   # a plain callable, or a chain with hooks in it
            return True
    return False


def _fail(why: str) -> None:
    global _failed
    if not _failed:
        warnings.warn(f"itop_kernels: cached Triton launches disabled, launching plainly ({why})",
                      RuntimeWarning, stacklevel=3)
    _failed = True
