"""Generation in ONNX Runtime (OrtModel.generate, OrtDecodeSession) and generate_text.

Oracle: our PyTorch generation (``AdaptedModel.generate`` and ``TorchSession`` over
``AdaptedModel.decoder()``), itself checked against Hugging Face and PEFT in
test_generate.py. Greedy tokens must be equal, per-step logits within RTOL.

Every ``to_onnx`` call costs seconds, so each file is a module-scoped fixture built once,
three in all: a Llama decode step with the adapter baked in, the same with the adapter as
inputs, and a grouped-query Mistral decode step (baked). The file "not exported for
generation" is a copy of the first without its generation metadata. The Llama's
vocabulary is the test tokenizer's, so the text tests reuse its model and file. Both
models carry a randomized "default" adapter; a test that changes it puts it back.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    assert_rel_close,
    randomize_adapter,
    step_logits,
    tiny_llama,
    tiny_mistral,
)

from adaption_fx import AdaptionConfig, generate_text, rewrite
from adaption_fx.export import OrtModel, to_onnx
from adaption_fx.generation.loop import TorchSession

CFG = AdaptionConfig(adapter_len=4, adapter_layers=2)
RTOL = 1e-4
PROMPT = 6
NEW = 8
# One ONNX Runtime thread: the models are tiny, and a spinning thread pool beside PyTorch's
# (the tests alternate the two) slows both down many times over on a small machine.
ORT_OPTIONS = dict(intra_op_num_threads=1)
SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song at dawn",
    "my friend reads books by the river",
    "we walk home when the sun goes down",
]


# ----------------------------------------------------------------------------- helpers
def left_padded_prompt(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of PROMPT tokens; row 1 has two pad tokens on the left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL), vocab, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    return ids, mask


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer trained on SENTENCES, saved as a Hugging Face tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    directory = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


@pytest.fixture(scope="module")
def llama(tokenizer):
    model = rewrite(tiny_llama(vocab_size=len(tokenizer)), CFG)
    randomize_adapter(model, seed=3)
    return model


@pytest.fixture(scope="module")
def mistral():
    model = rewrite(tiny_mistral(), CFG)
    randomize_adapter(model, seed=4)
    return model


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_generate")


@pytest.fixture(scope="module")
def llama_ort(llama, out_dir):
    return OrtModel(to_onnx(llama, out_dir / "llama.onnx", for_generation=True), **ORT_OPTIONS)


@pytest.fixture(scope="module")
def mistral_ort(mistral, out_dir):
    return OrtModel(to_onnx(mistral, out_dir / "mistral.onnx", for_generation=True), **ORT_OPTIONS)


@pytest.fixture(scope="module")
def inputs_path(llama, out_dir):
    return to_onnx(llama, out_dir / "inputs.onnx", for_generation=True, adapter_as_inputs=True)


@pytest.fixture(scope="module")
def no_generation_path(llama_ort, out_dir):
    """The Llama decode-step file without its "generation" metadata: what OrtModel sees in
    a file exported without for_generation (a copy, not a fourth export)."""
    import onnx

    proto = onnx.load(str(llama_ort.path))
    (entry,) = [p for p in proto.metadata_props if p.key == "adaption_fx"]
    meta = json.loads(entry.value)
    del meta["generation"]
    entry.value = json.dumps(meta)
    path = out_dir / "no_generation.onnx"
    onnx.save(proto, str(path))
    return path


@pytest.fixture(params=["llama", "mistral"])
def arch(request):
    """(AdaptedModel, OrtModel of its decode step, vocabulary size)."""
    model = request.getfixturevalue(request.param)
    ort = request.getfixturevalue(f"{request.param}_ort")
    vocab = ort.session.get_outputs()[0].shape[-1]  # logits (batch, 1, vocab): vocab is fixed
    assert isinstance(vocab, int)
    return model, ort, vocab


# ----------------------------------------------------------------------------- 1. tokens
def test_ort_greedy_tokens_equal_pytorch(arch):
    model, ort, vocab = arch
    ids, mask = left_padded_prompt(vocab)
    expected = model.generate(ids, mask, max_new_tokens=NEW)
    assert expected.shape == (2, PROMPT + NEW)
    out = ort.generate(ids, mask, max_new_tokens=NEW)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.long
    assert torch.equal(out, expected), (out, expected)
    # numpy in, the same tokens out
    assert torch.equal(ort.generate(ids.numpy(), mask.numpy(), max_new_tokens=NEW), expected)
    # The adapter is in the file: the base model continues differently.
    with model.disable_adapter():
        base = model.generate(ids, mask, max_new_tokens=NEW)
    assert not torch.equal(base, expected)


# ----------------------------------------------------------------------------- 2. logits
def test_ort_step_logits_match_pytorch(arch):
    model, ort, vocab = arch
    ids, mask = left_padded_prompt(vocab)
    new = model.generate(ids, mask, max_new_tokens=NEW)[:, PROMPT:]
    expected = step_logits(TorchSession(model.decoder()), ids, mask, new)
    actual = step_logits(ort.decode_session(), ids, mask, new)
    assert len(actual) == len(expected) == NEW + 1
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert isinstance(a, torch.Tensor) and a.shape == (2, vocab), index
        assert torch.isfinite(a).all(), index
        assert_rel_close(a.float(), e.float(), rtol=RTOL)
    # The last step's greedy choice continues the sequence the way generate() would.
    assert torch.equal(expected[-2].argmax(-1), new[:, -1])


# ----------------------------------------------------------------------------- 3. binding
def test_io_binding_keeps_cache_in_ort_values(llama_ort, tokenizer):
    import onnxruntime

    ids, mask = left_padded_prompt(len(tokenizer))
    session = llama_ort.decode_session()
    info = llama_ort.metadata["generation"]
    steps = 3
    step_logits(session, ids, mask, torch.full((2, steps), len(SPECIAL)))
    assert len(session.past) == len(info["past_inputs"]) == len(info["cache_shapes"])
    for value, (heads, dim) in zip(session.past, info["cache_shapes"], strict=True):
        assert isinstance(value, onnxruntime.OrtValue)
        assert value.shape() == [2, heads, PROMPT + steps, dim]
    # reset forgets the cache: zero length, the new batch size
    session.reset(1)
    assert all(v.shape()[:3] == [1, v.shape()[1], 0] for v in session.past)


# ----------------------------------------------------------------------------- 4. swap
def test_adapter_as_inputs_follows_set_adapter_weights(llama, llama_ort, inputs_path, tmp_path):
    ids, mask = left_padded_prompt(llama_ort.session.get_outputs()[0].shape[-1])
    ort = OrtModel(inputs_path, **ORT_OPTIONS)
    assert ort.adapter_input_names
    ort.set_adapter_weights(llama)
    first = llama.generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(ort.generate(ids, mask, max_new_tokens=NEW), first)

    original = {k: v.clone() for k, v in llama.state_dict().items()}
    try:
        randomize_adapter(llama, seed=21)
        llama.save_adapter(tmp_path / "other")
        second = llama.generate(ids, mask, max_new_tokens=NEW)
        assert not torch.equal(second, first)  # the new adapter changes the continuation
        ort.set_adapter_weights(tmp_path / "other")
        assert torch.equal(ort.generate(ids, mask, max_new_tokens=NEW), second)
        # The baked file does not follow the model: its adapter is the one it was exported with.
        assert torch.equal(llama_ort.generate(ids, mask, max_new_tokens=NEW), first)

        # 5. A zero-gated adapter contributes nothing: the base model's tokens.
        zero = {
            k: torch.zeros_like(v) if k.endswith("adaption_gate") else v
            for k, v in llama.state_dict().items()
        }
        llama.load_state_dict(zero)
        ort.set_adapter_weights(llama)
        with llama.disable_adapter():
            base = llama.generate(ids, mask, max_new_tokens=NEW)
        assert torch.equal(ort.generate(ids, mask, max_new_tokens=NEW), base)
    finally:
        llama.load_state_dict(original)
    assert torch.equal(llama.generate(ids, mask, max_new_tokens=NEW), first)


def test_set_adapter_weights_takes_a_snapshot_of_the_model(llama, inputs_path, tokenizer):
    ids, mask = left_padded_prompt(len(tokenizer))
    ort = OrtModel(inputs_path, **ORT_OPTIONS)
    ort.set_adapter_weights(llama)
    first = llama.generate(ids, mask, max_new_tokens=NEW)
    original = {k: v.clone() for k, v in llama.state_dict().items()}
    try:
        randomize_adapter(llama, seed=21)
        # The file holds the adapter it was given until it is given another.
        assert torch.equal(ort.generate(ids, mask, max_new_tokens=NEW), first)
    finally:
        llama.load_state_dict(original)


# ----------------------------------------------------------------------------- 6. sampling
def test_ort_sampling_is_reproducible(llama, llama_ort, tokenizer):
    ids, mask = left_padded_prompt(len(tokenizer))
    kwargs = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, seed=7)
    first = llama_ort.generate(ids, mask, **kwargs)
    assert torch.equal(llama_ort.generate(ids, mask, **kwargs), first)
    # The same draws as PyTorch: the probabilities agree far below any draw's resolution.
    assert torch.equal(llama.generate(ids, mask, **kwargs), first)
    others = [llama_ort.generate(ids, mask, **{**kwargs, "seed": s}) for s in (8, 9, 10)]
    assert any(not torch.equal(o, first) for o in others)
    greedy = llama_ort.generate(ids, mask, max_new_tokens=NEW)
    top1 = llama_ort.generate(ids, mask, max_new_tokens=NEW, do_sample=True, top_k=1, seed=3)
    assert torch.equal(top1, greedy)
    tiny_p = llama_ort.generate(ids, mask, max_new_tokens=NEW, do_sample=True, top_p=1e-6)
    assert torch.equal(tiny_p, greedy)


def test_ort_eos_stops_rows_and_pads(llama, llama_ort, tokenizer):
    ids, mask = left_padded_prompt(len(tokenizer))
    greedy = llama.generate(ids, mask, max_new_tokens=NEW)
    eos = int(greedy[0, PROMPT + 1])  # row 0's second new token
    expected = llama.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    out = llama_ort.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, expected)
    row = out[0, PROMPT:].tolist()
    first_eos = row.index(eos)
    assert all(t == 0 for t in row[first_eos + 1 :])


# ----------------------------------------------------------------------------- 7. errors
def test_file_not_for_generation_cannot_generate(no_generation_path, tokenizer):
    ort = OrtModel(no_generation_path, **ORT_OPTIONS)
    assert "generation" not in ort.metadata
    ids, mask = left_padded_prompt(len(tokenizer))
    with pytest.raises(ValueError, match="for_generation"):
        ort.generate(ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="for_generation"):
        ort.decode_session()


def test_adapter_inputs_needed_before_generate(inputs_path, tokenizer):
    ort = OrtModel(inputs_path, **ORT_OPTIONS)
    ids, mask = left_padded_prompt(len(tokenizer))
    with pytest.raises(RuntimeError, match="set_adapter_weights"):
        ort.generate(ids, mask, max_new_tokens=2)
    with pytest.raises(RuntimeError, match="set_adapter_weights"):
        ort.decode_session()


def test_ort_generate_argument_errors(llama, llama_ort, tokenizer, monkeypatch):
    ids, mask = left_padded_prompt(len(tokenizer))
    with pytest.raises(ValueError, match="max_new_tokens"):
        llama_ort.generate(ids, mask, max_new_tokens=-1)
    with pytest.raises(TypeError, match="max_new_tokens"):
        llama_ort.generate(ids, mask, max_new_tokens=2.0)
    with pytest.raises(ValueError, match="temperature"):
        llama_ort.generate(ids, mask, do_sample=True, temperature=0.0)
    right = mask.flip(-1)
    with pytest.raises(ValueError, match="right padding"):
        llama_ort.generate(ids, right, max_new_tokens=2)
    assert torch.equal(llama_ort.generate(ids, mask, max_new_tokens=0), ids)

    monkeypatch.setitem(llama_ort.metadata["generation"], "max_length", 8)
    with pytest.raises(ValueError, match="maximum length 8"):
        llama_ort.generate(ids, mask, max_new_tokens=5)
    # Exactly the maximum is allowed.
    expected = llama.generate(ids, mask, max_new_tokens=2)
    assert torch.equal(llama_ort.generate(ids, mask, max_new_tokens=2), expected)


# ----------------------------------------------------------------------------- 8. text
def encode_and_generate(model, tokenizer, prompt: str, **kwargs) -> str:
    """generate_text by hand: encode, generate, decode the new tokens."""
    ids = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[-1] :], skip_special_tokens=True)


def test_generate_text_pytorch(llama, tokenizer, tokenizer_dir):
    vocab = set(tokenizer.get_vocab()) - set(SPECIAL)
    text = generate_text(llama, tokenizer_dir, "the cat", max_new_tokens=5, eos_token_id=None)
    assert isinstance(text, str) and text
    words = text.split()
    assert 0 < len(words) <= 5 and set(words) <= vocab, text
    assert text == encode_and_generate(llama, tokenizer, "the cat", max_new_tokens=5)
    # A tokenizer object works as its directory does.
    assert generate_text(llama, tokenizer, "the cat", max_new_tokens=5, eos_token_id=None) == text

    prompts = ["the cat", "a dog ran in the park"]
    singles = [
        generate_text(llama, tokenizer_dir, p, max_new_tokens=5, eos_token_id=None) for p in prompts
    ]
    batch = generate_text(llama, tokenizer_dir, prompts, max_new_tokens=5, eos_token_id=None)
    assert isinstance(batch, list) and len(batch) == 2
    assert batch == singles
    assert tokenizer.padding_side == "right"  # generate_text puts the padding side back


def test_generate_text_ort_matches_pytorch(llama, llama_ort, tokenizer_dir):
    prompts = ["the cat", "a dog ran in the park"]
    for prompt in [prompts[0], prompts]:
        expected = generate_text(llama, tokenizer_dir, prompt, max_new_tokens=5, eos_token_id=None)
        out = generate_text(llama_ort, tokenizer_dir, prompt, max_new_tokens=5, eos_token_id=None)
        assert out == expected


def test_generate_text_stops_at_tokenizer_eos(llama, tokenizer, tokenizer_dir):
    # Default eos is the tokenizer's: the hand-made equivalent passes it explicitly.
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    expected = encode_and_generate(
        llama, tokenizer, "the bird", max_new_tokens=6, eos_token_id=eos, pad_token_id=pad
    )
    assert generate_text(llama, tokenizer_dir, "the bird", max_new_tokens=6) == expected


def test_generate_text_errors(llama, tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        generate_text(llama, tmp_path / "missing", "the cat", max_new_tokens=2)
    with pytest.raises(TypeError):
        generate_text(llama, tokenizer_dir, 123, max_new_tokens=2)
    with pytest.raises(TypeError):
        generate_text(llama, tokenizer_dir, ["the cat", 5], max_new_tokens=2)
    with pytest.raises(ValueError):
        generate_text(llama, tokenizer_dir, "", max_new_tokens=2)
    with pytest.raises(ValueError):
        generate_text(llama, tokenizer_dir, [], max_new_tokens=2)
    with pytest.raises(TypeError):
        generate_text(llama, object(), "the cat", max_new_tokens=2)
