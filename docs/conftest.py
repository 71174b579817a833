"""Running the docs' Python blocks as tests (pytest-markdown-docs, ``--markdown-docs``).

Each block runs in a fresh temporary working directory (blocks that save files write
there), with the names the reference pages use as placeholders bound to a tiny model:
``hf_model`` (the tests' 4-layer Llama), ``ids`` and ``mask``. Blocks that need torchrun or
a GPU are fenced ``python notest`` and name the test that runs them instead.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama  # tests/helpers.py (pyproject puts tests/ on the path)


@pytest.fixture(autouse=True)
def _in_a_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def pytest_markdown_docs_globals() -> dict[str, object]:
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"hf_model": tiny_llama(), "ids": ids, "mask": torch.ones_like(ids)}
