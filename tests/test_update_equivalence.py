"""The topology update path (prune/grow choice, moving values, gradients and optimizer state,
the in-place layout rebuild, fired masks) trains bit for bit like a straightforward reference
of the update rules (issue 14: cheaper updates must not change results).

The reference below replaces ``TopologyManager._update`` in a second run of the same model:
per layer, per tensor, with the new mask written entry by entry, every moved row looked up
in the old mask, and the layout rebuilt from the mask (``_sync_layout``, the build path
that shares no code with the update's in-place rebuild from sorted positions). Both runs
see the same batches, seeds and growth scores; after several updates every mask, layout
tensor, value, gradient, optimizer state tensor, fired mask, loss and the manager's generator
must be equal.
"""
import math
import warnings

import pytest
import torch
from torch import nn

import itop
from itop import storage
from itop.unit_selection import random_inactive, topk_indices
from step_models import batch, sparse_model, train_step
from training_state import assert_same_state, training_state



def _finite(t):
    lo, hi = torch.finfo(torch.float32).min, torch.finfo(torch.float32).max
    return torch.nan_to_num(t.float(), nan=lo, posinf=hi, neginf=lo)


def _reference_apply(m, drop, add, optimizer):
    """Main's update of one layer, written plainly."""
    old = m.block_mask.reshape(-1).clone()
    active = old.nonzero().squeeze(1)
    new = old.clone()
    for slot in drop.tolist():
        new[active[slot]] = False
    for p in add.tolist():
        new[p] = True
    new_active = new.nonzero().squeeze(1)
    was = old[new_active]                              # survived, else a new unit
    src = torch.searchsorted(active, new_active).clamp(max=active.numel() - 1)
    p = m.values
    tensors = [p.data] + ([p.grad] if p.grad is not None else [])
    tensors += [v for v in optimizer.state.get(p, {}).values()
                if torch.is_tensor(v) and v.shape == p.shape]
    for t in tensors:
        moved = t.clone()[src]
        moved[~was] = 0
        t.copy_(moved)
    m.block_mask.copy_(new.view_as(m.block_mask))
    m._sync_layout()   # sees the overwritten mask and rebuilds the layout from it


@torch.no_grad()
def _reference_update(mgr, t):
    """``TopologyManager._update`` (magnitude L1 prune, any fan-in, one process), plainly."""
    rate = mgr.prune_rate_at(t)
    ks = [min(math.ceil(rate * m.nnz), m.num_units - m.nnz) for _, m in mgr.layers]
    if not any(ks):
        return False
    scores = mgr._growth_scores()
    for (name, m), k, grow in zip(mgr.layers, ks, scores):
        if k == 0:
            continue
        mask = m.block_mask.reshape(-1)
        active = mask.nonzero().squeeze(1)
        v = m.values.detach()
        mag = v.reshape(v.shape[0], -1).float().abs().sum(1)
        drop = topk_indices(_finite(mag), k, largest=False)
        if grow is None:
            add = random_inactive(mask, k, mgr._generator, num_active=m.nnz)
        else:
            key = _finite(grow).reshape(-1).clone()
            key[active] = float("-inf")
            add = topk_indices(key, k)
        _reference_apply(m, drop, add, mgr.optimizer)
        mgr.fired[name].view(-1)[add] = True
    return True


class RepeatedShapes(nn.Module):
    """Three 32×32 layers (one grid shape, as GPT-2's 12 of each), a 64×32 and a 16×64, ReLU."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.up, self.out = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        h = x.flatten(1)[:, :32]
        for f in (self.a, self.b, self.c, self.up):
            h = torch.relu(f(h))
        return self.out(h)


def _model(kind):
    if kind == "conv_attn_mlp":
        return sparse_model()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return itop.sparsify(RepeatedShapes(), 0.3, block_size=1 if kind == "block1" else 8,
                             distribution="uniform")


def _run(kind, optimizer, growth, reference, monkeypatch, steps=11):
    if reference:
        monkeypatch.setattr(itop.TopologyManager, "_update", _reference_update)
    model = _model(kind)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-2))
    mgr = itop.TopologyManager(model, opt, update_every=2, total_steps=40, prune_rate=0.5,
                               growth=growth)
    losses = []
    for i in range(steps):
        x, y = batch(seed=i)
        losses.append(train_step(model, opt, x, y, mgr))
    monkeypatch.undo()
    return model, opt, mgr, torch.stack(losses)




@pytest.mark.parametrize("kind,optimizer,growth", [
    ("conv_attn_mlp", "sgd", "random"), ("conv_attn_mlp", "adamw", "gradient"),
    ("repeated", "adamw", "random"), ("repeated", "sgd", "gradient"),
    ("block1", "adamw", "gradient")])
@pytest.mark.parametrize("state_move", ["stacked", "per_tensor"])
def test_updates_match_the_plain_reference_bit_for_bit(kind, optimizer, growth, state_move,
                                                       monkeypatch):
    monkeypatch.setattr(storage, "_STATE_MOVE", state_move)
    m_ref, o_ref, g_ref, l_ref = _run(kind, optimizer, growth, True, monkeypatch)
    monkeypatch.setattr(storage, "_STATE_MOVE", state_move)
    m_new, o_new, g_new, l_new = _run(kind, optimizer, growth, False, monkeypatch)
    assert g_new.step_count == 11                       # five updates
    assert any(not torch.equal(g_new.fired[n], m.block_mask) for n, m in g_new.layers)
    assert torch.equal(l_new, l_ref)
    assert_same_state(training_state(m_new, o_new, g_new), training_state(m_ref, o_ref, g_ref))


def test_new_layout_objects_match_too(monkeypatch):
    """With the in-place layout rewrite switched off (a new layout object per update)."""
    m_ref, o_ref, g_ref, _ = _run("repeated", "adamw", "random", True, monkeypatch)
    monkeypatch.setattr(storage, "_INPLACE_LAYOUT", False)
    m_new, o_new, g_new, _ = _run("repeated", "adamw", "random", False, monkeypatch)
    assert_same_state(training_state(m_new, o_new, g_new), training_state(m_ref, o_ref, g_ref))


def test_the_comparison_sees_a_wrong_move(monkeypatch):
    """The check can fail: a state move that forgets to zero the optimizer state of new units
    is told apart from the reference."""
    m_ref, o_ref, g_ref, _ = _run("repeated", "adamw", "random", True, monkeypatch)
    move = storage._move_rows
    monkeypatch.setattr(storage, "_move_rows",
                        lambda ts, order, keep: move(ts[:1], order, keep) or
                        move(ts[1:], order, torch.ones_like(keep)))
    m_new, o_new, g_new, _ = _run("repeated", "adamw", "random", False, monkeypatch)
    with pytest.raises(AssertionError):
        assert_same_state(training_state(m_new, o_new, g_new), training_state(m_ref, o_ref, g_ref))
