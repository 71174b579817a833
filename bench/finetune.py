"""Fine-tuning throughput (tokens/s): our training loop against the same loop on PEFT's model.

Both contenders fine-tune the embedded SmolLM2-135M-Instruct on the demo task's training
split (``adaption_fx.app.demo_task``), encoded with the model's own tokenizer and chat template:

- ours: ``rewrite(model, None)`` + ``add_adapter``, stepped by ``train.optimizer_step``
  (what ``Finetune`` steps with), the step ``adaption-fx finetune`` takes (AdamW +
  schedule, loss from ``batch_loss_sum``, backward, optimizer step);
- PEFT: ``get_peft_model(AdaptionPromptConfig(...))`` on a deep copy of the same base model,
  with our adapter tensors copied in, stepped by the very same ``optimizer_step`` code with its
  own AdamW and schedule, on the same batches.

Rounds are interleaved: each round runs one optimizer step of each contender on the same
batch, and the contender that goes first alternates. Tokens are the batch's non-padding
tokens, as ``Finetune`` counts them. A contender's tokens/s is the median over rounds; the
ratio is the median of the per-round ratios, so slow drifts of the machine cancel (the
ratio of each contender's best round is a diagnostic: other processes only ever add time).
Each race stops starting rounds after ``--budget-s`` seconds. The two losses of the first
step (identical adapters, identical batch) must agree, which shows that both compute the
same function, so the race is one of equal work.

    python -m bench.finetune                  # the embedded model (2-5 minutes on 2 cores)
    python -m bench.finetune --quick          # tiny random Llama, in-code tokenizer (seconds)
    python -m bench.finetune --adapter-layers 30 8 --steps 6 --repeats 2 --budget-s 0

Results go to ``bench/results/finetune.json`` and ``finetune.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.app.demo_task import make_splits
from adaption_fx.training.data import (
    EncodedDataset,
    collate,
    encode_dataset,
    parse_record,
    resolve_pad_token_id,
)
from adaption_fx.training.loop import (
    Finetune,
    TrainingArguments,
    batch_loss_sum,
    build_optimizer,
    optimizer_step,
)

logger = logging.getLogger("bench.finetune")

PEFT_PREFIX = "base_model.model."
CONTENDERS = ("ours", "peft")


@dataclass
class Config:
    adapter_len: int = 10  # the finetune command's default (the paper's)
    # None: all attention layers, then 8 (a typical partial setting).
    adapter_layers: list[int] | None = None
    batch_size: int = 8  # the finetune command's default
    steps: int = 12  # distinct batches timed: the first ones of a real run's plan
    repeats: int = 1  # passes over those batches; rounds = steps * repeats at most
    warmup: int = 1  # untimed rounds first (their first step is the loss check)
    # A step of the real model takes 2 s on 2 idle cores but 10-20 s when other processes
    # share them: each race stops starting rounds once the next would end past this many
    # seconds (after at least MIN_ROUNDS), which keeps the default run within about 6
    # minutes either way. 0: no limit.
    budget_s: float = 120.0
    train_size: int = 600  # the demo's training split, as the demo trains on it
    max_length: int = 512  # the finetune command's default
    threads: int = 2
    seed: int = 0
    quick: bool = False
    # Only for --quick: the tiny model's size.
    quick_layers: int = 4
    quick_hidden: int = 64


MIN_ROUNDS = 3
QUICK = dict(batch_size=4, steps=2, repeats=1, warmup=1, train_size=40, quick=True)


# --------------------------------------------------------------------- model and data
def quick_tokenizer(texts: Sequence[str]):
    """A word-level fast tokenizer with a ChatML template, covering ``texts``.

    Built in code so the quick run needs neither the model wheel nor a download; the chat
    template makes it take the same encoding path as the real tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    piece = r"\s|\w+|[^\w\s]"
    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    words = {"system", "user", "assistant", "\n", " "}
    for text in texts:
        words.update(re.findall(piece, text))
    vocab = {token: i for i, token in enumerate(special + sorted(words))}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(piece), behavior="isolated")
    raw.decoder = decoders.Fuse()
    raw.add_special_tokens(special)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def quick_model(cfg: Config, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.quick_hidden,
            intermediate_size=cfg.quick_hidden * 3 // 2,
            num_hidden_layers=cfg.quick_layers,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query, like SmolLM2
            max_position_embeddings=512,
        )
    ).eval()


