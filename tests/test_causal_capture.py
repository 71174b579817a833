"""The mask-free causal capture: used for unpadded input, refused where it would be wrong.

Hugging Face causal LMs are captured twice: with ``attention_mask`` (the mask built in the
graph, as torch.export requires) and without it, where every attention is SDPA with
``is_causal=True``. The second graph is used when no token is padded; it must compute the
same function, and it must not exist for models whose mask is more than causal.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_close, padded_batch, randomize_adapter, tiny_llama, tiny_mistral

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.capture.export_model import capture

aten = torch.ops.aten


@pytest.fixture(scope="module")
def llama_pair():
    hf = tiny_llama()
    model = rewrite(hf, AdaptionConfig(adapter_len=3, adapter_layers=2))
    randomize_adapter(model, seed=4)
    return hf, model


def _graph_calls(model):
    """Counts of calls to the masked and the causal rewritten graphs of the active adapter
    (either form: with autograd recording, the one with the adapter attention written out
    runs, see adaption_fx.model.eager)."""
    from adaption_fx.model.eager import eager_graph

    calls = {"masked": 0, "causal": 0}
    hooks = []
    for kind, graph in (
        ("masked", model.adaption_graph()),
        ("causal", model.adaption_graph(causal=True)),
    ):
        with torch.enable_grad():
            forms = {graph.graph_module, eager_graph(graph.graph_module)}
        for form in forms:
            hooks.append(
                form.register_forward_hook(
                    lambda *_, kind=kind: calls.__setitem__(kind, calls[kind] + 1)
                )
            )
    return calls, hooks


def test_causal_graph_is_mask_free_sdpa(llama_pair):
    _, model = llama_pair
    causal = model.captured.causal
    assert causal is not None
    assert "attention_mask" not in causal.keyword_names
    assert "attention_mask" in model.captured.keyword_names
    sdpa = [
        n
        for n in causal.graph_module.graph.nodes
        if n.target == aten.scaled_dot_product_attention.default
    ]
    assert len(sdpa) == len(model.sites)
    for node in sdpa:
        assert node.args[3] is None and node.args[5] is True
    # Same base weights: the second capture copies nothing.
    masked = dict(model.base_graph_module.named_parameters())
    for name, param in causal.graph_module.named_parameters():
        assert param is masked[name]


def test_unpadded_input_runs_the_causal_graph_padded_the_masked(llama_pair):
    _, model = llama_pair
    ids, mask = padded_batch()
    calls, hooks = _graph_calls(model)
    try:
        model(input_ids=ids)
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        model(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool))
        assert calls == {"masked": 0, "causal": 3}
        model(input_ids=ids, attention_mask=mask)
        assert calls == {"masked": 1, "causal": 3}
    finally:
        for hook in hooks:
            hook.remove()


def test_causal_graph_equals_masked_graph(llama_pair):
    _, model = llama_pair
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(ids)
    tensors = model.adapter_tensors()
    masked_flat = model.captured.bind((), {"input_ids": ids, "attention_mask": ones})
    masked = model.adaption_graph().graph_module(*masked_flat, *tensors)[0]
    causal = model(input_ids=ids).logits
    assert_rel_close(causal, masked, 1e-5)


def test_disabled_causal_graph_is_bit_identical_to_the_model(llama_pair):
    hf, model = llama_pair
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with model.disable_adapter(), torch.no_grad():
        ours = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        theirs = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(ours, theirs)


def test_gradients_match_between_the_two_graphs(llama_pair):
    _, model = llama_pair
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(2))

    def grads(force_masked: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        causal = model.captured.causal
        if force_masked:
            model.captured.causal = None
        try:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        finally:
            model.captured.causal = causal
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    via_causal, via_masked = grads(False), grads(True)
    assert via_causal.keys() == via_masked.keys() and via_causal
    for key in via_causal:
        assert_rel_close(via_causal[key], via_masked[key], 1e-5)


def test_a_sliding_window_model_gets_no_causal_graph():
    # The window (4 tokens) makes the mask more than causal: is_causal would be wrong.
    hf = tiny_mistral(sliding_window=4)
    captured = capture(hf)
    assert captured.causal is None
    model = rewrite(hf, AdaptionConfig(adapter_len=2, adapter_layers=1))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with model.disable_adapter(), torch.no_grad():
        assert_rel_close(model(input_ids=ids).logits, hf(input_ids=ids).logits, 1e-5)


def test_an_eager_attention_model_gets_no_causal_graph():
    # Eager attention reads the mask itself: without one it would attend to the future.
    hf = tiny_llama(attn_implementation="eager")
    assert capture(hf).causal is None


def test_user_example_inputs_get_no_causal_graph():
    # position_ids or other inputs the user chose may carry packing: only the automatic
    # input_ids/attention_mask capture gets the second graph.
    hf = tiny_llama()
    ids = torch.ones(2, 5, dtype=torch.long)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    captured = capture(hf, example)
    assert captured.causal is None
