"""Hugging Face's ``Trainer`` with an AdaptedModel: the plain ``transformers.Trainer`` and
``adaption_fx.AdapterTrainer`` (PEFT-format saves), on the installed transformers (the
suite runs on 4.57 and 5.x).

Oracles: a plain PyTorch loop on the batches the Trainer ran (cross-entropy written out
here, the same AdamW), a float64 cross-entropy for ``eval_loss``, PEFT under the same
Trainer (``Trainer(peft_model)``) for the loss convention of Hugging Face's own models,
PEFT loading what ``save_model`` wrote, and the uninterrupted run for a resumed one.

One module-scoped AdaptedModel of a tiny Llama (capturing is the slow part); every test
adds its own adapter with random prompts and non-zero gates (so prompts train from the
first step) and makes it active, so the model always holds several adapters.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import re
import shutil
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_rel_close,
    one_thread,  # noqa: F401 (autouse: this module runs on one thread)
    randomize_adapter,
    tiny_llama,
)
from safetensors.torch import load_file

from adaption_fx import AdaptedModel, AdaptionConfig, rewrite
from adaption_fx.checkpoint import CONFIG_NAME, EXTRAS_NAME, PEFT_KEY_PREFIX, WEIGHTS_NAME

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.utils import find_labels  # noqa: E402

from adaption_fx import AdapterTrainer  # noqa: E402

CONFIG = AdaptionConfig(adapter_len=3, adapter_layers=2)
LR = 0.05
VOCAB = 96
# The Trainer guide's example (docs/guides/training-at-scale.md) is this one.
TRAINER_GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "training-at-scale.md"

_names = itertools.count()


def _examples(n: int, seed: int, first_label: bool = False) -> list[dict[str, torch.Tensor]]:
    """``n`` right-padded rows of 8 tokens with 5 to 8 real tokens. Labels are the tokens,
    with padding ignored and (unless ``first_label``) the first two, a "prompt", ignored
    too, so that transformers 4.57 and 5.x count the same tokens for ``num_items_in_batch``
    (4.57 counts ``labels != -100``, 5.x ``labels[..., 1:] != -100``)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (8,), generator=g)
        mask = torch.ones_like(ids)
        mask[5 + i % 4 :] = 0
        labels = ids.masked_fill(mask == 0, -100)
        if not first_label:
            labels[:2] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


TRAIN = _examples(8, seed=1)
EVAL = _examples(4, seed=2)


@pytest.fixture(scope="module")
def source():
    return tiny_llama()


@pytest.fixture(scope="module")
def model(source):
    return rewrite(source, CONFIG)


def fresh_adapter(model: AdaptedModel, seed: int = 0, config: AdaptionConfig = CONFIG) -> str:
    """Add an adapter with random prompts and non-zero gates and make it active."""
    name = f"t{next(_names)}"
    model.add_adapter(name, config)
    model.set_adapter(name)
    randomize_adapter(model, seed=seed)
    return name


