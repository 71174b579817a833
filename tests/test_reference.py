"""Parity of the graph pass with an independent eager reference of LLaMA-Adapter.

The reference does not use the pass at all. It is a transformers attention function
(registered in ``AttentionInterface``) that runs the layer's ordinary SDPA attention and, in
adapted layers, adds the gated adapter attention computed from the layer's own k_proj /
v_proj applied to the layer's prompt (REFERENCE.md). The reference is checked against PEFT
once (scalar gate, identity activation), and against itself for the per-head and tanh
variants, before the pass is compared with it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_rel_close, padded_batch, randomize_adapter, tiny_llama, tiny_mistral
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from adaption_fx import AdaptionConfig, rewrite

REFERENCE_IMPL = "adaption_reference"
ADAPTER_ATTR = "_adaption_reference"
RTOL = 1e-5
GATES = ("scalar", "per_head")
ACTIVATIONS = ("identity", "tanh")
BUILDERS = {"llama": tiny_llama, "mistral": tiny_mistral}
# (adapter_len, adapter_layers) per architecture; the models have 4 layers.
SHAPES = {"llama": (4, 2), "mistral": (3, 3)}


# --------------------------------------------------------------------------- reference
def reference_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """transformers' SDPA attention, plus the gated adapter attention in adapted layers.

    query: (batch, heads, seq, head_dim), already rotated. Returns (batch, seq, heads, head_dim).
    """
    out, weights = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    adapter = getattr(module, ADAPTER_ATTR, None)
    if adapter is None:
        return out, weights
    prompt, gate, activation = adapter
    _, heads, _, head_dim = query.shape
    n = prompt.shape[1]
    # The layer's own projections, bias included; no positional encoding on adapter keys.
    k_a = module.k_proj(prompt).view(1, n, -1, head_dim).transpose(1, 2)
    v_a = module.v_proj(prompt).view(1, n, -1, value.shape[-1]).transpose(1, 2)
    groups = heads // k_a.shape[1]
    # GQA: kv head i serves query heads i*G .. i*G+G-1 (as transformers' repeat_kv).
    k_a = torch.repeat_interleave(k_a, groups, dim=1)
    v_a = torch.repeat_interleave(v_a, groups, dim=1)
    scores = torch.matmul(query, k_a.transpose(2, 3)) * module.scaling
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)  # adapter keys only
    g = torch.tanh(gate) if activation == "tanh" else gate
    adapter_out = g * torch.matmul(probs, v_a)  # (batch, heads, seq, head_dim)
    return out + adapter_out.transpose(1, 2).to(out.dtype), weights


AttentionInterface.register(REFERENCE_IMPL, reference_attention)
# Without a mask function of its own, transformers would build no mask (padding ignored).
AttentionMaskInterface.register(REFERENCE_IMPL, sdpa_mask)


def expected_paths(src, adapter_layers: int) -> list[str]:
    """The top ``adapter_layers`` attention modules, derived without the pass."""
    n = src.config.num_hidden_layers
    return [f"model.layers.{i}.self_attn" for i in range(n - adapter_layers, n)]


def expected_shapes(src, cfg: AdaptionConfig) -> dict[str, tuple[int, ...]]:
    heads = src.config.num_attention_heads
    gate = (1,) if cfg.gate == "scalar" else (1, heads, 1, 1)
    shapes = {}
    for path in expected_paths(src, cfg.adapter_layers):
        shapes[f"{path}.adaption_prompt"] = (1, cfg.adapter_len, src.config.hidden_size)
        shapes[f"{path}.adaption_gate"] = gate
    return shapes


def reference_model(src, state: dict[str, torch.Tensor], cfg: AdaptionConfig):
    """A deep copy of ``src`` running the reference attention with ``state``'s tensors."""
    ref = copy.deepcopy(src)
    for path in expected_paths(src, cfg.adapter_layers):
        prompt = state[f"{path}.adaption_prompt"].detach().clone()
        gate = state[f"{path}.adaption_gate"].detach().clone()
        setattr(ref.get_submodule(path), ADAPTER_ATTR, (prompt, gate, cfg.gate_activation))
    ref.set_attn_implementation(REFERENCE_IMPL)
    assert ref.config._attn_implementation == REFERENCE_IMPL
    assert src.config._attn_implementation != REFERENCE_IMPL
    return ref


