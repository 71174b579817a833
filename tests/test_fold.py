"""fold_adapter_kv: the inference fold pass."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_close, padded_batch, randomize_adapter, tiny_llama, tiny_mistral

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.passes import ADAPTION_META_KEY
from adaption_fx.passes.fold import compute_folded, fold_adapter_kv, folded_keys

aten = torch.ops.aten


def _flat(model, batch):
    ids, mask = batch
    return model.captured.bind((), {"input_ids": ids, "attention_mask": mask})


def _linear_count(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == aten.linear.default)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_mistral], ids=["llama", "mistral"])
@pytest.mark.parametrize(
    "gate, activation", [("scalar", "identity"), ("per_head", "tanh")], ids=["peft", "official"]
)
@pytest.mark.parametrize("as_inputs", [False, True], ids=["constants", "inputs"])
def test_folded_equals_unfolded(builder, gate, activation, as_inputs):
    model = rewrite(
        builder(),
        AdaptionConfig(adapter_len=5, adapter_layers=3, gate=gate, gate_activation=activation),
    )
    randomize_adapter(model, seed=3)
    graph = model.adaption_graph()
    training_code = graph.graph_module.code
    tensors = model.adapter_tensors()
    folded = fold_adapter_kv(graph, tensors, as_inputs=as_inputs)
    with torch.no_grad():
        for shape in ((3, 7), (1, 12)):
            flat = _flat(model, padded_batch(*shape))
            expected = graph.graph_module(*flat, *tensors)[0]
            extra = [folded.values[k] for k in folded.adapter_inputs]
            assert_rel_close(folded.graph_module(*flat, *extra)[0], expected, rtol=1e-6)
    # No prompt projection is left: the base graph's linears only.
    assert _linear_count(folded.graph_module) == _linear_count(model.base_graph_module)
    tagged = [n for n in folded.graph_module.graph.nodes if ADAPTION_META_KEY in n.meta]
    roles = {n.meta[ADAPTION_META_KEY]["role"] for n in tagged}
    assert "input" not in roles and "folded" in roles  # prompts and gates are gone
    assert not [n for n in tagged if n.target in (aten.linear.default, aten.addmm.default)]
    assert not any(n.op == "placeholder" and "adaption_prompt" in n.name for n in tagged)
    assert folded.adapter_inputs == () or as_inputs
    # The training graph is left as it was.
    assert graph.graph_module.code == training_code
    assert model.adaption_graph() is graph


def test_folded_tensors_are_per_kv_head_and_activated():
    model = rewrite(
        tiny_mistral(),
        AdaptionConfig(adapter_len=4, adapter_layers=1, gate="per_head", gate_activation="tanh"),
    )
    state = randomize_adapter(model, seed=1)
    site = model.adapted_sites()[0]
    key, value, gate = folded_keys(site)
    values = compute_folded(model.adaption_graph(), model.adapter_tensors())
    assert list(values) == [key, value, gate]
    assert values[key].shape == (1, site.num_kv_heads, 4, site.head_dim) == (1, 2, 4, 8)
    assert torch.equal(values[gate], torch.tanh(state[f"{site.module_path}.adaption_gate"]))
    # Keys: the layer's own k_proj of the prompt, split into heads, no positional encoding.
    attn = model.base_graph_module.get_submodule(site.module_path)
    prompt = state[f"{site.module_path}.adaption_prompt"]
    expected = torch.nn.functional.linear(prompt, attn.k_proj.weight).view(1, 4, 2, 8)
    torch.testing.assert_close(values[key], expected.transpose(1, 2), rtol=0, atol=0)


def test_one_folded_graph_serves_another_adapter_of_the_same_structure():
    model = rewrite(tiny_llama(), AdaptionConfig(adapter_len=3, adapter_layers=2))
    randomize_adapter(model, seed=1)
    model.add_adapter("other", AdaptionConfig(adapter_len=3, adapter_layers=2))
    model.set_adapter("other")
    randomize_adapter(model, seed=2)
    batch = padded_batch()
    with torch.no_grad():
        expected_other = model(input_ids=batch[0], attention_mask=batch[1]).logits
    model.set_adapter("default")
    folded = fold_adapter_kv(model.adaption_graph(), model.adapter_tensors(), as_inputs=True)
    other_values = compute_folded(model.adaption_graph("other"), model.adapter_tensors("other"))
    with torch.no_grad():
        out = folded.graph_module(
            *_flat(model, batch), *[other_values[k] for k in folded.adapter_inputs]
        )[0]
    assert_rel_close(out, expected_other, rtol=1e-6)


def test_fold_rejects_bad_input():
    model = rewrite(tiny_llama(), AdaptionConfig(adapter_len=3, adapter_layers=2))
    graph = model.adaption_graph()
    with pytest.raises(ValueError, match="expected 4 adapter tensors, got 1"):
        fold_adapter_kv(graph, model.adapter_tensors()[:1])
    with pytest.raises(ValueError, match="missing adapter tensors"):
        fold_adapter_kv(graph, {"model.layers.3.self_attn.adaption_prompt": torch.zeros(1)})
