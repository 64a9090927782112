"""torch.compile traces through the custom ops without a graph break (CPU inductor)."""
import torch
import torch._dynamo

from itop_kernels import BlockLayout, block_sparse_linear


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = BlockLayout.from_mask(torch.rand(4, 2) < 0.6, 16)
        self.l2 = BlockLayout.from_mask(torch.rand(1, 4) < 0.9, 16)
        self.v1 = torch.nn.Parameter(torch.randn(self.l1.nnz, 16, 16) * 0.1)
        self.v2 = torch.nn.Parameter(torch.randn(self.l2.nnz, 16, 16) * 0.1)
        self.b1 = torch.nn.Parameter(torch.randn(64))

    def forward(self, x):
        h = torch.relu(block_sparse_linear(x, self.v1, self.l1, self.b1))
        return block_sparse_linear(h, self.v2, self.l2)


def test_compiled_model_matches_eager_and_has_no_graph_break():
    model = TwoLayer()
    x = torch.randn(8, 32)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    y_eager = model(x)
    y_comp = compiled(x)
    assert torch.allclose(y_comp, y_eager, rtol=1e-5, atol=1e-6)
    g_eager = torch.autograd.grad(y_eager.square().sum(), list(model.parameters()))
    g_comp = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()))
    for a, b in zip(g_eager, g_comp):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_autocast_runs_the_op_in_bfloat16():
    model = TwoLayer()
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block_sparse_linear(x.bfloat16(), model.v1.bfloat16(), model.l1, model.b1.bfloat16())
    ref = block_sparse_linear(x, model.v1, model.l1, model.b1)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()) < 1e-2
