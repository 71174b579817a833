"""Mixed-adapter batches in PyTorch: ``adapter_names=[...]`` in forward, generate and compile.

The oracle is the model itself run one row at a time with that row's adapter active (or
disabled, for ``"__base__"``): a mixed batch must give each row exactly that, whatever the
other rows use.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import (
    assert_rel_close,
    assert_state_unchanged,
    padded_batch,
    randomize_adapter,
    snapshot_state,
    tiny_llama,
    tiny_mistral,
)
from test_families import FAMILIES, VOCAB
from torch._dynamo.testing import CompileCounter

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.export import compile
from adaption_fx.model.mixed import BASE_ADAPTER

RTOL = 1e-5

# Different prompt lengths, layer counts, gate kinds and gate activations.
STRUCTURES = {
    "default": AdaptionConfig(adapter_len=3, adapter_layers=2),
    "long": AdaptionConfig(
        adapter_len=6, adapter_layers=3, gate="per_head", gate_activation="tanh"
    ),
    "short": AdaptionConfig(adapter_len=1, adapter_layers=1),
}


def with_adapters(source, structures=STRUCTURES):
    first, *rest = structures
    model = rewrite(source, structures[first])
    randomize_adapter(model, seed=11)
    for seed, name in enumerate(rest, start=12):
        model.add_adapter(name, structures[name])
        model.set_adapter(name)
        randomize_adapter(model, seed=seed)
    model.set_adapter(first)
    return model


@torch.no_grad()
def row_alone(model, name: str, **inputs) -> torch.Tensor:
    """The logits of a batch run with one adapter active (or the base model)."""
    active = model.active_adapter
    try:
        if name == BASE_ADAPTER:
            with model.disable_adapter():
                return model(**inputs).logits
        model.set_adapter(name)
        return model(**inputs).logits
    finally:
        model.set_adapter(active)


def assert_rows_match(model, names, ids, mask, mixed):
    for row, name in enumerate(names):
        alone = row_alone(
            model, name, input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]
        )
        real = mask[row].bool()
        assert_rel_close(mixed[row][real], alone[0][real], RTOL)


@pytest.fixture(scope="module")
def model():
    return with_adapters(tiny_mistral())


@pytest.mark.parametrize("build", [tiny_llama, tiny_mistral], ids=["mha", "gqa"])
def test_each_row_equals_that_row_alone(build):
    model = with_adapters(build())
    ids, mask = padded_batch(batch=5, seq=9)
    mask[3, :4] = 0
    names = ["long", BASE_ADAPTER, "default", "short", "long"]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert_rows_match(model, names, ids, mask, mixed)
    # Rows really differ by adapter: the same tokens under each name give other logits.
    same = ids[:1].expand(4, -1)
    with torch.no_grad():
        out = model(input_ids=same, adapter_names=["long", "default", "short", BASE_ADAPTER]).logits
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(out[i], out[j])


def test_a_row_does_not_depend_on_its_batchmates(model):
    ids, mask = padded_batch(batch=4, seq=8)
    with torch.no_grad():
        a = model(
            input_ids=ids, attention_mask=mask, adapter_names=["long", "short", "default", "short"]
        )
        b = model(
            input_ids=ids, attention_mask=mask, adapter_names=["long", BASE_ADAPTER, "long", "long"]
        )
    # Same shapes, same row: the other rows' adapters change nothing, to the bit.
    assert torch.equal(a.logits[0], b.logits[0])


def test_base_rows_are_the_base_model(model):
    ids, mask = padded_batch(batch=3, seq=7)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=[BASE_ADAPTER] * 3).logits
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits
            # Disabled adapters: every row runs the base model, whatever it names.
            named = model(input_ids=ids, attention_mask=mask, adapter_names=["long"] * 3).logits
    real = mask.bool()
    assert_rel_close(mixed[real], base[real], RTOL)
    assert torch.equal(named, base)


def test_no_attention_mask_runs_the_causal_capture(model):
    ids, _ = padded_batch(batch=3, seq=6)
    names = ["short", "long", BASE_ADAPTER]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    assert_rows_match(model, names, ids, torch.ones_like(ids), mixed)


def test_without_adapter_names_nothing_changes(model):
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        model(input_ids=ids, attention_mask=mask, adapter_names=["long", "short", "default"])
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert model.active_adapter == "default"


def test_the_table_follows_adapter_changes(model):
    ids, mask = padded_batch(batch=2, seq=6)
    names = ["short", "default"]
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        model.set_adapter("short")
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            randomize_adapter(model, seed=99)  # written in place, as an optimizer would
            after = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            assert not torch.allclose(after[0], before[0])
            assert torch.equal(after[1], before[1])
            assert_rows_match(model, names, ids, mask, after)
        finally:
            model.load_state_dict(saved)
            model.set_adapter("default")


def test_adding_and_deleting_adapters():
    model = with_adapters(tiny_llama(), {k: STRUCTURES[k] for k in ("default", "short")})
    ids, mask = padded_batch(batch=2, seq=6)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, adapter_names=["short", "default"])
        assert len(model.mixed_graph().sites) == 2
        # An adapter of more layers widens the mixed graph; deleting it narrows it again.
        model.add_adapter("wide", AdaptionConfig(adapter_len=2, adapter_layers=4))
        model.set_adapter("wide")
        randomize_adapter(model, seed=5)
        model.set_adapter("default")
        names = ["wide", "short"]
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        assert len(model.mixed_graph().sites) == 4
        assert_rows_match(model, names, ids, mask, mixed)
        model.delete_adapter("wide")
        assert len(model.mixed_graph().sites) == 2
        with pytest.raises(ValueError, match=re.escape("no adapter named ['wide']")):
            model(input_ids=ids, attention_mask=mask, adapter_names=names)
        for name in list(model.adapters):
            model.delete_adapter(name)
        # No adapters left: only the base model can be named.
        base = model(input_ids=ids, attention_mask=mask).logits
        named = model(input_ids=ids, attention_mask=mask, adapter_names=[BASE_ADAPTER] * 2)
        assert torch.equal(named.logits, base)


@pytest.mark.parametrize(
    ("names", "error", "message"),
    [
        (["long", "nope", "zzz"], ValueError, "no adapter named ['nope', 'zzz']"),
        (["long", "short"], ValueError, "adapter_names has 2 names but the batch has 3 rows"),
        ("long", TypeError, "adapter_names must be a list of adapter names"),
        (["long", 3, "short"], TypeError, "adapter_names must hold str names, got [3]"),
    ],
)
def test_bad_names_are_refused_and_change_nothing(model, names, error, message):
    ids, mask = padded_batch()
    snap = snapshot_state(model)
    with pytest.raises(error, match=re.escape(message)):
        model(input_ids=ids, attention_mask=mask, adapter_names=names)
    with pytest.raises(error, match=re.escape(message)):
        model.generate(ids[:, :4], adapter_names=names, max_new_tokens=2)
    assert_state_unchanged(model, snap)


def test_labels_with_adapter_names_are_refused(model):
    ids, mask = padded_batch()
    snap = snapshot_state(model)
    with pytest.raises(ValueError, match="adapter_names cannot be combined with labels"):
        model(input_ids=ids, attention_mask=mask, labels=ids, adapter_names=["long"] * 3)
    assert_state_unchanged(model, snap)


def test_mixed_output_carries_no_gradient(model):
    ids, mask = padded_batch()
    out = model(input_ids=ids, attention_mask=mask, adapter_names=["long", "short", "default"])
    assert not out.logits.requires_grad


def test_generation_tokens_equal_each_row_alone(model):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 96, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[3, :3] = 0
    names = ["long", BASE_ADAPTER, "short", "default"]
    kwargs = dict(max_new_tokens=6, eos_token_id=None)
    mixed = model.generate(ids, mask, adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        if name == BASE_ADAPTER:
            with model.disable_adapter():
                alone = model.generate(ids[row : row + 1], mask[row : row + 1], **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(ids[row : row + 1], mask[row : row + 1], **kwargs)
        model.set_adapter("default")
        assert torch.equal(mixed[row], alone[0]), (name, mixed[row], alone[0])


def test_changing_the_mix_does_not_recompile(model):
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = compile(model, backend=counter)
    ids, mask = padded_batch(batch=4, seq=7)
    mixes = [
        ["long", "short", "default", BASE_ADAPTER],
        ["short", "short", "long", "long"],
        [BASE_ADAPTER] * 4,
        ["default", "long", BASE_ADAPTER, "short"],
    ]
    with torch.no_grad():
        for names in mixes:
            out = compiled(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            eager = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            assert torch.equal(out, eager)
    assert counter.frame_count == 1


# A few families whose attention differs in ways the mixed graph must follow: eager
# attention, logit soft-capping, fused QKV, Conv1D projections, q/k norms, partial rotary.
@pytest.mark.parametrize("name", ["llama_eager", "gemma2", "phi3", "gpt2", "qwen3", "gpt_neox"])
def test_families(name):
    family = FAMILIES[name]
    structures = {
        "default": AdaptionConfig(adapter_len=2, adapter_layers=family.adapter_layers),
        "other": AdaptionConfig(adapter_len=4, adapter_layers=1, gate="per_head"),
    }
    model = with_adapters(family.build(), structures)
    ids, mask = padded_batch(batch=3, seq=7, vocab=VOCAB)
    names = ["other", "default", BASE_ADAPTER]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert_rows_match(model, names, ids, mask, mixed)


def test_inductor_matches_eager(model):
    torch._dynamo.reset()
    compiled = compile(model)
    ids, mask = padded_batch(batch=4, seq=7)
    with torch.no_grad():
        for names in (["long", "short", "default", BASE_ADAPTER], ["short"] * 4):
            out = compiled(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            eager = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            assert_rel_close(out, eager, RTOL)


def test_compiled_generation_tokens_equal_eager(model):
    torch._dynamo.reset()
    compiled = compile(model)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 96, (3, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :2] = 0
    names = ["short", "long", BASE_ADAPTER]
    kwargs = dict(max_new_tokens=4, eos_token_id=None, adapter_names=names)
    assert torch.equal(compiled.generate(ids, mask, **kwargs), model.generate(ids, mask, **kwargs))


def test_the_base_name_is_reserved(model):
    snap = snapshot_state(model)
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        model.add_adapter(BASE_ADAPTER, AdaptionConfig(adapter_len=2, adapter_layers=1))
    assert_state_unchanged(model, snap)
    source = tiny_llama()
    before = [p.requires_grad for p in source.parameters()]
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        rewrite(source, STRUCTURES["short"], adapter_name=BASE_ADAPTER)
    assert [p.requires_grad for p in source.parameters()] == before
