"""The pass across model families, against an independent per-family eager reference.

The reference never uses the pass. For Hugging Face models it is an attention function
registered in transformers' ``AttentionInterface`` (with a mask function registered in
``AttentionMaskInterface``, or transformers would build no padding mask): it runs the layer's
ordinary attention (SDPA, or the family's own ``eager_attention_forward`` for models run
eagerly) and, in adapted layers, adds the gated adapter attention. The adapter keys and
values are computed by a hand-written per-family ``adapter_kv`` from the module's own
submodules (k_proj / qkv_proj / query_key_value / c_attn, k_norm, ...), without positional
encoding; the scale and soft-cap are the ones the layer passes to its attention function.

Every family here routes its attention through ``ALL_ATTENTION_FUNCTIONS`` in transformers
5.x, so none needs a re-implemented module forward. The one non-transformers model (a
hand-written block calling ``F.scaled_dot_product_attention``) gets a hand-written eager
forward as its reference.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close, padded_batch, randomize_adapter
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

import adaption_fx
from adaption_fx import AdaptionConfig, rewrite

RTOL = 1e-5
VOCAB = 96
ADAPTER_ATTR = "_families_reference_adapter"
REF_SDPA = "adaption_families_ref_sdpa"
REF_EAGER = "adaption_families_ref_eager"


# --------------------------------------------------------------------------- adapter K/V
# Each returns (K_a, V_a) of shape (1, kv_heads, L, head_dim) from prompt (1, L, hidden):
# everything the layer applies to its keys / values except positional encoding.
def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(1, L, kv_heads * head_dim) -> (1, kv_heads, L, head_dim)."""
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def kv_separate(module, prompt, head_dim):
    """Llama, Mistral, Qwen2 (bias), Gemma, Gemma2, Granite, Starcoder2 (bias)."""
    return _heads(module.k_proj(prompt), head_dim), _heads(module.v_proj(prompt), head_dim)


def kv_no_qk_layernorm(module, prompt, head_dim):
    """StableLm, Phi: separate projections; the tiny configs have qk_layernorm off."""
    assert not module.qk_layernorm, "reference does not model qk_layernorm"
    return kv_separate(module, prompt, head_dim)


def kv_qwen3(module, prompt, head_dim):
    """Qwen3: k_norm (RMSNorm over head_dim) after the head split."""
    n = prompt.shape[1]
    k = module.k_norm(module.k_proj(prompt).view(1, n, -1, head_dim)).transpose(1, 2)
    return k, _heads(module.v_proj(prompt), head_dim)


def kv_olmo2(module, prompt, head_dim):
    """Olmo2: k_norm on the whole key projection, before the head split."""
    return _heads(module.k_norm(module.k_proj(prompt)), head_dim), _heads(
        module.v_proj(prompt), head_dim
    )


def kv_cohere(module, prompt, head_dim):
    """Cohere: per-head LayerNorm on (…, kv_heads, head_dim) before the transpose."""
    n = prompt.shape[1]
    k = module.k_proj(prompt).view(1, n, -1, head_dim)
    if module.use_qk_norm:
        k = module.k_norm(k)
    return k.transpose(1, 2), _heads(module.v_proj(prompt), head_dim)


def kv_phi3(module, prompt, head_dim):
    """Phi-3: one fused qkv_proj; q, k, v are consecutive slices of its output."""
    qkv = module.qkv_proj(prompt)
    q_size = module.config.num_attention_heads * head_dim
    kv_size = module.num_key_value_heads * head_dim
    k = qkv[..., q_size : q_size + kv_size]
    v = qkv[..., q_size + kv_size :]
    assert v.shape[-1] == kv_size
    return _heads(k, head_dim), _heads(v, head_dim)


def kv_gpt_neox(module, prompt, head_dim):
    """GPT-NeoX: fused query_key_value, per head interleaved [q_h | k_h | v_h]."""
    n = prompt.shape[1]
    qkv = module.query_key_value(prompt).view(1, n, -1, 3 * head_dim).transpose(1, 2)
    _, k, v = qkv.chunk(3, dim=-1)
    return k, v


