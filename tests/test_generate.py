"""AdaptedModel.generate and its decode-step twin, AdaptedModel.decoder().

Oracles: the same loop without the cache (use_cache=False), a naive loop over the
full-sequence capture, the Hugging Face model's own ``generate`` (adapters disabled),
PEFT's adaption prompt ``generate`` (same adapter), and the Hugging Face model called with
an explicit ``DynamicCache`` (for the decode graph alone), passed under the installed
release's cache argument.

Capturing is the slow part, so each architecture is rewritten once per module (with a
randomized "default" adapter that is never modified) and its decode step captured once.
Tests that add adapters or change the decoder's maximum length put things back.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_rel_close, randomize_adapter, tiny_llama, tiny_mistral

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.capture.hf_compat import cache_call, cache_tensors, dynamic_cache

BUILDERS = {"llama": tiny_llama, "mistral": tiny_mistral}  # MHA (4/4 heads), GQA (8/2 heads)
CFG = AdaptionConfig(adapter_len=4, adapter_layers=2)
VOCAB = 96
PROMPT = 6
NEW = 7
PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def build():
    """build(name) -> the module's one setup for an architecture, made on first use."""
    cache: dict[str, SimpleNamespace] = {}

    def get(name: str) -> SimpleNamespace:
        if name not in cache:
            hf = BUILDERS[name]()
            hf.generation_config.eos_token_id = None  # HF's generate must not stop early
            model = rewrite(hf, CFG)
            state = randomize_adapter(model, seed=3)
            cache[name] = SimpleNamespace(name=name, hf=hf, model=model, state=state)
        setup = cache[name]
        # Every test starts from the "default" adapter, enabled.
        assert setup.model.active_adapter == "default"
        assert setup.model.adapters_enabled
        return setup

    return get


@pytest.fixture(params=sorted(BUILDERS))
def setup(build, request):
    return build(request.param)


@pytest.fixture
def lm(build):
    return build("llama")


def prompts(batch: int = 2, seq: int = PROMPT, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D prompts of different lengths, padded on the left with token 0, mask 0."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def naive_greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by rerunning the full-sequence model on the whole sequence."""
    seq = ids.clone()
    for _ in range(steps):
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    return seq


def make_peft(hf, state: dict[str, torch.Tensor]):
    peft = pytest.importorskip("peft")
    config = peft.AdaptionPromptConfig(
        adapter_len=CFG.adapter_len, adapter_layers=CFG.adapter_layers, task_type="CAUSAL_LM"
    )
    peft_model = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    result = peft_model.load_state_dict(
        {PEFT_PREFIX + k: v for k, v in state.items()}, strict=False
    )
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if ".adaption_" in k] == []
    return peft_model


# ----------------------------------------------------------------------------- 1, 2, 3, 4
def test_cache_equals_no_cache(setup):
    model = setup.model
    ids = prompts(seed=1)
    adapted = model.generate(ids, max_new_tokens=NEW)
    assert adapted.shape == (2, PROMPT + NEW)
    assert torch.equal(adapted[:, :PROMPT], ids)
    assert torch.equal(adapted, model.generate(ids, max_new_tokens=NEW, use_cache=False))
    with model.disable_adapter():
        base = model.generate(ids, max_new_tokens=NEW)
        assert torch.equal(base, model.generate(ids, max_new_tokens=NEW, use_cache=False))
    assert model.adapters_enabled
    # The adapter is not a no-op: the randomized gates change the generated tokens.
    assert not torch.equal(adapted, base)
    # disable_adapter_layers() is the same switch as the context manager.
    model.disable_adapter_layers()
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=NEW), base)
    finally:
        model.enable_adapter_layers()
    assert torch.equal(model.generate(ids, max_new_tokens=NEW), adapted)


@torch.no_grad()
def hf_greedy(hf_like, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face's own greedy ``generate`` (a transformers or PEFT model)."""
    return hf_like.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
    )