def load(cfg: Config, records: list[dict[str, str]]) -> tuple[Any, Any, str]:
    """(model, tokenizer, source): the embedded model, or a tiny one with --quick."""
    if cfg.quick:
        texts = [text for record in records for text in record.values()]
        tokenizer = quick_tokenizer(texts)
        return quick_model(cfg, len(tokenizer)), tokenizer, "tiny random Llama (--quick)"
    from transformers.utils import logging as hf_logging

    from adaption_fx.app.pretrained import load_pretrained

    # transformers' own progress bars would bury the benchmark's output (its GGUF
    # de-quantisation bar is a plain tqdm and still shows); restored after.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        loaded = load_pretrained(None)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    logger.info("loaded %s in %.1f s", loaded.source, loaded.seconds)
    return loaded.model, loaded.tokenizer, loaded.source


def demo_train_data(cfg: Config, tokenizer: Any, records: list[dict[str, str]]) -> EncodedDataset:
    examples = [parse_record(r, f"demo train, record {i}") for i, r in enumerate(records)]
    return encode_dataset(examples, tokenizer, cfg.max_length)


# --------------------------------------------------------------------- the two contenders
def training_arguments(cfg: Config, total_steps: int) -> TrainingArguments:
    # The finetune command's defaults (lr 9e-3, weight decay 0.02, warm-up 10%) over a run
    # exactly as long as the benchmark, so the schedule is a real run's.
    return TrainingArguments(max_steps=total_steps, batch_size=cfg.batch_size, seed=cfg.seed)


def nonzero_gates(ours: Any, seed: int) -> dict[str, torch.Tensor]:
    """Give the active adapter small non-zero gates (prompts keep their initialisation).

    With the zero-initialised gates both models equal the base model, and the loss check
    would prove nothing about the adapter paths; the work per step is the same either way.
    Small (0.01), as a run's gates are early on: larger ones over 30 layers of N(0, 1)
    prompts wreck the model (loss 10 instead of 2.4).
    """
    g = torch.Generator().manual_seed(seed)
    state = {
        k: (torch.randn(v.shape, generator=g) * 0.01 if k.endswith("adaption_gate") else v)
        for k, v in ours.adapter_state_dict().items()
    }
    ours.load_state_dict(state)
    return {k: v.detach().clone() for k, v in ours.adapter_state_dict().items()}


