"""insert_adaption_prompt: the rewritten graph's structure; the input graph stays untouched."""

from __future__ import annotations

import collections

import pytest
import torch
from helpers import tiny_mistral

from adaption_fx.capture.export_model import capture
from adaption_fx.passes import ADAPTION_META_KEY, insert_adaption_prompt, locate_attention
from adaption_fx.passes.insert import AdapterStructure, adapter_tensor_shapes

aten = torch.ops.aten


@pytest.fixture(scope="module")
def base():
    gm = capture(tiny_mistral()).graph_module
    return gm, locate_attention(gm)


def _linear_weights(gm) -> collections.Counter:
    return collections.Counter(
        str(n.args[1].target)
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target == aten.linear.default
    )


def test_no_second_query_or_output_projection(base):
    gm, sites = base
    cfg = AdapterStructure(adapter_len=3)
    rewritten = insert_adaption_prompt(gm, sites[-2:], cfg).graph_module
    before, after = _linear_weights(gm), _linear_weights(rewritten)
    added = after - before
    # Exactly one extra key and one extra value projection (of the prompt) per adapted site;
    # q_proj and o_proj still run once each.
    assert added == collections.Counter(
        {f"model.layers.{i}.self_attn.{p}_proj.weight": 1 for i in (2, 3) for p in ("k", "v")}
    )
    assert all(after[w] == 1 for w in after if w.endswith(("q_proj.weight", "o_proj.weight")))
    sdpa = [
        n for n in rewritten.graph.nodes if n.target == aten.scaled_dot_product_attention.default
    ]
    # The layers' own attention once each, plus one fused adapter attention per adapted site.
    base_sdpa = [n for n in sdpa if ADAPTION_META_KEY not in n.meta]
    assert len(base_sdpa) == len(sites) and len(sdpa) - len(base_sdpa) == 2


def test_adapter_branch_reads_the_attentions_own_query(base):
    gm, sites = base
    rewritten = insert_adaption_prompt(gm, sites[-1:], AdapterStructure(adapter_len=2))
    nodes = {n.name: n for n in rewritten.graph_module.graph.nodes}
    site = sites[-1]
    query, attn = nodes[site.query_node], nodes[site.attention_node]
    readers = [u for u in query.users if ADAPTION_META_KEY in u.meta]
    # The fused adapter attention reads it as its query (and its batch size from it).
    scores = [u for u in readers if u.target == aten.scaled_dot_product_attention.default]
    assert len(scores) == 1 and scores[0].args[0] is query
    assert {u.target for u in readers} <= {
        aten.scaled_dot_product_attention.default,
        aten.sym_size.int,
    }
    # The attention output now only feeds the adapter's sum, which feeds everything else.
    (total,) = attn.users
    assert total.meta[ADAPTION_META_KEY]["role"] == "sum"
    assert total.target == aten.add.Tensor and total.args[0] is attn


def test_inputs_are_appended_in_site_order(base):
    gm, sites = base
    cfg = AdapterStructure(adapter_len=5, gate="per_head")
    result = insert_adaption_prompt(gm, sites[-2:], cfg)
    placeholders = [n for n in result.graph_module.graph.nodes if n.op == "placeholder"]
    base_count = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    assert [n.name for n in placeholders[:base_count]] == [
        n.name for n in gm.graph.nodes if n.op == "placeholder"
    ]
    extra = placeholders[base_count:]
    assert [n.meta[ADAPTION_META_KEY]["key"] for n in extra] == list(result.adapter_inputs)
    assert list(result.adapter_inputs) == list(adapter_tensor_shapes(sites[-2:], cfg))
    assert adapter_tensor_shapes(sites[-1:], cfg) == {
        "model.layers.3.self_attn.adaption_prompt": (1, 5, 64),
        "model.layers.3.self_attn.adaption_gate": (1, 8, 1, 1),
    }


def test_input_graph_is_not_modified_and_weights_are_shared(base):
    gm, sites = base
    code, count = gm.code, len(gm.graph.nodes)
    result = insert_adaption_prompt(gm, sites, AdapterStructure(adapter_len=2))
    assert gm.code == code and len(gm.graph.nodes) == count
    new_params = dict(result.graph_module.named_parameters())
    for name, param in gm.named_parameters():
        assert new_params[name] is param
    assert all(
        ADAPTION_META_KEY in n.meta
        for n in result.graph_module.graph.nodes
        if n.name not in {m.name for m in gm.graph.nodes} and n.op != "output"
    )


def test_inserting_twice_is_refused(base):
    gm, sites = base
    once = insert_adaption_prompt(gm, sites[-1:], AdapterStructure(adapter_len=2))
    with pytest.raises(ValueError, match="already carries adaption-prompt nodes"):
        insert_adaption_prompt(once.graph_module, sites[-1:], AdapterStructure(adapter_len=2))
