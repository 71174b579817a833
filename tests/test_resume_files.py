"""Files a resumed run reads, as if someone else wrote them: the training state never
unpickles code, every field is checked before anything changes, and each failure names the
file and the field (issue 28).

Covered: the checkpoint's training state in its safetensors + JSON form and in an earlier
version's ``training_state.pt`` (bit-for-bit resume from both; a planted pickle refused
unrun), ``trainer_state.json``, ``data_order.json``, ``metrics.jsonl``, ``run.json`` (through
the command line) and dataset files.
"""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_llama
from safetensors.torch import load_file, save_file
from tokenizers_for_tests import make_tokenizer

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.app.cli import RUN_OPTION_TYPES, finetune_defaults, main
from adaption_fx.training.data import DataError, Example, encode_dataset, read_records
from adaption_fx.training.loop import (
    ADAPTER_FILES,
    DATA_ORDER_FILE,
    METRICS_FILE,
    TRAINER_STATE_FILE,
    Finetune,
    TrainingArguments,
    TrainingError,
    active_parameters,
    read_metrics,
)
from adaption_fx.training.state import LEGACY_STATE_FILE, STATE_JSON_FILE, STATE_TENSORS_FILE

VOCAB = 117  # make_tokenizer()'s vocabulary
TOKEN_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
CONFIG = AdaptionConfig(adapter_len=3, adapter_layers=2)
ARGUMENTS = dict(lr=0.05, max_steps=4, batch_size=2, save_every=1)
FOUR = [
    ("Say hi", "hi"),
    ("Say hello", "hello there again"),
    ("Add two numbers", "3"),
    ("what is the sum", "the sum is 7 and the answer is yes"),
]
WEIGHTS = "adapter_model.safetensors"
_names = itertools.count()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def adapted():
    return rewrite(tiny_llama(vocab_size=VOCAB, num_hidden_layers=2, **TOKEN_IDS), None)


@pytest.fixture(scope="module")
def data():
    return encode_dataset([Example.from_alpaca(i, o) for i, o in FOUR], make_tokenizer(), 512)


@pytest.fixture(scope="module")
def reference(adapted, data, tmp_path_factory) -> Path:
    """An uninterrupted run of four steps, a checkpoint after each."""
    out = tmp_path_factory.mktemp("reference") / "run"
    fresh_adapter(adapted)
    finetune(adapted, data, out).run()
    return out


