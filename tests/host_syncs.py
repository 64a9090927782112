"""A recorder of the operations that make a GPU wait for the host, usable on the CPU.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` finds host syncs. On the CPU (CI has no
GPU) nothing waits, so :class:`HostSyncRecorder` looks at what runs instead:

- a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that records every aten op whose
  result a GPU would have to copy to the host before Python can go on:
  ``_local_scalar_dense``/``item`` (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``),
  ``is_nonzero``, ``equal``, ``nonzero``, ``masked_select``, ``unique*``,
  ``repeat_interleave`` without ``output_size``, and copies between devices (``_to_copy``/
  ``copy_`` whose source and target devices differ). It also goes inside the ``torch.library``
  custom ops of this package (their Python implementations), which a dispatch mode otherwise
  sees as one opaque op;
- Python-level hooks on ``Tensor.tolist``, ``Tensor.cpu`` and ``Tensor.numpy``: on CPU tensors
  these reach no aten op at all, so the dispatch mode alone would miss them.

Ops run by Triton's interpreter itself (``TRITON_INTERPRET=1``, the GPU code path on the CPU)
are not recorded: the interpreter copies tensors to run the kernel, which a GPU never does.
The kernel wrappers around the launch are recorded.
"""
from __future__ import annotations

import contextlib
import traceback
from typing import List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal",
             "aten.nonzero.", "aten.nonzero.default", "aten.masked_select", "aten.unique",
             "aten._unique", "aten.unique_consecutive", "aten.unique_dim")


def _devices(args) -> List[torch.device]:
    return [a.device for a in args if isinstance(a, torch.Tensor)]


def _is_sync(name: str, args, kwargs) -> bool:
    if name.startswith(_SYNC_OPS) or name == "aten.nonzero":
        return True
    if name.startswith("aten.repeat_interleave") and kwargs.get("output_size") is None:
        # the Tensor-repeats overloads size their output from the repeats' sum (a sync)
        return name != "aten.repeat_interleave.self_int"
    if name.startswith("aten._to_copy") or name.startswith("aten.to."):
        src = _devices(args[:1])
        dst = kwargs.get("device")
        return bool(src) and dst is not None and torch.device(dst) != src[0]
    if name.startswith("aten.copy_"):
        devs = _devices(args[:2])
        return len(devs) == 2 and devs[0] != devs[1]
    return False


class HostSyncRecorder(TorchDispatchMode):
    """Context manager; ``syncs`` lists ``(op, where)`` for every syncing op seen inside it.

    ``where`` is the innermost stack frame in this repository's code (``itop``/``itop_kernels``
    or the test), so a failure says which line synced.
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: List[Tuple[str, str]] = []
        self.ops: List[str] = []
        self._suspended = 0
        self._depth = 0
        self._patches = contextlib.ExitStack()

    # ------------------------------------------------------------------ recording
    def _record(self, name: str) -> None:
        where = "?"
        for fr in reversed(traceback.extract_stack()[:-2]):
            if "/itop" in fr.filename or "/tests/" in fr.filename or "/benchmarks/" in \
                    fr.filename:
                if not fr.filename.endswith("host_syncs.py"):
                    where = f"{fr.filename.rsplit('/', 2)[-2]}/{fr.filename.rsplit('/', 1)[-1]}" \
                            f":{fr.lineno} {fr.line}"
                    break
        self.syncs.append((name, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if not self._suspended:
            self.ops.append(name)
            if _is_sync(name, args, kwargs):
                self._record(name)
            from torch._library.custom_ops import OPDEFS
            opdef = OPDEFS.get(func._schema.name) if hasattr(func, "_schema") else None
            if opdef is not None:    # our custom ops: record what their implementation runs
                with self:
                    return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)

    # ------------------------------------------------------------------ python-level hooks
    def _wrap_method(self, name: str) -> None:
        orig = getattr(torch.Tensor, name)
        rec = self

        def wrapper(t, *a, **k):
            if not rec._suspended:
                rec._record(f"Tensor.{name}")
            return orig(t, *a, **k)

        self._patches.callback(setattr, torch.Tensor, name, orig)
        setattr(torch.Tensor, name, wrapper)

    def _suspend_inside_triton_interpreter(self) -> None:
        try:
            from triton.runtime import interpreter
        except ImportError:  # pragma: no cover - no Triton
            return
        executor = getattr(interpreter, "GridExecutor", None)   # (triton 3.6 and 3.8 have it)
        if executor is None:  # pragma: no cover - another Triton: nothing runs interpreted
            return
        orig = executor.__call__
        rec = self

        def call(ex, *a, **k):
            if not rec._suspended:   # a kernel launch, named as the test can look for it
                rec.ops.append(f"triton:{getattr(ex.fn, '__name__', ex.fn)}")
            rec._suspended += 1
            try:
                return orig(ex, *a, **k)
            finally:
                rec._suspended -= 1

        self._patches.callback(setattr, executor, "__call__", orig)
        executor.__call__ = call

    def __enter__(self):
        self._depth += 1
        if self._depth == 1:
            for name in ("tolist", "cpu", "numpy"):
                self._wrap_method(name)
            self._suspend_inside_triton_interpreter()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._depth -= 1
        if self._depth == 0:   # leaving the outermost `with` (custom ops re-enter it)
            self._patches.close()
        return out

    def report(self) -> str:
        """One line per distinct ``(op, where)``, with its count."""
        counts = {}
        for s in self.syncs:
            counts[s] = counts.get(s, 0) + 1
        return "\n".join(f"{n}x {op} at {where}" for (op, where), n in counts.items())
