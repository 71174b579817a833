"""Hugging Face's generate options (``adaption_fx/generation/args.py``), one set for every
``generate``: tokens equal Hugging Face's ``generate`` on the base model with the adapter
disabled and PEFT's ``generate`` with a random adapter, in eager PyTorch and in ONNX
Runtime; streamers receive exactly the generated text; unsupported options are refused by
name.

Oracles: transformers' own ``generate`` (base model) and PEFT's (adapter), on a tiny Llama
with a word-level tokenizer trained here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize_adapter, tiny_llama

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.export import OrtModel, to_onnx

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GenerationConfig,
    LogitsProcessor,
    StoppingCriteria,
    TextStreamer,
)
from transformers.generation.streamers import BaseStreamer  # noqa: E402

CFG = AdaptionConfig(adapter_len=4, adapter_layers=2)
NEW = 8
SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song at dawn",
    "my friend reads books by the river",
    "we walk home when the sun goes down",
]
PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained on SENTENCES, saved and loaded back."""
    # Byte-level BPE: every string has tokens (stop strings need that).
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(SENTENCES, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    directory = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    peft = pytest.importorskip("peft")
    hf = tiny_llama(vocab_size=len(tokenizer)).eval()
    hf.generation_config.eos_token_id = None  # no eos unless a test asks for one
    hf.generation_config.pad_token_id = 0
    model = rewrite(hf, CFG)
    state = randomize_adapter(model, seed=3)
    config = peft.AdaptionPromptConfig(
        adapter_len=CFG.adapter_len, adapter_layers=CFG.adapter_layers, task_type="CAUSAL_LM"
    )
    peft_model = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    peft_model.load_state_dict({PEFT_PREFIX + k: v for k, v in state.items()}, strict=False)
    path = to_onnx(model, tmp_path_factory.mktemp("onnx") / "gen.onnx", for_generation=True)
    ort = OrtModel(path, intra_op_num_threads=1)
    return hf, model, peft_model, ort


def prompt(tokenizer, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded word prompts (row 1 shorter)."""
    texts = ["the cat sat on the", "a dog ran"][:rows]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return ids, mask


class BanToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        return scores.masked_fill(torch.arange(scores.shape[-1]) == self.token, -float("inf"))


class StopAfter(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def _first_new(reference: torch.Tensor, width: int, step: int = 0) -> int:
    """The token the plain greedy reference generated at ``step`` in row 0."""
    return int(reference[0, width + step])


def _options(name: str, reference: torch.Tensor, width: int, tokenizer) -> dict:
    """One option set per case; token-dependent ones read the plain greedy reference."""
    if name == "repetition_penalty":
        return {"repetition_penalty": 1.8}
    if name == "no_repeat_ngram_size":
        return {"no_repeat_ngram_size": 2}
    if name == "min_new_tokens":
        return {"min_new_tokens": 5, "eos_token_id": _first_new(reference, width, 1)}
    if name == "eos":
        return {"eos_token_id": _first_new(reference, width, 2)}
    if name == "logits_processor":
        return {"logits_processor": [BanToken(_first_new(reference, width))]}
    if name == "stopping_criteria":
        return {"stopping_criteria": [StopAfter(_first_new(reference, width, 1))]}
    if name == "bad_words_ids":
        return {"bad_words_ids": [[_first_new(reference, width)]]}
    if name == "suppress_tokens":
        return {"suppress_tokens": [_first_new(reference, width)]}
    if name == "stop_strings":
        word = tokenizer.decode([_first_new(reference, width, 2)])
        return {"stop_strings": [word], "tokenizer": tokenizer}
    if name == "generation_config":
        return {"generation_config": GenerationConfig(max_new_tokens=5, repetition_penalty=1.5)}
    if name == "kwargs_over_config":
        return {
            "generation_config": GenerationConfig(max_new_tokens=9, no_repeat_ngram_size=2),
            "max_new_tokens": 4,
        }
    raise AssertionError(name)


CASES = [
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_new_tokens",
    "eos",
    "logits_processor",
    "stopping_criteria",
    "bad_words_ids",
    "suppress_tokens",
    "stop_strings",
    "generation_config",
    "kwargs_over_config",
]


def _generate(model, ids, mask, options):
    """``model.generate`` as a Hugging Face user calls it (ours and theirs alike), NEW new
    tokens unless a generation config says otherwise."""
    options = dict(options)
    if "generation_config" not in options:
        options.setdefault("max_new_tokens", NEW)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **options)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("case", CASES)
def test_greedy_options_equal_hugging_face_and_peft_in_eager_and_ort(models, tokenizer, case):
    hf, model, peft_model, ort = models
    ids, mask = prompt(tokenizer)
    width = ids.shape[1]
    base_plain = _generate(hf, ids, mask, {})
    with model.disable_adapter():
        options = _options(case, base_plain, width, tokenizer)
        assert torch.equal(_generate(model, ids, mask, options), _generate(hf, ids, mask, options))
    peft_plain = _generate(peft_model, ids, mask, {})
    options = _options(case, peft_plain, width, tokenizer)
    expected = _generate(peft_model, ids, mask, options)
    ours = _generate(model, ids, mask, options)
    assert torch.equal(ours, expected), (case, ours, expected)
    assert torch.equal(_generate(ort, ids, mask, options), ours)


def test_seeded_sampling_with_returned_sequences_equals_hugging_face(models, tokenizer):
    # Same RNG use (one multinomial per step over the same rows): same tokens.
    hf, model, _, ort = models
    ids, mask = prompt(tokenizer)
    options = dict(do_sample=True, temperature=0.7, top_k=9, top_p=0.9, num_return_sequences=3)
    torch.manual_seed(11)
    expected = _generate(hf, ids, mask, options)
    assert expected.shape[0] == 6
    with model.disable_adapter():
        torch.manual_seed(11)
        ours = _generate(model, ids, mask, options)
    assert torch.equal(ours, expected)
    # The sampled path through transformers' processors (a penalty takes it off the fast
    # path) draws the same way.
    options["repetition_penalty"] = 1.3
    torch.manual_seed(5)
    expected = _generate(hf, ids, mask, options)
    with model.disable_adapter():
        torch.manual_seed(5)
        assert torch.equal(_generate(model, ids, mask, options), expected)
    torch.manual_seed(5)
    first = _generate(ort, ids, mask, {**options, "seed": 3})
    assert torch.equal(_generate(ort, ids, mask, {**options, "seed": 3}), first)


def test_return_dict_with_scores_and_logits_equals_hugging_face(models, tokenizer):
    hf, model, _, ort = models
    ids, mask = prompt(tokenizer)
    options = dict(
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        repetition_penalty=1.4,
    )
    expected = _generate(hf, ids, mask, options)
    with model.disable_adapter():
        ours = _generate(model, ids, mask, options)
    assert isinstance(ours, type(expected))
    assert torch.equal(ours.sequences, expected.sequences)
    assert len(ours.scores) == len(expected.scores) == NEW
    for got, want in zip(ours.scores, expected.scores, strict=True):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    for got, want in zip(ours.logits, expected.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    from_ort = _generate(ort, ids, mask, options)
    assert torch.equal(from_ort.sequences, _generate(model, ids, mask, options).sequences)
    plain = _generate(model, ids, mask, {"return_dict_in_generate": True})
    assert plain.scores is None and plain.logits is None


class Recorder(BaseStreamer):
    def __init__(self):
        self.calls: list[list[int]] = []
        self.ended = 0

    def put(self, value):
        self.calls.append(value.flatten().tolist())

    def end(self):
        self.ended += 1


class Capture(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.text = ""

    def on_finalized_text(self, text, stream_end=False):
        self.text += text


def test_streamers_receive_what_hugging_face_sends(models, tokenizer):
    hf, model, _, ort = models
    ids, mask = prompt(tokenizer, rows=1)
    expected = Recorder()
    _generate(hf, ids, mask, {"streamer": expected})
    with model.disable_adapter():
        ours = Recorder()
        _generate(model, ids, mask, {"streamer": ours})
    assert ours.calls == expected.calls and ours.ended == expected.ended == 1
    assert ours.calls[0] == ids[0].tolist() and len(ours.calls) == NEW + 1
    peft_text, our_text, ort_text = Capture(tokenizer), Capture(tokenizer), Capture(tokenizer)
    _generate(models[2], ids, mask, {"streamer": peft_text})
    out = _generate(model, ids, mask, {"streamer": our_text})
    _generate(ort, ids, mask, {"streamer": ort_text})
    assert our_text.text == peft_text.text == ort_text.text
    assert our_text.text.strip() == tokenizer.decode(out[0, ids.shape[1] :]).strip()
    with pytest.raises(ValueError, match="batch size 1"):
        _generate(model, *prompt(tokenizer, rows=2), {"streamer": Capture(tokenizer)})


def test_stream_iterates_the_same_generation(models, tokenizer):
    _, model, _, ort = models
    ids, mask = prompt(tokenizer)
    for runner in (model, ort):
        expected = runner.generate(ids, mask, max_new_tokens=NEW, repetition_penalty=1.3)
        steps = list(runner.stream(ids, mask, max_new_tokens=NEW, repetition_penalty=1.3))
        assert len(steps) == NEW and all(s.shape == (2,) for s in steps)
        assert torch.equal(torch.stack(steps, dim=1), expected[:, ids.shape[1] :])
    one, one_mask = prompt(tokenizer, rows=1)
    tokens = model.generate(one, one_mask, max_new_tokens=NEW)
    # How the text is cut into pieces is transformers' TextStreamer's rule (by release).
    chunks = list(model.stream(one, one_mask, max_new_tokens=NEW, tokenizer=tokenizer))
    assert chunks and all(isinstance(c, str) and c for c in chunks)
    text = tokenizer.decode(tokens[0, one.shape[1] :], skip_special_tokens=True)
    assert "".join(chunks).strip() == text.strip()
    # Stopping early ends the generation; a new call starts afresh.
    expected = model.generate(ids, mask, max_new_tokens=NEW)
    partial = model.stream(ids, mask, max_new_tokens=NEW)
    assert torch.equal(next(partial), expected[:, ids.shape[1]])
    partial.close()
    assert torch.equal(model.generate(ids, mask, max_new_tokens=NEW), expected)


REFUSED = [
    ({"num_beams": 2}, ValueError, "num_beams=2 is not supported"),
    ({"penalty_alpha": 0.6, "top_k": 4}, ValueError, "penalty_alpha"),
    ({"assistant_model": object()}, ValueError, "assistant_model"),
    ({"prefix_allowed_tokens_fn": lambda b, i: [1]}, ValueError, "prefix_allowed_tokens_fn"),
    ({"output_attentions": True}, ValueError, "output_attentions"),
    ({"typo_option": 1}, TypeError, "typo_option"),
    ({"stop_strings": ["x"]}, ValueError, "needs the tokenizer"),
    ({"num_return_sequences": 2}, ValueError, "num_return_sequences"),
    ({"generation_config": {"max_new_tokens": 2}}, TypeError, "GenerationConfig"),
    ({"logits_processor": BanToken(1)}, TypeError, "logits_processor must be a list"),
    ({"streamer": object()}, TypeError, "streamer must have put"),
    ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty"),
    ({"do_sample": True, "top_k": -1}, ValueError, "top_k must be >= 0"),
]


@pytest.mark.parametrize(("options", "error", "match"), REFUSED)
def test_unsupported_and_bad_options_are_refused_by_name(models, tokenizer, options, error, match):
    _, model, _, ort = models
    ids, mask = prompt(tokenizer)
    for runner in (model, ort):
        with pytest.raises(error, match=match):
            runner.generate(ids, mask, max_new_tokens=2, **options)


def test_the_model_generation_config_is_the_default(models, tokenizer):
    # Options left out come from the source model's generation_config (and, in ONNX
    # Runtime, from the copy stored at export), as in Hugging Face's generate.
    hf, model, _, ort = models
    ids, mask = prompt(tokenizer)
    saved = copy.deepcopy(hf.generation_config)
    try:
        hf.generation_config.max_new_tokens = 5
        hf.generation_config.no_repeat_ngram_size = 2
        with model.disable_adapter():
            ours = model.generate(ids, mask)
        assert torch.equal(ours, hf.generate(ids, attention_mask=mask))
        assert ours.shape[1] == ids.shape[1] + 5
    finally:
        hf.generation_config = saved
    assert ort.generation_config is not None
    assert ort.generation_config.pad_token_id == 0
    assert ort.generate(ids, mask).shape[1] == 20  # Hugging Face's max_length default


def test_compiled_generate_takes_the_same_options(models, tokenizer):
    from adaption_fx.export import compile as compile_model

    _, model, _, _ = models
    compiled = compile_model(model, backend="eager")
    ids, mask = prompt(tokenizer, rows=1)
    options = {"repetition_penalty": 1.8, "no_repeat_ngram_size": 2}
    expected = _generate(model, ids, mask, options)
    recorder = Recorder()
    assert torch.equal(_generate(compiled, ids, mask, {**options, "streamer": recorder}), expected)
    assert recorder.calls[1:] == [[t] for t in expected[0, ids.shape[1] :].tolist()]
    steps = list(compiled.stream(ids, mask, max_new_tokens=NEW, **options))
    assert torch.equal(torch.stack(steps, dim=1), expected[:, ids.shape[1] :])
