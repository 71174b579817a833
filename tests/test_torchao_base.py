"""A frozen base quantized with torchao (int8 weight-only) through ``rewrite``.

torch.export unwraps torchao's ``Int8Tensor`` weights into their inner tensors (int8
``qdata`` and a per-row ``scale``): each projection becomes ``mm(x, qdata.t().float())``
and a rescale, with no linear node. The pass takes such a matmul as the projection of the
parameter whose inner tensors it reads, and replays the same nodes on the prompt, so the
adapter keys and values go through the quantized projections exactly as the layer's own.
PEFT on the same quantized model is the oracle.

torchao is not in the test extra (transformers and PEFT import it whenever it is
installed); CI installs it after the suite and runs this file (.ci/run).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_rel_close, padded_batch, randomize_adapter, tiny_llama

from adaption_fx import AdaptionConfig, rewrite

torchao = pytest.importorskip("torchao.quantization")

CONFIG = AdaptionConfig(adapter_len=4, adapter_layers=2)
PEFT_PREFIX = "base_model.model."


def quantized_llama(seed: int = 0):
    model = tiny_llama(seed)
    torchao.quantize_(model, torchao.Int8WeightOnlyConfig())
    return model


def peft_twin(source, state):
    import peft

    config = peft.AdaptionPromptConfig(
        adapter_len=CONFIG.adapter_len, adapter_layers=CONFIG.adapter_layers, task_type="CAUSAL_LM"
    )
    twin = peft.get_peft_model(copy.deepcopy(source), config).eval()
    result = twin.load_state_dict({PEFT_PREFIX + k: v for k, v in state.items()}, strict=False)
    assert not result.unexpected_keys
    return twin


def test_int8_base_matches_peft_on_the_same_quantized_model():
    source = quantized_llama()
    weight = source.model.layers[0].self_attn.k_proj.weight
    assert type(weight).__name__ == "Int8Tensor"
    ids, mask = padded_batch()
    with torch.no_grad():
        base = source(input_ids=ids, attention_mask=mask).logits
    ours = rewrite(source, CONFIG)
    assert len(ours.sites) == 4
    real = mask.bool()
    with torch.no_grad():
        # Zero gates: exactly the quantized base model.
        assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits[real], base[real])
        state = randomize_adapter(ours)
        got = ours(input_ids=ids, attention_mask=mask).logits
        want = peft_twin(source, state)(input_ids=ids, attention_mask=mask).logits
    assert_rel_close(got[real], want[real], 1e-5)
    # The user's model is left as it was: still quantized, still the same function.
    assert source.model.layers[0].self_attn.k_proj.weight is weight
    with torch.no_grad():
        assert torch.equal(source(input_ids=ids, attention_mask=mask).logits, base)


def test_int8_base_trains_prompts_and_gates_only_and_generates():
    source = quantized_llama(1)
    ours = rewrite(source, CONFIG)
    randomize_adapter(ours, gate_scale=0.1)
    inner = {
        name: p.qdata.clone()
        for name, p in source.named_parameters()
        if type(p).__name__ == "Int8Tensor"
    }
    assert inner and all(q.dtype == torch.int8 for q in inner.values())
    ids, mask = padded_batch()
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert {n.rsplit(".", 1)[-1] for n, p in ours.named_parameters() if p.requires_grad} == {
        "adaption_prompt",
        "adaption_gate",
    }
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = ours(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in source.named_parameters():
        if name in inner:
            assert torch.equal(p.qdata, inner[name]) and p.grad is None, name

    # Greedy generation (the decode step captured from the quantized model) equals
    # PEFT's on the same model and adapter.
    state = {k: v.detach().clone() for k, v in ours.adapter_state_dict().items()}
    prompt = ids[:1, :5]
    with torch.no_grad():
        got = ours.generate(prompt, max_new_tokens=6, eos_token_id=None)
        want = peft_twin(source, state).generate(
            input_ids=prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False
        )
    assert torch.equal(got, want)
