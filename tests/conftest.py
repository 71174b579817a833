"""pytest fixtures; the shared model builders live in helpers.py."""

from __future__ import annotations

import logging
import os
import sys
import tempfile

import pytest
from helpers import padded_batch, tiny_llama, tiny_mistral

logging.getLogger("transformers").setLevel(logging.ERROR)

# The suite's graph cache lives in a directory of its own, never in the user's ~/.cache;
# tests of the cache itself point it elsewhere again.
os.environ.setdefault("ADAPTION_FX_CACHE_DIR", tempfile.mkdtemp(prefix="adaption-fx-test-cache-"))


def pytest_terminal_summary(terminalreporter):
    """How many cases the fuzz harness ran per loader, when it ran (tests/test_fuzz_files.py)."""
    harness = sys.modules.get("fuzz_harness")
    if harness is not None and harness.REPORTS:
        terminalreporter.section("files from elsewhere: fuzz cases per loader")
        for line in harness.summary_lines():
            terminalreporter.write_line(line)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def mistral():
    return tiny_mistral()


@pytest.fixture
def batch():
    return padded_batch()
