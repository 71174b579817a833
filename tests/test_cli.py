"""The ``adaption-fx`` command line, run in-process through ``adaption_fx.app.cli.main``.

The models are tiny Llamas saved with ``save_pretrained`` next to the word-level test
tokenizer (whose vocabulary includes the demo task's words), so ``--model DIR`` loads them
as it would a real model. Every command loads and captures its model (seconds), so one
finetune run is shared by the module: its adapter is what generate, export and eval use.
Oracles: Hugging Face's ``generate`` on the base model (the adapter's gates at zero), our
uncached single-prompt generation, a cross-entropy written here, and ONNX Runtime against
PyTorch. Errors must exit with 2, print one line on stderr and write nothing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import (
    one_thread,  # noqa: F401 (autouse: this module runs on one thread)
    response_cross_entropy,
    tiny_llama,
)
from safetensors.torch import load_file
from tokenizers_for_tests import make_tokenizer

import adaption_fx.generation.text
from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.app.cli import main
from adaption_fx.app.demo_task import make_splits, score, write_splits
from adaption_fx.training.data import alpaca_prompt, encode_dataset, read_records

TOKEN_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)  # the test tokenizer's
TASK = make_splits(train_size=4, held_out_size=3, seed=0)
TASK_WORDS = [text for record in TASK.train + TASK.held_out for text in record.values()]
PROMPTS = ["Say hi", "what is the sum", "hello there"]
NEW = 8  # new tokens per answer
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "adaption_fx.json"}
CHECKPOINT_FILES = {
    *ADAPTER_FILES,
    "training_state.safetensors",
    "training_state.json",
    "trainer_state.json",
    "data_order.json",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# At --max-length 64 (the Alpaca prompt alone is about 55 tokens here) the record with an
# input cannot keep a response token (dropped) and the long answer is cut (truncated).
ALPACA = [
    {"instruction": "Say hi", "output": "hi"},
    {"instruction": "Say hello", "output": "hello there"},
    {"instruction": "Add two numbers", "input": "1 + 2", "output": "3"},
    {"instruction": "Say bye", "output": "bye"},
    {"instruction": "what is the sum", "output": "7"},
    {"instruction": "Say hi", "output": "hi hi hi hi hi hi hi hi hi hi hi hi"},
    {"instruction": "Say thanks", "output": "thanks"},
    {"instruction": "Say yes", "output": "yes"},
    {"instruction": "Say no", "output": "no"},
    {"instruction": "Say ok", "output": "ok"},
]
VAL = [{"instruction": "Say hello", "output": "hello"}, {"instruction": "Say no", "output": "no"}]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "You are a helpful bot."},
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "hi there"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "hello again"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Add two numbers 1 2"},
            {"role": "assistant", "content": "3"},
        ]
    },
    {"messages": [{"role": "user", "content": "Say bye"}, {"role": "assistant", "content": "bye"}]},
    {"messages": [{"role": "user", "content": "how ?"}, {"role": "assistant", "content": "ok"}]},
]
CHAT_VAL = [
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}
]


# ----------------------------------------------------------------------------- fixtures
@dataclass
class Models:
    base: Path  # the model the adapter is trained for (hidden 64, 1 layer), no template
    chat: Path  # the same weights with the ChatML tokenizer
    narrow: Path  # hidden 32, 1 layer
    deep: Path  # hidden 64, 2 layers
    hf: torch.nn.Module  # the base model in memory
    tokenizer: object


@dataclass
class Trained:
    out: Path  # the finetune --out directory: the adapter at its root
    stdout: str
    data: Path


@pytest.fixture(scope="module", autouse=True)
def no_loading_bars():
    """transformers draws a "Loading weights" bar on stderr, which would hide whether an
    error is reported in one line."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if enabled:
        hf_logging.enable_progress_bar()


