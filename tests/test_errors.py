"""Bad input gets a clear, specific error, and leaves every object as it was."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_state_unchanged,
    padded_batch,
    randomize_adapter,
    snapshot_state,
    tiny_llama,
)

from adaption_fx import AdaptionConfig, rewrite


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (
            {"adapter_len": 0, "adapter_layers": 1},
            ValueError,
            "adapter_len must be a positive int, got 0",
        ),
        (
            {"adapter_len": -3, "adapter_layers": 1},
            ValueError,
            "adapter_len must be a positive int, got -3",
        ),
        (
            {"adapter_len": 2, "adapter_layers": 0},
            ValueError,
            "adapter_layers must be a positive int, got 0",
        ),
        (
            {"adapter_len": 2, "adapter_layers": -1},
            ValueError,
            "adapter_layers must be a positive int",
        ),
        (
            {"adapter_len": 1.5, "adapter_layers": 1},
            TypeError,
            "adapter_len must be an int, got float 1.5",
        ),
        (
            {"adapter_len": True, "adapter_layers": 1},
            TypeError,
            "adapter_len must be an int, got bool",
        ),
        (
            {"adapter_len": 2, "adapter_layers": "2"},
            TypeError,
            "adapter_layers must be an int, got str",
        ),
        (
            {"adapter_len": 2, "adapter_layers": 1, "gate": "vector"},
            ValueError,
            r"gate must be one of \('scalar', 'per_head'\), got 'vector'",
        ),
        (
            {"adapter_len": 2, "adapter_layers": 1, "gate_activation": "relu"},
            ValueError,
            r"gate_activation must be one of \('identity', 'tanh'\), got 'relu'",
        ),
    ],
)
def test_config_validation(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        AdaptionConfig(**kwargs)


def test_config_needs_both_sizes():
    with pytest.raises(TypeError):
        AdaptionConfig(adapter_len=4)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def adapted():
    model = rewrite(tiny_llama(), AdaptionConfig(adapter_len=3, adapter_layers=2))
    randomize_adapter(model, seed=5)
    return model


def test_too_many_layers_in_rewrite_leaves_the_source_untouched():
    model = tiny_llama()
    with pytest.raises(
        ValueError,
        match=r"adapter_layers=9 but the model has only 4 attention site\(s\): model\.layers\.0",
    ):
        rewrite(model, AdaptionConfig(adapter_len=3, adapter_layers=9))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (
            lambda m: m.add_adapter("big", AdaptionConfig(adapter_len=2, adapter_layers=5)),
            ValueError,
            "adapter_layers=5 but the model has only 4",
        ),
        (
            lambda m: m.add_adapter("default", AdaptionConfig(adapter_len=2, adapter_layers=1)),
            ValueError,
            "an adapter named 'default' already exists",
        ),
        (
            lambda m: m.add_adapter("x", {"adapter_len": 2}),
            TypeError,
            "config must be an AdaptionConfig, got dict",
        ),
        (
            lambda m: m.add_adapter("", AdaptionConfig(adapter_len=2, adapter_layers=1)),
            TypeError,
            "adapter_name must be a non-empty str",
        ),
        (
            lambda m: m.add_adapter("a.b", AdaptionConfig(adapter_len=2, adapter_layers=1)),
            ValueError,
            "is not usable: use letters, digits",
        ),
        (
            lambda m: m.set_adapter("missing"),
            ValueError,
            r"no adapter named 'missing'; adapters are \['default'\]",
        ),
        (lambda m: m.delete_adapter("missing"), ValueError, "no adapter named 'missing'"),
        (
            lambda m: m.load_state_dict(
                {"model.layers.3.self_attn.adaption_prompt": torch.zeros(1, 4, 64)}
            ),
            ValueError,
            "missing keys",
        ),
    ],
)
def test_bad_adapter_calls_change_nothing(adapted, call, exc, pattern):
    snap = snapshot_state(adapted)
    with pytest.raises(exc, match=pattern):
        call(adapted)
    assert_state_unchanged(adapted, snap)


def test_load_state_dict_checks_every_shape_before_writing(adapted):
    state = {k: torch.full_like(v, 7.0) for k, v in adapted.adapter_state_dict().items()}
    last = sorted(state)[-1]
    state[last] = torch.zeros(1, 99, 64)
    snap = snapshot_state(adapted)
    with pytest.raises(ValueError, match=r"shape \(1, 99, 64\) does not fit"):
        adapted.load_state_dict(state)
    assert_state_unchanged(adapted, snap)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"input_ids": None, "foo": 1}, TypeError, r"unexpected \['foo'\]"),
        ({"input_ids": torch.ones(5, dtype=torch.long)}, ValueError, "input_ids must be 2-d"),
        (
            {"input_ids": torch.ones(2, 3)},
            TypeError,
            "input_ids must have a dtype like torch.int64",
        ),
        (
            {"input_ids": None, "use_cache": True},
            ValueError,
            "use_cache=True differs from the captured constant False",
        ),
    ],
)
def test_bad_forward_inputs(adapted, kwargs, exc, pattern):
    ids, _ = padded_batch()
    if kwargs.get("input_ids") is None:
        kwargs = {**kwargs, "input_ids": ids}
    with pytest.raises(exc, match=pattern):
        adapted(**kwargs)


def test_missing_attention_mask_means_all_ones(adapted):
    ids, _ = padded_batch()
    with torch.no_grad():
        assert torch.equal(
            adapted(input_ids=ids).logits,
            adapted(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
        )
        assert torch.equal(adapted(ids).logits, adapted(input_ids=ids).logits)


def test_casting_after_capture_is_a_clear_error():
    source = tiny_llama()
    model = rewrite(source, AdaptionConfig(adapter_len=2, adapter_layers=1))
    ids, mask = padded_batch()
    model.to(torch.float64)  # float32 -> float64 -> float32 is lossless
    with pytest.raises(
        RuntimeError,
        match=r"captured with torch.float32 weights on cpu, but they are now torch.float64",
    ):
        model(input_ids=ids, attention_mask=mask)
    model.to(torch.float32)  # back where it was captured: runs again, exactly as the source
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, attention_mask=mask).logits,
            source(input_ids=ids, attention_mask=mask).logits,
        )