def test_disabled_matches_hf_generate(setup):
    model, hf = setup.model, setup.hf
    ids = prompts(seed=2)
    with model.disable_adapter():
        ours = model.generate(ids, max_new_tokens=NEW)
    assert torch.equal(ours, hf_greedy(hf, ids, torch.ones_like(ids)))


def test_disabled_left_padded_matches_hf_generate(setup):
    model, hf = setup.model, setup.hf
    ids, mask = left_pad([prompts(1, 7, seed=4)[0], prompts(1, 4, seed=5)[0]])
    with model.disable_adapter():
        ours = model.generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(ours, hf_greedy(hf, ids, mask))


def test_matches_peft_generate(setup):
    model = setup.model
    peft_model = make_peft(setup.hf, setup.state)
    ids = prompts(seed=6)
    ours = model.generate(ids, max_new_tokens=NEW)
    assert torch.equal(ours, hf_greedy(peft_model, ids, torch.ones_like(ids)))


def test_matches_naive_full_sequence_loop(setup):
    model = setup.model
    ids = prompts(seed=7)
    assert torch.equal(model.generate(ids, max_new_tokens=NEW), naive_greedy(model, ids, NEW))
    with model.disable_adapter():
        assert torch.equal(model.generate(ids, max_new_tokens=NEW), naive_greedy(model, ids, NEW))


# ----------------------------------------------------------------------------- 5
def test_left_padded_batch_equals_rows_alone(setup):
    model = setup.model
    rows = [prompts(1, 7, seed=10)[0], prompts(1, 4, seed=11)[0], prompts(1, 6, seed=12)[0]]
    ids, mask = left_pad(rows)
    assert mask[:, 0].tolist() == [1, 0, 0]
    batched = model.generate(ids, mask, max_new_tokens=NEW)
    assert batched.shape == (3, 7 + NEW)
    assert torch.equal(batched[:, :7], ids)  # the prompts, padding included, as given
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=NEW)
        assert torch.equal(batched[i, -NEW:], alone[0, -NEW:]), i
    # A mask of all ones given explicitly is the same as none.
    assert torch.equal(
        model.generate(rows[0][None], torch.ones(1, 7, dtype=torch.long), max_new_tokens=NEW),
        model.generate(rows[0][None], max_new_tokens=NEW),
    )


# ----------------------------------------------------------------------------- 6
def test_sampling(lm):
    model = lm.model
    ids = prompts(seed=13)
    greedy = model.generate(ids, max_new_tokens=NEW)

    def sample(seed, **kwargs):
        kwargs.setdefault("max_new_tokens", 20)
        return model.generate(ids, do_sample=True, temperature=1.5, seed=seed, **kwargs)

    first = sample(1)
    assert first.shape == (2, PROMPT + 20)
    assert torch.equal(first, sample(1))
    assert not torch.equal(first, sample(2))
    assert ((first >= 0) & (first < VOCAB)).all()
    # Only the most likely token survives top_k=1 or a tiny top_p: sampling is greedy.
    assert torch.equal(sample(5, top_k=1, max_new_tokens=NEW), greedy)
    assert torch.equal(sample(6, top_p=1e-6, max_new_tokens=NEW), greedy)
    # The global RNG plays no part when a seed is given.
    torch.manual_seed(123)
    again = sample(1)
    torch.manual_seed(456)
    assert torch.equal(again, sample(1))
    assert torch.equal(again, first)


