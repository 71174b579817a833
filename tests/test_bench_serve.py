"""The server bench (``python -m bench.serve``) at ``--quick`` size, so it cannot rot. No
timing is asserted: every scenario is there with its numbers, and every answer (through the
real ``adaption-fx serve`` command, streamed with the openai client) equals offline
``OrtModel.generate`` with its adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_serve_bench_quick(monkeypatch, tmp_path, capsys):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("ADAPTION_FX_CACHE_DIR", str(tmp_path / "cache"))
    import bench.serve

    assert bench.serve.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "serve_quick.json").read_text())
    assert result["wrong"] == 0 and result["short"] == 0
    assert result["answers"] == 2 * bench.serve.QUICK.clients + bench.serve.QUICK.serial
    assert set(result["scenarios"]) == set(bench.serve.SCENARIOS)
    for scenario in result["scenarios"].values():
        assert scenario["tokens_per_s"] > 0 and scenario["latency_p99"] >= scenario["ttft_p50"]
    assert set(result["ratios"]) == set(bench.serve.TARGETS)
    table = (tmp_path / "serve_quick.md").read_text()
    assert "(a) spread over 4 adapters" in table and "one at a time" in table
    assert table.strip() in capsys.readouterr().out