def random_state(src, cfg: AdaptionConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_shapes(src, cfg).items():
        t = torch.randn(shape, generator=g)
        state[key] = t * 0.5 if key.endswith("gate") else t
    return state


@torch.no_grad()
def logits(model, ids, mask) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models():
    """arch -> (source model, AdaptedModel): one capture per architecture for the module."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            src = BUILDERS[arch]()
            n, layers = SHAPES[arch]
            cache[arch] = (src, rewrite(src, AdaptionConfig(adapter_len=n, adapter_layers=layers)))
        return cache[arch]

    return get


def fresh_adapter(model, name: str, cfg: AdaptionConfig) -> None:
    """Add ``name`` (replacing an earlier one of that name) and make it active."""
    if name in model.adapters:
        model.delete_adapter(name)
    model.add_adapter(name, cfg)
    model.set_adapter(name)
    assert model.active_adapter == name


def variant(arch: str, gate: str, activation: str) -> AdaptionConfig:
    n, layers = SHAPES[arch]
    return AdaptionConfig(
        adapter_len=n, adapter_layers=layers, gate=gate, gate_activation=activation
    )


# --------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_reference_matches_peft(arch):
    from peft import AdaptionPromptConfig, get_peft_model

    src = BUILDERS[arch]()
    n, layers = SHAPES[arch]
    cfg = AdaptionConfig(adapter_len=n, adapter_layers=layers)
    state = random_state(src, cfg, seed=11)
    peft = get_peft_model(
        copy.deepcopy(src),
        AdaptionPromptConfig(adapter_len=n, adapter_layers=layers, task_type="CAUSAL_LM"),
    )
    result = peft.load_state_dict(
        {"base_model.model." + k: v for k, v in state.items()}, strict=False
    )
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if "adaption" in k]
    ids, mask = padded_batch()
    expected = logits(peft, ids, mask)
    got = logits(reference_model(src, state, cfg), ids, mask)
    assert_rel_close(got, expected, RTOL)
    # The adapters matter: neither side is just the base model.
    assert rel_diff(expected, logits(src, ids, mask)) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_reference_variants_are_consistent(arch):
    """Per-head gates all equal to c equal a scalar gate c; tanh on g equals identity on tanh(g)."""
    src = BUILDERS[arch]()
    heads = src.config.num_attention_heads
    ids, mask = padded_batch()
    scalar = variant(arch, "scalar", "identity")
    state = random_state(src, scalar, seed=5)
    expected = logits(reference_model(src, state, scalar), ids, mask)

    per_head = variant(arch, "per_head", "identity")
    uniform = {
        k: v.expand(1, heads, 1, 1).clone() if k.endswith("gate") else v for k, v in state.items()
    }
    assert_rel_close(logits(reference_model(src, uniform, per_head), ids, mask), expected, RTOL)

    tanh = variant(arch, "scalar", "tanh")
    squashed = {k: torch.tanh(v) if k.endswith("gate") else v for k, v in state.items()}
    assert_rel_close(
        logits(reference_model(src, state, tanh), ids, mask),
        logits(reference_model(src, squashed, scalar), ids, mask),
        RTOL,
    )

    zero = {k: torch.zeros_like(v) if k.endswith("gate") else v for k, v in state.items()}
    assert torch.equal(
        logits(reference_model(src, zero, scalar), ids, mask), logits(src, ids, mask)
    )
    assert rel_diff(expected, logits(src, ids, mask)) > 1e-3


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_parity_with_reference(models, arch, gate, activation):
    src, model = models(arch)
    cfg = variant(arch, gate, activation)
    fresh_adapter(model, f"parity-{gate}-{activation}", cfg)
    state = randomize_adapter(model, seed=7)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(src, cfg)
    assert [s.module_path for s in model.adapted_sites()] == expected_paths(src, cfg.adapter_layers)
    if gate == "per_head":
        # Heads really carry different gates.
        assert all(v.flatten().unique().numel() > 1 for k, v in state.items() if "gate" in k)

    ids, mask = padded_batch()
    assert ids.shape[0] > 1 and not bool(mask.all())
    got = logits(model, ids, mask)
    expected = logits(reference_model(src, state, cfg), ids, mask)
    assert_rel_close(got, expected, RTOL)
    assert rel_diff(got, logits(src, ids, mask)) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_per_head_gate_acts_on_one_head(models, arch):
    src, model = models(arch)
    heads = src.config.num_attention_heads
    cfg = variant(arch, "per_head", "identity")
    fresh_adapter(model, "one-head", cfg)
    state = randomize_adapter(model, seed=3)
    zero_gates = {k: torch.zeros_like(v) if "gate" in k else v for k, v in state.items()}
    model.load_state_dict(zero_gates)
    ids, mask = padded_batch()
    all_zero = logits(model, ids, mask)
    assert torch.equal(all_zero, logits(src, ids, mask))

    # One non-zero head in the first adapted layer; for GQA a head of the second kv group.
    layer = expected_paths(src, cfg.adapter_layers)[0]
    head = heads - 2

    def single(h: int) -> dict[str, torch.Tensor]:
        gate = torch.zeros(1, heads, 1, 1)
        gate[0, h] = 1.5
        return {**zero_gates, f"{layer}.adaption_gate": gate}

    model.load_state_dict(single(head))
    got = logits(model, ids, mask)
    assert rel_diff(got, all_zero) > 1e-3
    assert_rel_close(got, logits(reference_model(src, single(head), cfg), ids, mask), RTOL)
    # Which head carries the gate matters: another head's gate gives another output.
    other = logits(reference_model(src, single(1), cfg), ids, mask)
    assert rel_diff(got, other) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_other_shapes_without_recapture(models, arch):
    src, model = models(arch)
    cfg = variant(arch, "per_head", "tanh")
    fresh_adapter(model, "shapes", cfg)
    state = randomize_adapter(model, seed=9)
    graph_module = model.graph_module
    base_graph_module = model.base_graph_module
    ref = reference_model(src, state, cfg)
    for batch, seq in [(1, 1), (1, 5), (4, 13), (2, 33)]:
        ids, mask = padded_batch(batch=batch, seq=seq, seed=batch * 100 + seq)
        got = logits(model, ids, mask)
        assert got.shape == (batch, seq, src.config.vocab_size)
        assert_rel_close(got, logits(ref, ids, mask), RTOL)
        assert rel_diff(got, logits(src, ids, mask)) > 1e-4
        assert model.graph_module is graph_module
        assert model.base_graph_module is base_graph_module


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_zero_init_equals_source(models, arch, gate, activation):
    src, model = models(arch)
    fresh_adapter(model, f"zero-{gate}-{activation}", variant(arch, gate, activation))
    state = model.state_dict()
    assert state
    for key, value in state.items():
        if key.endswith("adaption_gate"):
            assert not value.any(), key
        else:  # prompts are random: only the zero gate keeps the output unchanged
            assert value.abs().sum() > 0, key
    ids, mask = padded_batch()
    assert torch.equal(logits(model, ids, mask), logits(src, ids, mask))
