"""The benchmark at a tiny size, so it cannot rot. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_main(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.run import main

    return main


def test_bench_quick_run_writes_table_json_and_plot(bench_main, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert bench_main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| eager forward (MHA): ours / base |" in out
    results = json.loads((tmp_path / "latest.json").read_text())
    sections = ("eager", "eager_gqa", "train", "compile", "ort", "generate", "rewrite", "scaling")
    for section in sections:
        assert section in results, section
    assert all(results["generate"]["same_tokens"].values()), results["generate"]["same_tokens"]
    assert len(results["generate"]["same_tokens"]) == 3
    assert 0 < results["train"]["flops ours/peft"] < 1
    assert results["eager_gqa"]["kv_heads"] < results["config"]["heads"]
    assert results["rewrite"]["weights_shared"] is True
    for key in ("ours/base", "peft/base"):
        assert results["eager"][key] > 0
    assert [r["seq"] for r in results["scaling"]["seq"]] == [8, 16]
    assert (tmp_path / "overhead_vs_seq.png").stat().st_size > 1000
    assert (tmp_path / "latest.md").read_text().startswith("| measurement |")