def training_args(out: Path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=4,
        learning_rate=LR,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: the plain loop below does not clip
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


class Recorder:
    """Forward hook: the inputs and the loss of every training forward (autograd on)."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list[tuple[dict[str, torch.Tensor], float]] = []
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if torch.is_grad_enabled():
            batch = {k: kwargs[k].clone() for k in ("input_ids", "attention_mask", "labels")}
            self.calls.append((batch, output.loss.item()))

    def remove(self) -> None:
        self._handle.remove()

    def step_losses(self, per_step: int) -> list[float]:
        losses = [loss for _, loss in self.calls]
        return [sum(losses[i : i + per_step]) for i in range(0, len(losses), per_step)]


def logged_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def adapter_tensors(model: AdaptedModel, name: str | None = None) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.adapter_state_dict(name).items()}


def assert_tensors_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def shifted_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count."""
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((targets != -100).sum())


def plain_loop(model: AdaptedModel, steps: list[list[dict]]) -> list[float]:
    """The oracle: AdamW (the Trainer's settings) on the active adapter, each step's loss
    the mean over all its micro-batches' labelled tokens."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    losses = []
    for micro_batches in steps:
        count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        total = 0.0
        for batch in micro_batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss, _ = shifted_ce_sum(logits.logits, batch["labels"])
            (loss / count).backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / count)
    return losses


# ----------------------------------------------------------------------------- what it reads


def test_forward_signature_and_the_attributes_the_trainer_reads(model, source, tmp_path):
    signature = inspect.signature(model.forward)
    assert list(signature.parameters) == [
        "input_ids",
        "attention_mask",
        "use_cache",
        "labels",
        "num_items_in_batch",
        "adapter_names",
    ]
    assert signature.parameters["use_cache"].default is False  # the captured constant
    assert signature.parameters["labels"].kind is inspect.Parameter.KEYWORD_ONLY
    signature.bind(torch.ones(1, 2, dtype=torch.long))  # input_ids alone is a valid call
    assert find_labels(type(model)) == ["labels"]
    # A bound method's signature comes from its function: check that rebinding works as
    # Accelerate's mixed precision does it.
    rebound = types.MethodType(model.forward.__func__, model)
    batch = {k: v[None] for k, v in TRAIN[0].items()}
    assert torch.equal(rebound(**batch).loss, model(**batch).loss)

    trainer = Trainer(model=model, args=training_args(tmp_path))
    assert trainer.label_names == ["labels"]
    assert trainer.model_accepts_loss_kwargs is True
    assert model.config is source.config
    assert model.generation_config is source.generation_config
    assert model.loss_type == source.loss_type == "ForCausalLM"
    assert model.main_input_name == "input_ids"

    # PreTrainedModel's counting: the base model's parameters plus every adapter's.
    adapters = sum(p.numel() for p in model.adapter_weights.parameters())
    for exclude in (False, True):
        expected = source.num_parameters(exclude_embeddings=exclude) + adapters
        assert model.num_parameters(exclude_embeddings=exclude) == expected
    trainable = sum(p.numel() for p in model.adapter_weights[model.active_adapter].parameters())
    assert model.num_parameters(only_trainable=True) == trainable
    ids = torch.ones(2, 5, dtype=torch.long)
    assert model.floating_point_ops({"input_ids": ids}) == 6 * 10 * model.num_parameters(
        exclude_embeddings=True
    )


def test_only_the_active_adapter_requires_grad(model):
    first = fresh_adapter(model)
    second = fresh_adapter(model)
    for name, weights in model.adapter_weights.items():
        assert all(p.requires_grad == (name == second) for p in weights.parameters()), name
    model.set_adapter(first)
    for name, weights in model.adapter_weights.items():
        assert all(p.requires_grad == (name == first) for p in weights.parameters()), name
    assert not any(p.requires_grad for p in model.base_graph_module.parameters())
    model.delete_adapter(first)  # the first remaining adapter becomes active, and trainable
    active = model.active_adapter
    assert all(p.requires_grad for p in model.adapter_weights[active].parameters())


# ----------------------------------------------------------------------------- training


def test_trainer_trains_the_active_adapter_like_a_plain_loop(model, tmp_path):
    """Gradient accumulation over micro-batches with different token counts: the Trainer's
    per-step losses and final adapter equal a plain loop's on the same batches."""
    name = fresh_adapter(model)
    start = adapter_tensors(model)
    others = {n: adapter_tensors(model, n) for n in model.adapters if n != name}
    base = {k: v.clone() for k, v in model.base_graph_module.named_parameters()}

    args = training_args(tmp_path, gradient_accumulation_steps=2, max_steps=3)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=TRAIN)
    recorder = Recorder(model)
    try:
        trainer.train()
    finally:
        recorder.remove()
    trained = adapter_tensors(model)

    # The optimizer holds exactly the active adapter's tensors.
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.adapter_weights[name].parameters()}
    # Only the active adapter changed; the base weights and the other adapters did not.
    assert all(not torch.equal(trained[k], start[k]) for k in start)
    for other, tensors in others.items():
        assert_tensors_equal(adapter_tensors(model, other), tensors)
    for key, param in model.base_graph_module.named_parameters():
        assert torch.equal(param, base[key]), key

    # The same batches in a plain loop, from the same start.
    batches = [batch for batch, _ in recorder.calls]
    assert len(batches) == 6
    model.load_state_dict(start)
    expected = plain_loop(model, [batches[i : i + 2] for i in range(0, 6, 2)])
    for key, value in trained.items():
        assert_rel_close(value, model.adapter_state_dict()[key], rtol=1e-5)
    for ours, theirs in zip(recorder.step_losses(2), expected, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-5)
    # transformers 4.57 logs losses rounded to 4 decimals; 5.x unrounded.
    assert logged_losses(trainer) == pytest.approx(expected, abs=1e-4)