def save_model(model, path: Path, chat: bool = False) -> Path:
    model.save_pretrained(path)
    make_tokenizer(path, chat=chat, extra_words=TASK_WORDS)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("models")
    tokenizer = make_tokenizer(extra_words=TASK_WORDS)
    size = dict(vocab_size=len(tokenizer), **TOKEN_IDS)
    # One layer: every command captures its model, and a layer more costs half as much again.
    hf = tiny_llama(num_hidden_layers=1, **size)
    narrow = tiny_llama(1, hidden_size=32, intermediate_size=48, num_hidden_layers=1, **size)
    deep = tiny_llama(2, num_hidden_layers=2, **size)
    return Models(
        base=save_model(hf, root / "base"),
        chat=save_model(hf, root / "chat", chat=True),
        narrow=save_model(narrow, root / "narrow"),
        deep=save_model(deep, root / "deep"),
        hf=hf,
        tokenizer=tokenizer,
    )


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> Trained:
    """One finetune run (Alpaca JSON Lines, --val-split, --eval-every, --save-every)."""
    root = tmp_path_factory.mktemp("trained")
    data = write_jsonl(root / "train.jsonl", ALPACA)
    out = root / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        options = "--val-split 0.25 --max-length 64 --max-steps 4 --batch-size 2 --adapter-len 3"
        options += " --lr 0.05 --eval-every 2 --save-every 2 --quiet"
        argv = ["finetune", "--model", models.base, "--data", data, "--out", out, *options.split()]
        code = main([str(a) for a in argv])
    assert code == 0, stdout.getvalue()
    return Trained(out, stdout.getvalue(), data)


@pytest.fixture(scope="module")
def adapted(models, trained):
    """The base model with the trained adapter, built by the library."""
    return rewrite(models.hf, trained.out)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(code: int, err: str, command: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    assert err.startswith(f"adaption-fx {command}: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path`` with its bytes (None for directories)."""
    return {
        str(p.relative_to(path)): None if p.is_dir() else p.read_bytes() for p in path.rglob("*")
    }


def expected_stdout(prompts, answers) -> str:
    """What generate prints for several prompts."""
    return "".join(f"> {p}\n{a.strip()}\n\n" for p, a in zip(prompts, answers, strict=True))


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    # The test tokenizer has no chat template and adds no bos: the bare Alpaca prompt.
    return tokenizer(alpaca_prompt(prompt), add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ]


# ----------------------------------------------------------------------------- entry points
def test_module_help_and_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "adaption_fx", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in ("finetune", "generate", "export", "eval", "demo"):
        assert command in result.stdout
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert [e.value for e in scripts if e.name == "adaption-fx"] == ["adaption_fx.app.cli:main"]
    assert (Path(sys.executable).parent / "adaption-fx").is_file()


# ----------------------------------------------------------------------------- finetune
def test_finetune_alpaca_end_to_end(trained):
    out, lines = trained.out, trained.stdout.splitlines()
    # 10 records, 2 held out; one dropped and one truncated at --max-length 64, wherever
    # the split put them.
    counts = {}
    for label, total in (("train", 8), ("validation", 2)):
        (line,) = [x for x in lines if x.startswith(f"{label}: ")]
        words = line.split()
        assert words[1] == str(total), line
        counts[label] = (int(words[3]), int(words[6]))
    assert sum(t for t, _ in counts.values()) == 1 and sum(d for _, d in counts.values()) == 1
    assert any(x.startswith("training: 4 steps of 2 x 1 examples, lr 0.05 (") for x in lines)
    assert any(x.startswith("done: 4 steps, last train loss ") for x in lines)

    assert {p.name for p in out.iterdir()} == {
        "run.json",
        "metrics.jsonl",
        "loss.png",
        *ADAPTER_FILES,
        "checkpoint-2",
        "checkpoint-4",
    }
    for step in (2, 4):
        assert {p.name for p in (out / f"checkpoint-{step}").iterdir()} == CHECKPOINT_FILES
    final = load_file(out / "adapter_model.safetensors")
    last = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1),
        ("train", 2),
        ("eval", 2),
        ("train", 3),
        ("train", 4),
        ("eval", 4),
    ]
    assert (out / "loss.png").read_bytes()[:8] == PNG_SIGNATURE
    run_file = json.loads((out / "run.json").read_text())
    assert run_file["cli"]["val_split"] == 0.25 and run_file["arguments"]["max_steps"] == 4
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTION_PROMPT"
    assert (config["adapter_len"], config["adapter_layers"]) == (3, 1)


