"""The demo (``adaption-fx demo``) and its task, at a tiny size so they cannot rot.

The real run (SmolLM2, base 0% -> adapted >= 80%) is ``./dev.sh demo``; here a tiny random
Llama runs every stage of it and the task generator is pinned.
"""

from __future__ import annotations

import argparse
import json

import pytest
from helpers import tiny_llama
from tokenizers_for_tests import make_tokenizer

from adaption_fx.app.demo import DemoSettings, add_arguments, run_demo, run_from_args
from adaption_fx.app.demo_task import (
    INSTRUCTION,
    answer,
    is_task_example,
    make_splits,
    score,
    write_splits,
)


def test_splits_are_deterministic_and_disjoint():
    first, again = make_splits(50, 20, seed=3), make_splits(50, 20, seed=3)
    assert first == again
    assert make_splits(50, 20, seed=4).train != first.train
    assert len(first.train) == 50 and len(first.held_out) == 20

    def people(records):
        return {r["output"] for r in records}, {r["input"] for r in records}

    train_answers, train_inputs = people(first.train)
    held_answers, held_inputs = people(first.held_out)
    assert not train_answers & held_answers and not train_inputs & held_inputs
    # No held-out name or city occurs in any training sentence.
    train_text = " ".join(train_inputs)
    for record in first.held_out:
        name, city = (part.split(": ")[1] for part in record["output"].split(" | "))
        assert name not in train_text and city not in train_text
        assert name in record["input"] and city in record["input"]
        assert record["output"] == answer(name, city)
        assert is_task_example(record["instruction"], record["output"])


def test_written_splits_are_json_lines(tmp_path):
    splits = make_splits(5, 3)
    train, held_out = write_splits(splits, tmp_path)
    assert [json.loads(line) for line in train.read_text().splitlines()] == splits.train
    assert [json.loads(line) for line in held_out.read_text().splitlines()] == splits.held_out


def test_score_is_exact_match():
    refs = [answer("Aiko", "Osaka"), answer("Hugo", "Lyon")]
    assert score(refs, refs) == 1.0
    assert score([" NAME: Aiko | CITY: Osaka\n", "NAME: Hugo | CITY: Paris"], refs) == 0.5
    assert score(["name: aiko | city: osaka", ""], refs) == 0.0
    assert not is_task_example("Summarise.", refs[0])
    assert not is_task_example(INSTRUCTION, "Aiko lives in Osaka")
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score(refs, refs[:1])
    with pytest.raises(ValueError, match="split sizes must be positive"):
        make_splits(0, 3)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with a chat tokenizer that knows the task's words."""
    root = tmp_path_factory.mktemp("tiny-demo-model")
    splits = make_splits(16, 4)
    words = [INSTRUCTION] + [r["input"] + " " + r["output"] for r in splits.train + splits.held_out]
    tokenizer = make_tokenizer(root, chat=True, extra_words=words)
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(root)
    return root


def test_demo_runs_every_stage_on_a_tiny_model(tiny_model_dir, tmp_path):
    settings = DemoSettings(
        out=tmp_path / "demo",
        model=str(tiny_model_dir),
        train_size=16,
        held_out_size=4,
        adapter_layers=2,
        batch_size=4,
        max_new_tokens=6,
        progress=False,
    )
    result = run_demo(settings)
    assert 0.0 <= result.base_score <= 1.0 and 0.0 <= result.adapted_score <= 1.0
    assert len(result.shown) == 3
    assert result.onnx_matches, result.shown
    assert all(adapted == ort for _, _, adapted, ort in result.shown)
    for name in ("adapter", "loss plot", "metrics", "onnx"):
        assert result.paths[name].exists(), name
    assert (result.paths["adapter"] / "adapter_config.json").is_file()
    assert (result.paths["data"] / "held_out.jsonl").is_file()
    assert set(result.seconds) >= {"load model", "fine-tune", "ONNX export"}
    summary = result.paths["summary"].read_text()
    assert f"| base model | **{result.base_score:.0%}** |" in summary
    assert f"{result.trainable_params:,} trainable parameters" in summary
    assert f"**{result.adapted_score:.0%}** |" in summary
    assert summary.count("\n| `") == len(result.shown)  # one row per shown prompt


def test_demo_command_reports_and_fails_short_of_its_targets(tiny_model_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path / "d"),
            "--model",
            str(tiny_model_dir),
            "--train-size",
            "8",
            "--held-out-size",
            "4",
            "--adapter-layers",
            "1",
            "--batch-size",
            "4",
            "--quiet",
        ]
    )
    status = run_from_args(args)
    out = capsys.readouterr().out
    assert "held-out exact match: base model" in out
    assert "ONNX Runtime answers equal the PyTorch ones: True" in out
    # A random tiny model cannot learn the task in two steps: the demo must say so.
    assert status == 1 and out.rstrip().endswith(
        "FAILED: expected base <= 20%, adapted >= 80% and equal ORT answers"
    )
