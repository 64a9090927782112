"""Models people use, built from their libraries' own configs (tiny, no download): Hugging Face
BERT (classifier and masked LM), GPT-2 (Conv1D layers) and Llama; timm ViT and ResNet;
torchvision ResNet-18 and ViT. Each library is optional: its tests skip, with the reason, where
it does not import (CI installs transformers through the test extra; timm and torchvision need
a torchvision build that matches torch, which the CPU build of torch CI uses has not).

Covered: sparsify (outputs equal the densified model's), Conv1D and MultiheadAttention
coverage, training steps with topology updates, inference_mode, channels_last, deepcopy
during training (timm's EMA), torch.compile(fullgraph=True) without graph breaks, torch.export.
"""
import copy
import importlib
import warnings

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounter

import itop


def _import_or_skip(name: str, why: str):
    """The module, or a skip that says why it is missing (an ImportError, or a broken
    install: torchvision's C++ ops fail to load against another torch build)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a broken install raises more than ImportError
        pytest.skip(f"{name} does not import here ({type(exc).__name__}: {exc}); {why}")


HF_WHY = "install the test extra (pip install -e '.[test]') for the Hugging Face tests"
TV_WHY = ("timm and torchvision need a torchvision build made for this torch; PyPI's "
          "torchvision does not import next to the CPU build of torch 2.13.0 that CI uses")


def _sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, itop.SparseLayer)]


def _sparsify(model, density=0.3, block_size=16, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # small heads the block size does not divide
        return itop.sparsify(model, density, block_size=block_size, **kw)


def _train(model, batches, loss_fn, update_every=1, growth="gradient"):
    """A few AdamW steps with a topology manager; returns the number of topology changes."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = itop.TopologyManager(model, opt, update_every=update_every, total_steps=100,
                               growth=growth)
    changed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # no "nothing captured" fallback
        for batch in batches:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
            changed += mgr.step()
    mgr.close()
    for m in _sparse_layers(model):
        assert m.values.shape[0] == m.nnz == int(m.block_mask.sum())
    return changed


def _matches_densified(model, x):
    """Check ``model(x)`` against its densified copy under ``no_grad`` and ``inference_mode``;
    returns the reference output."""
    with torch.no_grad():
        ref = itop.densify(copy.deepcopy(model))(x)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    return ref


# --------------------------------------------------------------------------- Hugging Face
VOCAB = 128


def _hf_model(kind: str):
    T = _import_or_skip("transformers", HF_WHY)
    torch.manual_seed(0)
    if kind.startswith("bert"):
        cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=128,
                           max_position_embeddings=64, num_labels=3,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cls = T.BertForSequenceClassification if kind == "bert-cls" else T.BertForMaskedLM
        return cls(cfg)
    if kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return T.GPT2LMHeadModel(cfg)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64)
    return T.LlamaForCausalLM(cfg)


def _hf_loss(kind):
    def loss(model, ids):
        if kind == "bert-cls":
            return model(input_ids=ids, labels=ids[:, 0] % 3).loss
        return model(input_ids=ids, labels=ids).loss
    return loss


# the language-model heads are tied to the input embeddings: keep them dense
HEADS = {"bert-cls": [], "bert-mlm": ["cls"], "gpt2": ["lm_head"], "llama": ["lm_head"]}
# the weight matrices sparsify must make sparse (by the last part of their names)
EXPECTED = {
    "bert-cls": {"query", "key", "value", "dense"},
    "bert-mlm": {"query", "key", "value", "dense"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},                    # transformers' Conv1D
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
}


@pytest.mark.parametrize("kind", ["bert-cls", "bert-mlm", "gpt2", "llama"])
def test_hugging_face_model_sparsifies_matches_densified_and_trains(kind):
    model = _hf_model(kind).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    model = _sparsify(model, exclude=HEADS[kind])
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, itop.SparseLayer)}
    assert names == EXPECTED[kind]
    summary = itop.sparsity_summary(model)
    dense_rows = [r for r in summary if r["block_size"] is None]
    # only the excluded/undividable heads stay dense: the big matrices are all sparse
    assert sum(r["weights"] for r in dense_rows) < 0.2 * sum(r["weights"] for r in summary)
    assert summary.overall_density < 0.45
    with torch.no_grad():
        ref = itop.densify(copy.deepcopy(model))(input_ids=ids).logits
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, out)
    batches = [torch.randint(0, VOCAB, (2, 12)) for _ in range(2)]
    assert _train(model, batches, _hf_loss(kind)) == 2


