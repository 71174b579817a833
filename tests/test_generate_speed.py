"""The eager decode-step fast path (``TorchSession`` over ``StepProgram``) and its passes.

Oracles: the folded decode graph run as captured (its GraphModule, through
``CapturedModel.bind``: the path ``TorchSession`` takes with a runner), Hugging Face's own
``generate``, and small hand-built FX graphs for the cleanup passes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.fx
from helpers import (
    assert_rel_close,
    randomize_adapter,
    step_logits,
    tiny_llama,
    tiny_mistral,
)

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.generation.loop import StepProgram, TorchSession
from adaption_fx.passes.cleanup import (
    DropNoopNodes,
    EliminateCommonSubexpressions,
    EliminateDeadCode,
    FunctionalizeFreshInplace,
    is_functional,
)
from adaption_fx.passes.codegen import GraphFunction
from adaption_fx.passes.hoist import hoist_invariant
from adaption_fx.passes.infra import run_passes

aten = torch.ops.aten
CFG = AdaptionConfig(adapter_len=4, adapter_layers=2)
VOCAB = 96


@pytest.fixture(scope="module")
def setups():
    cache: dict[str, SimpleNamespace] = {}

    def get(name: str, **overrides) -> SimpleNamespace:
        key = name + repr(sorted(overrides.items()))
        if key not in cache:
            hf = {"llama": tiny_llama, "mistral": tiny_mistral}[name](**overrides)
            hf.generation_config.eos_token_id = None
            model = rewrite(hf, CFG)
            randomize_adapter(model, seed=5)
            cache[key] = SimpleNamespace(hf=hf, model=model)
        return cache[key]

    return get


def prompts(batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


# ----------------------------------------------------------------------------- step program
@pytest.mark.parametrize("name", ["llama", "mistral"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("enabled", [True, False])
def test_fast_steps_equal_the_captured_graph(setups, name, padded, enabled):
    model = setups(name).model
    ids = prompts(3, 6, seed=1)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0
        mask[2, :4] = 0
    new = prompts(3, 5, seed=2)
    decoder = model.decoder()
    with torch.no_grad():
        if not enabled:
            model.disable_adapter_layers()
        try:
            fast_session = TorchSession(decoder)
            assert fast_session.program is not None
            fast = step_logits(fast_session, ids, mask, new)
            slow = step_logits(TorchSession(decoder, runner=lambda gm: gm), ids, mask, new)
        finally:
            model.enable_adapter_layers()
    for got, expected in zip(fast, slow, strict=True):
        assert_rel_close(got, expected, 1e-5)


def test_each_kind_of_step_runs_its_variant(setups):
    model = setups("mistral").model
    session = TorchSession(model.decoder())
    ids = prompts(2, 5, seed=3)
    mask = torch.ones_like(ids)
    step_logits(session, ids, mask, prompts(2, 2, seed=4))
    assert sorted(session._bound) == ["decode", "prefill"]
    mask[0, 0] = 0
    step_logits(session, ids, mask, prompts(2, 2, seed=4))
    assert sorted(session._bound) == ["decode", "decode_masked", "masked", "prefill"]


def test_decode_variant_drops_what_eager_transformers_skips(setups):
    # Mistral has grouped-query attention (8 query heads, 2 key/value heads).
    decoder = setups("mistral").model.decoder()
    program = StepProgram(decoder.inference_graph()[0], decoder.captured, decoder.cache_layout)
    graph_nodes = [n for n in decoder.inference_graph()[0].graph.nodes if n.op == "call_function"]
    prologue, step = program.functions("decode")
    ops = step.op_counts
    assert sum(ops.values()) < 0.8 * len(graph_nodes)
    assert ops["aten.roll.default"] == 2 * decoder.cache_layout.num_layers  # rotate_half
    assert "aten._assert_tensor_metadata.default" not in ops
    # Neither repeat_kv nor the adapter batch expand; at most the rotary frequencies' own
    # expand to the batch (transformers 4.x keeps it in the step, 5.x folds it away).
    assert ops["aten.expand.default"] <= 1
    assert "aten.clone.default" not in ops
    assert "aten.index.Tensor" not in ops  # no mask is built
    # SDPA for the model's attention only (no mask, native GQA); the adapter's as
    # thread-free element-wise ops: no softmax, no MKL exp.
    assert ops["aten.scaled_dot_product_attention.default"] == decoder.cache_layout.num_layers
    assert "aten._softmax.default" not in ops and "aten.exp.default" not in ops
    assert ops["aten.exp2.default"] == CFG.adapter_layers
    # The adapter keys and values are shared across query heads once, in the prologue.
    assert prologue.op_counts["aten.expand.default"] == 2 * CFG.adapter_layers
    assert step.source.count("enable_gqa=True") == decoder.cache_layout.num_layers
    masked = program.functions("decode_masked")[1].op_counts
    # One float mask per step rather than one conversion per layer.
    assert masked["aten.where.ScalarOther"] == 1


def test_sliding_window_keeps_its_mask(setups):
    # A sliding-window mask is not causal-and-padding: the mask-free variants fall back to
    # the masked ones, and generation still equals Hugging Face's.
    setup = setups("mistral", sliding_window=3)
    model, hf = setup.model, setup.hf
    decoder = model.decoder()
    program = StepProgram(decoder.inference_graph()[0], decoder.captured, decoder.cache_layout)
    assert program.functions("decode") is program.functions("decode_masked")
    assert program.functions("prefill") is program.functions("masked")
    ids = prompts(2, 6, seed=6)
    with model.disable_adapter(), torch.no_grad():
        ours = model.generate(ids, max_new_tokens=6)
        theirs = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
    assert torch.equal(ours, theirs)


def test_session_rejects_steps_that_do_not_continue_it(setups):
    model = setups("llama").model
    session = TorchSession(model.decoder())
    ids = prompts(2, 4, seed=7)
    mask = torch.ones_like(ids)
    step_logits(session, ids, mask, prompts(2, 1, seed=8))
    token = prompts(2, 1, seed=9)
    with pytest.raises(ValueError, match="attention_mask"):
        session.step(token, torch.ones(2, 3, dtype=torch.long), torch.ones_like(token))
    with pytest.raises(ValueError):
        session.step(prompts(3, 1, seed=9), torch.ones(3, 6, dtype=torch.long), token)


def test_generation_runs_the_fast_path_and_matches_hf(setups, monkeypatch):
    setup = setups("mistral")
    calls = []
    original = TorchSession._function

    def spy(self, kind):
        calls.append(kind)
        return original(self, kind)

    monkeypatch.setattr(TorchSession, "_function", spy)
    ids = prompts(2, 5, seed=10)
    with setup.model.disable_adapter(), torch.no_grad():
        ours = setup.model.generate(ids, max_new_tokens=5)
        theirs = setup.hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
    assert torch.equal(ours, theirs)
    assert set(calls) == {"prefill", "decode"}


# ----------------------------------------------------------------------------- passes
def _graph(fn, *example) -> torch.fx.GraphModule:
    return torch.export.export(fn, example, strict=False).module()


def test_cleanup_drops_noops_and_repeats_only():
    class M(torch.nn.Module):
        def forward(self, x, n):
            a = x.to(torch.float32).detach() * 1.0  # three no-ops
            b = x.to(torch.float64)  # a real cast
            c = torch.arange(n.shape[0]) + 0  # integer + 0
            d = x.unsqueeze(1) + x.unsqueeze(1)  # one unsqueeze twice
            e = x * 1  # x * 1 stays x
            f = x + 0.0  # floats: -0.0 + 0.0 is +0.0, kept
            return a, b, c, d, e, f

    x = torch.tensor([-0.0, 1.5, -2.0])
    gm = _graph(M(), x, torch.ones(4))
    expected = gm(x, torch.ones(4))
    graph = gm.graph
    assert is_functional(graph)
    before = [n.target for n in graph.nodes if n.op == "call_function"]
    result = run_passes(gm, [DropNoopNodes(), EliminateCommonSubexpressions(), EliminateDeadCode()])
    assert result.graph_module is gm and result.modified
    after = [n.target for n in graph.nodes if n.op == "call_function"]
    assert aten._assert_tensor_metadata.default not in after
    assert aten.detach.default not in after
    assert after.count(aten.unsqueeze.default) == 1 < before.count(aten.unsqueeze.default)
    assert aten.to.dtype in after or aten._to_copy.default in after  # the float64 cast
    got = gm(x, torch.ones(4))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype
        assert torch.equal(g, e)
    assert torch.equal(got[5].signbit(), expected[5].signbit())


def test_inplace_on_fresh_tensors_becomes_out_of_place():
    # transformers 4.x builds mask indices as arange(n).add_(k); an in-place op on a tensor
    # others can see (an input, a view) or one that would change dtype is left alone.
    class M(torch.nn.Module):
        def forward(self, x, n):
            fresh = torch.arange(n.shape[0]).add_(3)  # rewritten
            view = x[1:]
            view.mul_(2.0)  # mutates x: kept
            return fresh, x

    gm = _graph(M(), torch.ones(4), torch.ones(5))
    graph = gm.graph
    assert not is_functional(graph)
    assert not is_functional(graph, allow_fresh_inplace=True)  # the view's mul_
    assert FunctionalizeFreshInplace().transform(graph) == 1
    gm.recompile()
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert aten.add_.Tensor not in targets and aten.add.Tensor in targets
    assert not is_functional(graph)  # the mul_ of x's view stays
    x = torch.ones(4)
    fresh, out = gm(x, torch.ones(5))
    assert torch.equal(fresh, torch.arange(5) + 3)
    assert torch.equal(out, torch.tensor([1.0, 2.0, 2.0, 2.0]))

    promoting = torch.fx.Graph()
    size = promoting.placeholder("n")
    created = promoting.call_function(aten.arange.default, (size,))
    created.meta["val"] = torch.empty(3, dtype=torch.long)
    promoting.output(promoting.call_function(aten.add_.Tensor, (created, 0.5)))
    assert FunctionalizeFreshInplace().transform(promoting) == 0  # long + 0.5 would be a float
    assert not is_functional(promoting, allow_fresh_inplace=True)

    class OnlyFresh(torch.nn.Module):
        def forward(self, n):
            return torch.arange(n.shape[0]).add_(3)

    graph = _graph(OnlyFresh(), torch.ones(5)).graph
    assert not is_functional(graph)
    assert is_functional(graph, allow_fresh_inplace=True)


def test_hoist_splits_invariant_work_and_codegen_runs_it():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    w = graph.placeholder("w")
    w2 = graph.call_function(aten.mul.Tensor, (w, 2.0))
    w3 = graph.call_function(aten.exp2.default, (w2,))
    y = graph.call_function(aten.add.Tensor, (x, w3))
    z = graph.call_function(aten.mul.Tensor, (y, w))
    graph.output((z, y))
    split = hoist_invariant(graph, ["w"])
    assert split.hoisted == 2  # exp2(w * 2) and w itself
    prologue = GraphFunction(split.prologue, "prologue").bind(None)
    main = GraphFunction(split.main, "main").bind(None)
    assert main.__code__.co_argcount == 3
    xv, wv = torch.randn(3), torch.randn(3)
    got = main(xv, *prologue(wv))
    y_expected = xv + torch.exp2(wv * 2.0)
    assert torch.equal(got[1], y_expected)
    assert torch.equal(got[0], y_expected * wv)


def test_roll_rotate_half_is_bit_exact():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from adaption_fx.passes.rotary import RollRotateHalf

    class Rotary(torch.nn.Module):
        def forward(self, q, k, cos, sin):
            return apply_rotary_pos_emb(q, k, cos, sin)

    g = torch.Generator().manual_seed(0)
    # Queries as attention produces them: a transposed (batch, seq, heads, dim) projection.
    q = torch.randn(2, 5, 4, 8, generator=g).transpose(1, 2)
    k = torch.randn(2, 5, 2, 8, generator=g).transpose(1, 2)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    gm = _graph(Rotary(), q, k, cos, sin)
    expected = gm(q, k, cos, sin)
    EliminateCommonSubexpressions()(gm)
    assert RollRotateHalf().transform(gm.graph) == 2
    run_passes(gm, [EliminateDeadCode()])
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(aten.roll.default) == 2
    assert targets.count(aten.neg.default) == 1  # of sin, once
    for got, want in zip(gm(q, k, cos, sin), expected, strict=True):
        assert torch.equal(got, want)