def kv_gpt2(module, prompt, head_dim):
    """GPT-2: fused Conv1D c_attn, split into q, k, v of hidden size each."""
    _, k, v = module.c_attn(prompt).split(module.split_size, dim=2)
    return _heads(k, head_dim), _heads(v, head_dim)


ADAPTER_KV: dict[str, Callable] = {
    "LlamaAttention": kv_separate,
    "MistralAttention": kv_separate,
    "Qwen2Attention": kv_separate,
    "GemmaAttention": kv_separate,
    "Gemma2Attention": kv_separate,
    "GraniteAttention": kv_separate,
    "Starcoder2Attention": kv_separate,
    "StableLmAttention": kv_no_qk_layernorm,
    "PhiAttention": kv_no_qk_layernorm,
    "Qwen3Attention": kv_qwen3,
    "Olmo2Attention": kv_olmo2,
    "CohereAttention": kv_cohere,
    "Phi3Attention": kv_phi3,
    "GPTNeoXAttention": kv_gpt_neox,
    "GPT2Attention": kv_gpt2,
}


def adapter_term(query, k_a, v_a, gate, scaling, softcap=None):
    """gate * softmax(Q K_a^T * scale [soft-capped]) V_a in head space (batch, heads, seq, d)."""
    heads = query.shape[1]
    groups = heads // k_a.shape[1]
    assert groups * k_a.shape[1] == heads
    # kv head i serves query heads i*G .. i*G+G-1, as transformers' repeat_kv.
    k_a = torch.repeat_interleave(k_a, groups, dim=1)
    v_a = torch.repeat_interleave(v_a, groups, dim=1)
    scores = torch.matmul(query, k_a.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)  # no mask on adapter keys
    return gate * torch.matmul(probs, v_a)


def adapter_kv(module, prompt, head_dim):
    """The family's adapter K/V, found by class (or base class: transformers 4.57 has
    per-backend subclasses such as StableLmSdpaAttention)."""
    for cls in type(module).__mro__:
        if cls.__name__ in ADAPTER_KV:
            return ADAPTER_KV[cls.__name__](module, prompt, head_dim)
    raise KeyError(f"no reference K/V for {type(module).__name__}")


def _intercept_sdpa(module, prompt, gate) -> None:
    """Reference for attention classes that call SDPA themselves instead of going through
    ``AttentionInterface`` (StableLM in transformers 4.57): the module's own SDPA call is
    intercepted, and the adapter term added to its output from the same post-RoPE query."""
    real = torch.nn.functional.scaled_dot_product_attention
    forward = module.forward

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        out = real(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
        k_a, v_a = adapter_kv(module, prompt, query.shape[-1])
        scaling = scale if scale is not None else query.shape[-1] ** -0.5
        return out + adapter_term(query, k_a, v_a, gate, scaling).to(out.dtype)

    def intercepted(*args, **kwargs):
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", sdpa):
            return forward(*args, **kwargs)

    module.forward = intercepted


def _reference_attention(eager: bool):
    def attention(module, query, key, value, attention_mask, **kwargs):
        if eager:  # the family's own eager attention (soft-capping and all)
            base = sys.modules[type(module).__module__].eager_attention_forward
        else:
            base = sdpa_attention_forward
        out, weights = base(module, query, key, value, attention_mask, **kwargs)
        adapter = getattr(module, ADAPTER_ATTR, None)
        if adapter is None:
            return out, weights
        prompt, gate = adapter
        # No scaling (GPT-2 in transformers 4.57) means SDPA's default, 1/sqrt(head_dim),
        # which is what the layer's own attention used.
        scaling = kwargs.get("scaling")
        if scaling is None:
            assert not eager, f"{type(module).__name__} passes no scaling to eager attention"
            scaling = query.shape[-1] ** -0.5
        k_a, v_a = adapter_kv(module, prompt, query.shape[-1])
        extra = adapter_term(query, k_a, v_a, gate, scaling, kwargs.get("softcap"))
        return out + extra.transpose(1, 2).to(out.dtype), weights

    return attention


AttentionInterface.register(REF_SDPA, _reference_attention(eager=False))
AttentionInterface.register(REF_EAGER, _reference_attention(eager=True))
AttentionMaskInterface.register(REF_SDPA, sdpa_mask)
AttentionMaskInterface.register(REF_EAGER, eager_mask)


def reference_model(src, state: dict[str, torch.Tensor], paths: list[str]):
    """A deep copy of ``src`` running the reference attention with ``state``'s tensors."""
    ref = copy.deepcopy(src)
    for path in paths:
        prompt = state[f"{path}.adaption_prompt"].detach().clone()
        gate = state[f"{path}.adaption_gate"].detach().clone()
        setattr(ref.get_submodule(path), ADAPTER_ATTR, (prompt, gate))
    impl = REF_EAGER if src.config._attn_implementation == "eager" else REF_SDPA
    ref.set_attn_implementation(impl)
    if ref.config._attn_implementation == impl:
        return ref
    # A model whose attention classes bypass AttentionInterface keeps "sdpa".
    assert ref.config._attn_implementation == "sdpa", ref.config._attn_implementation
    for path in paths:
        module = ref.get_submodule(path)
        _intercept_sdpa(module, *getattr(module, ADAPTER_ATTR))
    return ref


# --------------------------------------------------------------------------- the families
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    # Large enough weights that attention scores are O(1): with the default 0.02 the adapter
    # softmax is nearly uniform (keys barely matter) and soft-capping changes nothing.
    initializer_range=0.2,
)


