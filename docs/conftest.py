"""Running the docs' Python blocks as tests (pytest-markdown-docs, ``--markdown-docs``).

Each block runs in a fresh temporary working directory (blocks that save files write
there), with a few names the reference pages use as placeholders bound to tiny models:
``hf_model`` (a 4-layer Llama), ``tokenizer`` (a character tokenizer with a chat
template), ``ids`` and ``mask``. Blocks that need torchrun or a GPU are fenced
``python notest`` and name the test that runs them instead.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _in_a_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=4,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    return LlamaForCausalLM(config).eval()


def pytest_markdown_docs_globals() -> dict[str, object]:
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"hf_model": _tiny_llama(), "ids": ids, "mask": torch.ones_like(ids)}