def test_loss_is_the_one_peft_gets_from_the_same_trainer(model, source, tmp_path):
    """PEFT under the same Trainer, labels on every token (where 4.57 and 5.x count
    ``num_items_in_batch`` differently): the same losses and adapter, on either release."""
    peft = pytest.importorskip("peft")
    data = _examples(8, seed=3, first_label=True)
    fresh_adapter(model, seed=4)
    start = adapter_tensors(model)
    peft_model = peft.get_peft_model(
        copy.deepcopy(source),
        peft.AdaptionPromptConfig(
            adapter_len=CONFIG.adapter_len,
            adapter_layers=CONFIG.adapter_layers,
            task_type="CAUSAL_LM",
        ),
    )
    result = peft_model.load_state_dict(
        {PEFT_KEY_PREFIX + k: v for k, v in start.items()}, strict=False
    )
    assert result.unexpected_keys == []

    losses = {}
    for label, target in (("ours", model), ("peft", peft_model)):
        args = training_args(tmp_path / label, gradient_accumulation_steps=2, max_steps=2)
        trainer = Trainer(model=target, args=args, train_dataset=data)
        trainer.train()
        losses[label] = [logged_losses(trainer), trainer.state.log_history[-1]["train_loss"]]
    assert losses["ours"][0] == losses["peft"][0]  # 4 decimals on 4.57
    assert losses["ours"][1] == pytest.approx(losses["peft"][1], rel=1e-5)
    peft_tensors = {k: v for k, v in peft_model.named_parameters() if ".adaption_" in k}
    for key, value in model.adapter_state_dict().items():
        assert_rel_close(value, peft_tensors[PEFT_KEY_PREFIX + key].detach(), rtol=1e-5)


def test_evaluate_reports_the_mean_token_loss_of_each_batch(model, tmp_path):
    fresh_adapter(model, seed=5)
    trainer = AdapterTrainer(model=model, args=training_args(tmp_path), eval_dataset=EVAL)
    metrics = trainer.evaluate()
    # The Trainer averages the per-batch losses over examples; each batch's is the mean over
    # its labelled tokens (batches of 2, in order).
    expected = []
    with torch.no_grad():
        for i in range(0, len(EVAL), 2):
            rows = EVAL[i : i + 2]
            ids = torch.stack([r["input_ids"] for r in rows])
            mask = torch.stack([r["attention_mask"] for r in rows])
            labels = torch.stack([r["labels"] for r in rows])
            logits = model(input_ids=ids, attention_mask=mask).logits.double()
            loss, count = shifted_ce_sum(logits, labels)
            expected.append(loss.item() / count)
    assert metrics["eval_loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_gradient_checkpointing_changes_nothing(model, tmp_path):
    fresh_adapter(model, seed=6)
    start = adapter_tensors(model)
    results = {}
    try:
        for checkpointing in (False, True):
            model.load_state_dict(start)
            args = training_args(
                tmp_path / str(checkpointing), gradient_checkpointing=checkpointing
            )
            trainer = AdapterTrainer(model=model, args=args, train_dataset=TRAIN)
            recorder = Recorder(model)
            try:
                trainer.train()
            finally:
                recorder.remove()
            assert model.is_gradient_checkpointing is checkpointing
            results[checkpointing] = (recorder.step_losses(1), adapter_tensors(model))
    finally:
        model.gradient_checkpointing_disable()
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for key, value in results[True][1].items():
        assert_rel_close(value, results[False][1][key], rtol=1e-5)


# ----------------------------------------------------------------------------- saving


def test_save_model_writes_the_adapter_in_peft_format(model, source, tmp_path):
    name = fresh_adapter(model, seed=7)  # not "default": it is still saved at the root
    out = tmp_path / "run"
    args = training_args(out, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=TRAIN)
    trainer.train()
    trainer.save_model()  # into output_dir, beside checkpoint-2/
    assert sorted(p.name for p in out.iterdir()) == [
        CONFIG_NAME,
        WEIGHTS_NAME,
        EXTRAS_NAME,
        "checkpoint-2",
        "training_args.bin",
    ]
    assert {CONFIG_NAME, WEIGHTS_NAME} < {p.name for p in (out / "checkpoint-2").iterdir()}

    # Exactly what save_adapter writes for the adapter, and no base weight.
    model.save_adapter(tmp_path / "reference", name)
    reference = tmp_path / "reference" / name
    saved = load_file(out / WEIGHTS_NAME)
    assert sorted(saved) == sorted(PEFT_KEY_PREFIX + k for k in model.adapter_state_dict())
    assert_tensors_equal(saved, load_file(reference / WEIGHTS_NAME))
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config == json.loads((reference / CONFIG_NAME).read_text())

    ids = torch.stack([r["input_ids"] for r in EVAL])
    mask = torch.stack([r["attention_mask"] for r in EVAL])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        peft = pytest.importorskip("peft")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(source), out).eval()
        assert_rel_close(peft_model(input_ids=ids, attention_mask=mask).logits, ours, 1e-5)
        again = rewrite(source, out)
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, ours)