# ----------------------------------------------------------------------------- 7
def expected_with_eos(reference: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """What eos stopping makes of an eos-free greedy ``reference``."""
    out = reference.clone()
    new = out[:, PROMPT:]
    finish = []
    for row in new:
        hits = (row == eos).nonzero().flatten()
        stop = int(hits[0]) if len(hits) else None
        if stop is not None:
            row[stop + 1 :] = pad
        finish.append(stop + 1 if stop is not None else new.shape[1])
    return out[:, : PROMPT + max(finish)]


def test_eos_stops_rows_and_pads(lm):
    model = lm.model
    ids = prompts(seed=9)
    reference = model.generate(ids, max_new_tokens=NEW)
    eos = int(reference[0, PROMPT + 2])
    # Precondition: row 0 first produces eos at step 2.
    assert eos not in reference[0, PROMPT : PROMPT + 2].tolist()

    out = model.generate(ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=95)
    assert torch.equal(out, expected_with_eos(reference, eos, 95))
    assert torch.equal(out[0, : PROMPT + 3], reference[0, : PROMPT + 3])
    assert (out[0, PROMPT + 3 :] == 95).all()
    # pad_token_id defaults to the (first) eos id; a list of eos ids works too.
    assert torch.equal(
        model.generate(ids, max_new_tokens=NEW, eos_token_id=eos),
        expected_with_eos(reference, eos, eos),
    )
    assert torch.equal(
        model.generate(ids, max_new_tokens=NEW, eos_token_id=[eos]),
        expected_with_eos(reference, eos, eos),
    )

    # Alone, row 0 finishes after 3 tokens and generation stops there.
    single = model.generate(ids[:1], max_new_tokens=NEW, eos_token_id=eos, pad_token_id=95)
    assert single.shape == (1, PROMPT + 3)
    assert torch.equal(single, reference[:1, : PROMPT + 3])
    # An eos id that never comes changes nothing.
    unused = next(t for t in range(VOCAB) if t not in reference[:, PROMPT:].tolist())
    assert torch.equal(model.generate(ids, max_new_tokens=NEW, eos_token_id=unused), reference)


# ----------------------------------------------------------------------------- 8
def test_generation_follows_adapter_switching(lm):
    model = lm.model
    ids = prompts(seed=15)
    decoder = model.decoder()
    original = model.generate(ids, max_new_tokens=NEW)
    model.add_adapter("other", AdaptionConfig(adapter_len=2, adapter_layers=1))
    try:
        assert model.active_adapter == "default"  # adding does not switch
        assert torch.equal(model.generate(ids, max_new_tokens=NEW), original)
        model.set_adapter("other")
        randomize_adapter(model, seed=21)
        other = model.generate(ids, max_new_tokens=NEW)
        assert torch.equal(other, naive_greedy(model, ids, NEW))
        assert not torch.equal(other, original)
        assert model.decoder() is decoder  # no recapture for a new adapter

        model.set_adapter("default")
        assert torch.equal(model.generate(ids, max_new_tokens=NEW), original)
        model.set_adapter("other")
        assert torch.equal(model.generate(ids, max_new_tokens=NEW), other)
        # Deleting the active adapter activates "default" (the first one) again.
        model.delete_adapter("other")
        assert model.active_adapter == "default"
        assert torch.equal(model.generate(ids, max_new_tokens=NEW), original)
        assert model.decoder() is decoder
    finally:
        if "other" in model.adapters:
            model.delete_adapter("other")
        model.set_adapter("default")


# ----------------------------------------------------------------------------- 9
def random_past(layout, batch: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in layout.filled(batch, length)]


def cached_step(hf_model, ids, mask, positions, past: list[torch.Tensor]):
    """A Hugging Face (or PEFT) model's own step over a DynamicCache holding ``past``:
    (logits of the last token, present tensors in our input order)."""
    # The installed release's cache argument (past_key_values, or cache from 5.24), read off
    # the transformers model (a PEFT model's own forward takes **kwargs).
    base = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    call = cache_call(base)
    pairs = [(past[i].clone(), past[i + 1].clone()) for i in range(0, len(past), 2)]
    with torch.no_grad():
        out = hf_model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **call.step_kwargs(dynamic_cache(pairs)),
        )
    presents = []
    for key, value in cache_tensors(call.returned_cache(out)):
        presents += [key, value]
    return out.logits[:, -1:], presents


def peft_of(setup) -> object:
    if not hasattr(setup, "peft"):
        setup.peft = make_peft(setup.hf, setup.state)
    return setup.peft


def present_name(name: str) -> str:
    return name.replace("past_", "present_", 1)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("past_len", [0, 1, 3])
