"""What one training step keeps for the backward (bench/memory.py), checked on a tiny
model: counts of bytes are deterministic, so the issue's targets are pinned here."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def memory(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.memory

    return bench.memory


def test_memory_targets_and_layers_below_the_adapter_save_nothing(memory, tmp_path):
    pytest.importorskip("peft")
    result = memory.compare(memory.TOY_QUICK)
    held, saved = result["held_bytes"], result["saved_bytes"]
    # Two independent counts (saved-tensor hooks; storages still alive after the forward)
    # of what the backward needs.
    assert held == saved
    assert result["ratios"]["ours/peft"] <= memory.TARGETS["ours/peft"]
    assert result["ratios"]["checkpointed/ours"] <= memory.TARGETS["checkpointed/ours"]
    split = result["by_layer"]["saved_bytes"]
    layers = [k for k in split if k != memory.OUTSIDE]
    adapted = result["by_layer"]["adapted_layers"]
    assert len(layers) == 4 and adapted == 2
    assert all(split[layer] == 0 for layer in layers[:-adapted])
    assert all(split[layer] > 0 for layer in layers[-adapted:])


def test_memory_bench_writes_its_tables(memory, tmp_path, capsys):
    pytest.importorskip("peft")
    assert memory.main(["--quick", "--model", "toy", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "memory_quick.md").read_text()
    assert "| ours/peft |" in text and "| model.layers.0 | 0.0 |" in text
    assert text.strip() in capsys.readouterr().out
