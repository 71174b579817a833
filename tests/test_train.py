"""The fine-tuning loop (adaption_fx.training.loop): schedule, data plan, gradient accumulation, the
reported loss, checkpoints (PEFT format, resume bit for bit, refusal of another run's
checkpoint), interruption by SIGINT, and the metrics file and loss plot.

Library calls run on one module-scoped AdaptedModel of a tiny 2-layer Llama (capturing is
the slow part); each test adds its own adapter and makes it active, so the model always
holds several adapters, as a library user's may. Oracles are written here: the
cross-entropy over response tokens from the logits, the schedule's formula, PEFT loading
the saved adapter, and the uninterrupted run for a resumed one.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_rel_close,
    one_thread,  # noqa: F401 (autouse: this module runs on one thread)
    padded_batch,
    response_cross_entropy,
    tiny_llama,
)
from safetensors.torch import load_file
from tokenizers_for_tests import make_tokenizer

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.training import loop as train_module
from adaption_fx.training.data import Example, batch_order, encode_dataset
from adaption_fx.training.loop import (
    ADAPTER_FILES,
    Finetune,
    TrainingArguments,
    TrainingError,
    lr_factor,
    plan_steps,
    read_metrics,
    warmup_steps,
)

VOCAB = 117  # make_tokenizer()'s vocabulary
# The test tokenizer's ids, so that the saved model's generation config agrees with it.
TOKEN_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
CONFIG = AdaptionConfig(adapter_len=3, adapter_layers=2)
LR = 0.05  # large enough that a few steps move the adapter well past float noise
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WEIGHTS = "adapter_model.safetensors"

# Four examples whose responses differ in length, so that micro-batches of two hold
# different numbers of response tokens (a per-micro-batch mean would then differ).
FOUR = [
    ("Say hi", "hi"),
    ("Say hello", "hello there again"),
    ("Add two numbers", "3"),
    ("what is the sum", "the sum is 7 and the answer is yes"),
]
FIVE = [*FOUR, ("Say bye", "bye and thanks")]
VAL = [("Add two numbers", "5"), ("Say hello", "hello")]

_adapter_names = itertools.count()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def base():
    return tiny_llama(vocab_size=VOCAB, num_hidden_layers=2, **TOKEN_IDS)


@pytest.fixture(scope="module")
def adapted(base):
    return rewrite(base, None)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A one-layer model (each process captures it) and the test tokenizer, saved as a
    Hugging Face model directory."""
    path = tmp_path_factory.mktemp("model")
    tiny_llama(vocab_size=VOCAB, num_hidden_layers=1, **TOKEN_IDS).save_pretrained(path)
    make_tokenizer(path)
    return path


# ----------------------------------------------------------------------------- helpers
def fresh_adapter(model, seed: int = 0, config: AdaptionConfig = CONFIG) -> str:
    """Add a new adapter (prompts from ``seed``, zero gates) and make it the active one."""
    name = f"run{next(_adapter_names)}"
    model.add_adapter(name, config, generator=torch.Generator().manual_seed(seed))
    model.set_adapter(name)
    return name


def encode(tokenizer, pairs):
    return encode_dataset([Example.from_alpaca(i, o) for i, o in pairs], tokenizer, 512)


def finetune(model, data, out, val=None, **arguments) -> Finetune:
    args = TrainingArguments(**{"lr": LR, **arguments})
    return Finetune(model, data, val, out, args, pad_token_id=0, progress=False)


def train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if r["kind"] == "train"]