def test_gpt2_conv1d_round_trip_and_summary_of_the_dense_model():
    """A dense GPT-2 lists its Conv1D layers (no "density 0.1" for an all-dense model);
    densify gives Conv1D layers back, so the weights load into a stock GPT-2."""
    T = _import_or_skip("transformers", HF_WHY)
    dense = _hf_model("gpt2").eval()
    summary = itop.sparsity_summary(dense)
    rows = {r["name"]: r for r in summary}
    assert rows["transformer.h.0.attn.c_attn"]["shape"] == (192, 64)    # [out, in]
    assert rows["transformer.h.0.attn.c_attn"]["kind"] == "Conv1D"
    assert summary.overall_density == 1.0
    sparse = _sparsify(copy.deepcopy(dense), exclude=["lm_head"], init="magnitude")
    c_attn = sparse.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, itop.SparseLinear) and c_attn.dense_weight_shape == (192, 64)
    back = itop.densify(copy.deepcopy(sparse))
    assert type(back.transformer.h[0].attn.c_attn) is type(dense.transformer.h[0].attn.c_attn)
    fresh = _hf_model("gpt2").eval()
    fresh.load_state_dict(back.state_dict())
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits,
                                   sparse(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    # magnitude selection kept the largest blocks of the pretrained (here: random) weights
    w = dense.transformer.h[0].attn.c_attn.weight.detach().t()
    norms = w.reshape(12, 16, 4, 16).square().sum((1, 3))
    assert norms[c_attn.block_mask].min() >= norms[~c_attn.block_mask].max()
    # generate runs on the sparse model
    out = sparse.generate(ids[:1, :4], max_new_tokens=3, do_sample=False,
                          pad_token_id=0)
    assert out.shape == (1, 7)


def test_bert_compiles_whole_and_exports():
    """The issue's count was one graph break per sparse layer (16 on a BERT-tiny) and a failing
    fullgraph/export; the dense model has none."""
    model = _sparsify(_hf_model("bert-cls").eval())
    ids = torch.randint(0, VOCAB, (2, 12))
    counter = CompileCounter()     # counts graphs: one graph, with every sparse layer in it
    with torch.no_grad():
        torch.compile(model, backend=counter, fullgraph=True)(input_ids=ids)
    assert counter.frame_count == 1
    assert counter.op_count > 13 * 2   # 13 sparse layers, each at least its op and a reshape
    torch._dynamo.reset()
    ep = torch.export.export(model, (), {"input_ids": ids})
    ids2 = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(input_ids=ids2).logits,
                                   model(input_ids=ids2).logits, rtol=1e-5, atol=1e-6)
    # training compiled with fullgraph=True: topology updates recompile nothing
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)

    def loss(m, batch):
        return compiled(input_ids=batch, labels=batch[:, 0] % 3).loss

    batches = [torch.randint(0, VOCAB, (2, 12)) for _ in range(6)]
    assert _train(model, batches[:3], loss, update_every=2) == 1
    frames = counter.frame_count
    assert _train(model, batches[3:], loss, update_every=1) == 3
    assert counter.frame_count == frames


# --------------------------------------------------------------------------- timm
def test_timm_vit_and_resnet():
    timm = _import_or_skip("timm", TV_WHY)
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            patch_size=8, depth=2, num_classes=10)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    for model in (vit, resnet):
        model = _sparsify(model.eval(), block_size=16)
        assert len(_sparse_layers(model)) > 4
        x = torch.randn(2, 3, 32, 32)
        ref = _matches_densified(model, x)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), ref,
                                       rtol=1e-4, atol=1e-4)
        ema = ModelEmaV3(model, decay=0.9)   # a deepcopy taken during training

        def loss(m, batch):
            out = m(batch).square().mean()
            return out

        _train(model, [x, x], loss)
        ema.update(model)
        assert not any(m._captured for m in _sparse_layers(ema.module))
        explain = torch._dynamo.explain(model)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        torch._dynamo.reset()


# --------------------------------------------------------------------------- torchvision
def test_torchvision_resnet18_and_vit():
    tvm = _import_or_skip("torchvision.models", TV_WHY)
    torch.manual_seed(0)
    resnet = tvm.resnet18(num_classes=10)
    vit = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                hidden_dim=64, mlp_dim=128, num_classes=10)
    for model in (resnet, vit):
        model = _sparsify(model.eval(), block_size=16)
        if model is not resnet:   # torchvision's ViT attention is nn.MultiheadAttention
            assert isinstance(model.encoder.layers[0].self_attention,
                              itop.SparseMultiheadAttention)
        x = torch.randn(2, 3, 32, 32)
        ref = _matches_densified(model, x)
        _train(model, [x, x], lambda m, b: m(b).square().mean())
        explain = torch._dynamo.explain(model.eval())(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        torch._dynamo.reset()
