"""Memory ∝ density (issue 14): a sparse model holds no dense-size weight, gradient or
optimizer-state tensor for its sparse layers, and what gradient growth keeps (the layers'
inputs and output gradients) exists only around an update."""
import gc
import math

import torch
from torch import nn

import itop
from step_models import train_step

DENSITY = 0.1
UPDATE_EVERY = 4


def _model():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(),
                          nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 16))
    return itop.sparsify(dense, DENSITY, block_size=16, distribution="uniform",
                         exclude=["6"])


def _live_tensors():
    gc.collect()
    return [o for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter)]


def test_weights_grads_and_optimizer_state_scale_with_density():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = itop.TopologyManager(model, opt, update_every=UPDATE_EVERY, total_steps=100)
    x, y = torch.randn(32, 256), torch.randint(0, 16, (32,))
    for _ in range(UPDATE_EVERY + 1):                      # through one update
        train_step(model, opt, x, y, mgr)
    sparse_bytes = dense_bytes = 0
    for name, m in mgr.layers:
        dense_numel = math.prod(m.dense_weight_shape)
        tensors = [m.values.data, m.values.grad] + [
            v for v in opt.state[m.values].values() if isinstance(v, torch.Tensor) and v.dim()]
        assert len(tensors) == 4, name                      # values, grad, exp_avg, exp_avg_sq
        for t in tensors:
            assert t.numel() == m.nnz * m.block_size ** 2 < dense_numel, name
        for t in [getattr(m.layout, a) for a in ("row_ptr", "col_idx", "row_idx", "col_ptr",
                                                  "t_row_idx", "t_block_idx", "_positions")]:
            assert t.numel() * t.element_size() <= 8 * (m.nnz + max(m.block_mask.shape) + 1)
        sparse_bytes += sum(t.numel() * t.element_size() for t in tensors)
        dense_bytes += 4 * dense_numel * m.values.element_size()
    # the density (up to rounding nnz per layer): 4 tensors of nnz·bs² floats against 4 of the
    # dense weight's size
    assert abs(sparse_bytes / dense_bytes - DENSITY) < 0.01 * DENSITY


def test_no_dense_size_tensor_lives_between_updates():
    """Between updates no live tensor is as large as a sparse layer's dense weight; on the armed
    step before an update the layers keep their inputs and output gradients (activation-sized,
    for the growth scores) and drop them at the update."""
    weight_numel = 256 * 512               # the smallest sparse layer's dense weight
    # large tensors other tests left alive (held here, so their ids stay theirs)
    others = [t for t in _live_tensors() if t.numel() >= weight_numel]
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mgr = itop.TopologyManager(model, opt, update_every=UPDATE_EVERY, total_steps=100)
    x, y = torch.randn(8, 256), torch.randint(0, 16, (8,))
    assert weight_numel == min(math.prod(m.dense_weight_shape) for _, m in mgr.layers)
    known = {id(t) for t in others}
    for step in range(1, 2 * UPDATE_EVERY + 1):
        train_step(model, opt, x, y, None)
        armed = [m for _, m in mgr.layers if m._capturing]
        if step in (1, UPDATE_EVERY, UPDATE_EVERY + 1):     # (a gc scan is slow)
            big = [tuple(t.shape) for t in _live_tensors()
                   if t.numel() >= weight_numel and id(t) not in known]
            assert not big, (step, big)
        if step % UPDATE_EVERY == 0:                        # the armed step before an update
            assert len(armed) == len(mgr.layers)
            kept = [t for _, m in mgr.layers for e in m._captured for t in e[:2]]
            assert kept and all(t.shape[0] == x.shape[0] for t in kept)
        else:
            assert not armed and not any(m._captured for _, m in mgr.layers)
        mgr.step()
        assert not any(m._captured for _, m in mgr.layers)  # dropped at the update