@pytest.mark.parametrize("new_len", [1, 3])
def test_decoder_step_matches_hf_cache(setup, past_len, new_len, padded):
    model, hf = setup.model, setup.hf
    batch = 2
    with model.disable_adapter():
        decoder = model.decoder()
        assert not decoder.adapters_enabled
    layout = decoder.cache_layout
    assert layout.num_layers == hf.config.num_hidden_layers
    heads = hf.config.num_key_value_heads
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    assert layout.shapes == (((heads, head_dim), (heads, head_dim)),) * layout.num_layers
    assert layout.dtype == torch.float32
    assert decoder.max_length == hf.config.max_position_embeddings
    assert [tuple(t.shape) for t in layout.empty(batch)] == [(batch, heads, 0, head_dim)] * (
        2 * layout.num_layers
    )

    ids = prompts(batch, new_len, seed=30 + past_len)
    mask = torch.ones(batch, past_len + new_len, dtype=torch.long)
    if padded:
        if past_len + new_len < 2:
            pytest.skip("a one-token row cannot be padded")
        mask[1, 0] = 0  # row 1 is left-padded by one position
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, past_len:]
    past = random_past(layout, batch, past_len, seed=40 + new_len)
    names = [f"past_{i}_{kind}" for i in range(layout.num_layers) for kind in ("key", "value")]
    feed = dict(zip(names, past, strict=True))

    with model.disable_adapter():
        base = model.decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, **feed)
    expected_logits, expected_presents = cached_step(hf, ids, mask, positions, past)
    assert base["logits"].shape == (batch, 1, VOCAB)
    assert_rel_close(base["logits"], expected_logits, rtol=1e-5)
    for name, want in zip(names, expected_presents, strict=True):
        got = base[present_name(name)]
        assert got.shape == (batch, want.shape[1], past_len + new_len, want.shape[3]), name
        assert torch.equal(got[:, :, :past_len], feed[name]), name  # the past, as given
        if padded and not name.startswith("past_0_"):
            # Above layer 0 a present depends on attention, which the eager model may
            # compute in another order when a mask is present (1-ulp differences).
            assert_rel_close(got, want, rtol=1e-6)
        else:
            assert torch.equal(got, want), name

    # With the adapter: as PEFT's adaption prompt over the same cache; the adapter's own
    # keys and values never enter the cache (presents stay past + new long, and those of
    # every layer up to the first adapted one are the base model's, bit for bit).
    decoder = model.decoder()
    assert decoder.adapters_enabled
    with torch.no_grad():
        adapted = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, **feed)
    peft_logits, peft_presents = cached_step(peft_of(setup), ids, mask, positions, past)
    assert_rel_close(adapted["logits"], peft_logits, rtol=1e-5)
    assert not torch.allclose(adapted["logits"], base["logits"], rtol=1e-3, atol=1e-3)
    first_adapted = layout.num_layers - CFG.adapter_layers
    for name, want in zip(names, peft_presents, strict=True):
        got = adapted[present_name(name)]
        assert_rel_close(got, want, rtol=1e-5)
        layer = int(name.split("_")[1])
        if layer <= first_adapted:
            assert torch.equal(got, base[present_name(name)]), name
    last = present_name(names[-1])
    assert not torch.allclose(adapted[last][:, :, past_len:], base[last][:, :, past_len:])


def test_decoder_is_captured_once(lm):
    model = lm.model
    decoder = model.decoder()
    assert model.decoder() is decoder
    assert model.decoder(max_length=decoder.max_length) is decoder


