"""pytest fixtures; the shared model builders live in helpers.py."""

from __future__ import annotations

import logging
import os
import tempfile

import pytest
from helpers import padded_batch, tiny_llama, tiny_mistral

logging.getLogger("transformers").setLevel(logging.ERROR)

# The suite's graph cache lives in a directory of its own, never in the user's ~/.cache;
# tests of the cache itself point it elsewhere again.
os.environ.setdefault("ADAPTION_FX_CACHE_DIR", tempfile.mkdtemp(prefix="adaption-fx-test-cache-"))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def mistral():
    return tiny_mistral()


@pytest.fixture
def batch():
    return padded_batch()