@pytest.fixture
def stopped(reference, tmp_path) -> Path:
    """The reference run as if stopped after step 2: its checkpoints 1 and 2, run.json
    and the metrics of all four steps (those of steps 3 and 4 to be dropped)."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-1", "checkpoint-2"):
        shutil.copytree(reference / name, out / name)
    for name in ("run.json", METRICS_FILE):
        shutil.copy(reference / name, out / name)
    return out


# ----------------------------------------------------------------------------- helpers
def fresh_adapter(model, seed: int = 0) -> str:
    """A new adapter made the active one (prompts from ``seed``)."""
    name = f"resume{next(_names)}"
    model.add_adapter(name, CONFIG, generator=torch.Generator().manual_seed(seed))
    model.set_adapter(name)
    return name


def finetune(model, data, out: Path) -> Finetune:
    return Finetune(model, data, None, out, TrainingArguments(**ARGUMENTS), 0, progress=False)


def tree(path: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(path)): None if p.is_dir() else p.read_bytes() for p in path.rglob("*")
    }


def assert_same_adapter(out: Path, reference: Path) -> None:
    ours, theirs = load_file(out / WEIGHTS), load_file(reference / WEIGHTS)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def refused(adapted, data, out: Path, *fragments: str) -> str:
    """Resume in ``out`` and expect a TrainingError holding ``fragments``, with the model,
    the optimizer, the RNGs and the directory as they were."""
    fresh_adapter(adapted, seed=1)
    run = finetune(adapted, data, out)
    params = active_parameters(adapted)
    values = [p.detach().clone() for p in params]
    optimizer, torch_rng, python_rng = run.optimizer, torch.get_rng_state(), random.getstate()
    before = tree(out)
    with pytest.raises(TrainingError) as caught:
        run.run(resume=True)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message}"
    assert "\n" not in message
    assert active_parameters(adapted) == params
    assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))
    assert run.optimizer is optimizer and not optimizer.state and run.step == 0
    assert run.scheduler.last_epoch == 0
    assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == python_rng
    assert tree(out) == before
    return message


def to_legacy(checkpoint: Path) -> None:
    """Rewrite a checkpoint's training state as the earlier version wrote it: one
    ``torch.save`` of the optimizer's and scheduler's state dicts and the RNG states."""
    document = json.loads((checkpoint / STATE_JSON_FILE).read_text())
    tensors = load_file(checkpoint / STATE_TENSORS_FILE)
    optimizer = {
        "state": {
            int(index): {key: tensors[name] for key, name in names.items()}
            for index, names in document["optimizer"]["state"].items()
        },
        "param_groups": [
            {**group, "betas": tuple(group["betas"])}
            for group in document["optimizer"]["param_groups"]
        ],
    }
    version, words, gauss = document["python_rng"]
    state = {
        "optimizer": optimizer,
        "scheduler": document["scheduler"],
        "torch_rng": tensors[document["torch_rng"]],
        "python_rng": (version, tuple(words), gauss),
    }
    torch.save(state, checkpoint / LEGACY_STATE_FILE)
    (checkpoint / STATE_JSON_FILE).unlink()
    (checkpoint / STATE_TENSORS_FILE).unlink()


class Planted:
    """A pickle payload: unpickling it creates ``marker`` (as ``os.system`` would run a
    command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (pathlib.Path.touch, (self.marker,))


def planted(tmp_path: Path) -> tuple[Planted, Path]:
    """A payload, shown to work: a plain unpickling of a copy creates its marker."""
    proof = tmp_path / "proof-the-payload-runs"
    pickle.loads(pickle.dumps(Planted(proof)))
    assert proof.exists()
    marker = tmp_path / "MARKER"
    return Planted(marker), marker


def edit_json(path: Path, change: Callable[[dict], Any]) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


# ----------------------------------------------------------------------------- the format
def test_a_checkpoint_holds_no_pickle(reference):
    checkpoint = reference / "checkpoint-2"
    assert {p.name for p in checkpoint.iterdir()} == {
        *ADAPTER_FILES,
        STATE_TENSORS_FILE,
        STATE_JSON_FILE,
        TRAINER_STATE_FILE,
        DATA_ORDER_FILE,
    }
    document = json.loads((checkpoint / STATE_JSON_FILE).read_text())
    assert document.keys() == {
        "format",
        "version",
        "optimizer",
        "scheduler",
        "torch_rng",
        "python_rng",
    }
    assert (document["format"], document["version"]) == ("adaption-fx training state", 1)
    assert document["scheduler"]["last_epoch"] == 2
    layout = document["optimizer"]["state"]
    assert len(layout) == 2 * CONFIG.adapter_layers  # a prompt and a gate per layer
    names = {name for names in layout.values() for name in names.values()}
    tensors = load_file(checkpoint / STATE_TENSORS_FILE)
    assert tensors.keys() == names | {document["torch_rng"]}
    assert all(tensors[names["step"]].item() == 2 for names in layout.values())
    assert tensors[document["torch_rng"]].dtype == torch.uint8
    version, words, gauss = document["python_rng"]
    assert (version, len(words), gauss) == (3, 625, None)


def test_resume_continues_bit_for_bit(adapted, data, reference, stopped):
    fresh_adapter(adapted, seed=1)  # other prompts: the checkpoint's must replace them
    result = finetune(adapted, data, stopped).run(resume=True)
    assert (result.steps, result.interrupted) == (4, False)
    assert_same_adapter(stopped, reference)
    ours = load_file(stopped / "checkpoint-4" / STATE_TENSORS_FILE)
    theirs = load_file(reference / "checkpoint-4" / STATE_TENSORS_FILE)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert [r["step"] for r in read_metrics(stopped)] == [1, 2, 3, 4]


def test_an_earlier_versions_checkpoint_resumes_bit_for_bit(adapted, data, reference, stopped):
    to_legacy(stopped / "checkpoint-2")
    fresh_adapter(adapted, seed=1)
    finetune(adapted, data, stopped).run(resume=True)
    assert_same_adapter(stopped, reference)
    # What it writes from then on is the new form.
    assert (stopped / "checkpoint-4" / STATE_JSON_FILE).is_file()


# ----------------------------------------------------------------------------- pickles
def test_a_planted_pickle_never_runs(adapted, data, stopped, tmp_path):
    payload, marker = planted(tmp_path)
    checkpoint = stopped / "checkpoint-2"
    to_legacy(checkpoint)
    state = torch.load(checkpoint / LEGACY_STATE_FILE, weights_only=True)
    torch.save({**state, "optimizer": payload}, checkpoint / LEGACY_STATE_FILE)
    message = refused(
        adapted,
        data,
        stopped,
        f"{checkpoint / LEGACY_STATE_FILE} holds objects a checkpoint written by adaption-fx "
        "never holds",
        "(it asks for getattr)",  # Path.touch, a method: getattr(PosixPath, "touch")
        "it was not loaded",
        "resume from checkpoint-1 instead by moving checkpoint-2 out of",
        "--overwrite",
    )
    assert not marker.exists(), message
    # The same as a plain pickle (not torch's zip form).
    (checkpoint / LEGACY_STATE_FILE).write_bytes(pickle.dumps({"optimizer": payload}))
    refused(adapted, data, stopped, str(checkpoint / LEGACY_STATE_FILE), "was not loaded")
    assert not marker.exists()


def test_pickles_in_the_new_files_are_refused(adapted, data, stopped, tmp_path):
    payload, marker = planted(tmp_path)
    checkpoint = stopped / "checkpoint-2"
    tensors = checkpoint / STATE_TENSORS_FILE
    saved = tensors.read_bytes()
    tensors.write_bytes(pickle.dumps(payload))
    refused(adapted, data, stopped, str(tensors), "not a safetensors file")
    tensors.write_bytes(saved)
    (checkpoint / STATE_JSON_FILE).write_bytes(pickle.dumps(payload))
    refused(adapted, data, stopped, str(checkpoint / STATE_JSON_FILE), "not valid JSON")
    assert not marker.exists()


def test_new_files_win_over_a_planted_pickle_beside_them(
    adapted, data, reference, stopped, tmp_path
):
    payload, marker = planted(tmp_path)
    torch.save({"optimizer": payload}, stopped / "checkpoint-2" / LEGACY_STATE_FILE)
    fresh_adapter(adapted, seed=1)
    finetune(adapted, data, stopped).run(resume=True)
    assert not marker.exists()
    assert_same_adapter(stopped, reference)


# ----------------------------------------------------------------------------- damaged state
def _group(document: dict) -> dict:
    return document["optimizer"]["param_groups"][0]


STATE_DAMAGE = [
    (lambda d: d.update(version=2), "field 'version' is 2: written by a newer adaption-fx"),
    (lambda d: d.update(format="pickle"), "field 'format'"),
    (lambda d: d.pop("scheduler"), "field 'scheduler' is missing"),
    (
        lambda d: _group(d).update(weight_decay=0.5),
        "field 'optimizer.param_groups[0].weight_decay' is 0.5, but this run's is 0.02",
    ),
    (lambda d: _group(d).update(lr="fast"), "field 'optimizer.param_groups[0].lr' must be"),
    (lambda d: _group(d).update(params=[0, 1]), "field 'optimizer.param_groups[0].params'"),
    (
        lambda d: d["optimizer"]["param_groups"].append({}),
        "field 'optimizer.param_groups' holds 2 groups, but this run's optimizer has 1",
    ),
    (lambda d: d["optimizer"]["state"].pop("3"), "holds the state of 3 parameters"),
    (lambda d: d["optimizer"]["state"].update({"9": {}}), "holds parameter 9"),
    (lambda d: d["optimizer"]["state"]["0"].pop("exp_avg_sq"), "'optimizer.state.0' holds"),
    (lambda d: d["optimizer"]["state"].update(x={}), "has key 'x', not a parameter index"),
    (lambda d: d["scheduler"].update(last_epoch="2"), "field 'scheduler.last_epoch' must be"),
    (lambda d: d["scheduler"].update(last_epoch=7), "'scheduler.last_epoch' is 7, but the"),
    (lambda d: d["scheduler"].update(lr_lambdas=[{"x": 1}]), "field 'scheduler.lr_lambdas'"),
    (lambda d: d["scheduler"].update(_is_initial=[1]), "field 'scheduler._is_initial' must be"),
    (lambda d: d["scheduler"].update(_last_lr=[1, 2]), "'scheduler._last_lr' has 2 entries"),
    (lambda d: d["python_rng"][1].pop(), "field 'python_rng[1]' has 624 entries, not 625"),
    (lambda d: d["python_rng"][1].__setitem__(5, 2**32), "'python_rng[1][5]' is 4294967296"),
    (lambda d: d["python_rng"][1].__setitem__(5, 1.5), "'python_rng[1][5]' must be an integer"),
    (lambda d: d["python_rng"].__setitem__(2, "x"), "field 'python_rng[2]' must be"),
    (lambda d: d["python_rng"].__setitem__(0, 2), "field 'python_rng[0]' is 2"),
    (lambda d: d.update(torch_rng="optimizer.0.step"), "repeat a name"),
]


@pytest.mark.parametrize(("change", "fragment"), STATE_DAMAGE)
def test_a_damaged_training_state_json_is_refused(adapted, data, stopped, change, fragment):
    path = stopped / "checkpoint-2" / STATE_JSON_FILE
    edit_json(path, change)
    refused(
        adapted, data, stopped, f"cannot resume from {stopped / 'checkpoint-2'}: {path}", fragment
    )


def test_the_state_of_an_earlier_version_is_checked_alike(adapted, data, stopped):
    checkpoint = stopped / "checkpoint-2"
    edit_json(checkpoint / STATE_JSON_FILE, lambda d: _group(d).update(eps=1.0))
    to_legacy(checkpoint)
    refused(
        adapted,
        data,
        stopped,
        f"{checkpoint / LEGACY_STATE_FILE}: field 'optimizer.param_groups[0].eps' is 1.0",
    )


def _tensor_damage(tensors: dict[str, torch.Tensor]) -> None:
    tensors["optimizer.1.exp_avg"] = tensors["optimizer.1.exp_avg"][..., :-1].contiguous()


TENSOR_DAMAGE = [
    (_tensor_damage, "tensor 'optimizer.1.exp_avg' is F32 of shape"),
    (lambda t: t.update({"rng.torch": t["rng.torch"].float()}), "tensor 'rng.torch' is F32"),
    (lambda t: t.update({"rng.torch": t["rng.torch"][:-1].clone()}), "'rng.torch' is U8 of shape"),
    (lambda t: t.update(extra=torch.zeros(1)), "unexpected ['extra']"),
    (lambda t: t.pop("optimizer.2.exp_avg"), "missing ['optimizer.2.exp_avg']"),
    (
        lambda t: t["optimizer.0.exp_avg"].view(-1).__setitem__(0, float("nan")),
        "optimizer.state.0.exp_avg holds NaN or infinite values",
    ),
    (lambda t: t["optimizer.0.exp_avg_sq"].view(-1).__setitem__(0, -1.0), "negative values"),
    (lambda t: t["optimizer.3.step"].fill_(99), "optimizer.state.3.step is 99.0"),
    (lambda t: t["optimizer.3.step"].fill_(1.5), "optimizer.state.3.step is 1.5"),
]


@pytest.mark.parametrize(("change", "fragment"), TENSOR_DAMAGE)
def test_damaged_state_tensors_are_refused(adapted, data, stopped, change, fragment):
    path = stopped / "checkpoint-2" / STATE_TENSORS_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    refused(adapted, data, stopped, str(path), fragment)


def test_a_damaged_safetensors_header_is_refused_before_reading(adapted, data, stopped):
    path = stopped / "checkpoint-2" / STATE_TENSORS_FILE
    good = path.read_bytes()
    length = int.from_bytes(good[:8], "little")
    cases = [
        (b"", "it is 0 bytes long"),
        ((10**12).to_bytes(8, "little") + good[8:], "its header would be 1000000000000 bytes"),
        (good[:8] + b"x" + good[9:], "the safetensors header is not valid JSON"),
        (good[: 8 + length] + good[8 + length :][:-4], "not a readable safetensors file"),
        (good + b"\0" * (2 << 20), "more than the training state of this run's optimizer"),
    ]
    for damaged, fragment in cases:
        path.write_bytes(damaged)
        refused(adapted, data, stopped, str(path), fragment)


def test_a_missing_state_file_is_refused(adapted, data, stopped):
    checkpoint = stopped / "checkpoint-2"
    (checkpoint / STATE_TENSORS_FILE).unlink()
    refused(adapted, data, stopped, f"{checkpoint / STATE_TENSORS_FILE} is missing", "incomplete")
    (checkpoint / STATE_JSON_FILE).unlink()
    refused(adapted, data, stopped, f"{checkpoint} holds no {STATE_JSON_FILE}", "incomplete")


def test_adapter_files_of_another_adapter_are_refused(adapted, data, stopped):
    config = stopped / "checkpoint-2" / "adapter_config.json"
    edit_json(config, lambda d: d.update(adapter_len=5))
    refused(adapted, data, stopped, "the adapter files hold", f"but {TRAINER_STATE_FILE} and")


# ----------------------------------------------------------------------------- trainer state
TRAINER_DAMAGE = [
    (lambda p: p.write_text("{"), f"{TRAINER_STATE_FILE}: the trainer state is not valid JSON"),
    (lambda p: p.write_text("[]"), f"{TRAINER_STATE_FILE} must be an object, got list"),
    (lambda p: edit_json(p, lambda d: d.update(step="2")), "field 'step' must be an integer"),
    (lambda p: edit_json(p, lambda d: d.update(step=3)), "field 'step' is 3, but the directory"),
    (lambda p: edit_json(p, lambda d: d.pop("arguments")), "field 'arguments' is missing"),
    (lambda p: edit_json(p, lambda d: d.update(adapter=None)), "field 'adapter' must be an obj"),
    (lambda p: edit_json(p, lambda d: d.update(tokens=-1)), "field 'tokens' is -1, less than 0"),
    (lambda p: edit_json(p, lambda d: d.update(elapsed_s=-1)), "'elapsed_s' is -1, below 0"),
    (
        lambda p: p.write_text(p.read_text() + " " * (1 << 20)),
        "more than the 1048576 such a file can be",
    ),
]


@pytest.mark.parametrize(("change", "fragment"), TRAINER_DAMAGE)
def test_a_damaged_trainer_state_is_refused(adapted, data, stopped, change, fragment):
    change(stopped / "checkpoint-2" / TRAINER_STATE_FILE)
    message = refused(adapted, data, stopped, fragment, "Nothing was changed")
    # The newest checkpoint is damaged: no silent fallback to checkpoint-1, but the way to it.
    assert "resume from checkpoint-1 instead by moving checkpoint-2 out of" in message


def test_a_damaged_data_order_is_refused(adapted, data, stopped):
    path = stopped / "checkpoint-2" / DATA_ORDER_FILE
    edit_json(path, lambda d: d.update(steps={"0": [1]}))
    refused(adapted, data, stopped, f"{path}: field 'steps' must be a list, got dict")
    edit_json(path, lambda d: d.update(steps=[[[0, 1]]] * 4))
    refused(adapted, data, stopped, "different run", "batch order differs")
    path.unlink()
    refused(adapted, data, stopped, f"{path} is missing")


def test_only_checkpoint_damaged_says_to_start_again(adapted, data, stopped):
    shutil.rmtree(stopped / "checkpoint-1")
    (stopped / "checkpoint-2" / TRAINER_STATE_FILE).write_text("nonsense")
    message = refused(adapted, data, stopped, "Nothing was changed; start again with --overwrite")
    assert "checkpoint-1" not in message


# ----------------------------------------------------------------------------- metrics
def test_damaged_metrics_lines_are_dropped_with_a_warning(
    adapted, data, reference, stopped, caplog
):
    path = stopped / METRICS_FILE
    lines = path.read_text().splitlines(keepends=True)
    lines[1:1] = ['{"kind": "train", "st\n', "[1, 2]\n", '{"kind": "train", "step": "2"}\n']
    path.write_text("".join(lines))
    with caplog.at_level(logging.WARNING, logger="adaption_fx.training.loop"):
        records = read_metrics(stopped)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    warned = [r.getMessage() for r in caplog.records]
    for number in (2, 3, 4):
        assert any(f"{METRICS_FILE}:{number}: " in m and "dropped" in m for m in warned), warned
    fresh_adapter(adapted, seed=1)
    finetune(adapted, data, stopped).run(resume=True)
    assert_same_adapter(stopped, reference)
    # Rewritten on resume without the damaged lines.
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_an_oversized_metrics_file_is_refused(adapted, data, stopped, monkeypatch):
    from adaption_fx.training import loop

    monkeypatch.setattr(loop, "METRICS_MAX_BYTES", 100)
    refused(adapted, data, stopped, f"{stopped / METRICS_FILE} is", "move it out of the run")


# ----------------------------------------------------------------------------- run.json
def test_run_options_cover_every_finetune_option():
    assert RUN_OPTION_TYPES.keys() == {*finetune_defaults(), "data"}


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("{", ["run.json: the run file is not valid JSON"]),
        ('{"cli": []}', ["run.json: field 'cli' must be an object, got list"]),
        ('{"cli": {"data": 5}}', ["field 'cli.data' must be a string, got int 5"]),
        ('{"cli": {"data": "d", "max_length": "512"}}', ["field 'cli.max_length' must be an"]),
        ('{"cli": {"data": "d", "batch_size": 0}}', ["field 'cli.batch_size' is 0, less than 1"]),
        ('{"cli": {"data": "d", "lr": NaN}}', ["run.json: the run file is not valid JSON"]),
        ('{"cli": {"data": "d", "compile": 1}}', ["field 'cli.compile' must be true or false"]),
        ('{"cli": {"data": "d", "val_split": 2}}', ["field 'cli.val_split' is 2, not in (0, 1)"]),
        ("{}" + " " * (1 << 20), ["more than the 1048576 such a file can be"]),
    ],
)
def test_a_damaged_run_json_is_one_clear_line(tmp_path, capsys, content, fragments):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(content)
    code = main(["finetune", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("adaption-fx finetune: error: ") and err.count("\n") == 1, err
    for fragment in [str(out / "run.json"), *fragments]:
        assert fragment in err, (fragment, err)


# ----------------------------------------------------------------------------- dataset files
@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("deep.json", "[" * 100_000 + "]" * 100_000, "deep.json: invalid JSON: values nested"),
        ("deep.jsonl", '{"a": 1}\n' + "[" * 100_000, "deep.jsonl:2: invalid JSON: values nested"),
        ("nan.jsonl", '{"instruction": NaN, "output": "x"}', "nan.jsonl:1: invalid JSON: NaN"),
        (
            "digits.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": '
            + "9" * 5000
            + "}",
            "digits.jsonl:2: invalid JSON",
        ),
        (
            "number.json",
            '[{"instruction": "a", "output": "b"}, {"instruction": 7, "output": "b"}]',
            "number.json, record 1: 'instruction' must be a string, got int 7",
        ),
        (
            "role.jsonl",
            '{"messages": [{"role": ["user"], "content": "x"}]}',
            "role.jsonl:1: messages[0]: role [1 item(s)] is not one of",
        ),
        (
            "long.jsonl",
            '{"instruction": "a", "output": ["' + "x" * 10_000 + '"]}',
            "long.jsonl:1: 'output' must be a string, got list [1 item(s)]",
        ),
    ],
)
def test_a_damaged_dataset_names_the_file_and_the_record(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        read_records(path)
    message = str(caught.value)
    assert fragment in message, message
    assert len(message) < 400, message


def test_a_dataset_that_is_not_utf8_or_not_a_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:3: not UTF-8 text \(byte 0xe9"):
        read_records(path)
    with pytest.raises(DataError, match="is not a regular file"):
        read_records(tmp_path)