# ----------------------------------------------------------------------------- 10
ERRORS = [
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be >= 0"),
    ({"max_new_tokens": 2.0}, TypeError, "max_new_tokens must be an int"),
    ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an int"),
    ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, ValueError, "prompt is empty"),
    ({"input_ids": torch.zeros(0, 5, dtype=torch.long)}, ValueError, "prompt is empty"),
    ({"input_ids": torch.ones(2, PROMPT)}, TypeError, "integer token ids"),
    ({"input_ids": torch.ones(2, PROMPT, dtype=torch.bool)}, TypeError, "integer token ids"),
    ({"input_ids": [[1, 2, 3]]}, TypeError, r"must be a torch\.Tensor"),
    ({"input_ids": torch.ones(PROMPT, dtype=torch.long)}, ValueError, r"\(batch, seq\)"),
    ({"input_ids": torch.full((2, PROMPT), -1)}, ValueError, "negative token ids"),
    ({"attention_mask": torch.ones(2, PROMPT + 1)}, ValueError, "they must match"),
    ({"attention_mask": torch.ones(1, PROMPT)}, ValueError, "they must match"),
    (
        {"attention_mask": torch.tensor([[1] * PROMPT, [1] * (PROMPT - 2) + [0, 0]])},
        ValueError,
        "right padding",
    ),
    (
        {"attention_mask": torch.tensor([[1] * PROMPT, [0] * PROMPT])},
        ValueError,
        r"rows \[1\] of attention_mask are all padding",
    ),
    ({"attention_mask": torch.full((2, PROMPT), 2)}, ValueError, "only 0 and 1"),
    ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature must be"),
    ({"do_sample": True, "temperature": -1.0}, ValueError, "temperature must be"),
    ({"do_sample": True, "top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"do_sample": True, "top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"do_sample": True, "top_k": -1}, ValueError, "top_k must be >= 0"),  # 0: off, as HF
    ({"do_sample": True, "top_k": 2.5}, TypeError, "top_k must be an int"),
    ({"do_sample": True, "seed": -1}, ValueError, "seed must be >= 0"),
    ({"do_sample": 1}, TypeError, "do_sample must be a bool"),
    ({"eos_token_id": -3}, ValueError, "eos_token_id must hold non-negative ints"),
    ({"eos_token_id": "2"}, TypeError, "eos_token_id must be an int"),
    ({"pad_token_id": -1}, ValueError, "pad_token_id must be >= 0"),
    ({"use_cache": "yes"}, TypeError, "use_cache must be a bool"),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"), ERRORS, ids=[f"{i}-{e[2][:24]}" for i, e in enumerate(ERRORS)]
)
def test_generate_errors(lm, kwargs, error, match):
    model = lm.model
    ids = prompts(seed=50)
    reference = model.generate(ids, max_new_tokens=3)
    call = {"input_ids": ids, "max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=match):
        model.generate(**call)
    # The model is still usable and gives the same tokens.
    assert torch.equal(model.generate(ids, max_new_tokens=3), reference)
    assert model.active_adapter == "default" and model.adapters_enabled


def test_error_when_too_long_for_decoder(lm):
    model = lm.model
    original = model.decoder().max_length
    ids = prompts(seed=51)
    try:
        short = model.decoder(max_length=16)
        assert short.max_length == 16
        assert model.decoder() is short  # a later default call keeps the current twin
        reference = model.generate(ids, max_new_tokens=16 - PROMPT)  # exactly the maximum
        assert reference.shape == (2, 16)
        with pytest.raises(ValueError, match="exceeds the maximum length 16"):
            model.generate(ids, max_new_tokens=16 - PROMPT + 1)
        assert torch.equal(model.generate(ids, max_new_tokens=16 - PROMPT), reference)
        # The request is checked before any decode step runs, also without the cache.
        with pytest.raises(ValueError, match="exceeds the maximum length 16"):
            model.generate(ids, max_new_tokens=20, use_cache=False)
    finally:
        model.decoder(max_length=original)
    assert model.decoder().max_length == original
    assert torch.equal(model.generate(ids, max_new_tokens=16 - PROMPT), reference)


def test_max_new_tokens_zero_returns_prompt(lm):
    ids = prompts(seed=52)
    out = lm.model.generate(ids, max_new_tokens=0)
    assert torch.equal(out, ids)
    assert out is not ids


def test_exported_program_has_no_source_module():
    hf = tiny_llama(num_hidden_layers=1)
    ids = prompts(2, 5, seed=53)
    b, n = torch.export.Dim("b"), torch.export.Dim("s")
    ep = torch.export.export(
        hf,
        (),
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False},
        dynamic_shapes={
            "input_ids": {0: b, 1: n},
            "attention_mask": {0: b, 1: n},
            "use_cache": None,
        },
        strict=False,
    )
    model = rewrite(ep, AdaptionConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(TypeError, match=r"needs the source nn\.Module"):
        model.generate(ids, max_new_tokens=2)
    with pytest.raises(TypeError, match=r"needs the source nn\.Module"):
        model.decoder()
    # Still usable for forward.
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert torch.equal(out.logits, hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)


def test_a_held_decoder_follows_its_parents_state(lm):
    model = lm.model
    decoder = model.decoder()
    layout = decoder.cache_layout
    ids = prompts(batch=1, seq=3, seed=21)
    names = [n for n in decoder.captured.keyword_names if n.startswith("past_")]
    feed = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=torch.arange(3)[None],
        **dict(zip(names, layout.empty(1), strict=True)),
    )
    with torch.no_grad():
        adapted = decoder(**feed)["logits"]
        with model.disable_adapter():
            base = decoder(**feed)["logits"]
            assert not decoder.adapters_enabled
        assert not torch.equal(adapted, base)
        assert torch.equal(decoder(**feed)["logits"], adapted)
        assert decoder.adapters_enabled