# ----------------------------------------------------------------------------- schedule
def test_lr_factor_warms_up_linearly_then_decays_by_cosine():
    warmup, total = 4, 20
    factors = [lr_factor(step, warmup, total) for step in range(total)]
    # Linear from lr / warmup; the peak at the last warm-up step and the first decay step.
    assert factors[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    for step in range(warmup, total):
        expected = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert factors[step] == pytest.approx(expected, abs=1e-15)
    assert factors[warmup + (total - warmup) // 2] == pytest.approx(0.5, abs=1e-15)
    assert all(a > b for a, b in itertools.pairwise(factors[warmup:]))
    assert 0 < factors[-1] < 0.01  # the last step's rate is close to 0 ...
    assert lr_factor(total, warmup, total) == 0.0  # ... which the cosine reaches after it
    assert lr_factor(0, 0, 10) == 1.0  # no warm-up: the peak at once


def test_warmup_steps_default_is_a_tenth_of_the_run():
    assert warmup_steps(TrainingArguments(), 40) == 4
    assert warmup_steps(TrainingArguments(), 3) == 1  # at least one
    assert warmup_steps(TrainingArguments(warmup_steps=10), 5) == 5  # never past the end
    assert warmup_steps(TrainingArguments(warmup_steps=0), 5) == 0


LENGTHS = [5, 9, 2, 7, 7, 3, 8, 1, 4, 6]


def epochs_of(lengths, batch_size, seed, count):
    return [batch_order(lengths, batch_size, seed, epoch) for epoch in range(count)]


def test_plan_covers_each_example_once_per_epoch_in_grad_accum_groups():
    args = TrainingArguments(epochs=2, batch_size=3, grad_accum=2, seed=4)
    plan = plan_steps(LENGTHS, args)
    first, second = epochs_of(LENGTHS, 3, 4, 2)
    assert len(first) == 4  # 3 + 3 + 3 + 1 examples
    assert [len(step) for step in plan] == [2, 2, 2, 2]
    micro = [batch for step in plan for batch in step]
    assert micro == first + second
    for epoch in (micro[:4], micro[4:]):
        assert sorted(i for batch in epoch for i in batch) == list(range(len(LENGTHS)))
    assert first != second  # reshuffled per epoch

    # The last step of a run by epochs may hold fewer micro-batches.
    args = TrainingArguments(epochs=1, batch_size=3, grad_accum=3, seed=4)
    assert plan_steps(LENGTHS, args) == [first[:3], first[3:]]


def test_plan_max_steps_wins_over_epochs():
    # More steps than one epoch holds: the data repeats, reshuffled each time, and a step
    # spans the end of one epoch and the start of the next.
    args = TrainingArguments(epochs=1, max_steps=7, batch_size=3, grad_accum=3, seed=4)
    plan = plan_steps(LENGTHS, args)
    assert [len(step) for step in plan] == [3] * 7
    epochs = epochs_of(LENGTHS, 3, 4, 6)
    assert [batch for step in plan for batch in step] == [b for e in epochs for b in e][:21]
    assert len({json.dumps(e) for e in epochs}) == 6
    # Fewer steps than the epochs would take.
    args = TrainingArguments(epochs=5, max_steps=1, batch_size=3, grad_accum=2, seed=4)
    assert plan_steps(LENGTHS, args) == [epochs[0][:2]]
    with pytest.raises(TrainingError, match="no training examples"):
        plan_steps([], args)


# ----------------------------------------------------------------------------- the step
def test_grad_accumulation_equals_one_large_batch(adapted, tokenizer, tmp_path):
    data = encode(tokenizer, FOUR)
    results = {}
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        fresh_adapter(adapted, seed=0)
        out = tmp_path / f"{batch_size}x{grad_accum}"
        run = finetune(
            adapted,
            data,
            out,
            max_steps=3,
            batch_size=batch_size,
            grad_accum=grad_accum,
            warmup_steps=1,
        )
        # Four examples: every step of either run is the whole data set, so both runs
        # take the same examples at each step (only their grouping differs).
        for step in run.plan:
            assert sorted(i for batch in step for i in batch) == [0, 1, 2, 3]
        if grad_accum == 2:
            counts = [sum(data[i].response_tokens for i in batch) for batch in run.plan[0]]
            assert counts[0] != counts[1], counts  # the normalisation is put to the test
        run.run()
        results[batch_size] = (
            adapted.adapter_state_dict(),
            [r["loss"] for r in train_records(out)],
        )
    (big, big_losses), (accum, accum_losses) = results[4], results[2]
    assert accum_losses == pytest.approx(big_losses, rel=1e-6)
    assert big.keys() == accum.keys()
    for key in big:
        assert big[key].abs().max() > 0, key  # trained (gates start at zero)
        torch.testing.assert_close(accum[key], big[key], rtol=1e-6, atol=1e-6)


def test_reported_loss_is_the_cross_entropy_over_response_tokens(
    base, adapted, tokenizer, tmp_path
):
    data = encode(tokenizer, FOUR)
    fresh_adapter(adapted)
    out = tmp_path / "run"
    finetune(adapted, data, out, max_steps=3, batch_size=4, save_every=1).run()
    losses = {r["step"]: r["loss"] for r in train_records(out)}
    # Step 1 runs the zero-gated adapter: the base model's own logits.
    assert losses[1] == pytest.approx(response_cross_entropy(base, data), rel=1e-6)
    # Step 3 runs the adapter as checkpoint-2 holds it (each step is the whole data set).
    fresh_adapter(adapted)
    adapted.load_adapter(out / "checkpoint-2", adapted.active_adapter)
    assert all(v.abs().max() > 0 for k, v in adapted.state_dict().items() if "gate" in k)
    assert losses[3] == pytest.approx(response_cross_entropy(adapted, data), rel=1e-6)
    assert losses[3] != pytest.approx(losses[1], rel=1e-3)


def test_training_changes_only_the_active_adapter(adapted, tokenizer, tmp_path):
    other = fresh_adapter(adapted, seed=5)
    with torch.no_grad():
        for param in adapted.adapter_weights[other].parameters():
            param.fill_(0.25)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    active = fresh_adapter(adapted, seed=6)
    run = finetune(adapted, encode(tokenizer, FOUR), tmp_path / "run", max_steps=2, batch_size=4)
    optimized = [p for group in run.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {
        id(p) for p in adapted.adapter_weights[active].parameters()
    }
    run.run()
    assert adapted.active_adapter == active
    for key, value in adapted.adapter_state_dict(other).items():
        assert torch.equal(value, before[key]), key
    # The final adapter at the root of --out is the trained one, whatever its name.
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    trained = adapted.adapter_state_dict()
    assert {k.removeprefix("base_model.model.") for k in saved} == set(trained)
    for key, value in saved.items():
        assert torch.equal(value, trained[key.removeprefix("base_model.model.")]), key


# ----------------------------------------------------------------------------- checkpoints
CHECKPOINT_FILES = {
    *ADAPTER_FILES,
    "training_state.safetensors",
    "training_state.json",
    "trainer_state.json",
    "data_order.json",
}


def test_checkpoints_are_complete_and_the_adapter_loads_in_peft(base, adapted, tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    fresh_adapter(adapted)
    run = finetune(adapted, encode(tokenizer, FOUR), out, max_steps=4, batch_size=2, save_every=2)
    run.run()
    names = {p.name for p in out.iterdir()}
    assert names == {
        "run.json",
        "metrics.jsonl",
        "loss.png",
        *ADAPTER_FILES,
        "checkpoint-2",
        "checkpoint-4",
    }
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["step"] == step and state["total_steps"] == 4
        order = json.loads((checkpoint / "data_order.json").read_text())
        assert order == {"steps": run.plan}
    final = load_file(out / WEIGHTS)
    last = load_file(out / "checkpoint-4" / WEIGHTS)
    assert final.keys() == last.keys()
    assert all(torch.equal(final[k], last[k]) for k in final)

    ids, mask = padded_batch(vocab=VOCAB)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    with torch.no_grad():
        ours = adapted(input_ids=ids, attention_mask=mask).logits
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(theirs, plain, rtol=1e-3, atol=1e-3)  # the adapter matters
    assert_rel_close(ours, theirs, rtol=1e-5)
    # A checkpoint directory is a PEFT adapter too.
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / "checkpoint-2")
    tensors = load_file(out / "checkpoint-2" / WEIGHTS)
    loaded = {k: v for k, v in peft_model.named_parameters() if ".adaption_" in k}
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k].detach(), tensors[k]) for k in tensors)


