"""``state_dict()`` says what adapter it holds: the config as its ``_extra_state`` entry.

That is what makes a plain ``transformers.Trainer``'s ``model.safetensors`` (the state
dict, nothing else of the model) a complete adapter: ``rewrite(base, dir)``,
``load_adapter`` and ``OrtModel.set_adapter_weights`` read it. Oracles: the
adapter_config.json ``save_adapter`` writes for the same adapter, and the adapter's own
tensors. The Trainer itself is exercised in tests/test_hf_trainer.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    assert_state_unchanged,
    padded_batch,
    randomize_adapter,
    snapshot_state,
    tiny_llama,
)
from safetensors.torch import load_file, save_file

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.checkpoint import CONFIG_NAME, EXTRA_STATE_KEY, WEIGHTS_NAME, CheckpointError

SCALAR = AdaptionConfig(adapter_len=3, adapter_layers=2)
# The same tensor shapes as SCALAR's but not the same function: only the config tells them
# apart.
TANH = AdaptionConfig(adapter_len=3, adapter_layers=2, gate_activation="tanh")


@pytest.fixture(scope="module")
def model():
    """ "default" (SCALAR) and "tanh" (TANH), both random; "default" active."""
    adapted = rewrite(tiny_llama(), SCALAR)
    randomize_adapter(adapted, seed=1)
    adapted.add_adapter("tanh", TANH)
    adapted.set_adapter("tanh")
    randomize_adapter(adapted, seed=2)
    adapted.set_adapter("default")
    return adapted


def trainer_save(model, directory):
    """What ``transformers.Trainer._save`` does for a model that is neither a
    PreTrainedModel nor a PeftModel."""
    directory.mkdir(parents=True)
    save_file(model.state_dict(), str(directory / "model.safetensors"), metadata={"format": "pt"})


def logits(model, batch):
    ids, mask = batch
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("name", ["default", "tanh"])
def test_the_entry_is_the_adapter_config_save_adapter_writes(model, tmp_path, name):
    model.set_adapter(name)
    try:
        state = model.state_dict()
        model.save_adapter(tmp_path, name)
    finally:
        model.set_adapter("default")
    folder = tmp_path if name == "default" else tmp_path / name
    written = json.loads((folder / CONFIG_NAME).read_text())
    entry = state.pop(EXTRA_STATE_KEY)
    assert entry.dtype == torch.uint8 and entry.dim() == 1
    assert json.loads(bytes(entry.tolist())) == written
    assert state.keys() == model.adapter_state_dict(name).keys()
    assert torch.equal(model.get_extra_state(), entry) is (name == "default")


@pytest.mark.parametrize("name", ["default", "tanh"])
def test_a_trainer_file_loads_as_the_adapter_it_holds(model, tmp_path, name):
    batch = padded_batch()
    model.set_adapter(name)
    try:
        expected = logits(model, batch)
        trainer_save(model, tmp_path / "run")
    finally:
        model.set_adapter("default")
    config = model.adapters[name]

    again = rewrite(tiny_llama(), tmp_path / "run")
    assert again.adapters == {"default": config}
    assert torch.equal(logits(again, batch), expected)
    again.load_adapter(tmp_path / "run", "second")
    assert again.adapters["second"] == config
    for key, value in model.adapter_state_dict(name).items():
        assert torch.equal(again.adapter_state_dict("second")[key], value)


def test_a_different_config_with_the_same_shapes_is_refused(model):
    model.set_adapter("tanh")
    try:
        tanh_state = model.state_dict()
    finally:
        model.set_adapter("default")
    shapes = {k: v.shape for k, v in model.adapter_state_dict().items()}
    assert shapes == {k: v.shape for k, v in tanh_state.items() if k != EXTRA_STATE_KEY}
    snap = snapshot_state(model)
    with pytest.raises(
        CheckpointError, match=r"gate_activation='tanh'.*gate_activation='identity'"
    ):
        model.load_state_dict(tanh_state)
    with pytest.raises(CheckpointError, match="gate_activation='tanh'"):
        model.save_pretrained("never-written", state_dict=tanh_state)
    assert_state_unchanged(model, snap)
    # Its tensors alone load: the caller says they fit.
    tensors = {k: v for k, v in tanh_state.items() if k != EXTRA_STATE_KEY}
    before = model.adapter_state_dict()
    try:
        model.load_state_dict(tensors)
        for key, value in tensors.items():
            assert torch.equal(model.adapter_state_dict()[key], value)
    finally:
        model.load_state_dict(before)


def test_computed_tensors_for_the_entry_get_a_hint(model):
    zeros = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    snap = snapshot_state(model)
    with pytest.raises(CheckpointError, match=r"not adapter config JSON.*adapter_state_dict\(\)"):
        model.load_state_dict(zeros)
    wrong_type = {**model.adapter_state_dict(), EXTRA_STATE_KEY: torch.zeros(2, 3)}
    with pytest.raises(CheckpointError, match="must be a 1-D uint8 tensor"):
        model.load_state_dict(wrong_type)
    assert_state_unchanged(model, snap)


def test_round_trip_through_load_state_dict_and_save_pretrained(model, tmp_path):
    state = model.state_dict()
    result = model.load_state_dict(state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    model.save_pretrained(tmp_path / "given", state_dict=state)
    model.save_pretrained(tmp_path / "own")
    for file in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / "given" / file).read_bytes() == (tmp_path / "own" / file).read_bytes()


def test_peft_files_win_over_a_trainer_file_beside_them(model, tmp_path):
    """A directory with both (AdapterTrainer's output that a plain Trainer also wrote to)
    is read as PEFT's: adapter_config.json is the documented format."""
    model.save_adapter(tmp_path, "default")
    model.set_adapter("tanh")
    try:
        save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    finally:
        model.set_adapter("default")
    again = rewrite(tiny_llama(), tmp_path)
    assert again.adapters == {"default": SCALAR}
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert len(saved) == len(again.adapter_state_dict())
    for key, value in again.adapter_state_dict().items():
        assert torch.equal(value, model.adapter_state_dict("default")[key])