def _build(config_cls, model_cls, seed: int = 0, eager: bool = False, **kwargs):
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # transformers zero-inits biases and sets norms to 1: perturb them
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    if eager:
        model.set_attn_implementation("eager")
    assert model.config._attn_implementation in ("sdpa", "eager"), model.config._attn_implementation
    return model


def build_llama(eager: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build(LlamaConfig, LlamaForCausalLM, eager=eager, **COMMON)


def build_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return _build(MistralConfig, MistralForCausalLM, **{**COMMON, "sliding_window": None})


def build_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = _build(Qwen2Config, Qwen2ForCausalLM, **COMMON)
    assert model.model.layers[0].self_attn.k_proj.bias is not None
    return model


def build_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build(Qwen3Config, Qwen3ForCausalLM, **{**COMMON, "head_dim": 32})


def build_gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    return _build(GemmaConfig, GemmaForCausalLM, **{**COMMON, "head_dim": 32})


def build_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _build(
        Gemma2Config,
        Gemma2ForCausalLM,
        eager=True,
        **{
            **COMMON,
            "head_dim": 32,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": None,
            # Shorter than the test sequences: the sliding layers' mask really slides.
            "sliding_window": 4,
        },
    )


def build_phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return _build(Phi3Config, Phi3ForCausalLM, **{**COMMON, "pad_token_id": 0})


def build_gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    kwargs = {**COMMON, "partial_rotary_factor": 0.5, "attention_bias": True}
    del kwargs["num_key_value_heads"]
    model = _build(GPTNeoXConfig, GPTNeoXForCausalLM, **kwargs)
    attn = model.gpt_neox.layers[0].attention
    assert 0 < attn.rotary_ndims < attn.head_size  # partial rotary
    return model


def build_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = dict(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_positions=128,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _build(GPT2Config, GPT2LMHeadModel, **config)


def build_olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return _build(Olmo2Config, Olmo2ForCausalLM, **COMMON)


def build_granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    return _build(GraniteConfig, GraniteForCausalLM, **{**COMMON, "attention_multiplier": 0.3})


def build_stablelm():
    from transformers import StableLmConfig, StableLmForCausalLM

    model = _build(
        StableLmConfig,
        StableLmForCausalLM,
        # pad_token_id=None is every release's default, but 5.0's config does not set it
        # while its model reads it.
        **{**COMMON, "partial_rotary_factor": 0.5, "use_qkv_bias": True, "pad_token_id": None},
    )
    attn = model.model.layers[0].self_attn
    assert attn.rotary_ndims == attn.head_dim // 2 and attn.k_proj.bias is not None
    return model


def build_starcoder2():
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    return _build(Starcoder2Config, Starcoder2ForCausalLM, **{**COMMON, "sliding_window": None})


def build_cohere():
    from transformers import CohereConfig, CohereForCausalLM

    model = _build(CohereConfig, CohereForCausalLM, **{**COMMON, "use_qk_norm": True})
    assert model.model.layers[0].self_attn.use_qk_norm
    return model


def build_phi():
    from transformers import PhiConfig, PhiForCausalLM

    # pad_token_id=None: as for StableLM (transformers 5.0).
    model = _build(
        PhiConfig, PhiForCausalLM, **{**COMMON, "partial_rotary_factor": 0.5, "pad_token_id": None}
    )
    attn = model.model.layers[0].self_attn
    assert attn.rotary_ndims == attn.head_dim // 2
    return model


# --------------------------------------------------------------------------- a custom model
def rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half convention), positions arange(seq); x (b, h, s, d)."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CustomAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, heads * head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, heads * head_dim, bias=True)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = rope(self.split(self.q_proj(x)))
        k = rope(self.split(self.k_proj(x)))
        v = self.split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class CustomBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.attn = CustomAttention(hidden, heads, head_dim)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class CustomModel(nn.Module):
    """Not a transformers model: hidden states in, hidden states out."""

    def __init__(self, hidden: int = 32, heads: int = 4, head_dim: int = 8, layers: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(CustomBlock(hidden, heads, head_dim) for _ in range(layers))
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def build_custom():
    torch.manual_seed(0)
    return CustomModel().eval()


def custom_reference(model: CustomModel, x: torch.Tensor, state, paths) -> torch.Tensor:
    """Hand-written eager forward of CustomModel with the adapter (no SDPA)."""
    adapters = {p: (state[f"{p}.adaption_prompt"], state[f"{p}.adaption_gate"]) for p in paths}
    for i, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm(x)
        q = rope(attn.split(attn.q_proj(h)))
        k = rope(attn.split(attn.k_proj(h)))
        v = attn.split(attn.v_proj(h))
        scale = 1.0 / math.sqrt(attn.head_dim)
        seq = x.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        scores = (q @ k.transpose(2, 3) * scale).masked_fill(~causal, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        adapter = adapters.get(f"blocks.{i}.attn")
        if adapter is not None:
            prompt, gate = adapter
            k_a, v_a = attn.split(attn.k_proj(prompt)), attn.split(attn.v_proj(prompt))
            out = out + adapter_term(q, k_a, v_a, gate, scale)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(x.shape[0], seq, -1))
        x = x + block.mlp(x)
    return model.out(x)


def custom_input(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 7, 32, generator=g)


# --------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    path: str  # attention module path, "{}" for the layer index
    layers: int
    adapter_len: int
    adapter_layers: int


FAMILIES: dict[str, Family] = {
    "llama": Family(build_llama, "model.layers.{}.self_attn", 3, 4, 2),
    "llama_eager": Family(lambda: build_llama(eager=True), "model.layers.{}.self_attn", 3, 3, 2),
    "mistral": Family(build_mistral, "model.layers.{}.self_attn", 3, 3, 3),
    "qwen2": Family(build_qwen2, "model.layers.{}.self_attn", 3, 4, 2),
    "qwen3": Family(build_qwen3, "model.layers.{}.self_attn", 3, 3, 2),
    "gemma": Family(build_gemma, "model.layers.{}.self_attn", 3, 3, 2),
    "gemma2": Family(build_gemma2, "model.layers.{}.self_attn", 3, 3, 2),
    "phi3": Family(build_phi3, "model.layers.{}.self_attn", 3, 3, 2),
    "gpt_neox": Family(build_gpt_neox, "gpt_neox.layers.{}.attention", 3, 3, 2),
    "gpt2": Family(build_gpt2, "transformer.h.{}.attn", 3, 3, 2),
    "olmo2": Family(build_olmo2, "model.layers.{}.self_attn", 3, 3, 2),
    "granite": Family(build_granite, "model.layers.{}.self_attn", 3, 3, 2),
    "stablelm": Family(build_stablelm, "model.layers.{}.self_attn", 3, 3, 2),
    "starcoder2": Family(build_starcoder2, "model.layers.{}.self_attn", 3, 3, 2),
    "cohere": Family(build_cohere, "model.layers.{}.self_attn", 3, 3, 2),
    "phi": Family(build_phi, "model.layers.{}.self_attn", 3, 3, 2),
    "custom": Family(build_custom, "blocks.{}.attn", 3, 3, 2),
}


def expected_paths(name: str) -> list[str]:
    fam = FAMILIES[name]
    return [fam.path.format(i) for i in range(fam.layers - fam.adapter_layers, fam.layers)]


def hidden_size(src) -> int:
    return 32 if isinstance(src, CustomModel) else src.config.hidden_size


def inputs(name: str) -> tuple[tuple, dict]:
    if name == "custom":
        return (custom_input(),), {}
    ids, mask = padded_batch(vocab=VOCAB)
    assert not bool(mask.all())
    return (), {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def run(model, name: str) -> torch.Tensor:
    args, kwargs = inputs(name)
    out = model(*args, **kwargs)
    return out if name == "custom" else out.logits


@torch.no_grad()
def run_reference(src, name: str, state) -> torch.Tensor:
    paths = expected_paths(name)
    if name == "custom":
        return custom_reference(src, custom_input(), state, paths)
    return run(reference_model(src, state, paths), name)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def adapted():
    """name -> (source, AdaptedModel, failure): one capture per family for the module."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            fam = FAMILIES[name]
            src = fam.build()
            cfg = AdaptionConfig(adapter_len=fam.adapter_len, adapter_layers=fam.adapter_layers)
            example = (custom_input(seed=5),) if name == "custom" else None
            try:
                cache[name] = (src, rewrite(src, cfg, example_inputs=example), None)
            except Exception as exc:  # reported by every test of the family, not retried
                cache[name] = (src, None, exc)
        src, model, exc = cache[name]
        if exc is not None:
            raise exc
        return src, model

    return get


# --------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("name", list(FAMILIES))
def test_reference_sanity(name):
    """The reference with zero gates is the source model; with random ones it is not."""
    src = FAMILIES[name].build()
    paths = expected_paths(name)
    hidden = hidden_size(src)
    fam = FAMILIES[name]
    g = torch.Generator().manual_seed(3)
    state = {}
    for p in paths:
        state[f"{p}.adaption_prompt"] = torch.randn(1, fam.adapter_len, hidden, generator=g)
        state[f"{p}.adaption_gate"] = torch.randn(1, generator=g) * 0.5 + 1.0
    zero = {k: torch.zeros_like(v) if k.endswith("gate") else v for k, v in state.items()}
    base = run(src, name)
    assert torch.isfinite(base).all()
    if name == "custom":  # a hand-written eager forward: SDPA rounds differently
        assert_rel_close(run_reference(src, name, zero), base, 1e-6)
    else:  # the same attention function with nothing added
        assert torch.equal(run_reference(src, name, zero), base)
    assert differs(run_reference(src, name, state), base)


# --------------------------------------------------------------------------- the pass
@pytest.mark.parametrize("name", list(FAMILIES))
def test_state_dict_keys(adapted, name):
    src, model = adapted(name)
    paths = expected_paths(name)
    fam = FAMILIES[name]
    expected = {}
    for p in paths:
        expected[f"{p}.adaption_prompt"] = (1, fam.adapter_len, hidden_size(src))
        expected[f"{p}.adaption_gate"] = (1,)
    assert {k: tuple(v.shape) for k, v in model.adapter_state_dict().items()} == expected
    assert [s.module_path for s in model.adapted_sites()] == paths


@pytest.mark.parametrize("name", list(FAMILIES))
def test_zero_init_equals_source(adapted, name):
    src, model = adapted(name)
    state = model.state_dict()
    assert state and all(not v.any() for k, v in state.items() if k.endswith("adaption_gate"))
    assert torch.equal(run(model, name), run(src, name))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_random_adapter_matches_reference(adapted, name):
    src, model = adapted(name)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = randomize_adapter(model, seed=7)
    try:
        got = run(model, name)
        expected = run_reference(src, name, state)
        assert_rel_close(got, expected, RTOL)
        assert differs(got, run(src, name))
    finally:  # leave the shared model at its zero-init state for the other tests
        model.load_state_dict(initial)


# --------------------------------------------------------------------------- generation
GENERATED = 5
HF_FAMILIES = [name for name in FAMILIES if name != "custom"]


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_greedy_generation_matches_reference_generate(adapted, name):
    """The key/value-cache decode step is captured and run on every family (whatever the
    installed release calls the cache argument): greedy tokens for a left-padded batch equal
    Hugging Face's own ``generate`` over the reference model, which keeps its own cache, and
    our loop without the cache."""
    src, model = adapted(name)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = randomize_adapter(model, seed=11)
    ids, mask = padded_batch(batch=2, seq=6, vocab=VOCAB, seed=4)
    assert not bool(mask[1].all())  # row 1 is left-padded
    options = dict(max_new_tokens=GENERATED, eos_token_id=None, pad_token_id=0)
    try:
        ours = model.generate(ids, mask, **options)
        reference = reference_model(src, state, expected_paths(name))
        reference.generation_config.eos_token_id = None  # as ours: no early stop
        with torch.no_grad():
            expected = reference.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, **options
            )
        assert torch.equal(ours, expected)
        assert torch.equal(ours, model.generate(ids, mask, use_cache=False, **options))
    finally:  # leave the shared model at its zero-init state for the other tests
        model.load_state_dict(initial)


# --------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_bf16(name):
    src = FAMILIES[name].build().to(torch.bfloat16)
    fam = FAMILIES[name]
    model = rewrite(
        src, AdaptionConfig(adapter_len=fam.adapter_len, adapter_layers=fam.adapter_layers)
    )
    state = randomize_adapter(model, seed=7)
    assert state and all(v.dtype == torch.bfloat16 for v in model.adapter_state_dict().values())
    got = run(model, name)
    assert got.dtype == torch.bfloat16
    expected = run_reference(src, name, state)
    scale = expected.float().abs().max()
    err = ((got.float() - expected.float()).abs().max() / scale).item()
    assert err <= 2e-2, f"bf16 relative error {err:.3e}"
    assert differs(got.float(), run(src, name).float())


# --------------------------------------------------------------------------- bad input
class MlpOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:  # python control flow on a tensor value
            return self.proj(x)
        return -self.proj(x)


class Int8Attention(nn.Module):
    """An attention whose key projection weight is an int8 buffer, dequantised on the fly."""

    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        w = torch.randn(hidden, hidden) * 20
        self.register_buffer("k_weight_int8", w.round().clamp(-127, 127).to(torch.int8))
        self.k_scale = 0.05

    def forward(self, x):
        b, s, d = x.shape
        k = F.linear(x, self.k_weight_int8.float() * self.k_scale)

        def split(t):
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(k), split(self.v_proj(x)), is_causal=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))


def test_mlp_only_has_no_attention():
    with pytest.raises(adaption_fx.AttentionNotFoundError, match="found no attention"):
        rewrite(
            MlpOnly().eval(),
            AdaptionConfig(adapter_len=2, adapter_layers=1),
            example_inputs=(torch.randn(2, 5, 16),),
        )


def test_uncapturable_model():
    with pytest.raises(adaption_fx.CaptureError) as info:
        rewrite(
            DataDependent().eval(),
            AdaptionConfig(adapter_len=2, adapter_layers=1),
            example_inputs=(torch.randn(2, 5, 16),),
        )
    assert str(info.value).startswith("torch.export could not capture")


def test_rewriting_a_rewritten_model(adapted):
    _, model = adapted("llama")
    cfg = AdaptionConfig(adapter_len=2, adapter_layers=1)
    with pytest.raises(adaption_fx.UnsupportedGraphError):
        rewrite(model, cfg)
    with pytest.raises(adaption_fx.UnsupportedGraphError, match="already"):
        rewrite(model.graph_module, cfg)


def test_int8_projection_weights_give_a_clear_error():
    torch.manual_seed(0)
    module = Int8Attention().eval()
    x = torch.randn(2, 5, 32)
    assert torch.isfinite(module(x)).all()
    with pytest.raises(ValueError) as info:
        rewrite(module, AdaptionConfig(adapter_len=2, adapter_layers=1), example_inputs=(x,))
    message = str(info.value)
    # A short message about the key projection, not a deep torch trace.
    assert len(message) < 600 and "traceback" not in message.lower(), message
    assert "key input" in message, message
    assert "torch.int8" in message and "k_weight_int8" in message, message
    assert "quantised or computed weights are not supported" in message, message
