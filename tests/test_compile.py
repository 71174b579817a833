"""adaption_fx.export.compile: parity, recompilation behaviour, training under compile."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_close, padded_batch, randomize_adapter, tiny_llama, tiny_mistral
from torch._dynamo.testing import CompileCounter

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.export import CompiledModel, compile


def _model_with_two_adapters():
    model = rewrite(tiny_mistral(), AdaptionConfig(adapter_len=3, adapter_layers=2))
    randomize_adapter(model, seed=1)
    model.add_adapter("twin", AdaptionConfig(adapter_len=3, adapter_layers=2))
    model.set_adapter("twin")
    randomize_adapter(model, seed=2)
    model.add_adapter("deeper", AdaptionConfig(adapter_len=3, adapter_layers=4))
    model.set_adapter("deeper")
    randomize_adapter(model, seed=3)
    model.set_adapter("default")
    return model


def test_inductor_matches_eager():
    torch._dynamo.reset()
    model = _model_with_two_adapters()
    ids, mask = padded_batch()
    compiled = compile(model)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        out = compiled(input_ids=ids, attention_mask=mask)
    assert type(out) is type(model(input_ids=ids, attention_mask=mask))
    assert_rel_close(out.logits, expected, rtol=1e-5)


def test_switching_adapters_and_disabling_do_not_recompile():
    torch._dynamo.reset()
    model = _model_with_two_adapters()
    ids, mask = padded_batch()
    counter = CompileCounter()
    compiled = compile(model, backend=counter)

    def run():
        with torch.no_grad():
            out = compiled(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(out, model(input_ids=ids, attention_mask=mask).logits)
        return out

    first = run()
    assert counter.frame_count == 1
    model.set_adapter("twin")  # same structure: same graph, other tensors bound
    twin = run()
    assert counter.frame_count == 1
    assert not torch.allclose(first, twin)
    model.disable_adapter_layers()  # the base graph: compiled once
    run()
    assert counter.frame_count == 2
    model.enable_adapter_layers()
    model.set_adapter("default")
    assert torch.equal(run(), first)
    with model.disable_adapter():
        run()
    model.set_adapter("twin")
    run()
    assert counter.frame_count == 2, "no recompilation after each graph's first call"
    model.set_adapter("deeper")  # another structure: its own graph, compiled once
    run()
    run()
    assert counter.frame_count == 3


def test_training_step_under_compile_matches_eager():
    torch._dynamo.reset()
    ids, mask = padded_batch()
    results = []
    for use_compile in (False, True):
        model = rewrite(tiny_mistral(), AdaptionConfig(adapter_len=3, adapter_layers=2))
        randomize_adapter(model, seed=4)
        run = compile(model, backend="aot_eager") if use_compile else model
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loss = run(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        with torch.no_grad():
            after = run(input_ids=ids, attention_mask=mask).logits
        results.append((loss.detach(), grads, after))
    (loss_e, grads_e, after_e), (loss_c, grads_c, after_c) = results
    assert_rel_close(loss_c, loss_e, rtol=1e-5)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for key in grads_e:
        assert grads_e[key].abs().sum() > 0
        assert_rel_close(grads_c[key], grads_e[key], rtol=1e-5)
    assert_rel_close(after_c, after_e, rtol=1e-5)


def test_compile_arguments():
    model = rewrite(tiny_mistral(), AdaptionConfig(adapter_len=2, adapter_layers=1))
    compiled = compile(model, mode="reduce-overhead")
    assert isinstance(compiled, CompiledModel) and compiled.model is model
    assert compiled._options == {"mode": "reduce-overhead", "fullgraph": True}
    with pytest.raises(TypeError, match="compile expects an AdaptedModel, got Linear"):
        compile(torch.nn.Linear(2, 2))


def test_compiled_generation_equals_eager_and_compiles_a_bounded_number_of_times():
    model = rewrite(tiny_llama(), AdaptionConfig(adapter_len=3, adapter_layers=2))
    randomize_adapter(model, seed=5)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 96, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    counter = CompileCounter()
    compiled = compile(model, backend=counter)
    assert torch.equal(
        compiled.generate(ids, mask, max_new_tokens=5), model.generate(ids, mask, max_new_tokens=5)
    )
    # Prompt lengths and cache lengths vary; after the prefill and the first step are
    # compiled (and once more with dynamic sizes), no length recompiles.
    compiled.generate(ids[:, 1:], mask[:, 1:], max_new_tokens=7)
    settled = counter.frame_count
    assert settled <= 3
    out = compiled.generate(ids[:, 2:], mask[:, 2:], max_new_tokens=9)
    assert counter.frame_count == settled
    assert torch.equal(out, model.generate(ids[:, 2:], mask[:, 2:], max_new_tokens=9))


def test_unfused_adapter_attention_computes_the_same_function():
    from adaption_fx.export.compile import unfused_for_inductor

    model = rewrite(tiny_mistral(), AdaptionConfig(adapter_len=3, adapter_layers=2))
    randomize_adapter(model, seed=8)
    graph = model.adaption_graph()
    unfused = unfused_for_inductor(graph.graph_module)
    sdpa = torch.ops.aten.scaled_dot_product_attention.default

    def count(gm):
        return sum(n.target == sdpa for n in gm.graph.nodes)

    assert count(graph.graph_module) == 4 + 2 and count(unfused) == 4  # the layers' own stay
    for name, param in unfused.named_parameters():
        assert param is graph.graph_module.get_parameter(name)
    assert unfused_for_inductor(model.base_graph_module) is model.base_graph_module
    ids, mask = padded_batch()
    flat = model.captured.bind((), {"input_ids": ids, "attention_mask": mask})
    tensors = model.adapter_tensors()
    with torch.no_grad():
        fused_out = graph.graph_module(*flat, *tensors)[0]
        unfused_out = unfused(*flat, *tensors)[0]
    keep = mask.bool()  # padded query rows attend to nothing: their values are arbitrary
    assert_rel_close(unfused_out[keep], fused_out[keep], 1e-6)


def test_inductor_graphs_are_unfused_once_and_cached(monkeypatch):
    import sys

    # The module, not the function of the same name that adaption_fx.export exports.
    compile_module = sys.modules["adaption_fx.export.compile"]
    model = _model_with_two_adapters()
    seen = []
    real = compile_module.unfused_for_inductor
    monkeypatch.setattr(
        compile_module, "unfused_for_inductor", lambda gm: seen.append(gm) or real(gm)
    )
    monkeypatch.setattr(torch, "compile", lambda gm, **kwargs: gm)  # the call path only
    compiled = compile(model)
    ids, mask = padded_batch()
    with torch.no_grad():
        for _ in range(3):
            compiled(input_ids=ids, attention_mask=mask)
    assert seen == [model.graph_module]