@pytest.mark.parametrize(
    "config",
    [
        CONFIG,
        AdaptionConfig(adapter_len=3, adapter_layers=2, gate="per_head", gate_activation="tanh"),
    ],
    ids=["peft-gate", "tanh-per-head-gate"],
)
def test_plain_trainer_output_loads_with_rewrite_and_load_adapter(model, source, tmp_path, config):
    """``transformers.Trainer``, no subclass: ``save_model`` writes ``model.safetensors``
    (``state_dict()``: the tensors and the adapter's config), which ``rewrite(base, dir)``
    and ``load_adapter`` read as the adapter it is, the gate variant included (the tanh
    gate has the identity gate's shapes: only the config entry tells them apart). Saved
    again with ``save_pretrained``, PEFT loads it."""
    fresh_adapter(model, seed=3, config=config)
    trainer = Trainer(model=model, args=training_args(tmp_path / "run"), train_dataset=TRAIN)
    trainer.train()
    final = tmp_path / "final"
    trainer.save_model(str(final))
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "training_args.bin"]
    trained = adapter_tensors(model)
    ids = torch.stack([r["input_ids"] for r in EVAL])
    mask = torch.stack([r["attention_mask"] for r in EVAL])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        again = rewrite(source, final)
        assert again.adapters == {"default": config}
        assert_tensors_equal(adapter_tensors(again), trained)
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, expected)

        model.load_adapter(final, "from_trainer")
        assert model.adapters["from_trainer"] == config
        assert_tensors_equal(adapter_tensors(model, "from_trainer"), trained)
        model.delete_adapter("from_trainer")

        if config.peft_expressible:
            peft = pytest.importorskip("peft")
            again.save_pretrained(tmp_path / "peft")
            peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(source), tmp_path / "peft")
            logits = peft_model.eval()(input_ids=ids, attention_mask=mask).logits
            assert_rel_close(logits, expected, 1e-5)


@pytest.mark.parametrize("trainer_class", [Trainer, AdapterTrainer])
def test_resumed_run_ends_with_the_uninterrupted_runs_adapter(model, tmp_path, trainer_class):
    """Checkpoints every 2 of 4 steps (linear schedule); a run resumed from checkpoint-2
    takes the same steps and ends with the same adapter. The plain Trainer's checkpoints
    hold the adapter's tensors (``state_dict()``) and nothing else."""
    fresh_adapter(model, seed=8)
    start = adapter_tensors(model)

    def run(out: Path, resume: Path | None = None) -> Trainer:
        args = training_args(out, lr_scheduler_type="linear", save_strategy="steps", save_steps=2)
        trainer = trainer_class(model=model, args=args, train_dataset=TRAIN)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        return trainer

    whole = run(tmp_path / "whole")
    final = adapter_tensors(model)
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    if trainer_class is Trainer:
        assert "model.safetensors" in files and CONFIG_NAME not in files
        assert sorted(load_file(checkpoint / "model.safetensors")) == sorted(model.state_dict())
    else:
        assert {CONFIG_NAME, WEIGHTS_NAME} <= files and "model.safetensors" not in files

    randomize_adapter(model, seed=99)  # the checkpoint, not what the model holds, counts
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    resumed = run(tmp_path / "resumed", resume=tmp_path / "resumed" / "checkpoint-2")
    for key, value in adapter_tensors(model).items():
        assert_rel_close(value, final[key], rtol=1e-6)
    # The resumed history is the checkpoint's (steps 1-2) and the steps it took (3-4).
    assert logged_losses(resumed) == logged_losses(whole)
    assert resumed.state.log_history[-1]["train_loss"] != whole.state.log_history[-1]["train_loss"]
    assert not any(torch.equal(final[k], start[k]) for k in start)


def test_load_best_model_at_end_reads_the_best_adapter_back(model, tmp_path):
    fresh_adapter(model, seed=10)
    args = training_args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,  # the worse of the two: checkpoint-2 here, not the last
    )
    trainer = AdapterTrainer(model=model, args=args, train_dataset=TRAIN, eval_dataset=EVAL)
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-2"
    saved = load_file(best / WEIGHTS_NAME)
    last = load_file(tmp_path / "checkpoint-4" / WEIGHTS_NAME)
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(value, saved[PEFT_KEY_PREFIX + key]), key
        assert not torch.equal(value, last[PEFT_KEY_PREFIX + key]), key


# ----------------------------------------------------------------------------- refusals


