"""Shared test helpers: tiny seeded Hugging Face models, a padded batch, tolerances."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(seed: int = 0, **overrides):
    """A 4-layer multi-head Llama (no GQA) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def tiny_mistral(seed: int = 0, **overrides):
    """A 4-layer grouped-query Mistral (8 query heads, 2 key/value heads)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=None,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**config)).eval()


def padded_batch(batch: int = 3, seq: int = 7, vocab: int = 96, seed: int = 1):
    """input_ids and an attention_mask with left padding on row 1 and right padding on row 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, :2] = 0
    if batch > 2:
        mask[2, -3:] = 0
    return ids, mask


def randomize_adapter(model, seed: int = 0, gate_scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Give the active adapter random prompts and non-zero gates; return the tensors."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.adapter_state_dict().items():
        t = torch.randn(value.shape, generator=g, dtype=torch.float32)
        if key.endswith("adaption_gate"):
            t = t * gate_scale
        state[key] = t.to(value.dtype)
    model.load_state_dict(state)
    return state


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Max abs difference relative to the largest expected magnitude is within rtol."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1e-12)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def snapshot_state(model) -> dict:
    """Everything a failed call on an AdaptedModel must leave untouched."""
    return {
        "adapters": model.adapters,
        "active": model.active_adapter,
        "enabled": model.adapters_enabled,
        "graph": model.graph_module,
        "weights": list(model.adapter_weights.keys()),
        "params": {k: (v, v.detach().clone()) for k, v in model.named_parameters()},
    }


def assert_state_unchanged(model, snap: dict) -> None:
    """The model's adapters, active adapter, graph and every parameter are as in ``snap``."""
    assert model.adapters == snap["adapters"]
    assert model.active_adapter == snap["active"]
    assert model.adapters_enabled == snap["enabled"]
    assert model.graph_module is snap["graph"]
    assert list(model.adapter_weights.keys()) == snap["weights"]
    now = dict(model.named_parameters())
    assert now.keys() == snap["params"].keys()
    for key, (obj, value) in snap["params"].items():
        assert now[key] is obj, key
        assert torch.equal(now[key], value), key


# PEFT is the oracle for adapter management, but its rules changed between the releases the
# suite runs against: tests follow the installed release, found by what it does and has.
PEFT_ADD_KEEPS_ACTIVE_SINCE = "0.21"


def peft_add_keeps_active() -> bool:
    """True where PEFT's add_adapter keeps the active adapter (0.21 on); before, the new
    adapter became active."""
    import peft
    from packaging.version import Version

    return Version(peft.__version__) >= Version(PEFT_ADD_KEEPS_ACTIVE_SINCE)


def peft_active(peft_model) -> str | None:
    """The adapter PEFT's adaption-prompt tuner runs (its own record, in every release)."""
    return peft_model.base_model._active_adapter


def peft_can_delete(peft_model) -> bool:
    """PEFT's adaption-prompt tuner has delete_adapter from 0.18 on (before, the call
    falls through to transformers' mixin and fails)."""
    return "delete_adapter" in vars(type(peft_model.base_model))


def response_cross_entropy(model, data) -> float:
    """Mean next-token cross-entropy over the response tokens of an EncodedDataset, each
    example run on its own (no padding), in float64: the fine-tuning tests' independent
    reference for the loss the training loop and `eval` report."""
    from adaption_fx.training.data import IGNORE_INDEX

    total, count = 0.0, 0
    with torch.no_grad():
        for example in data.examples:
            ids = torch.tensor([example.input_ids])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            log_probs = torch.log_softmax(logits[:-1].double(), dim=-1)
            targets = torch.tensor(example.labels[1:])
            rows = (targets != IGNORE_INDEX).nonzero().flatten()
            total -= log_probs[rows, targets[rows]].sum().item()
            count += len(rows)
    return total / count


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for a module of tiny-model tests (import it into the module): threads
    gain nothing on tiny models, and OpenMP threads spinning beside other work on a small
    machine make every step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def positions_for(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as adaption_fx.generation.loop computes them."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def step_logits(session, ids: torch.Tensor, mask: torch.Tensor, new: torch.Tensor) -> list:
    """Prefill ``ids`` then feed the columns of ``new`` one at a time; every step's logits."""
    positions = positions_for(mask)
    session.reset(ids.shape[0])
    logits = [session.step(ids, mask, positions)]
    for column in new.unbind(dim=1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        logits.append(session.step(column[:, None], mask, positions))
    return logits


def embedded_model_installed() -> bool:
    """Whether the embedded default model's wheel is installed (``./dev.sh test`` and CI
    install it; tests of the real model are skipped without it)."""
    from adaption_fx.app.pretrained import embedded_model_file

    try:
        embedded_model_file()
    except FileNotFoundError:
        return False
    return True


EMBEDDED_SKIP_REASON = "the embedded model wheel is not installed (./dev.sh test does it)"