def test_greedy_ignores_temperature_as_hf_does(lm):
    ids = prompts(seed=22)
    greedy = lm.model.generate(ids, max_new_tokens=4)
    assert torch.equal(lm.model.generate(ids, max_new_tokens=4, temperature=0.0), greedy)


def test_decode_graph_does_not_copy_the_past(lm):
    # Each present tensor is one cat(past, new): the cache's empty start tensor is gone.
    graph = lm.model.decoder().base_graph_module.graph
    cats = [n for n in graph.nodes if n.target == torch.ops.aten.cat.default]
    placeholders = {n for n in graph.nodes if n.op == "placeholder"}
    cache_cats = [n for n in cats if n.args[0][0] in placeholders]
    assert len(cache_cats) == 2 * lm.model.decoder().cache_layout.num_layers
    assert all(len(n.args[0]) == 2 for n in cache_cats)
    assert not [n for n in graph.nodes if n.target == torch.ops.aten.lift_fresh_copy.default]


def test_generation_runs_the_folded_graph(lm):
    # The prompt projections run once per generate call, not per step: the step graph has
    # no projection of the prompt, and its output equals the unfolded graph's.
    decoder = lm.model.decoder()
    folded, values = decoder.inference_graph()
    unfolded = decoder.adaption_graph()
    assert len(values) == 3 * len(unfolded.sites)
    linears = [n for n in folded.graph.nodes if n.target == torch.ops.aten.linear.default]
    unfolded_linears = [
        n for n in unfolded.graph_module.graph.nodes if n.target == torch.ops.aten.linear.default
    ]
    assert len(unfolded_linears) - len(linears) == 2 * len(unfolded.sites)
    ids = prompts(batch=2, seq=4, seed=23)
    names = [n for n in decoder.captured.keyword_names if n.startswith("past_")]
    feed = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=torch.arange(4).repeat(2, 1),
        **dict(zip(names, decoder.cache_layout.empty(2), strict=True)),
    )
    flat = decoder.captured.bind((), feed)
    with torch.no_grad():
        expected = decoder(**feed)["logits"]
        got = decoder.captured.unflatten(folded(*flat, *values))["logits"]
    assert_rel_close(got, expected, 1e-6)


def test_every_generate_takes_the_same_options():
    # One definition of the options (adaption_fx.generation.args): every generate and stream
    # takes the prompt, generation_config and Hugging Face's keyword arguments.
    import inspect

    from adaption_fx.export.compile import CompiledModel
    from adaption_fx.export.ort import OrtModel
    from adaption_fx.model.adapted import AdaptedModel

    for owner in (AdaptedModel, OrtModel):
        for method in (owner.generate, owner.stream):
            params = inspect.signature(method).parameters
            assert list(params)[1:4] == ["input_ids", "attention_mask", "generation_config"]
            assert params["generation_config"].default is None
            assert inspect.Parameter.VAR_KEYWORD in [p.kind for p in params.values()]
    assert callable(CompiledModel.generate) and callable(CompiledModel.stream)