def test_resume_continues_bit_for_bit(adapted, tokenizer, tmp_path):
    data, val = encode(tokenizer, FIVE), encode(tokenizer, VAL)
    # Five examples in batches of two, two per step: 1.5 steps per epoch, so the
    # checkpoint at step 3 sits inside an epoch and later steps span epochs.
    arguments = dict(max_steps=6, batch_size=2, grad_accum=2, save_every=3, eval_every=2)
    a, b = tmp_path / "a", tmp_path / "b"
    fresh_adapter(adapted, seed=0)
    finetune(adapted, data, a, val, **arguments).run()

    b.mkdir()
    shutil.copytree(a / "checkpoint-3", b / "checkpoint-3")
    for name in ("run.json", "metrics.jsonl"):  # metrics of steps 4-6 too: to be dropped
        shutil.copy(a / name, b / name)
    fresh_adapter(adapted, seed=1)  # other prompts: the checkpoint's must replace them
    run = finetune(adapted, data, b, val, **arguments)
    result = run.run(resume=True)
    assert (result.steps, result.total_steps, result.interrupted) == (6, 6, False)

    final_a, final_b = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key
    state_a, state_b = (
        json.loads((d / "checkpoint-6" / "training_state.json").read_text()) for d in (a, b)
    )
    assert state_a["scheduler"]["last_epoch"] == state_b["scheduler"]["last_epoch"] == 6
    opt_a, opt_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert opt_a == opt_b and len(opt_a) == 2 * CONFIG.adapter_layers
    tensors_a, tensors_b = (
        load_file(d / "checkpoint-6" / "training_state.safetensors") for d in (a, b)
    )
    for index, names in opt_a.items():
        assert tensors_a[names["step"]] == tensors_b[names["step"]] == 6
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(tensors_a[names[moment]], tensors_b[names[moment]]), (index, moment)

    records_a, records_b = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in records_b if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records_b if r["kind"] == "eval"] == [2, 4, 6]
    for ra, rb in zip(records_a, records_b, strict=True):
        for key in ("kind", "step", "loss", "lr", "tokens", "val_loss"):
            assert ra.get(key) == rb.get(key), (ra, rb)
    # This session's token count covers steps 4 to 6 only.
    assert result.tokens == records_b[-2]["tokens"] - records_b[3]["tokens"]
    trainer_a, trainer_b = (
        json.loads((d / "checkpoint-6" / "trainer_state.json").read_text()) for d in (a, b)
    )
    assert trainer_a["tokens"] == trainer_b["tokens"]