def peft_model_for(pristine: Any, adapter_len: int, layers: int, state: dict[str, torch.Tensor]):
    """PEFT's adapted model on a copy of ``pristine`` (PEFT wraps modules in place), holding
    exactly our adapter tensors."""
    from peft import AdaptionPromptConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(pristine),
        AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=layers, task_type="CAUSAL_LM"),
    )
    peft_state = {PEFT_PREFIX + k: v for k, v in state.items()}
    result = peft_model.load_state_dict(peft_state, strict=False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    if result.unexpected_keys or trainable != set(peft_state):
        raise RuntimeError(
            f"PEFT's adapter does not match ours: unexpected {result.unexpected_keys}, "
            f"trainable {sorted(trainable ^ set(peft_state))[:6]}"
        )
    return peft_model


Stepper = Callable[[list[list[int]]], tuple[float, int]]


def stepper(forward: Any, optimizer: Any, scheduler: Any, run: Finetune) -> Stepper:
    """One optimizer step on a run's micro-batches through ``train.optimizer_step``, the
    function ``Finetune`` steps with, so both contenders run the same step code."""

    def step(micro_batches: list[list[int]]) -> tuple[float, int]:
        batches = [
            collate([run.train_data[i] for i in mb], run.pad_token_id) for mb in micro_batches
        ]
        return optimizer_step(forward, optimizer, scheduler, batches)

    return step


def peft_stepper(peft_model: Any, run: Finetune) -> Stepper:
    """The step for PEFT's model, with an AdamW and schedule built as ``Finetune`` builds
    them (``Finetune`` itself only takes an AdaptedModel)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, run.args, run.warmup, run.total_steps)
    return stepper(peft_model, optimizer, scheduler, run)


def base_model_loss(run: Finetune, micro_batches: list[list[int]]) -> float:
    """The first step's loss without the adapter: how far the adapter moves it says how
    much the loss check between the contenders proves."""
    total, count = 0.0, 0
    with torch.no_grad(), run.model.disable_adapter():
        for indices in micro_batches:
            batch = collate([run.train_data[i] for i in indices], run.pad_token_id)
            loss, n = batch_loss_sum(run.forward, batch)
            total, count = total + loss.item(), count + n
    return total / count


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def race(
    steppers: dict[str, Any], batches: list[list[list[int]]], warmup: int, budget_s: float
) -> dict[str, Any]:
    """One step of each contender per batch, alternating which goes first; the first
    ``warmup`` rounds are untimed, and no round starts that would likely end past
    ``budget_s`` seconds of timed rounds (0: no limit)."""
    seconds: dict[str, list[float]] = {k: [] for k in steppers}
    cpu: dict[str, list[float]] = {k: [] for k in steppers}
    tokens: dict[str, list[int]] = {k: [] for k in steppers}
    losses: dict[str, list[float]] = {k: [] for k in steppers}
    names = list(steppers)
    timed_started = 0.0
    for index, micro_batches in enumerate(batches):
        done = index - warmup
        if index == warmup:
            timed_started = time.perf_counter()
        elif budget_s and done >= MIN_ROUNDS:
            spent = time.perf_counter() - timed_started
            if spent + spent / done > budget_s:
                break
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            started, cpu_started = time.perf_counter(), time.process_time()
            loss, seen = steppers[name](micro_batches)
            elapsed = time.perf_counter() - started
            cpu_elapsed = time.process_time() - cpu_started
            losses[name].append(loss)
            if index >= warmup:
                seconds[name].append(elapsed)
                cpu[name].append(cpu_elapsed)
                tokens[name].append(seen)
    return {"seconds": seconds, "cpu": cpu, "tokens": tokens, "losses": losses}


def section(
    cfg: Config, ours: Any, pristine: Any, train: EncodedDataset, pad_id: int, layers: int
) -> dict[str, Any]:
    name = f"bench-{layers}"
    ours.add_adapter(
        name,
        AdaptionConfig(adapter_len=cfg.adapter_len, adapter_layers=layers),
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    ours.set_adapter(name)
    try:
        state = nonzero_gates(ours, cfg.seed + layers)
        peft_model = peft_model_for(pristine, cfg.adapter_len, layers, state)
        rounds = cfg.warmup + cfg.steps * cfg.repeats
        with tempfile.TemporaryDirectory() as out:
            # Finetune writes nothing until run(); the directory only satisfies its signature.
            run = Finetune(
                ours, train, None, out, training_arguments(cfg, rounds), pad_id, progress=False
            )
            # The batches a real run starts with (its plan), the timed ones repeated.
            timed = run.plan[cfg.warmup : cfg.warmup + cfg.steps]
            batches = run.plan[: cfg.warmup] + timed * cfg.repeats
            base_loss = base_model_loss(run, batches[0])
            ours.train()
            peft_model.train()  # as Finetune.run puts ours in training mode
            started = time.perf_counter()
            steppers = {
                "ours": stepper(run.forward, run.optimizer, run.scheduler, run),
                "peft": peft_stepper(peft_model, run),
            }
            raced = race(steppers, batches, cfg.warmup, cfg.budget_s)
            logger.info(
                "adapter_layers=%d: %d rounds in %.1f s",
                layers,
                len(raced["losses"]["ours"]),
                time.perf_counter() - started,
            )
    finally:
        ours.eval()
        ours.delete_adapter(name)
    seconds, cpu, tokens, losses = (raced[k] for k in ("seconds", "cpu", "tokens", "losses"))
    if tokens["ours"] != tokens["peft"]:
        raise RuntimeError("the contenders saw different batches")
    tps = {k: [n / s for n, s in zip(tokens[k], seconds[k], strict=True)] for k in CONTENDERS}
    return {
        "adapter_layers": layers,
        "rounds": len(seconds["ours"]),
        "tokens_per_s": {k: statistics.median(v) for k, v in tps.items()},
        "step_ms": {k: 1000 * statistics.median(v) for k, v in seconds.items()},
        # Throughput ratio: above 1, ours trains faster.
        "ours/peft tokens_per_s": statistics.median(
            a / b for a, b in zip(tps["ours"], tps["peft"], strict=True)
        ),
        # Diagnostic: each contender's best round (the least disturbed by other processes,
        # which only ever add time), compared.
        "ours/peft best rounds": max(tps["ours"]) / max(tps["peft"]),
        # Diagnostic: the same ratio from the CPU time the process spent (all threads).
        # Other processes on a shared machine inflate wall time when they deschedule ours,
        # CPU time much less, so where the two ratios disagree the wall-time one is noise.
        "ours/peft by cpu time": statistics.median(
            b / a for a, b in zip(cpu["ours"], cpu["peft"], strict=True)
        ),
        "tokens_per_step": statistics.median(tokens["ours"]),
        "first_loss": {k: losses[k][0] for k in CONTENDERS},
        "first_loss_rel_diff": rel_diff(losses["ours"][0], losses["peft"][0]),
        # Against the base model's loss on that batch: the size of the adapter's effect.
        "base_first_loss": base_loss,
        "adapter_effect_rel": rel_diff(losses["ours"][0], base_loss),
        # Diagnostic: after all the steps the two runs still train the same function.
        "last_loss_rel_diff": rel_diff(losses["ours"][-1], losses["peft"][-1]),
        "trainable_parameters": sum(v.numel() for v in state.values()),
        # Diagnostic: all timed tokens over all timed seconds, and the raw rounds.
        "aggregate_tokens_per_s": {k: sum(tokens[k]) / sum(seconds[k]) for k in CONTENDERS},
        "per_round": {"tokens": tokens["ours"], "seconds": seconds, "cpu_seconds": cpu},
    }


# --------------------------------------------------------------------- report
def table(results: dict[str, Any]) -> str:
    lines = [
        "| adapter layers | ours tokens/s | PEFT tokens/s | ours / PEFT tokens/s (median of "
        "per-round ratios) | ours / PEFT, best rounds (diagnostic) | timed rounds "
        "| first-step loss rel. diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        layers = f"{r['adapter_layers']} of {results['model']['layers']}"
        lines.append(
            f"| {layers} | {r['tokens_per_s']['ours']:.0f} | {r['tokens_per_s']['peft']:.0f} "
            f"| {r['ours/peft tokens_per_s']:.3f} | {r['ours/peft best rounds']:.3f} "
            f"| {r['rounds']} | {r['first_loss_rel_diff']:.1e} |"
        )
    cfg = results["config"]
    lines.append("")
    lines.append(
        f"{results['model']['source'].rsplit('/', 1)[-1]}, demo task train split, batch "
        f"{cfg['batch_size']} (median {results['runs'][0]['tokens_per_step']:.0f} tokens), "
        f"adapter_len {cfg['adapter_len']}, {cfg['warmup']} warm-up round, "
        f"{cfg['threads']} threads, CPU; tokens/s: median over rounds."
    )
    return "\n".join(lines)


def run_benchmark(cfg: Config) -> dict[str, Any]:
    from bench.common import machine

    torch.set_num_threads(cfg.threads)
    records = make_splits(train_size=cfg.train_size, seed=cfg.seed).train
    model, tokenizer, source = load(cfg, records)
    started = time.perf_counter()
    train = demo_train_data(cfg, tokenizer, records)
    logger.info("encoded %d examples in %.1f s", len(train), time.perf_counter() - started)
    # PEFT gets copies of this untouched model; rewrite freezes the original's weights and
    # shares them with our AdaptedModel.
    pristine = copy.deepcopy(model)
    started = time.perf_counter()
    ours = rewrite(model, None)
    logger.info("captured the model in %.1f s", time.perf_counter() - started)
    num_layers = len(ours.sites)
    layer_counts = cfg.adapter_layers or [num_layers, min(8, max(1, num_layers // 2))]
    if any(not 1 <= n <= num_layers for n in layer_counts):
        raise ValueError(f"--adapter-layers must lie in 1..{num_layers}, got {layer_counts}")
    pad_id = resolve_pad_token_id(tokenizer)
    runs = [section(cfg, ours, pristine, train, pad_id, n) for n in layer_counts]
    return {
        "config": asdict(cfg),
        "machine": machine(),
        "model": {
            "source": source,
            "layers": num_layers,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "data": {"examples": len(train), "response_tokens": train.response_tokens},
        "contenders": list(CONTENDERS),
        "runs": runs,
        "max_first_loss_rel_diff": max(r["first_loss_rel_diff"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.finetune", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny random model (seconds)")
    parser.add_argument("--steps", type=int, help="distinct batches timed (12)")
    parser.add_argument("--repeats", type=int, help="passes over those batches (1)")
    parser.add_argument(
        "--budget-s", type=float, help="seconds of timed rounds per race, at most (120; 0: all)"
    )
    parser.add_argument("--warmup", type=int, help="untimed rounds first (1)")
    parser.add_argument(
        "--adapter-layers", type=int, nargs="+", help="adapted layers, one race each (all, 8)"
    )
    parser.add_argument("--adapter-len", type=int, help="prompt tokens per layer (10)")
    parser.add_argument("--batch-size", type=int, help="examples per step (8)")
    parser.add_argument("--threads", type=int, help="torch threads (2)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    values = asdict(Config())
    if args.quick:
        values.update(QUICK)
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    cfg = Config(**values)
    for name in ("steps", "repeats", "batch_size", "adapter_len", "threads"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.budget_s < 0:
        parser.error("--budget-s must be >= 0")
    if cfg.warmup < 1:
        parser.error("--warmup must be >= 1 (its first step is the loss check)")
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logger.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    results = run_benchmark(cfg)
    results["seconds"] = time.perf_counter() - started
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "finetune.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
