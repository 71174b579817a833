"""The mixed-batch benchmark (``python -m bench.mixed``) at ``--quick`` size, so it cannot
rot. No timing is asserted: every row is there with its ratios, and mixed generation gave
every row the tokens it generates alone, in PyTorch and in ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mixed_bench_quick(monkeypatch, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.mixed

    assert bench.mixed.main(["--quick", "--model", "toy", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "mixed_quick.json").read_text())["toy"]
    assert result["same_tokens_eager"] is True
    assert result["same_tokens_ort"] is True
    for key, _ in bench.mixed.ROWS:
        row = result[key]
        assert set(row["ms"]) == {"single", "mixed", "separate"}
        assert all(row[r] > 0 for r in ("mixed/single", "separate/single", "separate/mixed"))
    table = (tmp_path / "mixed_quick.md").read_text()
    assert "ORT, generate" in table and "mixed / single" in table
    assert table.strip() in capsys.readouterr().out
