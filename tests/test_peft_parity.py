"""Numerical parity with Hugging Face PEFT's adaption prompts (PEFT is the oracle).

Both implementations are built from the same seeded model: PEFT from a deep copy (it wraps
the attention modules in place), ours with ``rewrite`` on the original (it shares the
weights). Our adapter tensors are copied into PEFT under PEFT's keys
(``"base_model.model." + our key``), so the two models compute the same function and their
logits must agree on a padded batch.

Capturing is the slow part (about 2 s), so each architecture is captured once per module:
``rewrite`` gives the "default" adapter (4, 2), which is never modified, and every other
test adds its own freshly zero-initialised adapter with ``add_adapter``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_rel_close, padded_batch, randomize_adapter, tiny_llama, tiny_mistral

from adaption_fx import AdaptionConfig, rewrite

peft = pytest.importorskip("peft")

PEFT_PREFIX = "base_model.model."
BUILDERS = {"llama": tiny_llama, "mistral": tiny_mistral}  # MHA (4/4 heads), GQA (8/2 heads)
DEFAULT_LEN, DEFAULT_LAYERS = 4, 2

# A single token in the last layer only, a typical setting, and an odd prompt length over
# every layer of the 4-layer models.
COMBOS = [(1, 1), (4, 2), (7, 4)]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def source_and_ours(request):
    """(source model, our AdaptedModel from rewrite(source)) for one architecture."""
    src = BUILDERS[request.param]()
    ours = rewrite(src, AdaptionConfig(adapter_len=DEFAULT_LEN, adapter_layers=DEFAULT_LAYERS))
    return src, ours


def make_peft(src, adapter_len: int, adapter_layers: int):
    """PEFT on a deep copy of the source (the copy has the same weights, bit for bit)."""
    config = peft.AdaptionPromptConfig(
        adapter_len=adapter_len, adapter_layers=adapter_layers, task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(copy.deepcopy(src), config).eval()


def add_fresh_adapter(ours, name: str, adapter_len: int, adapter_layers: int) -> None:
    ours.add_adapter(name, AdaptionConfig(adapter_len=adapter_len, adapter_layers=adapter_layers))
    ours.set_adapter(name)
    assert ours.active_adapter == name


def peft_adaption_params(peft_model) -> dict[str, torch.Tensor]:
    return {
        name: param
        for name, param in peft_model.named_parameters()
        if name.rsplit(".", 1)[-1] in ("adaption_prompt", "adaption_gate")
    }


def copy_into_peft(peft_model, state: dict[str, torch.Tensor]) -> None:
    """Load our adapter tensors into PEFT and check that every PEFT adapter tensor took them."""
    peft_state = {PEFT_PREFIX + key: value for key, value in state.items()}
    result = peft_model.load_state_dict(peft_state, strict=False)
    assert result.unexpected_keys == [], result.unexpected_keys
    adaption_missing = [k for k in result.missing_keys if ".adaption_" in k]
    assert adaption_missing == [], adaption_missing
    params = peft_adaption_params(peft_model)
    assert set(params) == set(peft_state), (sorted(params), sorted(peft_state))
    for name, param in params.items():
        assert torch.equal(param.detach(), peft_state[name]), name


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def adapted_layer_indices(ours) -> list[int]:
    return sorted(int(key.split(".")[2]) for key in ours.state_dict() if key.endswith("gate"))


def test_zero_init_is_bit_identical_to_peft_and_base(source_and_ours):
    src, ours = source_and_ours
    ids, mask = padded_batch()
    ours.set_adapter("default")  # the adapter rewrite() created, never trained or loaded
    peft_model = make_peft(src, DEFAULT_LEN, DEFAULT_LAYERS)

    # Same keys and shapes as PEFT, PEFT's prefix aside; gates start at zero.
    ours_state = ours.adapter_state_dict()
    peft_params = peft_adaption_params(peft_model)
    assert {PEFT_PREFIX + k for k in ours_state} == set(peft_params)
    for key, value in ours_state.items():
        assert value.shape == peft_params[PEFT_PREFIX + key].shape, key
        if key.endswith("adaption_gate"):
            assert torch.equal(value, torch.zeros_like(value)), key

    base = logits(src, ids, mask)
    ours_logits = logits(ours, ids, mask)
    peft_logits = logits(peft_model, ids, mask)
    assert torch.equal(ours_logits, base)
    assert torch.equal(ours_logits, peft_logits)


@pytest.mark.parametrize(("adapter_len", "adapter_layers"), COMBOS)
def test_random_adapter_matches_peft(source_and_ours, adapter_len, adapter_layers):
    src, ours = source_and_ours
    ids, mask = padded_batch()
    add_fresh_adapter(ours, f"parity {adapter_len}x{adapter_layers}", adapter_len, adapter_layers)
    peft_model = make_peft(src, adapter_len, adapter_layers)
    num_layers = src.config.num_hidden_layers
    assert adapted_layer_indices(ours) == list(range(num_layers - adapter_layers, num_layers))

    state = randomize_adapter(ours, seed=adapter_len * 10 + adapter_layers)
    assert all(v.abs().min() > 0 for k, v in state.items() if k.endswith("gate"))
    copy_into_peft(peft_model, state)

    base = logits(src, ids, mask)
    ours_logits = logits(ours, ids, mask)
    peft_logits = logits(peft_model, ids, mask)
    # Guard against a trivial pass: the oracle moved away from the base model.
    assert not torch.allclose(peft_logits, base, rtol=1e-3, atol=1e-3)
    assert_rel_close(ours_logits, peft_logits, rtol=1e-5)


def test_random_adapter_moves_logits_noticeably(source_and_ours):
    """The randomized adapters change the output far beyond the parity tolerance, in every
    row of the padded batch, and through the gates: zero gates bring back the base exactly."""
    src, ours = source_and_ours
    ids, mask = padded_batch()
    add_fresh_adapter(ours, "moves", DEFAULT_LEN, DEFAULT_LAYERS)
    peft_model = make_peft(src, DEFAULT_LEN, DEFAULT_LAYERS)
    base = logits(src, ids, mask)
    peft_zero = logits(peft_model, ids, mask)

    state = randomize_adapter(ours, seed=5)
    copy_into_peft(peft_model, state)
    ours_logits = logits(ours, ids, mask)
    peft_logits = logits(peft_model, ids, mask)

    scale = base.abs().max()
    for row in range(ids.shape[0]):
        row_change = ((ours_logits[row] - base[row]).abs().max() / scale).item()
        assert row_change > 1e-2, (row, row_change)
    peft_change = ((peft_logits - peft_zero).abs().max() / peft_zero.abs().max()).item()
    assert peft_change > 1e-2, peft_change

    # Each adapted layer contributes: zeroing one layer's gate changes the output.
    for key in [k for k in state if k.endswith("adaption_gate")]:
        ours.load_state_dict({**state, key: torch.zeros_like(state[key])})
        assert not torch.allclose(logits(ours, ids, mask), ours_logits, rtol=1e-4, atol=1e-4), key

    # All gates zero again: bit-identical to the base model, prompts notwithstanding.
    zero_gates = {k: torch.zeros_like(v) if k.endswith("gate") else v for k, v in state.items()}
    ours.load_state_dict(zero_gates)
    assert torch.equal(logits(ours, ids, mask), base)