def test_resume_refuses_a_checkpoint_of_another_run(adapted, tokenizer, tmp_path):
    data = encode(tokenizer, FOUR)
    out = tmp_path / "run"
    fresh_adapter(adapted)
    finetune(adapted, data, out, max_steps=2, batch_size=2, save_every=1).run()
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    arguments = dict(max_steps=2, batch_size=2, save_every=1)
    cases = [
        ({"lr": 0.01}, data, CONFIG, "lr: checkpoint 0.05, now 0.01"),
        ({"seed": 3}, data, CONFIG, "seed: checkpoint 0, now 3"),
        ({"max_steps": 3}, data, CONFIG, "max_steps: checkpoint 2, now 3"),
        ({"grad_accum": 2}, data, CONFIG, "grad_accum: checkpoint 1, now 2"),
        ({}, encode(tokenizer, FIVE), CONFIG, "the training data"),
        ({}, data, AdaptionConfig(adapter_len=4, adapter_layers=2), "adapter: checkpoint"),
    ]
    for changed, train, config, message in cases:
        fresh_adapter(adapted, config=config)
        run = finetune(adapted, train, out, **{**arguments, **changed})
        with pytest.raises(TrainingError, match="cannot resume") as caught:
            run.run(resume=True)
        assert message in str(caught.value), (message, str(caught.value))
        assert run.step == 0
        # Nothing in the directory was touched (run.json and metrics.jsonl included).
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == kept


