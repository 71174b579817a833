"""Property: for random Llama-/Qwen2-like shapes and paddings, the pass equals the reference.

The reference (independent of the pass) is a transformers attention function registered in
``AttentionInterface`` and, with SDPA's mask builder, in ``AttentionMaskInterface`` (without
it transformers builds no padding mask). It runs the layer's SDPA attention and, in adapted
layers, adds ``g * softmax(Q K_a^T * scaling) V_a`` with K_a, V_a from the layer's own k_proj /
v_proj applied to the prompt (no rotary), key/value heads shared as transformers' repeat_kv.
"""

from __future__ import annotations

import copy

import torch
from helpers import assert_rel_close
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from adaption_fx import AdaptionConfig, rewrite

RTOL = 1e-5
VOCAB = 64
REFERENCE_IMPL = "adaption_property_reference"
ADAPTER_ATTR = "_property_reference_adapter"


def reference_attention(module, query, key, value, attention_mask, **kwargs):
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    adapter = getattr(module, ADAPTER_ATTR, None)
    if adapter is None:
        return out, weights
    prompt, gate = adapter
    heads, head_dim = query.shape[1], query.shape[-1]
    n = prompt.shape[1]
    k_a = module.k_proj(prompt).view(1, n, -1, head_dim).transpose(1, 2)
    v_a = module.v_proj(prompt).view(1, n, -1, head_dim).transpose(1, 2)
    groups = heads // k_a.shape[1]
    k_a = torch.repeat_interleave(k_a, groups, dim=1)
    v_a = torch.repeat_interleave(v_a, groups, dim=1)
    scores = torch.matmul(query, k_a.transpose(2, 3)) * kwargs["scaling"]
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    extra = gate * torch.matmul(probs, v_a)
    return out + extra.transpose(1, 2).to(out.dtype), weights


AttentionInterface.register(REFERENCE_IMPL, reference_attention)
AttentionMaskInterface.register(REFERENCE_IMPL, sdpa_mask)


@st.composite
def cases(draw):
    heads = draw(st.sampled_from([2, 4, 8]))
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(1, 9))
    layers = draw(st.integers(1, 3))
    # Per row: padding length (at least one real token) and side.
    pads = [
        (draw(st.integers(0, seq - 1)), draw(st.sampled_from(["left", "right"])))
        for _ in range(batch)
    ]
    return dict(
        family=draw(st.sampled_from(["llama", "qwen2"])),
        heads=heads,
        kv_heads=draw(st.sampled_from([d for d in (1, 2, 4, 8) if heads % d == 0])),
        head_dim=draw(st.sampled_from([8, 16])),
        hidden=draw(st.sampled_from([32, 64])),
        layers=layers,
        adapter_len=draw(st.integers(1, 6)),
        adapter_layers=draw(st.integers(1, layers)),
        batch=batch,
        seq=seq,
        pads=pads,
        seed=draw(st.integers(0, 2**16)),
    )


def build(case) -> torch.nn.Module:
    if case["family"] == "llama":
        from transformers import LlamaConfig as Config
        from transformers import LlamaForCausalLM as Model
    else:
        from transformers import Qwen2Config as Config
        from transformers import Qwen2ForCausalLM as Model
    config = Config(
        vocab_size=VOCAB,
        hidden_size=case["hidden"],
        intermediate_size=48,
        num_hidden_layers=case["layers"],
        num_attention_heads=case["heads"],
        num_key_value_heads=case["kv_heads"],
        head_dim=case["head_dim"],
        max_position_embeddings=64,
        initializer_range=0.2,  # O(1) attention scores: the adapter keys matter
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(case["seed"])
    model = Model(config).eval()
    with torch.no_grad():  # non-trivial biases (Qwen2) and norm weights
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == case["heads"] * case["head_dim"]
    assert attn.k_proj.out_features == case["kv_heads"] * case["head_dim"]
    return model


def batch_of(case) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"] + 1)
    ids = torch.randint(0, VOCAB, (case["batch"], case["seq"]), generator=g)
    mask = torch.ones_like(ids)
    for row, (pad, side) in enumerate(case["pads"]):
        if pad:
            if side == "left":
                mask[row, :pad] = 0
            else:
                mask[row, -pad:] = 0
    assert bool((mask.sum(dim=1) > 0).all())
    return ids, mask


# No shrinking: a failure reports its (unshrunk) example at once instead of minutes later.
@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(case=cases())
def test_parity_with_reference(case):
    src = build(case)
    cfg = AdaptionConfig(adapter_len=case["adapter_len"], adapter_layers=case["adapter_layers"])
    model = rewrite(src, cfg)
    paths = [
        f"model.layers.{i}.self_attn"
        for i in range(case["layers"] - case["adapter_layers"], case["layers"])
    ]
    assert [s.module_path for s in model.adapted_sites()] == paths

    g = torch.Generator().manual_seed(case["seed"] + 2)
    state = {}
    for path in paths:
        state[f"{path}.adaption_prompt"] = torch.randn(
            1, case["adapter_len"], case["hidden"], generator=g
        )
        state[f"{path}.adaption_gate"] = torch.randn(1, generator=g) * 0.5 + 0.5
    model.load_state_dict(state)

    ref = copy.deepcopy(src)
    for path in paths:
        prompt, gate = state[f"{path}.adaption_prompt"], state[f"{path}.adaption_gate"]
        setattr(ref.get_submodule(path), ADAPTER_ATTR, (prompt, gate))
    ref.set_attn_implementation(REFERENCE_IMPL)

    ids, mask = batch_of(case)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        expected = ref(input_ids=ids, attention_mask=mask).logits
        base = src(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(expected).all()
    assert_rel_close(got, expected, RTOL)
    assert not torch.allclose(got, base, atol=1e-4, rtol=0)
