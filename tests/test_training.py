"""Training: only prompts and gates learn; the frozen base is shared and never written."""

from __future__ import annotations

import pytest
import torch
from helpers import padded_batch, tiny_llama, tiny_mistral

from adaption_fx import AdaptionConfig, rewrite


@pytest.mark.parametrize("builder", [tiny_llama, tiny_mistral], ids=["llama", "mistral"])
@pytest.mark.parametrize("gate", ["scalar", "per_head"])
def test_one_step_trains_only_the_adapter(builder, gate):
    source = builder()
    ids, mask = padded_batch()
    base_before = {k: v.detach().clone() for k, v in source.named_parameters()}
    model = rewrite(
        source,
        AdaptionConfig(
            adapter_len=4,
            adapter_layers=2,
            gate=gate,
            gate_activation="tanh" if gate == "per_head" else "identity",
        ),
    )
    before = model(input_ids=ids, attention_mask=mask, labels=ids)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before.loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    adapter_keys = {k for k in grads if k.startswith("adapter_weights.")}
    assert adapter_keys and all(
        k.endswith(("adaption_prompt", "adaption_gate")) for k in adapter_keys
    )
    for key, grad in grads.items():
        if key in adapter_keys:
            assert grad is not None, key
            # With the gate at zero only the gate sees a gradient: the prompt's effect is
            # multiplied by it (the same holds in PEFT).
            if key.endswith("adaption_gate"):
                assert grad.abs().sum() > 0, key
            else:
                assert torch.equal(grad, torch.zeros_like(grad)), key
        else:
            assert grad is None, f"base parameter {key} received a gradient"
    optimizer.step()
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(before.logits, after)
    # Second step: the gate is now non-zero, so the prompts learn too.
    optimizer.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for key, param in model.named_parameters():
        if key in adapter_keys:
            assert param.grad.abs().sum() > 0, key
    for key, value in source.named_parameters():
        assert torch.equal(value, base_before[key]), f"base weight {key} changed"
        assert not value.requires_grad


def test_loss_matches_the_source_models_own_loss():
    source = tiny_llama()
    ids, mask = padded_batch()
    model = rewrite(source, AdaptionConfig(adapter_len=2, adapter_layers=1))
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        theirs = source(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert torch.equal(ours, theirs)


def test_parameter_init_and_count():
    source = tiny_mistral()
    model = rewrite(
        source,
        AdaptionConfig(adapter_len=6, adapter_layers=3, gate="per_head"),
        generator=torch.Generator().manual_seed(0),
    )
    state = model.adapter_state_dict()
    assert len(state) == 2 * 3  # exactly two tensors per adapted layer, as PEFT saves
    prompts = [v for k, v in state.items() if k.endswith("adaption_prompt")]
    gates = [v for k, v in state.items() if k.endswith("adaption_gate")]
    assert all(p.shape == (1, 6, 64) and p.dtype == torch.float32 for p in prompts)
    assert all(g.shape == (1, 8, 1, 1) and torch.equal(g, torch.zeros_like(g)) for g in gates)
    values = torch.cat([p.flatten() for p in prompts])
    assert abs(values.mean().item()) < 0.1 and abs(values.std().item() - 1) < 0.1
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 3 * 6 * 64 + 3 * 8


def test_prompt_dtype_follows_the_projection_weight():
    source = tiny_llama().to(torch.bfloat16)
    model = rewrite(source, AdaptionConfig(adapter_len=2, adapter_layers=1))
    assert {v.dtype for v in model.adapter_state_dict().values()} == {torch.bfloat16}
    ids, mask = padded_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(out, source(input_ids=ids, attention_mask=mask).logits)


def test_autograd_runs_the_adapter_attention_written_out(monkeypatch):
    # Where autograd records, the graph with the adapter attention as matmul, softmax,
    # matmul runs (its backward is cheaper than SDPA's over a short adapter key); without
    # it, the fused graph. Same outputs and gradients either way.
    from helpers import randomize_adapter

    import adaption_fx.model.eager as eager
    from adaption_fx.passes import ADAPTION_META_KEY

    model = rewrite(tiny_mistral(), AdaptionConfig(adapter_len=4, adapter_layers=2))
    randomize_adapter(model, seed=3)
    ids, mask = padded_batch()
    ran = []
    original = eager.eager_graph

    def spy(graph_module, checkpointing=None):
        chosen = original(graph_module, checkpointing)
        ran.append(chosen)
        return chosen

    monkeypatch.setattr("adaption_fx.model.adapted.eager_graph", spy)

    def adapter_sdpa(graph_module) -> int:
        sdpa = torch.ops.aten.scaled_dot_product_attention.default
        return sum(
            n.target == sdpa and (n.meta.get(ADAPTION_META_KEY) or {}).get("role") == "out"
            for n in graph_module.graph.nodes
        )

    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=mask).logits
    assert adapter_sdpa(ran[-1]) == 2
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert adapter_sdpa(ran[-1]) == 0
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], fused[keep], rtol=1e-5, atol=1e-6)
    out.loss.backward()
    written_out = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(
        "adaption_fx.model.adapted.eager_graph", lambda graph_module, _=None: graph_module
    )
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    fused_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert written_out.keys() == fused_grads.keys() and written_out
    for key, grad in written_out.items():
        torch.testing.assert_close(grad, fused_grads[key], rtol=1e-4, atol=1e-6)
    assert original(ran[-1]) is ran[-1]  # the twin is built once and kept
