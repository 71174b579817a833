"""eos_token_id and pad_token_id default to the source model's generation config.

Oracle: the Hugging Face model's own ``generate(..., do_sample=False)`` called with no eos
or pad argument, so that it reads them from ``generation_config`` as ours must. Adapters
are disabled for those comparisons (the HF model has none). The eos ids are tokens the
tiny model really produces (found in an eos-free greedy reference), so a default that is
not applied changes the tokens.

One tiny Llama is rewritten and its decode step captured once for the module; one ONNX
file is exported (seconds), with a list of eos ids and a pad id in its generation config.
Tests change ``generation_config`` through ``monkeypatch``, which puts it back.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_llama

from adaption_fx import AdaptionConfig, generate_text, rewrite
from adaption_fx.export import OrtModel, compile, to_onnx
from adaption_fx.generation.loop import generation_defaults
from adaption_fx.generation.options import MODEL_DEFAULT

CFG = AdaptionConfig(adapter_len=4, adapter_layers=2)
VOCAB = 96
PROMPT = 6
NEW = 8
PAD = 95  # an explicit pad id, to tell padding from eos-filled rows
ORT_OPTIONS = dict(intra_op_num_threads=1)  # tiny model: one thread beside PyTorch's
SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]


# ----------------------------------------------------------------------------- helpers
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of PROMPT tokens; row 1 has two pad tokens on the left."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(len(SPECIAL), VOCAB, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    return ids, mask


def hf_greedy(hf, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF greedy generation with no eos or pad argument: its generation config decides."""
    return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)


def stop_token(reference: torch.Tensor, row: int, step: int) -> int:
    """The token ``row`` produces at new-token ``step`` of the eos-free ``reference``,
    checked to be its first occurrence there (so eos on it stops the row at ``step``)."""
    new = reference[row, PROMPT:].tolist()
    assert new[step] not in new[:step], f"row {row} repeats its token before step {step}"
    return new[step]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf():
    model = tiny_llama(seed=2)
    model.generation_config.eos_token_id = None  # module default: no eos, no pad
    model.generation_config.pad_token_id = None
    return model


@pytest.fixture(scope="module")
def model(hf):
    adapted = rewrite(hf, CFG)
    adapted.decoder()  # the decode-step capture, once
    return adapted


@pytest.fixture(scope="module")
def reference(hf):
    """HF greedy tokens of batch() with eos off: what no default must change."""
    ids, mask = batch()
    out = hf_greedy(hf, ids, mask)
    assert out.shape == (2, PROMPT + NEW)
    return out


@pytest.fixture(scope="module")
def eos_ids(reference) -> list[int]:
    """Row 0's token at step 2 and row 1's at step 4: both rows stop, at different steps."""
    first, second = stop_token(reference, 0, 2), stop_token(reference, 1, 4)
    assert first not in reference[1, PROMPT : PROMPT + 4].tolist()
    assert second not in reference[0, PROMPT : PROMPT + 2].tolist()
    return [first, second]


@pytest.fixture(scope="module")
def onnx_path(hf, model, eos_ids, tmp_path_factory):
    """The decode step exported (base model) while the config holds eos_ids and PAD."""
    path = tmp_path_factory.mktemp("defaults") / "decode.onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf.generation_config, "eos_token_id", eos_ids)
        patch.setattr(hf.generation_config, "pad_token_id", PAD)
        with model.disable_adapter():
            to_onnx(model, path, for_generation=True)
    return path


@pytest.fixture(scope="module")
def ort(onnx_path):
    return OrtModel(onnx_path, **ORT_OPTIONS)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the model's vocabulary: special tokens, then w3..w95."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), VOCAB)})
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    assert len(tok) == VOCAB and tok.convert_tokens_to_ids("w7") == 7
    return tok


# ----------------------------------------------------------------------------- the helper
def test_generation_defaults_reads_generation_config_then_config(hf, monkeypatch, caplog):
    assert generation_defaults(hf) == (None, None)
    monkeypatch.setattr(hf.generation_config, "eos_token_id", [5, 7])
    monkeypatch.setattr(hf.generation_config, "pad_token_id", 0)
    assert generation_defaults(hf) == ([5, 7], 0)
    # A None in the generation config is kept, as HF's generate keeps it, although the
    # model config has an eos id (tiny Llama's: 2).
    monkeypatch.setattr(hf.generation_config, "eos_token_id", None)
    assert hf.config.eos_token_id == 2
    assert generation_defaults(hf) == (None, 0)
    # Without a generation config: the config's (a tuple read as a list).
    config_only = SimpleNamespace(config=SimpleNamespace(eos_token_id=(3, 4), pad_token_id=1))
    assert generation_defaults(config_only) == ([3, 4], 1)
    no_gen = SimpleNamespace(generation_config=None, config=config_only.config)
    assert generation_defaults(no_gen) == ([3, 4], 1)
    # A generation config lacking an attribute: that one from the config.
    partial = SimpleNamespace(
        generation_config=SimpleNamespace(eos_token_id=9), config=config_only.config
    )
    assert generation_defaults(partial) == (9, 1)
    assert generation_defaults(None) == (None, None)
    assert generation_defaults(torch.nn.Linear(2, 2)) == (None, None)
    # Invalid ids (early Llama conversions have pad_token_id=-1) are dropped, not raised
    # later by a generate call that never named them.
    bad = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id="2", pad_token_id=-1))
    with caplog.at_level(logging.WARNING, logger="adaption_fx.generation.loop"):
        assert generation_defaults(bad) == (None, None)
    assert "eos_token_id" in caplog.text and "pad_token_id" in caplog.text
    assert repr(MODEL_DEFAULT) == "MODEL_DEFAULT"


