"""The key/value cache argument is bound by what the installed forward offers.

transformers 5.24 renamed the causal LM forward's ``past_key_values`` to ``cache`` (input
and output field). ``adaption_fx.capture.hf_compat.cache_call`` reads the name off the installed
signature (a parameter typed ``Cache``, else a known name), so both releases work, and so
does a model whose forward uses another name, as the next release might; a forward with no
cache argument is refused naming the argument and the installed release.

No ``from __future__ import annotations`` here: the signatures below carry real annotation
objects (``Cache | None``, ``Optional[Cache]``), and one an explicit string.
"""

from typing import Optional, Union

import pytest
import torch
from helpers import randomize_adapter, tiny_llama
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicCache

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.capture.hf_compat import (
    CACHE_ARGUMENT_NAMES,
    MissingArgumentError,
    cache_argument,
    cache_call,
    cache_tensors,
    dynamic_cache,
    installed_version,
)

INSTALLED = cache_argument(LlamaForCausalLM.forward)


# ------------------------------------------------------------------ binding by signature
def typed_cache(self, input_ids, attention_mask, position_ids, cache: Cache | None = None):
    pass


def typed_past(
    self,
    input_ids,
    attention_mask,
    position_ids,
    past_key_values: Optional[Cache],  # noqa: UP045
):
    pass


def typed_other_name(
    self,
    input_ids,
    attention_mask,
    position_ids,
    kv_state: "Optional[Cache]",  # noqa: UP045
):
    pass


def typed_subclass(
    self,
    input_ids,
    attention_mask,
    position_ids,
    memo: Union[DynamicCache, None],  # noqa: UP007
):
    pass


def untyped_past(self, input_ids, attention_mask, position_ids, past_key_values=None):
    pass


def typed_and_untyped(
    self, input_ids, attention_mask, position_ids, past_key_values=None, cache: Cache | None = None
):
    pass


def no_cache(self, input_ids, attention_mask, position_ids, **kwargs):
    pass


def no_positions(self, input_ids, attention_mask, cache: Cache | None = None):
    pass


@pytest.mark.parametrize(
    ("forward", "expected"),
    [
        (typed_cache, "cache"),
        (typed_past, "past_key_values"),
        (typed_other_name, "kv_state"),
        (typed_subclass, "memo"),
        (untyped_past, "past_key_values"),
        (typed_and_untyped, "cache"),
        (no_cache, None),
    ],
)
def test_cache_argument_is_read_off_the_signature(forward, expected):
    assert cache_argument(forward) == expected


def test_installed_release_names_a_known_argument():
    # 5.24 and later: ``cache``; 4.57 through 5.23: ``past_key_values``.
    assert INSTALLED in CACHE_ARGUMENT_NAMES
    call = cache_call(tiny_llama())
    assert call.argument == INSTALLED
    assert call.use_cache and call.logits_to_keep


@pytest.mark.parametrize(
    ("forward", "named"), [(no_cache, "cache"), (no_positions, "position_ids")]
)
def test_missing_argument_names_it_and_the_installed_release(forward, named):
    with pytest.raises(MissingArgumentError) as info:
        cache_call(forward)
    message = str(info.value)
    assert named in message
    assert f"transformers {installed_version('transformers')}" in message
    assert isinstance(info.value, TypeError)  # what generation raised before


def test_dynamic_cache_round_trip():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g))]
    pairs.append((torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)))
    back = cache_tensors(dynamic_cache(pairs))
    assert len(back) == 2
    for (k, v), (k2, v2) in zip(pairs, back, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    assert cache_tensors(tuple(pairs)) == pairs  # a legacy tuple of tuples
    with pytest.raises(TypeError, match="expected a Cache"):
        cache_tensors(object())


def test_returned_cache_reads_the_field_or_the_one_cache_value():
    call = cache_call(tiny_llama())
    model = tiny_llama()
    ids = torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **call.step_kwargs(None))
    cache = call.returned_cache(out)
    assert isinstance(cache, Cache)
    renamed = type(call)(argument="kv_state", use_cache=True, logits_to_keep=True)
    assert renamed.returned_cache(out) is cache  # found by type, not by name


# --------------------------------------------------------- generation through a renamed one
class RenamedCacheLlama(LlamaForCausalLM):
    """A Llama whose forward takes its cache as ``kv_state`` (a future release's name)."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        kv_state: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
    ):
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{INSTALLED: kv_state},
        )


class NoCacheLlama(LlamaForCausalLM):
    """A Llama whose forward cannot take a key/value cache at all."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None):
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )


def _tiny(cls):
    plain = tiny_llama(num_hidden_layers=2)
    model = cls(plain.config).eval()
    model.load_state_dict(plain.state_dict())
    return plain, model


def test_generation_follows_a_renamed_cache_argument():
    plain, renamed = _tiny(RenamedCacheLlama)
    cfg = AdaptionConfig(adapter_len=3, adapter_layers=2)
    ours_plain, ours_renamed = rewrite(plain, cfg), rewrite(renamed, cfg)
    state = randomize_adapter(ours_plain, seed=5)
    ours_renamed.load_state_dict(state)
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    options = dict(max_new_tokens=6, eos_token_id=None)
    expected = ours_plain.generate(ids, **options)
    assert torch.equal(ours_renamed.generate(ids, **options), expected)


def test_generation_without_a_cache_argument_is_refused_clearly():
    _, no_cache_model = _tiny(NoCacheLlama)
    model = rewrite(no_cache_model, AdaptionConfig(adapter_len=3, adapter_layers=1))
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(MissingArgumentError, match=r"key/value cache argument.*transformers \d"):
        model.generate(ids, max_new_tokens=2)
    # Forward still works: only generation needs the cache.
    assert model(input_ids=ids).logits.shape == (1, 4, 96)
