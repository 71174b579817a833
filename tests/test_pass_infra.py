"""The one pass interface (``passes/infra.py``): torch.fx ``PassBase`` passes, one runner
that regenerates code once, preconditions that refuse without changing the graph, and the
decode step's pipeline as a list of such passes."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from adaption_fx.passes.cleanup import DropNoopNodes, EliminateDeadCode
from adaption_fx.passes.decode_step import STEP_KINDS, decode_step_passes
from adaption_fx.passes.fast_attention import DropAttentionMasks
from adaption_fx.passes.graph_copy import copy_flat_graph
from adaption_fx.passes.infra import (
    GraphPass,
    PassNotApplicable,
    graph_module_over,
    run_passes,
)

aten = torch.ops.aten


def _traced(module: torch.nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    return torch.export.export(module, args).module()


class Noops(torch.nn.Module):
    def forward(self, x):
        return (x.detach() * 1.0 + 1.0).sum()


class CountRecompiles(GraphPass):
    def transform(self, graph: torch.fx.Graph) -> int:
        return 0


def test_runner_regenerates_code_once_after_the_last_pass(monkeypatch):
    gm = _traced(Noops(), torch.randn(3))
    calls = []
    original = torch.fx.GraphModule.recompile
    monkeypatch.setattr(
        torch.fx.GraphModule, "recompile", lambda self: calls.append(1) or original(self)
    )
    x = torch.randn(3)
    expected = gm(x)
    result = run_passes(gm, [DropNoopNodes(), EliminateDeadCode(), CountRecompiles()])
    assert isinstance(result, PassResult) and result.modified and result.graph_module is gm
    assert calls == [1]
    assert "detach" not in gm.code
    assert torch.equal(gm(x), expected)
    calls.clear()
    assert not run_passes(gm, [CountRecompiles()]).modified
    assert calls == []  # nothing changed: nothing regenerated


def test_every_pass_is_a_torch_fx_pass():
    for kind in STEP_KINDS:
        passes = decode_step_passes(kind)
        assert passes and all(isinstance(p, PassBase) for p in passes)
        names = [type(p).__name__ for p in passes]
        assert names[0] == "FunctionalizeFreshInplace" and names[-1] == "EliminateDeadCode"
        assert ("DropAttentionMasks" in names) == (kind in ("decode", "prefill"))
        assert ("FloatAttentionMasks" in names) == (kind not in ("decode", "prefill"))
    assert repr(decode_step_passes("prefill")[3]) == "DropAttentionMasks(is_causal=True)"
    with pytest.raises(ValueError, match="kind must be one of"):
        decode_step_passes("beam")


def test_a_failed_precondition_refuses_and_leaves_the_graph():
    class Masked(torch.nn.Module):
        def forward(self, q, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    q = torch.randn(1, 2, 3, 4)
    gm = _traced(Masked(), q, torch.ones(1, 1, 3, 3, dtype=torch.bool))
    before = str(gm.graph)
    with pytest.raises(PassNotApplicable, match="not a plain causal mask"):
        DropAttentionMasks(is_causal=False)(gm)
    assert str(gm.graph) == before
    with pytest.raises(PassNotApplicable, match="no model attention"):
        DropAttentionMasks(is_causal=False)(_traced(Noops(), torch.randn(3)))


def test_a_pass_without_a_result_is_refused():
    class Silent(PassBase):
        def call(self, graph_module):
            return None

    with pytest.raises(TypeError, match="not a pass result"):
        run_passes(_traced(Noops(), torch.randn(3)), [Silent()])


def test_functional_precondition_is_checked():
    class Mutates(torch.nn.Module):
        def forward(self, x):
            y = x[1:]
            y.mul_(2.0)
            return x

    gm = _traced(Mutates(), torch.ones(4))
    with pytest.raises(PassNotApplicable, match="functional graph"):
        DropNoopNodes()(gm)


def test_lazy_module_over_a_copied_graph_shares_weights():
    linear = torch.nn.Linear(3, 2)
    gm = _traced(linear, torch.randn(1, 3))
    graph, _ = copy_flat_graph(gm)  # flat inputs and outputs, as the decode step's copy
    lazy = graph_module_over(gm, graph)
    assert lazy.get_parameter("weight") is gm.get_parameter("weight")
    x = torch.randn(1, 3)
    assert torch.equal(lazy(x)[0], gm(x))


def test_a_pass_that_builds_a_new_module_is_a_pass_result():
    from helpers import tiny_llama

    from adaption_fx import AdaptionConfig
    from adaption_fx.capture.export_model import capture
    from adaption_fx.passes.insert import insert_adaption_prompt
    from adaption_fx.passes.locate import locate_attention, select_top_sites

    captured = capture(tiny_llama())
    base = captured.graph_module
    before = str(base.graph)
    sites = select_top_sites(locate_attention(base), 2)
    structure = AdaptionConfig(adapter_len=3, adapter_layers=2).structure

    class Insert(PassBase):
        def call(self, graph_module):
            return insert_adaption_prompt(graph_module, sites, structure)

    result = run_passes(base, [Insert()])
    assert result.modified and result.graph_module is not base
    assert str(base.graph) == before  # the input module is left as it was
    assert len(result.graph_module.graph.nodes) > len(base.graph.nodes)


def test_copying_passes_name_the_new_module_and_refuse_unknown_regions():
    from adaption_fx.passes.activation_checkpoint import CheckpointRegions, Region

    gm = _traced(Noops(), torch.randn(3))
    names = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    result = run_passes(gm, [CheckpointRegions([Region("whole", tuple(names[:2]))])])
    assert result.modified and result.graph_module is not gm
    assert hasattr(result.graph_module, "checkpointed_0") and not hasattr(gm, "checkpointed_0")
    assert not run_passes(gm, [CheckpointRegions([])]).modified
    with pytest.raises(PassNotApplicable, match="has no nodes"):
        CheckpointRegions([Region("whole", ("nowhere",))])(gm)
