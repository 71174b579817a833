"""Capturing a decoder through one layer and growing the rest (adaption_fx.capture.repeated and
passes.replicate): the grown graphs compute what a whole capture computes, bit for bit,
and a model whose layers are not alike is captured whole."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import padded_batch, randomize_adapter, tiny_llama, tiny_mistral

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.capture.export_model import capture
from adaption_fx.capture.repeated import ENV_SWITCH, find_repeated_layers, first_layer_only
from adaption_fx.passes.graph_copy import shares_weights
from adaption_fx.passes.replicate import ReplicateLayer, ReplicationError, layer_region


@pytest.fixture(autouse=True)
def _uncached(monkeypatch):
    # What is under test is the capture itself, not a graph read back from the cache.
    monkeypatch.setenv("ADAPTION_FX_CACHE", "0")


def _whole(model, monkeypatch, config=None):
    monkeypatch.setenv(ENV_SWITCH, "0")
    try:
        return rewrite(model, config)
    finally:
        monkeypatch.delenv(ENV_SWITCH)


def _grown_layers(caplog) -> bool:
    return any("through 1 of its" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("build", [tiny_llama, tiny_mistral])
def test_grown_capture_equals_whole_capture(build, monkeypatch, caplog):
    model = build()
    with caplog.at_level(logging.INFO, logger="adaption_fx.capture.repeated"):
        grown = rewrite(model, AdaptionConfig(adapter_len=3, adapter_layers=2))
    assert _grown_layers(caplog)
    whole = _whole(model, monkeypatch, AdaptionConfig(adapter_len=3, adapter_layers=2))
    assert [s.module_path for s in grown.sites] == [s.module_path for s in whole.sites]
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in grown.sites] == [
        (s.num_heads, s.num_kv_heads, s.head_dim) for s in whole.sites
    ]
    randomize_adapter(grown)
    whole.load_state_dict(grown.state_dict())
    ids, mask = padded_batch()
    assert torch.equal(
        grown(input_ids=ids, attention_mask=mask).logits,
        whole(input_ids=ids, attention_mask=mask).logits,
    )
    assert torch.equal(grown(input_ids=ids).logits, whole(input_ids=ids).logits)
    assert grown.captured.causal is not None
    assert shares_weights(grown.base_graph_module, model)
    out = grown.generate(ids[:1], max_new_tokens=4, eos_token_id=None)
    assert torch.equal(out, whole.generate(ids[:1], max_new_tokens=4, eos_token_id=None))


def test_grown_decode_step_equals_whole_decode_step(monkeypatch):
    model = tiny_llama(num_key_value_heads=2)
    grown = rewrite(model, None).decoder()
    whole = _whole(model, monkeypatch).decoder()
    layout = grown.cache_layout
    g = torch.Generator().manual_seed(3)
    feed = {
        "input_ids": torch.randint(0, 96, (2, 3), generator=g),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
        "position_ids": torch.arange(4, 7).repeat(2, 1),
    }
    for name, t in zip(layout.past_inputs, layout.filled(2, 4), strict=True):
        feed[name] = torch.randn(t.shape, generator=g)
    got, want = grown(**feed), whole(**feed)
    assert list(got) == list(want) == ["logits", *layout.present_outputs]
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert shares_weights(grown.base_graph_module, model)


def test_layers_with_different_settings_are_captured_whole(caplog):
    model = tiny_llama()
    model.model.layers[2].self_attn.scaling = 0.5
    assert find_repeated_layers(model) is None
    with caplog.at_level(logging.INFO, logger="adaption_fx.capture.repeated"):
        captured = rewrite(model, None)
    assert "model.layers.2.self_attn.scaling is 0.5" in caplog.text
    assert not _grown_layers(caplog)
    ids, mask = padded_batch()
    assert torch.equal(captured(input_ids=ids, attention_mask=mask).logits, model(ids, mask).logits)


def test_layers_with_hooks_are_captured_whole():
    model = tiny_llama()
    model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: o)
    assert find_repeated_layers(model) is None


def test_a_layer_whose_code_depends_on_its_index_is_caught_by_the_check(monkeypatch, caplog):
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaDecoderLayer.forward

    def forward(self, hidden_states, *args, **kwargs):
        out = original(self, hidden_states, *args, **kwargs)
        return out * 2 if self.self_attn.layer_idx == 2 else out

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", forward)
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="adaption_fx.capture.repeated"):
        adapted = rewrite(model, None)
    assert "does not match the model" in caplog.text
    ids, mask = padded_batch()
    torch.testing.assert_close(
        adapted(input_ids=ids, attention_mask=mask).logits, model(ids, mask).logits
    )
    torch.testing.assert_close(adapted(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_model_keeps_its_layers_when_the_one_layer_capture_fails(monkeypatch):
    import adaption_fx.capture.export_model as capture_module

    model = tiny_llama()
    layers = model.model.layers
    real_export = capture_module.export_program
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(len(model.model.layers))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(capture_module, "export_program", failing_once)
    captured = capture(model, cache=False)
    assert calls[:2] == [1, 4]  # one layer, failed; then the whole model
    assert model.model.layers is layers and len(layers) == 4
    ids, _ = padded_batch()
    out = captured.unflatten(captured.graph_module(*captured.bind((), {"input_ids": ids})))
    torch.testing.assert_close(out.logits, model(input_ids=ids).logits)


def test_first_layer_only_restores_the_list_on_error():
    model = tiny_llama()
    layers = model.model.layers
    info = find_repeated_layers(model)
    assert info.container == "model.layers" and info.count == 4
    with pytest.raises(RuntimeError, match="inside"), first_layer_only(model, info):
        assert len(model.model.layers) == 1
        raise RuntimeError("inside")
    assert model.model.layers is layers


def test_replicate_layer_refuses_a_graph_without_the_layer():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten.relu.default, (x,)))
    with pytest.raises(ReplicationError, match=r"model\.layers\.0"):
        layer_region(graph, "model.layers.0")
    with pytest.raises(ValueError, match="must start with"):
        ReplicateLayer("model.layers.0", ["model.layers.1"]).transform(graph)


def test_paused_gc_restores_the_collector():
    import gc

    from adaption_fx.capture.gc_pause import paused_gc

    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner pause leaves the outer one in place
    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # a collector the caller turned off stays off
    finally:
        gc.enable()
