"""Gradient checkpointing as a graph pass, and the gated-activation recompute pass."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_state_unchanged,
    padded_batch,
    randomize_adapter,
    snapshot_state,
    tiny_llama,
    tiny_mistral,
)

from adaption_fx import AdaptionConfig, UnsupportedGraphError, rewrite
from adaption_fx.model.eager import eager_graph, training_graph
from adaption_fx.passes.activation_checkpoint import (
    checkpointed_regions,
    decoder_layer_regions,
)
from adaption_fx.passes.graph_copy import copy_sharing_weights
from adaption_fx.passes.infra import run_passes
from adaption_fx.passes.recompute import RecomputeGatedActivations, find_gated_activations


def _adapted(builder, layers: int = 2, gate: str = "scalar"):
    model = rewrite(builder(), AdaptionConfig(adapter_len=4, adapter_layers=layers, gate=gate))
    randomize_adapter(model, seed=3)
    return model


def _step(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def _assert_grads_equal(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys() and expected
    for key, grad in expected.items():
        scale = grad.abs().max().clamp_min(1e-12)
        err = ((actual[key] - grad).abs().max() / scale).item()
        assert err <= rtol, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize(
    ("builder", "gate", "options"),
    [
        (tiny_llama, "scalar", None),
        (tiny_mistral, "per_head", None),
        (tiny_llama, "scalar", {"use_reentrant": True}),
        (tiny_mistral, "scalar", {"preserve_rng_state": False}),
    ],
)
def test_checkpointed_gradients_equal_the_kept_ones(builder, gate, options):
    model = _adapted(builder, gate=gate)
    ids, mask = padded_batch()
    loss, logits, grads = _step(model, ids, mask)
    model.gradient_checkpointing_enable(options)
    assert model.is_gradient_checkpointing
    loss_c, logits_c, grads_c = _step(model, ids, mask)
    # Recomputing runs the same ops on the same inputs: the issue asks for 1e-6 relative;
    # on CPU they come out bit-identical.
    assert torch.equal(loss_c, loss) and torch.equal(logits_c, logits)
    _assert_grads_equal(grads_c, grads, rtol=1e-6)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    _assert_grads_equal(_step(model, ids, mask)[2], grads, rtol=0.0)


def test_only_the_adapted_decoder_layers_are_checkpointed():
    model = _adapted(tiny_llama, layers=2)
    model.gradient_checkpointing_enable()
    graph = model.adaption_graph().graph_module
    with torch.enable_grad():
        twin = model.eager_runner()(graph)
    # Layers below the lowest adapted one save nothing (nothing there needs a gradient), so
    # they are left as they are; the regions come from module stacks, not model types.
    assert checkpointed_regions(twin) == ["model.layers.2", "model.layers.3"]
    checkpoint_calls = [
        n for n in twin.graph.nodes if n.target is torch.utils.checkpoint.checkpoint
    ]
    assert len(checkpoint_calls) == 2
    assert all(n.kwargs["use_reentrant"] is False for n in checkpoint_calls)
    # The regions read the graph's own weights: nothing is copied.
    weights = dict(model.base_graph_module.named_parameters())
    for name, param in twin.named_parameters(remove_duplicate=False):
        if name.startswith("checkpointed_"):
            name = name.split(".", 1)[1]
        assert param is weights[name], name


def test_eval_generation_and_export_are_unaffected(tmp_path):
    from adaption_fx.export import OrtModel, to_onnx

    model = _adapted(tiny_llama)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    tokens = model.generate(ids[:2], mask[:2], max_new_tokens=3)  # left-padded rows
    model.gradient_checkpointing_enable()
    graph = model.graph_module
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
        assert eager_graph(graph, model._checkpointing) is graph
    assert torch.equal(model.generate(ids[:2], mask[:2], max_new_tokens=3), tokens)
    path = to_onnx(model, tmp_path / "m.onnx")
    ort = OrtModel(path)(input_ids=ids.numpy(), attention_mask=mask.numpy())
    keep = mask.bool()
    torch.testing.assert_close(torch.as_tensor(ort)[keep], before[keep], rtol=1e-4, atol=1e-5)
    assert not any(
        n.target is torch.utils.checkpoint.checkpoint for n in model.graph_module.graph.nodes
    )


def test_bad_checkpointing_options_are_refused_and_change_nothing():
    model = _adapted(tiny_llama)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    snap = snapshot_state(model)
    with pytest.raises(ValueError, match=r"unsupported gradient_checkpointing_kwargs \['foo'\]"):
        model.gradient_checkpointing_enable({"foo": 1})
    with pytest.raises(TypeError, match="must be a dict or None, got list"):
        model.gradient_checkpointing_enable(["use_reentrant"])
    with pytest.raises(TypeError, match=r"\['use_reentrant'\] must be a bool"):
        model.gradient_checkpointing_enable({"use_reentrant": "no"})
    assert_state_unchanged(model, snap)
    assert dict(model._checkpointing.options) == {"use_reentrant": False}


def test_decoder_layer_regions_refuse_interleaved_layers():
    model = _adapted(tiny_llama)
    gm = model.adaption_graph().graph_module
    sites = [s.module_path for s in model.sites]
    regions = decoder_layer_regions(gm.graph, sites)
    assert [r.module_path for r in regions] == [f"model.layers.{i}" for i in range(4)]
    spans = [set(r.nodes) for r in regions]
    assert all(not (a & b) for i, a in enumerate(spans) for b in spans[i + 1 :])
    # A node of layer 0 moved into layer 1's run: layer 0 is no longer one run of nodes.
    graph = training_graph(gm).graph
    first = next(n for n in graph.nodes if n.name in regions[0].nodes)
    last_of_1 = next(n for n in reversed(graph.nodes) if n.name in regions[1].nodes)
    stray = graph.call_function(torch.ops.aten.clone.default, (first,))
    stray.meta["nn_module_stack"] = dict(first.meta["nn_module_stack"])
    last_of_1.append(stray)
    with pytest.raises(UnsupportedGraphError, match="is not one run of nodes"):
        decoder_layer_regions(graph, sites)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_mistral])
def test_gated_activation_recompute_is_bit_identical_and_saves_less(builder):
    model = _adapted(builder, layers=4)
    graph = model.adaption_graph().graph_module
    assert len(find_gated_activations(graph.graph)) == 4  # one SwiGLU per decoder layer
    recomputed = run_passes(copy_sharing_weights(graph), [RecomputeGatedActivations()]).graph_module
    assert not find_gated_activations(recomputed.graph)
    ids, mask = padded_batch()
    flat = model.captured.bind((), {"input_ids": ids, "attention_mask": mask})
    tensors = model.adapter_tensors()

    def run(gm):
        saved = []

        def pack(t):
            saved.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model.captured.unflatten(gm(*flat, *tensors)).logits
        grads = torch.autograd.grad(logits.square().sum(), tensors)
        return logits.detach(), grads, sum(saved)

    plain_logits, plain_grads, plain_saved = run(graph)
    logits, grads, saved = run(recomputed)
    assert torch.equal(logits, plain_logits)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))
    assert saved < plain_saved


def test_compiled_training_recomputes_the_checkpointed_layers():
    from adaption_fx.export import compile as compile_model

    model = _adapted(tiny_llama)
    ids, mask = padded_batch()
    _, _, grads = _step(model, ids, mask)
    model.gradient_checkpointing_enable()
    compiled = compile_model(model, backend="aot_eager", dynamic=True)
    model.zero_grad(set_to_none=True)
    compiled(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    _assert_grads_equal(got, grads, rtol=1e-6)
    (graph, plan), *_ = compiled._compiled
    assert plan == model.checkpointing_plan and graph is model.graph_module
