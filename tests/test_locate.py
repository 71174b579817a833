"""locate_attention: what it finds, and the numbers it reads from the graph."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_llama, tiny_mistral

from adaption_fx.capture.export_model import capture
from adaption_fx.passes import (
    AttentionNotFoundError,
    UnsupportedGraphError,
    locate_attention,
    select_top_sites,
)


def _sites(model):
    return locate_attention(capture(model).graph_module)


def _weight_of_linear(gm, node_name):
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    return str(node.args[1].target)


def test_llama_sites_in_execution_order():
    model = tiny_llama()
    captured = capture(model)
    sites = locate_attention(captured.graph_module)
    assert [s.module_path for s in sites] == [f"model.layers.{i}.self_attn" for i in range(4)]
    assert [s.index for s in sites] == [0, 1, 2, 3]
    for i, site in enumerate(sites):
        attn = model.model.layers[i].self_attn
        assert (site.num_heads, site.num_kv_heads, site.head_dim) == (4, 4, 16)
        assert site.hidden_size == 64
        assert site.scale == pytest.approx(attn.scaling, rel=0, abs=0)
        assert site.key_projection.weight == f"model.layers.{i}.self_attn.k_proj.weight"
        assert site.value_projection.weight == f"model.layers.{i}.self_attn.v_proj.weight"
        assert site.key_projection.bias is None
        out_weight = _weight_of_linear(captured.graph_module, site.output_projection)
        assert out_weight == f"model.layers.{i}.self_attn.o_proj.weight"


def test_gqa_heads_from_graph():
    sites = _sites(tiny_mistral())
    assert {(s.num_heads, s.num_kv_heads, s.head_dim, s.kv_groups) for s in sites} == {(8, 2, 8, 4)}


def test_head_dim_not_hidden_over_heads_and_bias():
    # hidden 64 but 4 heads x 32: numbers must come from shapes, not hidden // heads.
    model = tiny_llama(head_dim=32, num_key_value_heads=2, attention_bias=True)
    sites = _sites(model)
    site = sites[-1]
    assert (site.num_heads, site.num_kv_heads, site.head_dim) == (4, 2, 32)
    assert site.hidden_size == 64
    assert site.key_projection.out_features == 64
    assert site.scale == pytest.approx(1 / math.sqrt(32), rel=1e-12)
    assert site.key_projection.bias == "model.layers.3.self_attn.k_proj.bias"
    assert site.value_projection.bias == "model.layers.3.self_attn.v_proj.bias"


def test_select_top_sites_takes_the_last():
    sites = _sites(tiny_llama())
    assert [s.index for s in select_top_sites(sites, 1)] == [3]
    assert [s.index for s in select_top_sites(sites, 3)] == [1, 2, 3]
    assert select_top_sites(sites, 4) == sites
    with pytest.raises(ValueError, match=r"adapter_layers=5 but the model has only 4 attention"):
        select_top_sites(sites, 5)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_no_attention_is_a_clear_error():
    ep = torch.export.export(_MLP(), (torch.randn(2, 3, 8),))
    with pytest.raises(AttentionNotFoundError, match=r"found no attention.*aten.linear"):
        locate_attention(ep.module())


def test_symbolic_trace_graph_is_rejected():
    gm = torch.fx.symbolic_trace(_MLP())
    with pytest.raises(UnsupportedGraphError, match=r"not a torch\.export"):
        locate_attention(gm)


def test_scope_check_is_by_whole_path_components():
    from adaption_fx.passes.locate import within

    assert within("model.layers.1.self_attn.k_proj", "model.layers.1.self_attn")
    assert within("model.layers.1", "model.layers.1")
    assert not within("model.layers.10.self_attn", "model.layers.1")
    assert within("anything", "")


class _OddAttention(torch.nn.Module):
    """Softmax attention with an unknown op between the scores and the softmax."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = torch.relu(q @ k.transpose(-2, -1))  # not a pattern the pass knows
        return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, 16)


def test_unknown_attention_pattern_names_where_matching_stopped():
    ep = torch.export.export(_OddAttention(), (torch.randn(2, 5, 16),))
    with pytest.raises(AttentionNotFoundError, match=r"softmax 'softmax'.*'relu'"):
        locate_attention(ep.module())