def test_finetune_chat_json_with_val_data_over_an_earlier_run(models, tmp_path, capsys):
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(CHAT, indent=1))  # one JSON list, over many lines
    val = tmp_path / "chat_val.json"
    val.write_text(json.dumps(CHAT_VAL))
    out = tmp_path / "out"
    # An earlier run's files and someone else's, side by side.
    (out / "checkpoint-99").mkdir(parents=True)
    (out / "checkpoint-99" / "trainer_state.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 99}\n')
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "keep.txt").write_text("also mine")
    argv = [
        *("finetune", "--model", models.chat, "--data", data, "--val-data", val, "--out", out),
        *"--epochs 2 --batch-size 2 --adapter-len 2 --eval-every 1 --save-every 3 --quiet".split(),
    ]
    before = tree(out)
    code, _, err = run(capsys, *argv)
    assert_usage_error(code, err, "finetune", "not empty", "notes.txt", "--overwrite")
    assert tree(out) == before

    code, stdout, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err
    # Every assistant turn is a response, the template's end of turn included.
    tokenizer = models.tokenizer
    response_tokens = sum(
        len(tokenizer(m["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
        for record in CHAT
        for m in record["messages"]
        if m["role"] == "assistant"
    )
    lines = stdout.splitlines()
    assert (
        f"train: 4 examples, 0 truncated and 0 dropped at --max-length 512, "
        f"{response_tokens} response tokens"
    ) in lines
    assert any(x.startswith("validation: 1 examples, 0 truncated and 0 dropped") for x in lines)
    # --max-steps left out: 2 epochs of 2 batches.
    assert any(x.startswith("training: 4 steps of 2 x 1 examples, lr 0.009 (") for x in lines)
    # The earlier run is gone, the foreign files are untouched.
    assert {p.name for p in out.iterdir()} == {
        "run.json",
        "metrics.jsonl",
        "loss.png",
        *ADAPTER_FILES,
        "checkpoint-3",
        "checkpoint-4",
        "notes.txt",
        "mine",
    }
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "mine" / "keep.txt").read_text() == "also mine"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [
        (kind, step) for step in (1, 2, 3, 4) for kind in ("train", "eval")
    ]


def test_finetune_resume_refuses_a_changed_schedule(trained, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained.out, out)
    before = tree(out)
    code, _, err = run(capsys, "finetune", "--out", out, "--resume", "--lr", "0.001")
    assert_usage_error(code, err, "finetune", "cannot resume", "lr: checkpoint 0.05, now 0.001")
    assert tree(out) == before


def test_finetune_all_examples_too_long(models, trained, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["finetune", "--model", models.base, "--data", trained.data, "--out", out]
    code, _, err = run(capsys, *argv, "--max-length", "20")
    assert_usage_error(code, err, "finetune", "all 10 examples are longer than max_length=20")
    assert not out.exists()


_GOOD = json.dumps(ALPACA[0])
# File text, and what the one error line must say besides the file's path.
BAD_DATA = {
    "malformed line": (f"{_GOOD}\n{{'instruction': 1}}\n", ["data.jsonl:2: invalid JSON"]),
    "missing field": (f'{_GOOD}\n{{"instruction": "Say hi"}}\n', ["data.jsonl:2", "'output'"]),
    "empty": ("\n\n", ["empty"]),
    "empty list": ("[]", ["empty"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_finetune_bad_data(case, models, tmp_path, capsys):
    text, fragments = BAD_DATA[case]
    data = tmp_path / "data.jsonl"
    data.write_text(text)
    out = tmp_path / "out"
    code, _, err = run(capsys, "finetune", "--model", models.base, "--data", data, "--out", out)
    assert_usage_error(code, err, "finetune", str(data.parent), *fragments)
    assert not out.exists()


def test_finetune_usage_errors(trained, tmp_path, capsys):
    data, out = trained.data, tmp_path / "out"
    base = ["finetune", "--data", data, "--out", out]
    cases = [
        ([*base, "--model", tmp_path / "nowhere"], ["nowhere", "does not exist"]),
        ([*base, "--val-data", data, "--val-split", "0.2"], ["--val-data or --val-split"]),
        ([*base, "--resume"], ["--resume", "run.json"]),
        ([*base, "--resume", "--overwrite"], ["--resume or --overwrite"]),
        (["finetune", "--out", out], ["--data FILE is required"]),
    ]
    for argv, fragments in cases:
        code, _, err = run(capsys, *argv)
        assert_usage_error(code, err, "finetune", *fragments)
        assert not out.exists(), argv
    # A run.json but no checkpoint: nothing to resume from.
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"cli": {"data": str(data)}}))
    code, _, err = run(capsys, "finetune", "--out", out, "--resume")
    assert_usage_error(code, err, "finetune", "no checkpoint-<step>/")
    assert [p.name for p in out.iterdir()] == ["run.json"]


def test_generate_and_export_usage_errors(models, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--model", models.base, "--top-k", "5", "hi")
    assert_usage_error(code, err, "generate", "--sample only")
    code, _, err = run(capsys, "generate", "--model", models.base, " ")
    assert_usage_error(code, err, "generate", "PROMPT is empty")
    out = tmp_path / "model.bin"
    code, _, err = run(
        capsys, "export", "--model", models.base, "--adapter", tmp_path, "--out", out
    )
    assert_usage_error(code, err, "export", ".onnx")
    code, _, err = run(capsys, "generate", "--model", models.base, "--adapter", out, "hi")
    assert_usage_error(code, err, "generate", "is not a directory")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "model"), [("generate", "narrow"), ("export", "deep"), ("eval", "narrow")]
)
def test_adapter_for_another_model(command, model, models, trained, tmp_path, capsys):
    argv = [command, "--model", getattr(models, model), "--adapter", trained.out]
    argv += {
        "generate": ["hi"],
        "export": ["--out", tmp_path / "model.onnx"],
        "eval": ["--data", trained.data],
    }[command]
    code, _, err = run(capsys, *argv)
    assert_usage_error(code, err, command, str(trained.out))
    # The narrow model's projections are narrower; the deep model's top layer has another
    # name than the one the adapter was trained for.
    assert "but this model needs" in err or "do not match the model's adapted layers" in err, err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def fresh_adapter(adapted, tmp_path_factory) -> Path:
    """A just-initialised adapter (random prompts, zero gates), saved on its own."""
    path = tmp_path_factory.mktemp("fresh")
    adapted.add_adapter("fresh", AdaptionConfig(adapter_len=3, adapter_layers=1))
    assert adapted.active_adapter == "default"  # the trained one stays active
    adapted.save_adapter(path, "fresh")
    return path / "fresh"


def test_generate_with_a_fresh_adapter_is_the_base_model(models, fresh_adapter, capsys):
    argv = ["generate", "--model", models.base, "--adapter", fresh_adapter]
    code, out, err = run(capsys, *argv, "--max-new-tokens", NEW, *PROMPTS)
    assert code == 0, err
    tokenizer, answers = models.tokenizer, []
    for prompt in PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        with torch.no_grad():
            tokens = models.hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False
            )
        answers.append(tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True))
    assert any(a.strip() for a in answers)
    assert out == expected_stdout(PROMPTS, answers)


