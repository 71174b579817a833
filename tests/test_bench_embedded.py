"""The real-model benchmark (``python -m bench --model embedded``) at ``--quick`` size: a
tiny random Llama through every section, start-up subprocesses included, so it cannot rot.

No timing is asserted: only that every row is there, with its target and verdict where it
has one and a reason for every miss, that all generation contenders produced the same
tokens, and that the JSON, table and plot are written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("peft")
pytest.importorskip("matplotlib")
pytest.importorskip("onnxruntime")

ROWS = [
    "rewrite_nocache_s",
    "rewrite_cache_s",
    "peft_s",
    "rewrite/peft",
    "startup_cold_s",
    "startup_cold_rewrite_s",
    "startup_cold_generate_s",
    "startup_warm_s",
    "startup_warm_rewrite_s",
    "startup_warm_generate_s",
    "onnx_forward_s",
    "onnx_decode_s",
    "onnx_decoder_capture_s",
    *(
        f"gen{batch}_{key}"
        for batch in (1, 4)
        for key in ("ours/base_hf", "ort/ours", "peft_hf/base_hf", "tokens_per_s", "same_tokens")
    ),
    "train_ours/peft",
    "train_ours_fused/peft",
    "train_flops_ours/peft",
    "train_operators_ours/peft",
    "train_time_minus_flops",
    "compile_ours/peft",
    "compile_first_step_ours_s",
]
TARGETED = {
    "startup_cold_s",
    "startup_warm_s",
    "onnx_forward_s",
    "onnx_decode_s",
    "gen1_ours/base_hf",
    "gen1_ort/ours",
    "gen4_ours/base_hf",
    "gen4_ort/ours",
    "gen1_same_tokens",
    "gen4_same_tokens",
    "train_time_minus_flops",
}


@pytest.fixture
def bench_main(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.main import main

    return main


def test_quick_embedded_run_writes_every_row(bench_main, tmp_path, capsys):
    xdg_before = os.environ.get("XDG_CACHE_HOME")
    assert bench_main(["--model", "embedded", "--quick", "--out", str(tmp_path)]) == 0
    assert os.environ.get("XDG_CACHE_HOME") == xdg_before  # the run's own cache is undone
    printed = capsys.readouterr().out

    results = json.loads((tmp_path / "embedded.json").read_text())
    rows = {r["key"]: r for r in results["rows"]}
    assert list(rows) == ROWS
    for key, row in rows.items():
        assert set(row) >= {"label", "value", "target", "met", "why"}, key
        if key in TARGETED:
            assert row["target_text"] and row["met"] in (True, False), key
            if not row["met"]:
                assert row["why"], key  # every miss says why
        else:
            assert row["met"] is None and row["why"] is None, key

    # Zero-initialised gates: ours (PyTorch and ORT), PEFT and the base model all produce
    # the same greedy tokens, all of them.
    for batch in ("1", "4"):
        same = results["generate"]["batches"][batch]["same_tokens"]
        assert len(same) == 4 and all(same.values()), (batch, same)
    assert rows["gen4_same_tokens"]["value"] == "yes"
    # The two training steps run the same function, and ours does less arithmetic.
    assert results["train"]["first_loss_rel_diff"] < 1e-4
    assert 0 < results["train"]["flops ours/peft"] < 1
    assert results["compile"]["first_loss_rel_diff"] < 1e-4
    # Start-up ran in two fresh processes, timed after loading.
    for kind in ("cold", "warm"):
        startup = results["startup"][kind]
        assert startup["total_s"] == pytest.approx(
            startup["rewrite_s"] + startup["first_generate_s"]
        )

    table = (tmp_path / "embedded.md").read_text()
    assert table.startswith("| measurement | value | target | met |")
    assert table.strip() in printed
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + len(ROWS)
    assert (tmp_path / "embedded.png").stat().st_size > 1000


def test_model_flag_and_sections_are_checked(bench_main):
    with pytest.raises(SystemExit):
        bench_main(["--model", "embedded", "--only", "nonsense"])
    with pytest.raises(SystemExit):
        bench_main(["--model", "other"])
