"""Adapter checkpoints in PEFT's format: PEFT -> us, us -> PEFT, us -> us."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import assert_rel_close, padded_batch, randomize_adapter, tiny_llama, tiny_mistral

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.checkpoint import CONFIG_NAME, EXTRAS_NAME, PEFT_KEY_PREFIX, WEIGHTS_NAME

peft = pytest.importorskip("peft")

BUILDERS = {"llama": tiny_llama, "mistral": tiny_mistral}


def _logits(model, batch):
    ids, mask = batch
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _randomize_peft(peft_model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "adaption_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("adapter_len, adapter_layers", [(2, 1), (5, 3)])
def test_peft_checkpoint_loads_into_our_model(tmp_path, arch, adapter_len, adapter_layers):
    source = BUILDERS[arch]()
    batch = padded_batch()
    peft_model = peft.get_peft_model(
        copy.deepcopy(source),
        peft.AdaptionPromptConfig(
            adapter_len=adapter_len, adapter_layers=adapter_layers, task_type="CAUSAL_LM"
        ),
    ).eval()
    _randomize_peft(peft_model, seed=adapter_len)
    peft_model.save_pretrained(tmp_path)
    expected = _logits(peft_model, batch)
    assert not torch.allclose(expected, _logits(source, batch), atol=1e-3)

    ours = rewrite(source, tmp_path)  # a checkpoint directory works as the config
    assert ours.adapters["default"] == AdaptionConfig(
        adapter_len=adapter_len, adapter_layers=adapter_layers
    )
    assert_rel_close(_logits(ours, batch), expected, rtol=1e-5)

    # ... and load_adapter into a model rewritten for something else.
    other = rewrite(source, AdaptionConfig(adapter_len=7, adapter_layers=1))
    other.load_adapter(tmp_path, adapter_name="from_peft")
    other.set_adapter("from_peft")
    assert_rel_close(_logits(other, batch), expected, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_our_adapters_load_into_peft_and_back(tmp_path, arch):
    source = BUILDERS[arch]()
    batch = padded_batch()
    ours = rewrite(source, AdaptionConfig(adapter_len=3, adapter_layers=2))
    randomize_adapter(ours, seed=1)
    ours.add_adapter("long", AdaptionConfig(adapter_len=7, adapter_layers=4))
    ours.set_adapter("long")
    randomize_adapter(ours, seed=2)
    expected = {}
    for name in ("default", "long"):
        ours.set_adapter(name)
        expected[name] = _logits(ours, batch)

    ours.save_adapter(tmp_path / "ours")
    assert (tmp_path / "ours" / CONFIG_NAME).is_file()
    assert (tmp_path / "ours" / "long" / WEIGHTS_NAME).is_file()
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(source), tmp_path / "ours").eval()
    peft_model.load_adapter(tmp_path / "ours" / "long", adapter_name="long")
    for name in ("default", "long"):
        peft_model.set_adapter(name)
        assert_rel_close(_logits(peft_model, batch), expected[name], rtol=1e-5)

    # Back through PEFT's own save: the same tensors, so our outputs are bit-identical.
    # Older PEFT (0.17) saves the active adapter's tensors under every adapter's name, so
    # each adapter is saved while it is the active one (same files on every release).
    for name in ("default", "long"):
        peft_model.set_adapter(name)
        peft_model.save_pretrained(tmp_path / "via_peft", selected_adapters=[name])
    again = rewrite(source, tmp_path / "via_peft")
    again.load_adapter(tmp_path / "via_peft", adapter_name="long")
    for name in ("default", "long"):
        again.set_adapter(name)
        assert torch.equal(_logits(again, batch), expected[name]), name


PEFT_FIELDS = {
    "peft_type",
    "adapter_len",
    "adapter_layers",
    "target_modules",
    "task_type",
    "inference_mode",
    "base_model_name_or_path",
    "revision",
    "auto_mapping",
}


def test_a_peft_load_of_our_checkpoint_is_silent(tmp_path, caplog):
    peft = pytest.importorskip("peft")
    import warnings

    source = tiny_llama()
    ours = rewrite(source, AdaptionConfig(adapter_len=4, adapter_layers=2))
    randomize_adapter(ours, seed=2)
    ours.save_adapter(tmp_path)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(source), tmp_path)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "Unexpected keyword" in m or "upgrade" in m.lower()], said
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "gate, activation", [("scalar", "identity"), ("per_head", "tanh"), ("scalar", "tanh")]
)
def test_round_trip_through_our_own_format_is_bit_identical(tmp_path, gate, activation):
    source = tiny_mistral()
    batch = padded_batch()
    config = AdaptionConfig(adapter_len=4, adapter_layers=3, gate=gate, gate_activation=activation)
    ours = rewrite(source, config)
    randomize_adapter(ours, seed=7)
    expected = _logits(ours, batch)
    ours.save_adapter(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    extras = json.loads((tmp_path / EXTRAS_NAME).read_text())
    assert saved["peft_type"] == "ADAPTION_PROMPT"
    assert (extras["gate"], extras["gate_activation"]) == (gate, activation)
    assert extras["adaption_fx_version"]
    if config.peft_expressible:  # exactly PEFT's fields: PEFT loads it without a word
        assert set(saved) == PEFT_FIELDS
    else:  # PEFT cannot run it: the gate fields stay where PEFT reads them, and it says so
        assert (saved["gate"], saved["gate_activation"]) == (gate, activation)
    assert saved["target_modules"] == "self_attn" and saved["task_type"] == "CAUSAL_LM"
    fresh = rewrite(source, tmp_path)
    assert fresh.adapters == {"default": config}
    assert torch.equal(_logits(fresh, batch), expected)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_checkpoint_keys_are_peft_keys(tmp_path):
    from safetensors import safe_open

    ours = rewrite(tiny_llama(), AdaptionConfig(adapter_len=2, adapter_layers=2))
    ours.save_adapter(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        keys = sorted(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert keys == sorted(PEFT_KEY_PREFIX + k for k in ours.adapter_state_dict())
    assert keys[0] == "base_model.model.model.layers.2.self_attn.adaption_gate"


def test_config_files_are_read_by_both(tmp_path):
    config = AdaptionConfig(
        adapter_len=6, adapter_layers=2, gate="per_head", gate_activation="tanh"
    )
    config.save_pretrained(tmp_path / "ours")
    assert AdaptionConfig.from_pretrained(tmp_path / "ours") == config
    peft_view = peft.AdaptionPromptConfig.from_pretrained(tmp_path / "ours")
    assert (peft_view.adapter_len, peft_view.adapter_layers) == (6, 2)

    peft.AdaptionPromptConfig(
        adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM"
    ).save_pretrained(tmp_path / "peft")
    # PEFT's files carry no gate fields: they mean PEFT's scalar, identity gate.
    assert AdaptionConfig.from_pretrained(tmp_path / "peft") == AdaptionConfig(
        adapter_len=3, adapter_layers=1
    )


def test_what_peft_does_with_variants_it_cannot_represent(tmp_path):
    """Pins the failure modes the README documents for PEFT."""
    source = tiny_llama()
    batch = padded_batch()
    per_head = rewrite(source, AdaptionConfig(adapter_len=2, adapter_layers=1, gate="per_head"))
    randomize_adapter(per_head, seed=1)
    per_head.save_adapter(tmp_path / "per_head")
    with pytest.raises(RuntimeError, match=r"size mismatch for .*adaption_gate"):
        peft.PeftModel.from_pretrained(copy.deepcopy(source), tmp_path / "per_head")

    tanh = rewrite(source, AdaptionConfig(adapter_len=2, adapter_layers=1, gate_activation="tanh"))
    randomize_adapter(tanh, seed=1)
    tanh.save_adapter(tmp_path / "tanh")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(source), tmp_path / "tanh").eval()
    # PEFT loads it without complaint but applies the gate without tanh: another function.
    assert not torch.allclose(_logits(loaded, batch), _logits(tanh, batch), rtol=1e-4)


def test_tensors_are_cast_to_the_adapter_dtype(tmp_path):
    source = tiny_llama()
    fp32 = rewrite(source, AdaptionConfig(adapter_len=2, adapter_layers=2))
    state = randomize_adapter(fp32, seed=4)
    fp32.save_adapter(tmp_path)
    bf16 = rewrite(tiny_llama().to(torch.bfloat16), tmp_path)
    for key, value in bf16.adapter_state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, state[key].to(torch.bfloat16))
