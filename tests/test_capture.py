"""rewrite() on every kind of input it accepts, and what it leaves of the source model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import padded_batch, randomize_adapter, tiny_llama

from adaption_fx import AdaptionConfig, CaptureError, UnsupportedGraphError, rewrite
from adaption_fx.passes.graph_copy import shares_weights

CFG = AdaptionConfig(adapter_len=3, adapter_layers=2)


def test_exported_program_and_graph_module_inputs():
    model = tiny_llama()
    ids, mask = padded_batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    ep = torch.export.export(
        model,
        (),
        {"input_ids": ids, "attention_mask": mask, "use_cache": False},
        dynamic_shapes={
            "input_ids": {0: torch.export.Dim("b"), 1: torch.export.Dim("s")},
            "attention_mask": {0: torch.export.Dim("b"), 1: torch.export.Dim("s")},
            "use_cache": None,
        },
        strict=False,
    )
    for source in (ep, ep.module()):
        adapted = rewrite(source, CFG)
        # use_cache was a captured constant: callers may leave it out.
        out = adapted(input_ids=ids, attention_mask=mask)
        assert torch.equal(out.logits, expected)
        ids2, mask2 = padded_batch(batch=4, seq=11)
        assert torch.equal(
            adapted(input_ids=ids2, attention_mask=mask2).logits,
            model(input_ids=ids2, attention_mask=mask2).logits,
        )


class PlainAttention(torch.nn.Module):
    """A user-written attention block calling F.scaled_dot_product_attention itself."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q = torch.nn.Linear(dim, dim)
        self.k = torch.nn.Linear(dim, dim)
        self.v = torch.nn.Linear(dim, dim)
        self.o = torch.nn.Linear(dim, dim)

    def split(self, x):
        b, s, d = x.shape
        return x.view(b, s, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(x.shape))


class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([PlainAttention(), PlainAttention()])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def _reference(model: TwoBlocks, x, state, adapted_paths):
    """Plain eager LLaMA-Adapter on TwoBlocks, written out by hand."""
    for i, block in enumerate(model.blocks):
        path = f"blocks.{i}"
        q, k, v = block.split(block.q(x)), block.split(block.k(x)), block.split(block.v(x))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if path in adapted_paths:
            prompt = state[f"{path}.adaption_prompt"]
            gate = state[f"{path}.adaption_gate"]
            ka, va = block.split(block.k(prompt)), block.split(block.v(prompt))
            scores = q @ ka.transpose(-2, -1) / (q.shape[-1] ** 0.5)
            a = a + gate * torch.softmax(scores.float(), dim=-1) @ va
        x = x + block.o(a.transpose(1, 2).reshape(x.shape))
    return x


def test_user_module_with_example_inputs():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = torch.randn(2, 6, 32)
    adapted = rewrite(model, AdaptionConfig(adapter_len=5, adapter_layers=1), example_inputs=(x,))
    assert [s.module_path for s in adapted.adapted_sites()] == ["blocks.1"]
    assert torch.equal(adapted(x), model(x))
    state = randomize_adapter(adapted, seed=3)
    with torch.no_grad():
        for shape in ((2, 6, 32), (3, 9, 32)):
            y = torch.randn(shape)
            ours, ref = adapted(y), _reference(model, y, state, {"blocks.1"})
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(ours, model(y), atol=1e-3)


def test_non_hf_module_needs_example_inputs():
    with pytest.raises(ValueError, match="example_inputs are needed to capture TwoBlocks"):
        rewrite(TwoBlocks(), CFG)


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = PlainAttention()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return self.inner(x)
        return x


def test_export_failure_is_reported_with_the_exporters_complaint():
    model = DataDependent()
    params_before = {k: v.requires_grad for k, v in model.named_parameters()}
    with pytest.raises(CaptureError, match=r"torch\.export could not capture DataDependent: .+"):
        rewrite(
            model,
            AdaptionConfig(adapter_len=2, adapter_layers=1),
            example_inputs=(torch.randn(2, 4, 32),),
        )
    assert {k: v.requires_grad for k, v in model.named_parameters()} == params_before
    assert model.training


def test_source_model_keeps_working_and_shares_weights():
    model = tiny_llama()
    model.train()
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model.eval()(input_ids=ids, attention_mask=mask).logits
    model.train()
    adapted = rewrite(model, CFG)
    assert model.training, "capture must restore the source's train/eval mode"
    randomize_adapter(adapted, seed=1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    assert shares_weights(adapted.base_graph_module, model)
    src = dict(model.named_parameters())
    for name, param in adapted.base_graph_module.named_parameters():
        assert param is src[name]
        assert not param.requires_grad


def test_rewriting_a_rewritten_model_is_an_error():
    adapted = rewrite(tiny_llama(), CFG)
    with pytest.raises(UnsupportedGraphError, match="already an AdaptedModel"):
        rewrite(adapted, CFG)
    with pytest.raises(UnsupportedGraphError, match="already carries adaption-prompt nodes"):
        rewrite(adapted.graph_module, CFG)


@pytest.mark.parametrize(
    "bad_model, bad_config, exc, pattern",
    [
        ("not a model", CFG, TypeError, "model must be an nn.Module.*got str"),
        (
            None,
            {"adapter_len": 2},
            TypeError,
            "config must be an AdaptionConfig, an adapter checkpoint directory or None, got dict",
        ),
    ],
)
def test_bad_arguments(bad_model, bad_config, exc, pattern):
    model = tiny_llama() if bad_model is None else bad_model
    with pytest.raises(exc, match=pattern):
        rewrite(model, bad_config)


def test_adapter_name_must_be_a_string():
    with pytest.raises(TypeError, match="adapter_name must be a non-empty str"):
        rewrite(tiny_llama(), CFG, adapter_name="")
