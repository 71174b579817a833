"""The fine-tuning throughput benchmark at a tiny size (``--quick``), so it cannot rot.

No timing is asserted: only that both contenders ran on the same batches, that their first
losses agree (they compute the same function), and that the results and table are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("peft")


@pytest.fixture
def finetune_main(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.finetune import main

    return main


def test_quick_run_writes_json_and_table(finetune_main, tmp_path, capsys):
    assert finetune_main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| adapter layers |")

    results = json.loads((tmp_path / "finetune.json").read_text())
    assert results["contenders"] == ["ours", "peft"]
    layers = results["model"]["layers"]
    runs = results["runs"]
    # All layers, then a smaller count.
    assert [r["adapter_layers"] for r in runs] == [layers, layers // 2]
    for run in runs:
        for name in ("ours", "peft"):
            assert run["tokens_per_s"][name] > 0
            assert run["step_ms"][name] > 0
        assert run["ours/peft tokens_per_s"] > 0
        assert 1 <= run["rounds"] <= results["config"]["steps"] * results["config"]["repeats"]
        # Same adapter tensors, same batch: the same loss, to float rounding; and far
        # closer than the adapter moves it from the base model's, so the check has teeth.
        assert run["first_loss_rel_diff"] < 1e-4, run["first_loss"]
        assert run["adapter_effect_rel"] > 10 * run["first_loss_rel_diff"], run
    assert results["max_first_loss_rel_diff"] < 1e-4

    table = (tmp_path / "finetune.md").read_text()
    assert table.startswith("| adapter layers | ours tokens/s | PEFT tokens/s |")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(runs)  # the header and one row per race
    assert table.strip() in printed
