"""pytest fixtures; the shared model builders live in helpers.py."""

from __future__ import annotations

import logging

import pytest
from helpers import padded_batch, tiny_llama, tiny_mistral

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def mistral():
    return tiny_mistral()


@pytest.fixture
def batch():
    return padded_batch()
