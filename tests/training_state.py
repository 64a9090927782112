"""Test helpers: everything a topology update may change in a training run, gathered into one
dict, and an exact comparison of two such dicts (bit-for-bit equivalence tests of update
paths)."""
from __future__ import annotations

from typing import Dict

import torch

#: The layout tensors an update rewrites (``_positions``: the sorted flat positions).
LAYOUT_TENSORS = ("block_mask", "row_ptr", "col_idx", "row_idx", "col_ptr", "t_row_idx",
                  "t_block_idx", "_positions")


def training_state(model, opt, mgr) -> Dict[str, torch.Tensor]:
    """The manager's generator state and, per sparse layer, its layout tensors, mask, fired mask,
    gradient and optimizer state, plus the model's ``state_dict``."""
    out = {"gen": mgr._generator.get_state()}
    for name, m in mgr.layers:
        for t in LAYOUT_TENSORS:
            out[f"{name}.layout.{t}"] = getattr(m.layout, t)
        out[f"{name}.mask"] = m.block_mask
        out[f"{name}.fired"] = mgr.fired[name]
        out[f"{name}.grad"] = m.values.grad
        for k, v in opt.state[m.values].items():
            if torch.is_tensor(v):
                out[f"{name}.opt.{k}"] = v
    out.update(model.state_dict())
    return out


def assert_same_state(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    """Same keys, and every tensor of the same dtype and bit for bit equal (names the first
    that is not)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