# ----------------------------------------------------------------------------- metrics
def test_metrics_records_and_loss_plot(adapted, tokenizer, tmp_path, monkeypatch):
    import matplotlib.image

    drawn = []
    real_draw = train_module.draw_loss_plot

    def spy(records, path):
        drawn.append([r["step"] for r in records if r["kind"] == "eval"])
        return real_draw(records, path)

    monkeypatch.setattr(train_module, "draw_loss_plot", spy)
    data, val = encode(tokenizer, FIVE), encode(tokenizer, VAL)
    out = tmp_path / "run"
    fresh_adapter(adapted)
    run = finetune(adapted, data, out, val, max_steps=3, batch_size=2, eval_every=1)
    result = run.run()
    # Redrawn after each evaluation (then once more at the end).
    assert drawn == [[1], [1, 2], [1, 2, 3], [1, 2, 3]]
    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert matplotlib.image.imread(out / "loss.png").shape[:2] == (400, 700)

    records = read_metrics(out)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1),
        ("eval", 1),
        ("train", 2),
        ("eval", 2),
        ("train", 3),
        ("eval", 3),
    ]
    tokens = 0
    for record in records[::2]:
        assert set(record) == {"kind", "step", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s"}
        step = record["step"]
        assert record["lr"] == LR * lr_factor(step - 1, run.warmup, 3)
        # Every token of the step's examples, prompt included.
        tokens += sum(len(data[i]) for batch in run.plan[step - 1] for i in batch)
        assert record["tokens"] == tokens
        assert record["tokens_per_s"] > 0 and math.isfinite(record["loss"])
    for record in records[1::2]:
        assert set(record) == {"kind", "step", "val_loss", "val_perplexity", "val_tokens"}
        assert record["val_tokens"] == val.response_tokens
        assert record["val_perplexity"] == pytest.approx(math.exp(record["val_loss"]))
    assert records[-1]["val_loss"] == result.val.loss
    assert result.val.loss == pytest.approx(response_cross_entropy(adapted, val), rel=1e-6)
    assert result.train_loss == records[-2]["loss"]
    assert (result.steps, result.tokens) == (3, tokens)


# ----------------------------------------------------------------------------- interruption
def signal_during_step(monkeypatch, at_step: int, *signums: int) -> None:
    """Have the process send itself ``signums`` while optimizer step ``at_step`` runs."""
    real_step = Finetune._train_step

    def step(self, micro_batches):
        result = real_step(self, micro_batches)
        if self.step + 1 == at_step:  # self.step counts the finished steps
            for signum in signums:
                os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(Finetune, "_train_step", step)


def test_sigterm_finishes_the_step_then_checkpoints(adapted, tokenizer, tmp_path, monkeypatch):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal_during_step(monkeypatch, 2, signal.SIGTERM)
    out = tmp_path / "run"
    fresh_adapter(adapted)
    result = finetune(adapted, encode(tokenizer, FOUR), out, max_steps=5, batch_size=2).run()
    assert (result.interrupted, result.steps, result.checkpoint) == (True, 2, out / "checkpoint-2")
    assert [r["step"] for r in train_records(out)] == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not any((out / name).exists() for name in ADAPTER_FILES)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_second_sigint_stops_at_once(adapted, tokenizer, tmp_path, monkeypatch):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal_during_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    out = tmp_path / "run"
    fresh_adapter(adapted)
    run = finetune(adapted, encode(tokenizer, FOUR), out, max_steps=5, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        run.run()
    assert not list(out.glob("checkpoint-*"))  # no checkpoint of a half-done step
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def finetune_process(*args: str, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "adaption_fx", "finetune", "--quiet", *args]
    # One thread: the model is tiny, and OpenMP threads spinning beside other work on a
    # small machine make each step many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def finished_train_steps(out: Path) -> list[int]:
    """Train steps in metrics.jsonl so far (a line being written is skipped)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]  # only lines with their newline
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_sigint_writes_a_checkpoint_and_resume_finishes(saved_model, tmp_path):
    data, val, out = tmp_path / "train.jsonl", tmp_path / "val.jsonl", tmp_path / "out"
    for path, pairs in ((data, FIVE), (val, VAL)):
        path.write_text(
            "".join(json.dumps({"instruction": i, "output": o}) + "\n" for i, o in pairs)
        )
    steps = 12
    # Evaluating (and redrawing the plot) every step keeps the steps slow enough to be
    # interrupted in the middle of the run.
    process = finetune_process(
        "--model",
        str(saved_model),
        "--data",
        str(data),
        "--val-data",
        str(val),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-size",
        "2",
        "--adapter-len",
        "2",
        "--eval-every",
        "1",
        log=tmp_path / "first.log",
    )
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if len(finished_train_steps(out)) >= 2:
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    code = process.wait(timeout=120)
    log = (tmp_path / "first.log").read_text()
    assert code == 130, log
    reached = finished_train_steps(out)
    k = reached[-1]
    assert reached == list(range(1, k + 1)) and 2 <= k < steps, reached
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{k}"]
    state = json.loads((out / f"checkpoint-{k}" / "trainer_state.json").read_text())
    assert state["step"] == k
    assert f"interrupted at step {k} of {steps}" in log
    assert not any((out / name).exists() for name in ADAPTER_FILES)
    assert (out / "loss.png").read_bytes()[:8] == PNG_SIGNATURE  # drawn at the evaluations

    # --resume alone: the rest comes from run.json.
    process = finetune_process("--out", str(out), "--resume", log=tmp_path / "second.log")
    code = process.wait(timeout=120)
    assert code == 0, (tmp_path / "second.log").read_text()
    assert all((out / name).is_file() for name in ADAPTER_FILES)
    records = read_metrics(out)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert [r["step"] for r in records if r["kind"] == "eval"] == list(range(1, steps + 1))
    assert all(a["tokens"] < b["tokens"] for a, b in itertools.pairwise(train))
    warmup = 1  # 10% of 12, rounded
    assert [r["lr"] for r in train] == [9e-3 * lr_factor(s, warmup, steps) for s in range(steps)]
    final = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert final["step"] == steps and final["tokens"] == train[-1]["tokens"]


def test_compiled_training_follows_the_eager_run(adapted, tokenizer, tmp_path):
    # One compile (inductor, dynamic shapes) of the two-layer model: three steps on padded
    # batches of different lengths give the adapter the eager loop gives.
    data = encode(tokenizer, FOUR)
    states = {}
    for compiled in (False, True):
        fresh_adapter(adapted, seed=0)
        finetune(
            adapted, data, tmp_path / str(compiled), max_steps=3, batch_size=2, compile=compiled
        ).run()
        states[compiled] = adapted.adapter_state_dict()
    for key, eager in states[False].items():
        assert eager.abs().max() > 0, key
        torch.testing.assert_close(states[True][key], eager, rtol=1e-5, atol=1e-6)


def test_resuming_a_finished_run_only_republishes(adapted, tokenizer, tmp_path):
    data = encode(tokenizer, FOUR)
    fresh_adapter(adapted)
    out = tmp_path / "run"
    finetune(adapted, data, out, val=data, max_steps=2, batch_size=4).run()
    before = read_metrics(out)
    result = finetune(adapted, data, out, val=data, max_steps=2, batch_size=4).run(resume=True)
    assert result.steps == 2 and not result.interrupted and result.tokens == 0
    assert read_metrics(out) == before  # no second evaluation of the last step
    assert (out / "adapter_model.safetensors").is_file()