@pytest.fixture(scope="module")
def trained_answers(models, trained) -> str:
    """generate's output with the trained adapter."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        argv = ["generate", "--model", str(models.base), "--adapter", str(trained.out)]
        code = main([*argv, "--max-new-tokens", str(NEW), *PROMPTS])
    assert code == 0
    return stdout.getvalue()


def test_generate_with_the_trained_adapter(models, adapted, trained_answers):
    # One prompt at a time, no padding, the whole sequence recomputed at every step.
    answers = []
    for prompt in PROMPTS:
        ids = prompt_ids(models.tokenizer, prompt)
        tokens = adapted.generate(ids, max_new_tokens=NEW, use_cache=False)
        answers.append(models.tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True))
    assert trained_answers == expected_stdout(PROMPTS, answers)


def test_generate_sampling_follows_the_seed(models, adapted, trained, capsys):
    argv = ["generate", "--model", models.base, "--adapter", trained.out, "--sample"]
    code, out, err = run(capsys, *argv, "--seed", 5, "--max-new-tokens", NEW, *PROMPTS[:2])
    assert code == 0, err
    prompts = [alpaca_prompt(p) for p in PROMPTS[:2]]
    again = [
        adaption_fx.generation.text.generate_text(
            adapted, models.tokenizer, prompts, max_new_tokens=NEW, do_sample=True, seed=seed
        )
        for seed in (5, 6)
    ]
    assert out == expected_stdout(PROMPTS[:2], again[0])
    assert again[0] != again[1]


def test_export_for_generation_then_generate_in_onnx_runtime(
    models, trained, trained_answers, tmp_path, capsys, monkeypatch
):
    import adaption_fx.export

    progress = []
    original = adaption_fx.export.to_onnx

    def spy(*args, **kwargs):
        progress.append(kwargs.get("progress"))
        return original(*args, **kwargs)

    monkeypatch.setattr(adaption_fx.export, "to_onnx", spy)
    path = tmp_path / "adapted.onnx"
    argv = ["export", "--model", models.base, "--adapter", trained.out, "--out", path]
    code, out, err = run(capsys, *argv, "--for-generation", "--quiet")
    assert code == 0, err
    assert path.is_file() and f"wrote {path} (" in out
    assert progress == [False]  # --quiet: no progress bar
    argv = ["generate", "--model", models.base, "--onnx", path, "--max-new-tokens", NEW]
    code, out, err = run(capsys, *argv, *PROMPTS)
    assert code == 0, err
    assert out == trained_answers


def test_export_int4_then_generate_in_onnx_runtime(models, trained, tmp_path, capsys, monkeypatch):
    """--weights int4: a model directory (no GGUF) gets ONNX Runtime's block quantizer;
    generate --onnx runs the file with no other option."""
    import onnx

    import adaption_fx.export

    calls = []
    original = adaption_fx.export.to_onnx

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(adaption_fx.export, "to_onnx", spy)
    path = tmp_path / "int4.onnx"
    argv = ["export", "--model", models.base, "--adapter", trained.out, "--out", path]
    code, out, err = run(capsys, *argv, "--for-generation", "--weights", "int4", "--quiet")
    assert code == 0, err
    assert calls[0]["weights"] == "int4" and calls[0]["gguf_file"] is None
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(path)).graph.node}
    argv = ["generate", "--model", models.base, "--onnx", path, "--max-new-tokens", NEW]
    code, out, err = run(capsys, *argv, *PROMPTS)
    assert code == 0, err
    assert len(out.strip().splitlines()) >= len(PROMPTS)
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        main(["export", "--weights", "int3", "--adapter", str(trained.out), "--out", str(path)])
    assert exit_info.value.code == 2
    assert "argument --weights: invalid choice: 'int3'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- eval
def test_eval_reports_the_loss_over_response_tokens(models, trained, adapted, tmp_path, capsys):
    data = write_jsonl(tmp_path / "val.jsonl", [*VAL, *ALPACA[:3]])
    argv = ["eval", "--model", models.base, "--adapter", trained.out, "--data", data]
    code, out, err = run(capsys, *argv, "--batch-size", 2, "--json")
    assert code == 0, err
    report = json.loads(out.splitlines()[-1])
    encoded = encode_dataset(read_records(data), models.tokenizer, 512)
    assert report.keys() == {"examples", "dropped", "truncated", "tokens", "loss", "perplexity"}
    assert (report["examples"], report["dropped"], report["truncated"]) == (5, 0, 0)
    assert report["tokens"] == encoded.response_tokens
    assert report["loss"] == pytest.approx(response_cross_entropy(adapted, encoded), rel=1e-6)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-12)
    assert report["loss"] != pytest.approx(response_cross_entropy(models.hf, encoded), rel=1e-4)


def test_eval_on_the_demo_task_reports_exact_match(models, trained, adapted, tmp_path, capsys):
    _, held_out = write_splits(TASK, tmp_path)
    argv = ["eval", "--model", models.base, "--adapter", trained.out, "--data", held_out]
    code, out, err = run(capsys, *argv, "--max-new-tokens", NEW)
    assert code == 0, err
    records = TASK.held_out
    answers = adaption_fx.generation.text.generate_text(
        adapted,
        models.tokenizer,
        [alpaca_prompt(r["instruction"], r["input"]) for r in records],
        max_new_tokens=NEW,
    )
    rate = score(answers, [r["output"] for r in records])
    assert 0 <= rate <= 1
    lines = out.splitlines()
    assert lines[-2].startswith("loss ") and lines[-2].endswith(" response tokens")
    assert lines[-1] == f"task exact match: {rate:.1%} of {len(records)}"


def test_eval_exact_match_counts_right_answers(models, tmp_path, capsys, monkeypatch):
    """Without --adapter (the base model); a stand-in generator answers the first and last
    example right, so the rate must be 2/3."""
    _, held_out = write_splits(TASK, tmp_path)
    records = TASK.held_out
    calls = []

    def answer(model, tokenizer, prompts, **kwargs):
        calls.append(kwargs)
        found = [next(i for i, r in enumerate(records) if r["input"] in p) for p in prompts]
        return [records[i]["output"] if i != 1 else "NAME: Aiko | CITY: Kyoto" for i in found]

    monkeypatch.setattr(adaption_fx.generation.text, "generate_text", answer)
    argv = ["eval", "--model", models.base, "--data", held_out]
    code, out, err = run(capsys, *argv, *"--batch-size 2 --max-new-tokens 5 --json".split())
    assert code == 0, err
    report = json.loads(out.splitlines()[-1])
    assert report["exact_match"] == pytest.approx(2 / 3)
    assert calls == [{"max_new_tokens": 5}] * 2  # two batches of at most 2
    encoded = encode_dataset(read_records(held_out), models.tokenizer, 512)
    assert report["loss"] == pytest.approx(response_cross_entropy(models.hf, encoded), rel=1e-6)