class OneBlock(torch.nn.Module):
    """A non-Hugging Face model: one causal SDPA attention block."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, s, d = x.shape

        def split(t):
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return x + self.o(a.transpose(1, 2).reshape(b, s, d))


def test_what_an_adapted_model_cannot_do_is_refused_clearly(model, source, tmp_path):
    fresh_adapter(model, seed=9)
    with pytest.raises(TypeError, match=r"get_input_embeddings\(\).*NEFTune"):
        model.get_input_embeddings()
    with pytest.raises(TypeError, match=r"enable_input_require_grads\(\).*not needed"):
        model.enable_input_require_grads()
    with pytest.raises(TypeError, match=r"resize_token_embeddings\(\).*rewrite\(\)"):
        model.resize_token_embeddings(200)
    with pytest.raises(TypeError, match=r"get_input_embeddings\(\).*neftune_noise_alpha"):
        args = training_args(tmp_path, neftune_noise_alpha=5.0)
        Trainer(model=model, args=args, train_dataset=TRAIN).train()
    with pytest.raises(ValueError, match=r"every_n_layers=2.*not supported"):
        model.activation_checkpointing_enable(every_n_layers=2)
    assert not model.is_gradient_checkpointing
    with pytest.raises(TypeError, match=r"AdapterTrainer trains an adaption_fx.AdaptedModel"):
        AdapterTrainer(model=source, args=training_args(tmp_path))

    out = tmp_path / "refused"
    with pytest.raises(ValueError, match=r"safe_serialization=False.*safetensors only"):
        model.save_pretrained(out, safe_serialization=False)
    with pytest.raises(TypeError, match=re.escape("unsupported arguments ['push_to_hub']")):
        model.save_pretrained(out, push_to_hub=True)
    with pytest.raises(ValueError, match="state_dict does not fit adapter"):
        model.save_pretrained(out, state_dict={"model.embed_tokens.weight": torch.zeros(1)})
    assert not out.exists()
    with pytest.raises(TypeError, match=re.escape("unexpected ['token_type_ids']")):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.zeros(1, 3))

    # A model that is not a Hugging Face one has no config, and no labels= to take.
    torch.manual_seed(0)
    block = OneBlock().eval()
    x = torch.randn(2, 5, 16)
    plain = rewrite(block, AdaptionConfig(adapter_len=2, adapter_layers=1), example_inputs=(x,))
    assert not hasattr(plain, "config")
    assert plain.accepts_loss_kwargs is False
    assert str(inspect.signature(plain.forward)) == "(arg0, /, *, adapter_names=None)"
    assert find_labels(type(plain)) == ["labels"]  # the class is AdaptedModel's
    with pytest.raises(TypeError, match=re.escape("unexpected ['labels']")):
        plain(x, labels=x)


# ----------------------------------------------------------------------------- the guide

GUIDE_EXAMPLE = """\
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from adaption_fx import AdaptionConfig, AdapterTrainer, rewrite

base = LlamaForCausalLM(
    LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
)
model = rewrite(base, AdaptionConfig(adapter_len=4, adapter_layers=2))
rows = torch.randint(0, 100, (16, 12))
data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in rows]
args = TrainingArguments(
    output_dir="run",
    max_steps=4,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    save_steps=2,
    report_to=[],
    use_cpu=True,
)
trainer = AdapterTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
trainer.train()  # only the active adapter's prompts and gates train
print(trainer.evaluate()["eval_loss"])
trainer.save_model("run/final")  # adapter_config.json + adapter_model.safetensors
trainer.train(resume_from_checkpoint="run/checkpoint-2")  # adapter, optimizer, schedule, RNG
tuned = rewrite(base, "run/final")  # or peft.PeftModel.from_pretrained(base, "run/final")
"""


def test_readme_trainer_example_runs(tmp_path, monkeypatch):
    """The Trainer guide's example is this one, and it runs."""
    blocks = re.findall(r"```python\n(.*?)```", TRAINER_GUIDE.read_text(), re.S)
    in_readme = [b for b in blocks if "AdapterTrainer(" in b]
    assert in_readme == [GUIDE_EXAMPLE]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(GUIDE_EXAMPLE, "GUIDE_EXAMPLE", "exec"), namespace)
    final = tmp_path / "run" / "final"
    assert sorted(p.name for p in final.iterdir()) == [
        CONFIG_NAME,
        WEIGHTS_NAME,
        EXTRAS_NAME,
        "training_args.bin",
    ]
    ids = namespace["rows"][:2]
    with torch.no_grad():
        tuned = namespace["tuned"](input_ids=ids).logits
        trained = namespace["model"](input_ids=ids).logits
    assert not torch.equal(tuned, namespace["base"](input_ids=ids).logits)
    assert_rel_close(tuned, trained, rtol=1e-5)  # the resumed run ended where the first did
