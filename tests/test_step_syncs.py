"""Steps between topology updates make no host sync (issue 14).

On the CPU, :class:`host_syncs.HostSyncRecorder` records the ops that would make a GPU wait
(``.item()``, ``nonzero``, device-to-host copies, ``.tolist()``, ...) over several training steps
of a model with a sparse conv, sparse attention and sparse linear layers, through the code the
GPU runs (the Triton kernel wrappers, under the interpreter). On a GPU the same steps run under
``torch.cuda.set_sync_debug_mode("error")``.
"""
import pytest
import torch

import itop
from host_syncs import HostSyncRecorder
from step_models import batch, sparse_model, train_step

HAS_CUDA = torch.cuda.is_available()

UPDATE_EVERY = 4


@pytest.fixture
def gpu_code_path(monkeypatch):
    """The device the GPU code path runs on: CUDA, else the CPU through Triton's interpreter."""
    if HAS_CUDA:
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


def _setup(device, growth):
    model = sparse_model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mgr = itop.TopologyManager(model, opt, update_every=UPDATE_EVERY, total_steps=1000,
                               growth=growth, prune_rate=0.3)
    x, y = batch(device)
    for _ in range(UPDATE_EVERY):          # warm up through the first update
        train_step(model, opt, x, y, mgr)
    assert mgr.step_count == UPDATE_EVERY
    return model, opt, mgr, x, y


def _steps_between_updates(model, opt, mgr, x, y):
    """Steps UPDATE_EVERY+1 .. 2·UPDATE_EVERY-1 whole, then the next update step's forward,
    backward and optimizer step (its capture armed for gradient growth), not its update."""
    for _ in range(UPDATE_EVERY - 1):
        train_step(model, opt, x, y, mgr)
    train_step(model, opt, x, y, None)


@pytest.mark.parametrize("growth", ["gradient", "random", "momentum"])
def test_steps_between_updates_make_no_host_sync(gpu_code_path, growth):
    model, opt, mgr, x, y = _setup(gpu_code_path, growth)
    layers_armed = []
    with HostSyncRecorder() as rec:
        _steps_between_updates(model, opt, mgr, x, y)
        layers_armed = [m._capturing for _, m in mgr.layers]
    assert rec.ops, "the recorder saw no op at all"
    # the block-sparse kernels ran inside the recording (on the CPU: interpreted launches; on a
    # GPU the sync debug mode test below covers the real launches)
    launched = {op for op in rec.ops if op.startswith("triton:")}
    if gpu_code_path == "cpu":
        assert {"triton:_bsl_fwd_kernel", "triton:_conv_fwd_kernel"} <= launched, sorted(launched)
    if growth in ("gradient", "momentum"):   # the capture ops ran inside the recording
        assert all(layers_armed) and any("capture" in op for op in rec.ops)
    assert not rec.syncs, "host syncs between updates:\n" + rec.report()


def test_the_recorder_catches_a_planted_item(gpu_code_path, monkeypatch):
    """The check can fail: an ``.item()`` (and a ``.tolist()``, a ``nonzero``) planted in the
    sparse layers' forward are reported, with the line."""
    model, opt, mgr, x, y = _setup(gpu_code_path, "gradient")
    forward = itop.SparseLinear.forward

    def planted(self, inp):
        inp.sum().item()
        self.values.detach()[:1, :1, :1].tolist()
        self.block_mask.nonzero()
        return forward(self, inp)

    monkeypatch.setattr(itop.SparseLinear, "forward", planted)
    with HostSyncRecorder() as rec:
        _steps_between_updates(model, opt, mgr, x, y)
    found = {op for op, _ in rec.syncs}
    assert {"aten._local_scalar_dense.default", "Tensor.tolist", "aten.nonzero.default"} <= found, rec.report()
    assert all("test_step_syncs.py" in where for _, where in rec.syncs), rec.report()


@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_update_step_makes_no_host_sync(gpu_code_path, growth):
    """A whole update (scores, prune, grow, moving values/grads/optimizer state, layout rebuild,
    fired masks) on the GPU code path, without a GradScaler, DDP or constant fan-in (the syncs
    those still make are listed in the ``itop.topology`` module docstring, "Host syncs")."""
    model, opt, mgr, x, y = _setup(gpu_code_path, growth)
    _steps_between_updates(model, opt, mgr, x, y)
    with HostSyncRecorder() as rec:
        assert mgr.step()                       # the update
    assert not rec.syncs, "host syncs in a topology update:\n" + rec.report()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: set_sync_debug_mode is CUDA-only")
@pytest.mark.parametrize("opt_name", ["sgd", "adamw_capturable"])
@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_steps_between_updates_sync_free_on_gpu(growth, opt_name):
    """On a GPU, bf16 autocast: the steps between updates run under
    ``set_sync_debug_mode("error")`` (any sync raises)."""
    model = sparse_model("cuda")
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    mgr = itop.TopologyManager(model, opt, update_every=UPDATE_EVERY, total_steps=1000,
                               growth=growth, prune_rate=0.3)
    x, y = batch("cuda")
    for _ in range(UPDATE_EVERY):
        train_step(model, opt, x, y, mgr, autocast_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(UPDATE_EVERY - 1):
            train_step(model, opt, x, y, mgr, autocast_dtype=torch.bfloat16)
        train_step(model, opt, x, y, None, autocast_dtype=torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_layout_rebuild_with_known_nnz_makes_no_host_sync(monkeypatch):
    """The device build of a layout (4096², block 32, density 0.1): from known positions (what
    an update runs), from a mask with a known nnz (a sort instead of nonzero), and the in-place
    install. ``benchmarks/bench_train_gpu.py`` times them and checks them on a GPU."""
    import itop_kernels.layout as layout_mod
    from itop_kernels import BlockLayout
    monkeypatch.setattr(layout_mod, "_CPU_FAST_BUILD", False)   # the path CUDA masks take
    R = C = 128
    nnz = round(0.1 * R * C)
    pos = torch.randperm(R * C)[:nnz].sort().values
    mask = torch.zeros(R * C, dtype=torch.bool)
    mask[pos] = True
    mask = mask.view(R, C)
    ref = BlockLayout.from_mask(mask, 32)
    with HostSyncRecorder() as rec:
        a = BlockLayout.from_positions(pos, (R, C), 32, check=False)
        b = BlockLayout.from_mask(mask, 32, nnz=nnz)
        a.copy_(b)
    assert not rec.syncs, rec.report()
    for lay in (a, b):
        for t in ("row_ptr", "col_idx", "row_idx", "col_ptr", "t_row_idx", "t_block_idx"):
            assert torch.equal(getattr(lay, t), getattr(ref, t)), t
    with HostSyncRecorder() as rec:      # the check: it does see the count of an unknown nnz
        BlockLayout.from_mask(mask, 32)
    assert [op for op, _ in rec.syncs] == ["aten._local_scalar_dense.default"], rec.report()
