"""The README's usage example runs as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _self_contained_examples() -> list[str]:
    # Runnable examples begin with "import ..."; the API overviews (from ...) use placeholders.
    # The Trainer example writes files: test_hf_trainer.py runs it in a temporary directory.
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return [b for b in blocks if b.lstrip().startswith("import ") and "AdapterTrainer(" not in b]


def test_readme_has_the_usage_and_serving_examples():
    examples = _self_contained_examples()
    assert len(examples) >= 2
    assert "rewrite(" in examples[0]
    assert any("OrtModel(" in b and "to_onnx(" in b for b in examples)
    assert any("for_generation=True" in b and "generate_text(" in b for b in examples)
    assert "adapter_names=" in examples[3] and "mixed_batch=True" in examples[3]


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_readme_example_runs(index):
    code = _self_contained_examples()[index]
    exec(compile(code, str(README), "exec"), {})
