"""The quantized-serving benchmark (``python -m bench.quantized``) at ``--quick`` size, so
it cannot rot. No timing is asserted: every file and row is there, the int4 and int8 files
are smaller than fp32, and llama.cpp's row says why it is skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quantized_bench_quick(monkeypatch, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.quantized

    assert bench.quantized.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "quantized.json").read_text())
    sizes = result["sizes"]["vs_fp32"]
    assert set(sizes) == {"fp32", "int4 (ORT quantizer)", "int8 (ORT quantizer)"}
    assert sizes["int4 (ORT quantizer)"] < sizes["int8 (ORT quantizer)"] < 1
    speed = result["speed"]
    written_out = bench.quantized.WRITTEN_OUT  # the int4 file at opset 18
    assert set(speed["batch1"]["tokens_per_s"]) == set(sizes) | {written_out}
    assert speed["batch1"]["fused / written out"] > 0
    assert result["profile"][written_out]["nodes_per_step"] > max(
        result["profile"]["int4 (ORT quantizer)"]["nodes_per_step"], 1
    )
    matmul = result["matmul"]["us"]
    assert set(matmul) == {"1", "4"} and all(v > 0 for row in matmul.values() for v in row.values())
    assert speed["llama_cpp_skipped"] == "--quick: no GGUF file"
    assert speed["batch4"]["int4 (ORT quantizer) / fp32"] > 0
    assert speed["mixed"]["int4 (ORT quantizer) / fp32"] > 0
    base = result["torch_base"]  # the torchao rows, or why they are skipped
    assert "skipped" in base or base["base_weights_int8/fp32"] < 1
    table = (tmp_path / "quantized.md").read_text()
    assert "llama.cpp | skipped" in table
    assert table.strip() in capsys.readouterr().out