def test_default_token_ids_follow_the_source(hf, model, monkeypatch):
    assert model.default_token_ids == (None, None)
    monkeypatch.setattr(hf.generation_config, "eos_token_id", 7)
    monkeypatch.setattr(hf.generation_config, "pad_token_id", PAD)
    assert model.default_token_ids == (7, PAD)
    assert compile(model, backend="eager").default_token_ids == (7, PAD)


# ----------------------------------------------------------------------------- PyTorch
def test_default_eos_stops_as_hf_generate(hf, model, reference, eos_ids, monkeypatch):
    ids, mask = batch()
    eos = eos_ids[0]
    monkeypatch.setattr(hf.generation_config, "eos_token_id", eos)
    expected = hf_greedy(hf, ids, mask)
    # Precondition: HF's default stops row 0 and fills it with eos (its pad fallback).
    assert not torch.equal(expected, reference)
    assert expected[0, PROMPT + 3 :].eq(eos).all()
    with model.disable_adapter():
        assert torch.equal(model.generate(ids, mask, max_new_tokens=NEW), expected)
        # An explicit None turns eos off; an explicit id still wins over the default.
        assert torch.equal(
            model.generate(ids, mask, max_new_tokens=NEW, eos_token_id=None), reference
        )
        other = model.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos_ids[1])
        assert not torch.equal(other, expected)

        # The pad id comes from the generation config too.
        monkeypatch.setattr(hf.generation_config, "pad_token_id", PAD)
        expected = hf_greedy(hf, ids, mask)
        assert expected[0, PROMPT + 3 :].eq(PAD).all()
        assert torch.equal(model.generate(ids, mask, max_new_tokens=NEW), expected)
        # pad_token_id=None passed: the first eos id, as before.
        out = model.generate(ids, mask, max_new_tokens=NEW, pad_token_id=None)
        assert out[0, PROMPT + 3 :].eq(eos).all()


def test_default_eos_list_stops_every_row_as_hf_generate(
    hf, model, reference, eos_ids, monkeypatch
):
    ids, mask = batch()
    monkeypatch.setattr(hf.generation_config, "eos_token_id", eos_ids)
    expected = hf_greedy(hf, ids, mask)
    # Both rows stop: row 1 at step 4, so generation ends after five new tokens.
    assert expected.shape == (2, PROMPT + 5)
    with model.disable_adapter():
        assert torch.equal(model.generate(ids, mask, max_new_tokens=NEW), expected)
        compiled = compile(model, backend="eager")
        assert torch.equal(compiled.generate(ids, mask, max_new_tokens=NEW), expected)
        assert torch.equal(
            compiled.generate(ids, mask, max_new_tokens=NEW, eos_token_id=None), reference
        )


# ----------------------------------------------------------------------------- ONNX
def test_onnx_metadata_carries_the_ids(onnx_path, ort, eos_ids):
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    (entry,) = [p for p in proto.metadata_props if p.key == "adaption_fx"]
    generation = json.loads(entry.value)["generation"]
    assert generation["eos_token_id"] == eos_ids
    assert generation["pad_token_id"] == PAD
    assert ort.default_token_ids == (eos_ids, PAD)


def test_ort_defaults_match_hf_generate(hf, ort, reference, eos_ids, monkeypatch):
    ids, mask = batch()
    monkeypatch.setattr(hf.generation_config, "eos_token_id", eos_ids)
    monkeypatch.setattr(hf.generation_config, "pad_token_id", PAD)
    expected = hf_greedy(hf, ids, mask)
    assert expected.shape == (2, PROMPT + 5) and expected[0, PROMPT + 3 :].eq(PAD).all()
    # The file's defaults are those of export time: the config is back to no eos now.
    monkeypatch.undo()
    assert torch.equal(ort.generate(ids, mask, max_new_tokens=NEW), expected)
    assert torch.equal(ort.generate(ids, mask, max_new_tokens=NEW, eos_token_id=None), reference)


def test_file_without_the_ids_still_loads(onnx_path, ort, reference, tmp_path):
    import onnx

    proto = onnx.load(str(onnx_path))
    (entry,) = [p for p in proto.metadata_props if p.key == "adaption_fx"]
    meta = json.loads(entry.value)
    del meta["generation"]["eos_token_id"], meta["generation"]["pad_token_id"]
    entry.value = json.dumps(meta)
    path = tmp_path / "old.onnx"
    onnx.save(proto, str(path))
    old = OrtModel(path, **ORT_OPTIONS)
    assert old.default_token_ids == (None, None)
    ids, mask = batch()
    assert torch.equal(old.generate(ids, mask, max_new_tokens=NEW), reference)


# ----------------------------------------------------------------------------- text
def test_generate_text_prefers_the_model_eos(hf, model, tokenizer, monkeypatch):
    ids, _ = batch()
    prompt = " ".join(f"w{i}" for i in ids[0].tolist())
    with model.disable_adapter():
        free = generate_text(model, tokenizer, prompt, max_new_tokens=NEW, eos_token_id=None)
        words = free.split()
        assert len(words) == NEW
        assert words[2] not in words[:2]
        monkeypatch.setattr(hf.generation_config, "eos_token_id", int(words[2][1:]))
        # The model's eos (not the tokenizer's [EOS], which never comes) ends the text.
        assert generate_text(model, tokenizer, prompt, max_new_tokens=NEW) == " ".join(words[:3])
